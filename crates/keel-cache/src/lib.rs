//! Cache-aside caching for Keel services: Redis in production, an in-memory
//! twin in tests, and the policies that make a cache safe to put in front of
//! a database.
//!
//! Application services use [`CacheAside`]: one per logical cache
//! (namespace), each with its own policy, over a shared [`Backend`]. The
//! backends also implement keel-core's [`Cache`](keel_core::Cache) port for
//! code that wants plain bytes.
//!
//! * **Cache-aside with stampede protection.**
//!   [`get_or_load`](CacheAside::get_or_load) returns the cached value or
//!   runs the loader and caches its answer. Concurrent misses for a key run
//!   the loader once per process and, with a short Redis lock, once across
//!   processes.
//! * **Evictions win over loads in progress.** A value loaded before an
//!   [`invalidate`](CacheAside::invalidate) (or `invalidate_many`, `set`,
//!   `invalidate_all`) of its key is never cached after it, in any process:
//!   each key has an *eviction fence* that evictions move and that the
//!   fill checks atomically. See "Evictions during a load" on
//!   [`CacheAside`].
//! * **Strategies per cache.** TTL with jitter, negative caching of "not
//!   found", namespaced and versioned keys
//!   ([`invalidate_all`](CacheAside::invalidate_all) drops a namespace
//!   without `SCAN`), and an optional in-process tier kept coherent across
//!   processes over Redis pub/sub.
//! * **Automatic invalidation.** [`InvalidationHandler`] is a keel-core
//!   [`EventHandler`](keel_core::EventHandler) that evicts what a domain
//!   event made stale.
//! * **A cache never takes a service down.** When Redis is down or slow,
//!   reads fall back to the loader after a timeout, and the failure is
//!   counted ([`CacheStats`]) and logged with `tracing`. Values that no
//!   longer deserialize are removed and reloaded.
//! * **Bad input is refused** with a typed [`CacheError`] (empty or long
//!   keys, large values), which converts into [`keel_core::Error`].
//! * **Observable**: hits (by tier) and misses are recorded as
//!   `keel.cache.hits` / `keel.cache.misses` through the global meter
//!   provider or [`CacheAsideBuilder::metrics`]; with Redis,
//!   `RedisCache::readiness_check` is the health check (`PING` within a
//!   time limit).
//!
//! The guide is `docs/cache.md` in the repository.
//!
//! # Example
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), keel_core::Error> {
//! use std::time::Duration;
//! use keel_cache::{CacheAside, MemoryCache};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Serialize, Deserialize, Clone, PartialEq, Debug)]
//! struct Product { sku: String, price_cents: u64 }
//!
//! // In production: RedisCache::connect(RedisConfig::new(url).key_prefix("shop:")).await?
//! let backend = MemoryCache::new();
//! let products = CacheAside::builder(backend, "products")
//!     .ttl(Duration::from_secs(600))
//!     .build()
//!     .await?;
//!
//! let load = || async {
//!     // e.g. repository.find(sku).await
//!     Ok::<_, keel_core::Error>(Product { sku: "A-1".into(), price_cents: 1250 })
//! };
//! let first = products.get_or_load("A-1", load).await?;
//! let again = products.get_or_load("A-1", load).await?; // served from the cache
//! assert_eq!(first, again);
//! assert_eq!(products.stats().loads, 1);
//!
//! products.invalidate("A-1").await?; // after a price change
//! # Ok(())
//! # }
//! ```
//!
//! # Feature flags
//!
//! * `redis` (default): [`RedisCache`], on the `redis` crate's
//!   multiplexed, self-reconnecting `ConnectionManager`. Without it the
//!   crate has no Redis dependency, and [`MemoryCache`] is the only backend.
//! * `tls`: Redis over TLS (`rediss://` URLs) through rustls with the
//!   `ring` provider, never OpenSSL; trusts the system's roots, or a private
//!   CA given to `RedisConfig::root_certificate_pem`. Implies `redis`.
//! * `testing`: the `testing` module, the contract suite every backend passes.

mod aside;
mod backend;
mod error;
#[cfg(feature = "redis")]
mod health;
mod invalidation;
mod memory;
#[cfg(feature = "redis")]
mod redis;
mod stats;

#[cfg(feature = "testing")]
pub mod testing;

pub use aside::{
    CacheAside, CacheAsideBuilder, DEFAULT_MAX_KEY_LEN, DEFAULT_MAX_VALUE_LEN, MAX_NAMESPACE_LEN,
};
pub use backend::{Backend, DEFAULT_MAX_KEY_BYTES, DEFAULT_MAX_VALUE_BYTES, Notice, Subscription};
pub use error::{CacheError, Result};
#[cfg(feature = "redis")]
pub use health::{DEFAULT_REDIS_DEGRADED_AFTER, DEFAULT_REDIS_HEALTH_TIMEOUT, RedisReadiness};
pub use invalidation::InvalidationHandler;
pub use memory::{DEFAULT_MEMORY_CAPACITY_BYTES, MemoryCache};
#[cfg(feature = "redis")]
pub use redis::{RedisCache, RedisConfig};
pub use stats::CacheStats;
