//! [`CacheAside`]: typed cache-aside reads and writes with a policy.

mod builder;
mod flight;
mod lock;
mod store;
#[cfg(test)]
mod tests;
mod versions;

use std::fmt;
use std::future::Future;
use std::ops::Deref;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock, Weak};
use std::time::{Duration, Instant};

use keel_telemetry::KeelMetrics;
use keel_telemetry::metrics::{CacheMetrics, CacheTier};
use rand::Rng;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::task::AbortHandle;

use self::flight::{Flights, Lead, Role};
use crate::backend::{Backend, Notice, Subscription};
use crate::error::{CacheError, Result};
use crate::stats::{CacheStats, Counters, bump};

pub use self::builder::CacheAsideBuilder;
use self::builder::Policy;
use self::store::*;
use self::versions::*;

/// The default longest key accepted by a [`CacheAside`], in bytes.
pub const DEFAULT_MAX_KEY_LEN: usize = 512;

/// The default largest serialized value a [`CacheAside`] stores.
pub const DEFAULT_MAX_VALUE_LEN: usize = 4 * 1024 * 1024;

/// The longest namespace name.
pub const MAX_NAMESPACE_LEN: usize = 64;

/// Envelope tags: the first byte of every stored value.
const TAG_NOT_FOUND: u8 = 0;
const TAG_VALUE: u8 = 1;

/// One logical cache (a namespace, e.g. `users`) with its policy, over a
/// shared [`Backend`].
///
/// * [`get_or_load`](Self::get_or_load): cache-aside reads. Concurrent misses
///   for one key run the loader once per process (single flight) and, with
///   the distributed lock (on by default), once across processes.
/// * TTL with jitter, optional negative caching of "not found", an optional
///   in-process tier whose copies other processes invalidate over pub/sub.
/// * [`invalidate_all`](Self::invalidate_all) bumps the namespace's version:
///   every key in it is gone at once, without `SCAN` or `KEYS`.
/// * A failing or slow backend never fails a read: after
///   [`timeout`](CacheAsideBuilder::timeout) the loader answers, and the
///   failure is counted in [`stats`](Self::stats) and logged.
///
/// Cheap to clone; clones share everything.
///
/// # Evictions during a load
///
/// A load can read the database just before a write commits and finish
/// just after the writer's [`invalidate`](Self::invalidate); storing its
/// value then would keep the old state cached for a whole TTL. So each key
/// has an *eviction fence* in the backend (`{namespace}:_fence:{key}`, a
/// random token living [`max_load_time`](CacheAsideBuilder::max_load_time)):
///
/// * the caller that loads reads the fence before calling the loader
///   (creating it when absent);
/// * [`invalidate`](Self::invalidate), [`invalidate_many`](Self::invalidate_many)
///   and [`set`](Self::set) give the fence a new token in the same atomic
///   step as the removal or write; [`invalidate_all`](Self::invalidate_all)
///   changes the namespace version;
/// * the fill stores the loaded value only if the fence still holds the
///   token read before the load and the namespace version is unchanged,
///   checked and written in one atomic step (a Lua script on Redis).
///
/// The guarantee: once an eviction of a key has returned `Ok`, no value
/// whose load began before it is stored under the key, by any process
/// sharing the backend, nor kept in this process's local tier. A refused
/// fill is counted in [`CacheStats::stale_fills`]; its caller still gets
/// the loaded value. Callers arriving after an eviction in this process do
/// not join a load that began before it (other processes stop joining
/// theirs when the eviction's broadcast arrives). Loads taking longer than
/// `max_load_time` may not be cached (their fence may have expired), and a
/// fill refused without an eviction (the fence expired) only costs a later
/// miss. Other processes' local tiers and namespace versions still follow
/// pub/sub, as before (bounded by the local TTL and
/// [`version_refresh`](CacheAsideBuilder::version_refresh)).
///
/// Cost: hits are unchanged (one `GET`, or none from the local tier). A
/// miss that loads costs one more round trip (reading the fence, a small
/// script) and fills with a script that checks two keys instead of a plain
/// `SET`; `set` and the invalidations are one `MULTI`/`EXEC` round trip
/// instead of one command.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), keel_core::Error> {
/// use std::time::Duration;
/// use keel_cache::{CacheAside, MemoryCache};
///
/// let users = CacheAside::builder(MemoryCache::new(), "users")
///     .ttl(Duration::from_secs(300))
///     .negative_ttl(Duration::from_secs(30))
///     .build()
///     .await?;
///
/// let name: Option<String> = users
///     .get_or_load_optional("42", || async { Ok::<_, keel_core::Error>(Some("Ada".to_owned())) })
///     .await?;
/// assert_eq!(name.as_deref(), Some("Ada"));
/// assert_eq!(users.stats().loads, 1);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct CacheAside {
    inner: Arc<Inner>,
}

impl fmt::Debug for CacheAside {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CacheAside")
            .field("namespace", &self.inner.namespace)
            .field("backend", &self.inner.backend)
            .field("policy", &self.inner.policy)
            .finish_non_exhaustive()
    }
}

struct NamespaceVersion {
    token: Arc<str>,
    /// When the token was last read from the backend; `None`: read it now.
    checked_at: Option<Instant>,
    /// Bumped by every change pushed over pub/sub, so a refresh that read
    /// the backend before the change does not overwrite it.
    generation: u64,
}

struct Inner {
    backend: Arc<dyn Backend>,
    namespace: String,
    version_key: String,
    /// Tells this instance's own broadcasts apart.
    origin: String,
    policy: Policy,
    /// Whether the backend ends every read within `policy.timeout` by
    /// itself, so reads need no timer of ours.
    read_bounded: bool,
    version: RwLock<NamespaceVersion>,
    /// Whether the version may be used without looking at the clock: set
    /// by every read of the version, cleared every `version_refresh` by the
    /// ticker task (and when pub/sub messages may have been lost). Saves a
    /// clock read per lookup.
    version_fresh: AtomicBool,
    /// Whether the ticker task runs; once it stops (its runtime shut down)
    /// lookups go back to comparing `checked_at` with the clock.
    ticking: AtomicBool,
    refreshing: AtomicBool,
    /// Bumped (after the backend changed) by every eviction or write that
    /// may make local copies stale. A local copy of a value read or loaded
    /// from the backend is kept only if no bump happened since just before
    /// that read or load, so a value read before an eviction is not kept
    /// locally after it.
    local_epoch: AtomicU64,
    local: Option<moka::sync::Cache<String, Arc<[u8]>>>,
    flights: Flights,
    counters: Counters,
    /// `keel.cache.hits` / `keel.cache.misses`, bound to the namespace.
    metrics: CacheMetrics,
    /// Whether the last backend operation failed; logs only transitions at
    /// warn level so an outage does not flood the logs.
    failing: AtomicBool,
    listener: OnceLock<AbortHandle>,
    ticker: OnceLock<AbortHandle>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        for task in [self.listener.get(), self.ticker.get()]
            .into_iter()
            .flatten()
        {
            task.abort();
        }
    }
}

/// How the leader of a flight got its value.
enum Source<T> {
    /// From the cache after all (another flight or process filled it).
    Cache(Decoded<T>, Arc<[u8]>),
    /// From the loader.
    Loaded,
}

impl CacheAside {
    /// Starts building a cache for `namespace` (1 to 64 characters of
    /// `A-Z a-z 0-9 - _ .`) on `backend`.
    pub fn builder(backend: impl Backend, namespace: impl Into<String>) -> CacheAsideBuilder {
        Self::builder_shared(Arc::new(backend), namespace)
    }

    /// [`builder`](Self::builder) for a backend already behind an `Arc`.
    pub fn builder_shared(
        backend: Arc<dyn Backend>,
        namespace: impl Into<String>,
    ) -> CacheAsideBuilder {
        CacheAsideBuilder {
            backend,
            namespace: namespace.into(),
            policy: Policy::default(),
            metrics: None,
        }
    }

    /// The namespace.
    #[must_use]
    pub fn namespace(&self) -> &str {
        &self.inner.namespace
    }

    /// A snapshot of the counters.
    #[must_use]
    pub fn stats(&self) -> CacheStats {
        self.inner.counters.snapshot()
    }

    /// The cached value, if any. A cached "not found", a value that no
    /// longer decodes (it is removed) and a failing backend are all `None`.
    pub async fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        let inner = &self.inner;
        inner.check_key(key)?;
        let data_key = inner.data_key(&inner.current_token().await, key);
        Ok(match self.read::<T>(&data_key).await {
            Some(Decoded::Value(v)) => Some(v),
            _ => None,
        })
    }

    /// Looks up, counts, and removes undecodable entries. `None`: a miss.
    async fn read<T: DeserializeOwned>(&self, data_key: &str) -> Option<Decoded<T>> {
        let inner = &self.inner;
        let (envelope, local) = match inner.lookup(data_key).await {
            Lookup::Hit { envelope, local } => (envelope, local),
            Lookup::Missing | Lookup::Failed => {
                inner.missed();
                return None;
            }
        };
        match decode::<T>(&envelope) {
            Decoded::Invalid => {
                inner.missed();
                inner.discard(data_key).await;
                None
            }
            decoded => {
                inner.hit(local);
                Some(decoded)
            }
        }
    }

    /// Cache-aside read: the cached value, or else `load`'s, which is then
    /// cached with the policy's TTL.
    ///
    /// Concurrent calls for one key in this process share one `load` (single
    /// flight); with the distributed lock, processes share it too. A value
    /// whose key is evicted while it loads is returned but not cached (see
    /// "Evictions during a load" above). If the
    /// backend fails or is slow, `load` answers after at most the timeout,
    /// and nothing fails. A `load` error is returned (to the other waiting
    /// callers as [`CacheError::LoadFailed`]) and nothing is cached.
    ///
    /// Bad keys are refused with [`CacheError::EmptyKey`] or
    /// [`CacheError::KeyTooLong`], converted into `E`.
    pub async fn get_or_load<T, E, F, Fut>(&self, key: &str, load: F) -> Result<T, E>
    where
        T: Serialize + DeserializeOwned,
        E: From<CacheError> + fmt::Display,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let found = self
            .fetch(key, false, || async { load().await.map(Some) })
            .await?;
        // `fetch` with `accept_not_found: false` treats cached "not found"s
        // as misses, and this loader never returns `None`.
        found.ok_or_else(|| {
            E::from(CacheError::LoadFailed {
                key: key.to_owned(),
                reason: "the load returned no value".into(),
            })
        })
    }

    /// Like [`get_or_load`](Self::get_or_load) for records that may not
    /// exist: `load` returns `Ok(None)` for "not found", which is cached for
    /// the [`negative_ttl`](CacheAsideBuilder::negative_ttl) when one is set
    /// (and not cached otherwise).
    pub async fn get_or_load_optional<T, E, F, Fut>(
        &self,
        key: &str,
        load: F,
    ) -> Result<Option<T>, E>
    where
        T: Serialize + DeserializeOwned,
        E: From<CacheError> + fmt::Display,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<T>, E>>,
    {
        self.fetch(key, true, load).await
    }

    /// `accept_not_found`: whether a cached "not found" answers the call
    /// (`get_or_load_optional`) or counts as a miss (`get_or_load`).
    async fn fetch<T, E, F, Fut>(
        &self,
        key: &str,
        accept_not_found: bool,
        load: F,
    ) -> Result<Option<T>, E>
    where
        T: Serialize + DeserializeOwned,
        E: From<CacheError> + fmt::Display,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<T>, E>>,
    {
        let inner = &self.inner;
        inner.check_key(key)?;
        let data_key = inner.data_key(&inner.current_token().await, key);
        let backend_up = match inner.lookup(&data_key).await {
            Lookup::Hit { envelope, local } => match decode::<T>(&envelope) {
                Decoded::Invalid => {
                    inner.discard(&data_key).await;
                    true
                }
                Decoded::NotFound if !accept_not_found => true,
                decoded => {
                    inner.hit(local);
                    return Ok(match decoded {
                        Decoded::Value(v) => Some(v),
                        _ => None,
                    });
                }
            },
            Lookup::Missing => true,
            Lookup::Failed => false,
        };
        // Boxed: the miss path (single flight, lock, loader, fill) is most
        // of this future's size, and every hit would otherwise carry it.
        Box::pin(self.miss(key, &data_key, backend_up, accept_not_found, load)).await
    }
}

impl CacheAside {
    /// Stores `value` under `key` with the policy's TTL (write-through after
    /// a change), and moves the key's eviction fence in the same step, so a
    /// load that began earlier cannot overwrite it with an older value.
    /// Other processes' local copies of the key are evicted (one
    /// `PUBLISH`).
    ///
    /// Unlike reads, a failing backend is reported
    /// ([`CacheError::Backend`] or [`CacheError::Timeout`]).
    pub async fn set<T: Serialize + ?Sized>(&self, key: &str, value: &T) -> Result<()> {
        let inner = &self.inner;
        inner.check_key(key)?;
        let envelope = encode(Some(value))?;
        if envelope.len() > inner.policy.max_value_len {
            return Err(CacheError::ValueTooLarge {
                len: envelope.len(),
                max: inner.policy.max_value_len,
            });
        }
        let data_key = inner.data_key(&inner.current_token().await, key);
        let ttl = inner.policy.ttl.map(|t| jittered(t, inner.policy.jitter));
        // The fence moves with the write, so a load that began before it
        // cannot overwrite it with an older value.
        let fence_key = inner.fence_key(key);
        let fence = Inner::new_fence();
        let writes = [
            (data_key.as_str(), envelope.as_slice(), ttl),
            (
                fence_key.as_str(),
                fence.as_bytes(),
                Some(inner.policy.max_load_time),
            ),
        ];
        inner
            .call("set", inner.backend.write_batch(&writes, &[]))
            .await?;
        inner.flights.detach(&data_key);
        inner.evict_local(std::slice::from_ref(&data_key));
        if let Some(local) = &inner.local {
            local.insert(data_key, Arc::from(envelope));
        }
        // Other processes may keep local copies even if this one does not.
        inner.broadcast(vec![key.to_owned()], None).await;
        Ok(())
    }

    /// Removes `key`, from the backend and from every process's local tier.
    /// A load of `key` that began before this call (in any process) is not
    /// cached after it returns `Ok`.
    pub async fn invalidate(&self, key: &str) -> Result<()> {
        self.invalidate_many(&[key]).await
    }

    /// Removes every key in `keys`, in one backend round trip, moving each
    /// key's eviction fence in the same atomic step: a load of one of them
    /// that began before this call is not cached after it returns `Ok`.
    pub async fn invalidate_many<K: AsRef<str>>(&self, keys: &[K]) -> Result<()> {
        let inner = &self.inner;
        for key in keys {
            inner.check_key(key.as_ref())?;
        }
        if keys.is_empty() {
            return Ok(());
        }
        let token = inner.current_token().await;
        let data_keys: Vec<String> = keys
            .iter()
            .map(|k| inner.data_key(&token, k.as_ref()))
            .collect();
        let refs: Vec<&str> = data_keys.iter().map(String::as_str).collect();
        // New callers in this process must not join a load that began
        // before the eviction (safe to do before it: a load that begins now
        // reads its fence before the eviction moves it, so it cannot fill).
        for key in &data_keys {
            inner.flights.detach(key);
        }
        inner.evict_local(&data_keys);
        // Each key's fence moves in the same atomic step as its removal: a
        // load that began before it can no longer fill the key.
        let fence = Inner::new_fence();
        let fence_keys: Vec<String> = keys.iter().map(|k| inner.fence_key(k.as_ref())).collect();
        let fences: Vec<(&str, &[u8], Option<Duration>)> = fence_keys
            .iter()
            .map(|k| {
                (
                    k.as_str(),
                    fence.as_bytes(),
                    Some(inner.policy.max_load_time),
                )
            })
            .collect();
        inner
            .call("delete", inner.backend.write_batch(&fences, &refs))
            .await?;
        // Again: a flight that began meanwhile may have found the old value
        // on its second look, and a copy read from the backend just before
        // the removal may have been stored locally.
        for key in &data_keys {
            inner.flights.detach(key);
        }
        inner.evict_local(&data_keys);
        inner
            .broadcast(keys.iter().map(|k| k.as_ref().to_owned()).collect(), None)
            .await;
        Ok(())
    }

    /// Invalidates every key in the namespace at once by bumping its
    /// version: later reads, in every process, use new keys. The old entries
    /// are not deleted; they expire by their TTL. Loads that began before
    /// the bump are not cached (their fill checks the version).
    ///
    /// Other processes learn of the bump over pub/sub, or at the latest
    /// after [`version_refresh`](CacheAsideBuilder::version_refresh).
    pub async fn invalidate_all(&self) -> Result<()> {
        let inner = &self.inner;
        let token = format!("{:016x}", rand::rng().random::<u64>());
        inner
            .call(
                "set version",
                // A batch, so the bump is atomic with respect to fills,
                // which check the version.
                inner
                    .backend
                    .write_batch(&[(&inner.version_key, token.as_bytes(), None)], &[]),
            )
            .await?;
        inner.set_token(&token);
        inner.broadcast(Vec::new(), Some(token)).await;
        Ok(())
    }
}
