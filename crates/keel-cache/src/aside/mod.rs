//! [`CacheAside`]: typed cache-aside reads and writes with a policy.

mod flight;

use std::fmt;
use std::future::Future;
use std::ops::Deref;
use std::sync::atomic::{AtomicBool, Ordering};
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

#[derive(Clone, Debug)]
struct LockPolicy {
    ttl: Duration,
    poll: Duration,
}

#[derive(Clone, Debug)]
struct LocalPolicy {
    ttl: Duration,
    max_entries: u64,
}

#[derive(Clone, Debug)]
struct Policy {
    ttl: Option<Duration>,
    jitter: f64,
    negative_ttl: Option<Duration>,
    timeout: Duration,
    max_key_len: usize,
    max_value_len: usize,
    lock: Option<LockPolicy>,
    local: Option<LocalPolicy>,
    version_refresh: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            ttl: Some(Duration::from_secs(300)),
            jitter: 0.1,
            negative_ttl: None,
            timeout: Duration::from_millis(100),
            max_key_len: DEFAULT_MAX_KEY_LEN,
            max_value_len: DEFAULT_MAX_VALUE_LEN,
            lock: Some(LockPolicy {
                ttl: Duration::from_secs(5),
                poll: Duration::from_millis(20),
            }),
            local: None,
            version_refresh: Duration::from_secs(1),
        }
    }
}

/// Builds a [`CacheAside`]; from [`CacheAside::builder`].
#[derive(Debug)]
#[must_use]
pub struct CacheAsideBuilder {
    backend: Arc<dyn Backend>,
    namespace: String,
    policy: Policy,
    metrics: Option<KeelMetrics>,
}

impl CacheAsideBuilder {
    /// Records hits and misses (`keel.cache.hits`, `keel.cache.misses`,
    /// named after the namespace) through `metrics` instead of the
    /// instruments of the global meter provider at
    /// [`build`](Self::build) time.
    pub fn metrics(mut self, metrics: KeelMetrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// How long values live (default 5 minutes).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.policy.ttl = Some(ttl);
        self
    }

    /// Values never expire (they leave only by invalidation or eviction).
    pub fn no_expiry(mut self) -> Self {
        self.policy.ttl = None;
        self
    }

    /// Shortens each TTL by a random fraction up to `fraction` (default
    /// 0.1: a 300 s TTL becomes 270–300 s), so entries written together do
    /// not expire together. `0.0` turns jitter off; must be below 1.
    pub fn jitter(mut self, fraction: f64) -> Self {
        self.policy.jitter = fraction;
        self
    }

    /// Caches "not found" (a loader returning `Ok(None)`) for `ttl`, so
    /// lookups of absent records stop reaching the database. Off by default.
    pub fn negative_ttl(mut self, ttl: Duration) -> Self {
        self.policy.negative_ttl = Some(ttl);
        self
    }

    /// How long one backend operation may take before the cache gives up on
    /// it and, for reads, asks the loader (default 100 ms).
    ///
    /// Reads are bounded by a timer per call, unless the backend guarantees
    /// a shorter bound by itself ([`Backend::read_time_limit`]; for Redis,
    /// `RedisConfig::reconnect_attempts(0)` with a connect plus response
    /// timeout within this one), which saves that timer on every hit.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.policy.timeout = timeout;
        self
    }

    /// The longest key accepted, in bytes (default [`DEFAULT_MAX_KEY_LEN`]).
    pub fn max_key_len(mut self, bytes: usize) -> Self {
        self.policy.max_key_len = bytes;
        self
    }

    /// The largest serialized value stored (default
    /// [`DEFAULT_MAX_VALUE_LEN`]). [`set`](CacheAside::set) refuses larger
    /// values; a loader's larger value is returned but not cached.
    pub fn max_value_len(mut self, bytes: usize) -> Self {
        self.policy.max_value_len = bytes;
        self
    }

    /// Protects against stampedes across processes: on a miss, the process
    /// that takes a short lock (`SET NX PX`, held at most `ttl`) loads, and
    /// the others poll the cache until the value appears, the lock goes, or
    /// `ttl` passes. On by default with a 5 s lock.
    pub fn distributed_lock(mut self, ttl: Duration) -> Self {
        let poll = self
            .policy
            .lock
            .as_ref()
            .map_or(Duration::from_millis(20), |l| l.poll);
        self.policy.lock = Some(LockPolicy { ttl, poll });
        self
    }

    /// How often processes waiting for another's load poll (default 20 ms).
    pub fn lock_poll_interval(mut self, every: Duration) -> Self {
        if let Some(lock) = &mut self.policy.lock {
            lock.poll = every;
        }
        self
    }

    /// Turns the distributed lock off: each process loads on its own (still
    /// once per process).
    pub fn no_distributed_lock(mut self) -> Self {
        self.policy.lock = None;
        self
    }

    /// Adds an in-process tier in front of the backend: up to `max_entries`
    /// decoded-ready copies, each kept at most `ttl`. Writes and
    /// invalidations by any process evict other processes' copies over the
    /// backend's pub/sub; since pub/sub may drop messages, keep `ttl` short
    /// (seconds): it bounds how stale a copy can get.
    pub fn local_tier(mut self, ttl: Duration, max_entries: u64) -> Self {
        self.policy.local = Some(LocalPolicy { ttl, max_entries });
        self
    }

    /// How long this process trusts its copy of the namespace version
    /// before reading it again (default 1 s). Bumps by other processes also
    /// arrive over pub/sub at once; this bounds the delay when a message is
    /// lost.
    pub fn version_refresh(mut self, every: Duration) -> Self {
        self.policy.version_refresh = every;
        self
    }

    fn validate(&self) -> Result<()> {
        let ns = &self.namespace;
        let config = |reason: String| Err(CacheError::Config(reason));
        if ns.is_empty()
            || ns.len() > MAX_NAMESPACE_LEN
            || !ns
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        {
            return config(format!(
                "namespace {ns:?} must be 1 to {MAX_NAMESPACE_LEN} characters of A-Z, a-z, 0-9, '-', '_' and '.'"
            ));
        }
        let p = &self.policy;
        if !(0.0..1.0).contains(&p.jitter) {
            return config(format!(
                "jitter {} must be at least 0 and below 1",
                p.jitter
            ));
        }
        let zero = |d: Option<Duration>| d.is_some_and(|d| d.is_zero());
        if zero(p.ttl)
            || zero(p.negative_ttl)
            || p.timeout.is_zero()
            || zero(p.lock.as_ref().map(|l| l.ttl))
            || zero(p.lock.as_ref().map(|l| l.poll))
            || zero(p.local.as_ref().map(|l| l.ttl))
        {
            return config("TTLs, timeouts and intervals must be longer than zero".into());
        }
        if p.max_key_len == 0 || p.max_value_len == 0 {
            return config("size limits must be above zero".into());
        }
        Ok(())
    }

    /// Builds the cache: reads the namespace version and subscribes to
    /// invalidations. With a local tier, waits (at most one second) until
    /// the subscription is established; a backend that is down does not fail
    /// the build.
    ///
    /// Must run within a Tokio runtime (it starts a listener task).
    pub async fn build(self) -> Result<CacheAside> {
        self.validate()?;
        let metrics = self
            .metrics
            .unwrap_or_else(KeelMetrics::global)
            .cache(&self.namespace);
        let local = self.policy.local.as_ref().map(|l| {
            moka::sync::Cache::builder()
                .max_capacity(l.max_entries)
                .time_to_live(l.ttl)
                .build()
        });
        let read_bounded = self
            .backend
            .read_time_limit()
            .is_some_and(|limit| limit <= self.policy.timeout);
        let inner = Arc::new(Inner {
            version_key: format!("{}:_version", self.namespace),
            backend: self.backend,
            namespace: self.namespace,
            origin: uuid::Uuid::new_v4().simple().to_string(),
            read_bounded,
            policy: self.policy,
            version: RwLock::new(NamespaceVersion {
                token: Arc::from("0"),
                checked_at: None,
                generation: 0,
            }),
            version_fresh: AtomicBool::new(false),
            ticking: AtomicBool::new(true),
            refreshing: AtomicBool::new(false),
            local,
            flights: Flights::default(),
            counters: Counters::default(),
            metrics,
            failing: AtomicBool::new(false),
            listener: OnceLock::new(),
            ticker: OnceLock::new(),
        });
        let ticker = tokio::spawn(tick(Arc::downgrade(&inner), inner.policy.version_refresh));
        let _ = inner.ticker.set(ticker.abort_handle());
        // Subscribe before reading the version, so no bump falls between.
        match inner.backend.subscribe() {
            Ok(mut subscription) => {
                if inner.local.is_some() && !subscription.wait_ready(Duration::from_secs(1)).await {
                    tracing::warn!(
                        namespace = %inner.namespace,
                        "cache invalidations are not subscribed yet; local copies live until their TTL"
                    );
                }
                let task = tokio::spawn(listen(Arc::downgrade(&inner), subscription));
                let _ = inner.listener.set(task.abort_handle());
            }
            Err(e) => {
                tracing::warn!(namespace = %inner.namespace, error = %e, "cannot subscribe to cache invalidations");
            }
        }
        inner.refresh_version().await;
        Ok(CacheAside { inner })
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

/// A cross-process message on the backend's channel.
#[derive(Serialize, Deserialize)]
struct Broadcast {
    origin: String,
    namespace: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    keys: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    version: Option<String>,
}

/// Stored bytes, shared (local tier, flights) or owned (fresh from the
/// backend), without copying either way.
enum Bytes {
    Shared(Arc<[u8]>),
    Owned(Vec<u8>),
}

impl Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Shared(b) => b,
            Bytes::Owned(b) => b,
        }
    }
}

enum Lookup {
    Hit {
        envelope: Bytes,
        local: bool,
    },
    Missing,
    /// The backend failed or was too slow.
    Failed,
}

enum Decoded<T> {
    Value(T),
    NotFound,
    Invalid,
}

/// Decodes an envelope without side effects.
fn decode<T: DeserializeOwned>(envelope: &[u8]) -> Decoded<T> {
    match envelope.split_first() {
        Some((&TAG_VALUE, json)) => match serde_json::from_slice(json) {
            Ok(v) => Decoded::Value(v),
            Err(_) => Decoded::Invalid,
        },
        Some((&TAG_NOT_FOUND, [])) => Decoded::NotFound,
        _ => Decoded::Invalid,
    }
}

fn encode<T: Serialize + ?Sized>(value: Option<&T>) -> Result<Vec<u8>> {
    match value {
        None => Ok(vec![TAG_NOT_FOUND]),
        Some(value) => {
            let mut envelope = vec![TAG_VALUE];
            serde_json::to_writer(&mut envelope, value).map_err(CacheError::Serialize)?;
            Ok(envelope)
        }
    }
}

/// `ttl` shortened by a random fraction of at most `jitter`.
fn jittered(ttl: Duration, jitter: f64) -> Duration {
    if jitter <= 0.0 {
        return ttl;
    }
    let factor = rand::rng().random_range((1.0 - jitter)..=1.0);
    ttl.mul_f64(factor).max(Duration::from_millis(1))
}

/// Clears `refreshing` however the refresh ends (even if cancelled).
struct RefreshGuard<'a>(&'a AtomicBool);

impl Drop for RefreshGuard<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl Inner {
    fn check_key(&self, key: &str) -> Result<()> {
        if key.is_empty() {
            return Err(CacheError::EmptyKey);
        }
        if key.len() > self.policy.max_key_len {
            return Err(CacheError::KeyTooLong {
                len: key.len(),
                max: self.policy.max_key_len,
            });
        }
        Ok(())
    }

    fn data_key(&self, token: &str, key: &str) -> String {
        // On every hit: plain pushes are cheaper than `format!`.
        let mut data_key =
            String::with_capacity(self.namespace.len() + token.len() + key.len() + 3);
        data_key.push_str(&self.namespace);
        data_key.push_str(":v");
        data_key.push_str(token);
        data_key.push(':');
        data_key.push_str(key);
        data_key
    }

    fn lock_key(&self, data_key: &str) -> String {
        // `{ns}:v…` becomes `{ns}:_lock:v…`: never a data key.
        format!(
            "{}:_lock{}",
            self.namespace,
            &data_key[self.namespace.len()..]
        )
    }

    /// Counts a hit, in the stats and in `keel.cache.hits`.
    fn hit(&self, local: bool) {
        bump(&self.counters.hits);
        if local {
            bump(&self.counters.local_hits);
            self.metrics.hit(CacheTier::Local);
        } else {
            self.metrics.hit(CacheTier::Remote);
        }
    }

    /// Counts a miss, in the stats and in `keel.cache.misses`.
    fn missed(&self) {
        bump(&self.counters.misses);
        self.metrics.miss();
    }

    /// Counts a lookup that joined another caller's load: `joined` in the
    /// stats, a miss in `keel.cache.misses` (the cache did not answer it).
    fn joined(&self) {
        bump(&self.counters.joined);
        self.metrics.miss();
    }

    fn backend_ok(&self) {
        if self.failing.load(Ordering::Relaxed) && self.failing.swap(false, Ordering::Relaxed) {
            tracing::info!(namespace = %self.namespace, backend = self.backend.name(), "cache backend recovered");
        }
    }

    fn backend_failed(&self, operation: &'static str, error: &CacheError) {
        bump(&self.counters.errors);
        if self.failing.swap(true, Ordering::Relaxed) {
            tracing::debug!(namespace = %self.namespace, operation, %error, "cache backend still failing");
        } else {
            tracing::warn!(
                namespace = %self.namespace,
                backend = self.backend.name(),
                operation,
                %error,
                "cache backend failing; reads fall back to loaders"
            );
        }
    }

    /// Runs a backend operation within the timeout, recording the outcome.
    async fn call<T>(
        &self,
        operation: &'static str,
        op: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        let result = match tokio::time::timeout(self.policy.timeout, op).await {
            Ok(result) => result,
            Err(_) => Err(CacheError::Timeout {
                operation,
                after: self.policy.timeout,
            }),
        };
        self.record(operation, &result);
        result
    }

    /// Runs a backend read within the timeout, recording the outcome. When
    /// the backend bounds its reads by itself, within the timeout
    /// ([`Backend::read_time_limit`]), no timer of our own is set: one
    /// fewer timer per hit.
    async fn call_read(&self, operation: &'static str, key: &str) -> Result<Option<Vec<u8>>> {
        if !self.read_bounded {
            return self.call(operation, self.backend.read(key)).await;
        }
        let result = self.backend.read(key).await;
        self.record(operation, &result);
        result
    }

    fn record<T>(&self, operation: &'static str, result: &Result<T>) {
        match result {
            Ok(_) => self.backend_ok(),
            Err(e) if e.is_backend_failure() => self.backend_failed(operation, e),
            Err(_) => {}
        }
    }

    async fn current_token(&self) -> Arc<str> {
        {
            let version = self.version.read().unwrap_or_else(|p| p.into_inner());
            if self.version_fresh.load(Ordering::Acquire)
                || version
                    .checked_at
                    .is_some_and(|at| at.elapsed() < self.policy.version_refresh)
            {
                return version.token.clone();
            }
        }
        self.refresh_version().await;
        self.version
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .token
            .clone()
    }

    /// Records that the version was just read (or set): it may be used
    /// without a clock read until the next tick.
    fn mark_checked(&self, version: &mut NamespaceVersion) {
        version.checked_at = Some(Instant::now());
        if self.ticking.load(Ordering::Acquire) {
            self.version_fresh.store(true, Ordering::Release);
        }
    }

    /// Reads the namespace version from the backend; one caller at a time,
    /// the others go on with the token they have.
    async fn refresh_version(&self) {
        if self.refreshing.swap(true, Ordering::AcqRel) {
            return;
        }
        let _guard = RefreshGuard(&self.refreshing);
        let generation = self
            .version
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .generation;
        let read = self.call_read("get version", &self.version_key).await;
        let mut version = self.version.write().unwrap_or_else(|p| p.into_inner());
        if version.generation != generation {
            // Pub/sub changed the version meanwhile: a newer token is set
            // (and marked checked), or a re-read was asked for (resync).
            return;
        }
        // Retry a failed read only after the refresh interval, not per call.
        self.mark_checked(&mut version);
        let token: Arc<str> = match read {
            Ok(Some(bytes)) => Arc::from(String::from_utf8_lossy(&bytes).as_ref()),
            Ok(None) => Arc::from("0"),
            Err(_) => return,
        };
        if token != version.token {
            version.token = token;
            if let Some(local) = &self.local {
                local.invalidate_all();
            }
        }
    }

    fn set_token(&self, token: &str) {
        let mut version = self.version.write().unwrap_or_else(|p| p.into_inner());
        version.generation += 1;
        self.mark_checked(&mut version);
        if *version.token != *token {
            version.token = Arc::from(token);
        }
        if let Some(local) = &self.local {
            local.invalidate_all();
        }
    }

    /// Drops everything derived from messages that may have been missed.
    fn resync(&self) {
        if let Some(local) = &self.local {
            local.invalidate_all();
        }
        let mut version = self.version.write().unwrap_or_else(|p| p.into_inner());
        version.generation += 1;
        version.checked_at = None;
        self.version_fresh.store(false, Ordering::Release);
    }

    fn apply(&self, message: &[u8]) {
        let Ok(message) = serde_json::from_slice::<Broadcast>(message) else {
            tracing::debug!(namespace = %self.namespace, "ignoring an unreadable cache broadcast");
            return;
        };
        if message.origin == self.origin || message.namespace != self.namespace {
            return;
        }
        if let Some(token) = &message.version {
            self.set_token(token);
        }
        if let Some(local) = &self.local
            && !message.keys.is_empty()
        {
            let token = self
                .version
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .token
                .clone();
            for key in &message.keys {
                local.invalidate(&self.data_key(&token, key));
            }
        }
    }

    async fn broadcast(&self, keys: Vec<String>, version: Option<String>) {
        let message = Broadcast {
            origin: self.origin.clone(),
            namespace: self.namespace.clone(),
            keys,
            version,
        };
        let Ok(bytes) = serde_json::to_vec(&message) else {
            return;
        };
        // Best effort: other processes' local copies expire by their TTL and
        // versions are re-read every `version_refresh` anyway.
        let _ = self.call("publish", self.backend.publish(&bytes)).await;
    }

    async fn lookup(&self, data_key: &str) -> Lookup {
        if let Some(local) = &self.local
            && let Some(envelope) = local.get(data_key)
        {
            return Lookup::Hit {
                envelope: Bytes::Shared(envelope),
                local: true,
            };
        }
        match self.call_read("get", data_key).await {
            Ok(Some(bytes)) => {
                let envelope = match &self.local {
                    Some(local) => {
                        let shared: Arc<[u8]> = Arc::from(bytes);
                        local.insert(data_key.to_owned(), shared.clone());
                        Bytes::Shared(shared)
                    }
                    None => Bytes::Owned(bytes),
                };
                Lookup::Hit {
                    envelope,
                    local: false,
                }
            }
            Ok(None) => Lookup::Missing,
            Err(_) => Lookup::Failed,
        }
    }

    /// Removes an entry that no longer decodes.
    async fn discard(&self, data_key: &str) {
        bump(&self.counters.invalid_values);
        tracing::warn!(namespace = %self.namespace, key = data_key, "removing a cached value that no longer decodes");
        if let Some(local) = &self.local {
            local.invalidate(data_key);
        }
        let _ = self.call("delete", self.backend.remove(&[data_key])).await;
    }

    /// Writes an envelope to the backend (and the local tier), with the
    /// policy's TTL. Failures are counted and logged, never returned.
    async fn fill(&self, data_key: &str, envelope: &[u8], ttl: Option<Duration>) {
        if envelope.len() > self.policy.max_value_len {
            tracing::warn!(
                namespace = %self.namespace,
                key = data_key,
                len = envelope.len(),
                max = self.policy.max_value_len,
                "loaded value is over the size limit; not cached"
            );
            return;
        }
        let ttl = ttl.map(|t| jittered(t, self.policy.jitter));
        if self
            .call("set", self.backend.write(data_key, envelope, ttl))
            .await
            .is_ok()
            && let Some(local) = &self.local
        {
            local.insert(data_key.to_owned(), Arc::from(envelope));
        }
    }
}

/// Ends the clock-free version checks when the ticker stops: aborted with
/// its cache (then there is nothing left to do) or dropped with its
/// runtime (then lookups must look at the clock again).
struct TickerGuard(Weak<Inner>);

impl Drop for TickerGuard {
    fn drop(&mut self) {
        if let Some(inner) = self.0.upgrade() {
            inner.ticking.store(false, Ordering::Release);
            inner.version_fresh.store(false, Ordering::Release);
        }
    }
}

/// Marks the namespace version stale every `every`, so the next lookup
/// reads it again, until the cache is dropped.
async fn tick(inner: Weak<Inner>, every: Duration) {
    let _guard = TickerGuard(inner.clone());
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        inner.version_fresh.store(false, Ordering::Release);
    }
}

/// Applies what other processes broadcast, until the cache is dropped.
async fn listen(inner: Weak<Inner>, mut subscription: Subscription) {
    while let Some(notice) = subscription.recv().await {
        let Some(inner) = inner.upgrade() else {
            return;
        };
        match notice {
            Notice::Message(message) => inner.apply(&message),
            Notice::Lost | Notice::Subscribed => inner.resync(),
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
    /// flight); with the distributed lock, processes share it too. If the
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

    /// A lookup found nothing usable: join or lead the key's flight.
    async fn miss<T, E, F, Fut>(
        &self,
        key: &str,
        data_key: &str,
        backend_up: bool,
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
        let mut load = Some(load);
        // Each lookup is counted once, by the role it first takes.
        let mut counted = false;
        loop {
            match inner.flights.join(data_key) {
                Role::Leader(lead) => {
                    if !counted {
                        inner.missed();
                    }
                    let Some(load) = load.take() else {
                        unreachable!("a caller leads at most once: leading ends the loop");
                    };
                    return self
                        .lead(key, data_key, backend_up, accept_not_found, lead, load)
                        .await;
                }
                Role::Follower(slot) => {
                    if !counted {
                        inner.joined();
                        counted = true;
                    }
                    match flight::wait(slot).await {
                        Some(Ok(envelope)) => match decode::<T>(&envelope) {
                            Decoded::Value(v) => return Ok(Some(v)),
                            Decoded::NotFound if accept_not_found => return Ok(None),
                            // A different type, or a "not found" this caller
                            // cannot use: go round and lead a load of our own.
                            Decoded::NotFound | Decoded::Invalid => {}
                        },
                        Some(Err(reason)) => {
                            return Err(E::from(CacheError::LoadFailed {
                                key: key.to_owned(),
                                reason: reason.to_string(),
                            }));
                        }
                        // The leader was cancelled: go round, one of us leads.
                        None => {}
                    }
                }
            }
        }
    }

    async fn lead<T, E, F, Fut>(
        &self,
        key: &str,
        data_key: &str,
        mut backend_up: bool,
        accept_not_found: bool,
        lead: Lead<'_>,
        load: F,
    ) -> Result<Option<T>, E>
    where
        T: Serialize + DeserializeOwned,
        E: From<CacheError> + fmt::Display,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<T>, E>>,
    {
        let inner = &self.inner;
        let mut lock = None;
        if backend_up {
            match self.before_load::<T>(data_key, accept_not_found).await {
                Ok((Source::Cache(decoded, envelope), _)) => {
                    lead.finish(Ok(envelope));
                    return Ok(match decoded {
                        Decoded::Value(v) => Some(v),
                        _ => None,
                    });
                }
                Ok((Source::Loaded, held)) => lock = held,
                Err(()) => backend_up = false,
            }
        }

        bump(&inner.counters.loads);
        let loaded = load().await;
        let result = match loaded {
            Ok(value) => {
                match encode(value.as_ref()) {
                    Ok(envelope) => {
                        let ttl = if value.is_some() {
                            Some(inner.policy.ttl)
                        } else {
                            inner.policy.negative_ttl.map(Some)
                        };
                        if backend_up && let Some(ttl) = ttl {
                            inner.fill(data_key, &envelope, ttl).await;
                        }
                        lead.finish(Ok(Arc::from(envelope)));
                    }
                    Err(e) => {
                        tracing::warn!(namespace = %inner.namespace, key, error = %e, "cannot serialize a loaded value; not cached");
                        lead.finish(Err(Arc::from(e.to_string())));
                    }
                }
                Ok(value)
            }
            Err(e) => {
                bump(&inner.counters.load_errors);
                lead.finish(Err(Arc::from(e.to_string())));
                Err(e)
            }
        };
        if let Some((lock_key, token)) = lock {
            let _ = inner
                .call(
                    "unlock",
                    inner.backend.remove_if_equals(&lock_key, token.as_bytes()),
                )
                .await;
        }
        result
    }

    /// The leader's steps before loading: look again (a flight that just
    /// ended may have filled the cache), then take the distributed lock or
    /// wait for the process holding it. `Err`: the backend failed.
    #[allow(clippy::type_complexity)] // private plumbing
    async fn before_load<T: DeserializeOwned>(
        &self,
        data_key: &str,
        accept_not_found: bool,
    ) -> Result<(Source<T>, Option<(String, String)>), ()> {
        let inner = &self.inner;
        if let Some(found) = self.recheck::<T>(data_key, accept_not_found).await? {
            return Ok((found, None));
        }
        let Some(lock) = &inner.policy.lock else {
            return Ok((Source::Loaded, None));
        };
        let lock_key = inner.lock_key(data_key);
        let token = uuid::Uuid::new_v4().simple().to_string();
        let acquired = inner
            .call(
                "lock",
                inner
                    .backend
                    .write_if_absent(&lock_key, token.as_bytes(), lock.ttl),
            )
            .await
            .map_err(|_| ())?;
        if acquired {
            // The previous holder may have filled the cache and unlocked
            // between our last look and our lock.
            if let Some(found) = self.recheck::<T>(data_key, accept_not_found).await? {
                let _ = inner
                    .call(
                        "unlock",
                        inner.backend.remove_if_equals(&lock_key, token.as_bytes()),
                    )
                    .await;
                return Ok((found, None));
            }
            return Ok((Source::Loaded, Some((lock_key, token))));
        }
        // Another process is loading: poll until its value appears, its lock
        // goes (it failed or gave up) or the lock's lifetime passes.
        let deadline = Instant::now() + lock.ttl;
        while Instant::now() < deadline {
            tokio::time::sleep(lock.poll).await;
            // The lock first, then the value: the holder fills the cache
            // before it unlocks, so a lock seen gone means the value (if
            // any) is there to be found by the look that follows.
            let holder = inner
                .call_read("get lock", &lock_key)
                .await
                .map_err(|_| ())?;
            if let Some(found) = self.recheck::<T>(data_key, accept_not_found).await? {
                return Ok((found, None));
            }
            if holder.is_none() {
                break;
            }
        }
        Ok((Source::Loaded, None))
    }

    async fn recheck<T: DeserializeOwned>(
        &self,
        data_key: &str,
        accept_not_found: bool,
    ) -> Result<Option<Source<T>>, ()> {
        let inner = &self.inner;
        match inner.lookup(data_key).await {
            Lookup::Hit { envelope, .. } => match decode::<T>(&envelope) {
                Decoded::Invalid => {
                    inner.discard(data_key).await;
                    Ok(None)
                }
                Decoded::NotFound if !accept_not_found => Ok(None),
                decoded => {
                    let shared = match envelope {
                        Bytes::Shared(b) => b,
                        Bytes::Owned(b) => Arc::from(b),
                    };
                    Ok(Some(Source::Cache(decoded, shared)))
                }
            },
            Lookup::Missing => Ok(None),
            Lookup::Failed => Err(()),
        }
    }

    /// Stores `value` under `key` with the policy's TTL (write-through after
    /// a change). Other processes' local copies of the key are evicted (one
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
        inner
            .call("set", inner.backend.write(&data_key, &envelope, ttl))
            .await?;
        if let Some(local) = &inner.local {
            local.insert(data_key, Arc::from(envelope));
        }
        // Other processes may keep local copies even if this one does not.
        inner.broadcast(vec![key.to_owned()], None).await;
        Ok(())
    }

    /// Removes `key`, from the backend and from every process's local tier.
    pub async fn invalidate(&self, key: &str) -> Result<()> {
        self.invalidate_many(&[key]).await
    }

    /// Removes every key in `keys`, in one backend round trip.
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
        if let Some(local) = &inner.local {
            for key in &data_keys {
                local.invalidate(key);
            }
        }
        inner.call("delete", inner.backend.remove(&refs)).await?;
        inner
            .broadcast(keys.iter().map(|k| k.as_ref().to_owned()).collect(), None)
            .await;
        Ok(())
    }

    /// Invalidates every key in the namespace at once by bumping its
    /// version: later reads, in every process, use new keys. The old entries
    /// are not deleted; they expire by their TTL.
    ///
    /// Other processes learn of the bump over pub/sub, or at the latest
    /// after [`version_refresh`](CacheAsideBuilder::version_refresh).
    pub async fn invalidate_all(&self) -> Result<()> {
        let inner = &self.inner;
        let token = format!("{:016x}", rand::rng().random::<u64>());
        inner
            .call(
                "set version",
                inner
                    .backend
                    .write(&inner.version_key, token.as_bytes(), None),
            )
            .await?;
        inner.set_token(&token);
        inner.broadcast(Vec::new(), Some(token)).await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_round_trip_and_reject_garbage() {
        let envelope = encode(Some(&vec![1, 2, 3])).unwrap();
        assert!(matches!(decode::<Vec<u8>>(&envelope), Decoded::Value(v) if v == [1, 2, 3]));
        let not_found = encode::<u8>(None).unwrap();
        assert!(matches!(decode::<u8>(&not_found), Decoded::NotFound));
        for garbage in [&b""[..], b"\x01{", b"\x00x", b"\x07[]", b"plain"] {
            assert!(
                matches!(decode::<Vec<u8>>(garbage), Decoded::Invalid),
                "{garbage:?}"
            );
        }
        // The right bytes for the wrong type are invalid too.
        assert!(matches!(decode::<String>(&envelope), Decoded::Invalid));
    }

    #[test]
    fn jitter_shortens_within_bounds_and_varies() {
        let ttl = Duration::from_secs(100);
        let samples: Vec<Duration> = (0..1000).map(|_| jittered(ttl, 0.2)).collect();
        assert!(
            samples
                .iter()
                .all(|d| *d >= Duration::from_secs(80) && *d <= ttl)
        );
        let distinct: std::collections::HashSet<_> = samples.iter().collect();
        assert!(distinct.len() > 100, "jitter should spread TTLs out");
        assert_eq!(jittered(ttl, 0.0), ttl);
    }

    #[tokio::test]
    async fn builder_refuses_bad_configuration() {
        let memory = crate::MemoryCache::new;
        for (builder, what) in [
            (CacheAside::builder(memory(), ""), "empty namespace"),
            (CacheAside::builder(memory(), "has:colon"), "colon"),
            (
                CacheAside::builder(memory(), "x".repeat(65)),
                "long namespace",
            ),
            (CacheAside::builder(memory(), "ok").jitter(1.0), "jitter"),
            (
                CacheAside::builder(memory(), "ok").jitter(-0.1),
                "negative jitter",
            ),
            (
                CacheAside::builder(memory(), "ok").ttl(Duration::ZERO),
                "zero ttl",
            ),
            (
                CacheAside::builder(memory(), "ok").timeout(Duration::ZERO),
                "timeout",
            ),
            (
                CacheAside::builder(memory(), "ok").local_tier(Duration::ZERO, 10),
                "local ttl",
            ),
        ] {
            assert!(
                matches!(builder.build().await, Err(CacheError::Config(_))),
                "{what}"
            );
        }
        assert!(
            CacheAside::builder(memory(), "users.v2-eu_1")
                .build()
                .await
                .is_ok()
        );
    }
}
