//! The contract suite: what every [`Backend`] must do, and what
//! [`CacheAside`] must do on every backend.
//!
//! Each function takes a fresh [`Subject`] and panics on a violation. Run
//! them all with `keel_testkit::contract_tests!`:
//!
//! ```ignore
//! keel_testkit::contract_tests! {
//!     factory: || async { (keel_cache::testing::Subject::memory(), ()) },
//!     suite: keel_cache::testing,
//!     tests: [get_set_delete, missing_keys, /* … */],
//! }
//! ```
//!
//! Subjects must use the default size limits
//! ([`DEFAULT_MAX_KEY_BYTES`](crate::DEFAULT_MAX_KEY_BYTES),
//! [`DEFAULT_MAX_VALUE_BYTES`](crate::DEFAULT_MAX_VALUE_BYTES)) and a key
//! prefix of their own (no other test may use it).

use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_core::{Cache, ErrorKind};

use crate::{Backend, CacheAside, MemoryCache};

mod aside;
mod backend;

pub use aside::*;
pub use backend::*;

/// What a contract test runs against: one store seen from two "processes",
/// and a neighbour on the same server under another key prefix.
#[derive(Clone)]
pub struct Subject {
    /// The backend under test ("process one").
    pub cache: Arc<dyn Backend>,
    /// The same store through keel-core's port.
    pub port: Arc<dyn Cache>,
    /// The same keys through a separate connection ("process two").
    pub peer: Arc<dyn Backend>,
    /// The same server under a different key prefix.
    pub neighbour: Arc<dyn Backend>,
}

impl std::fmt::Debug for Subject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subject")
            .field("cache", &self.cache)
            .field("peer", &self.peer)
            .field("neighbour", &self.neighbour)
            .finish_non_exhaustive()
    }
}

impl Subject {
    /// A subject from a backend, a second connection to the same keys, and
    /// a third under another prefix.
    pub fn new<B: Backend + Cache + Clone>(cache: B, peer: B, neighbour: B) -> Self {
        Self {
            port: Arc::new(cache.clone()),
            cache: Arc::new(cache),
            peer: Arc::new(peer),
            neighbour: Arc::new(neighbour),
        }
    }

    /// A subject on a fresh [`MemoryCache`] (clones share entries, so a clone
    /// is the second "process").
    #[must_use]
    pub fn memory() -> Self {
        let store = MemoryCache::new();
        let cache = store.with_prefix("a:");
        Self::new(cache.clone(), cache, store.with_prefix("b:"))
    }

    fn aside(&self, namespace: &str) -> crate::CacheAsideBuilder {
        CacheAside::builder_shared(self.cache.clone(), namespace)
    }

    fn peer_aside(&self, namespace: &str) -> crate::CacheAsideBuilder {
        CacheAside::builder_shared(self.peer.clone(), namespace)
    }
}

/// Polls `check` every 10 ms until it holds or `within` passes.
async fn eventually<F, Fut>(within: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn kind(e: &keel_core::Error) -> ErrorKind {
    e.kind()
}
