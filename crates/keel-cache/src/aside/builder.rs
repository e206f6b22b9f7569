//! Building a [`CacheAside`]: its policy and the checks on it.

use super::*;

#[derive(Clone, Debug)]
pub(super) struct LockPolicy {
    pub(super) ttl: Duration,
    pub(super) poll: Duration,
}

#[derive(Clone, Debug)]
pub(super) struct LocalPolicy {
    pub(super) ttl: Duration,
    pub(super) max_entries: u64,
}

#[derive(Clone, Debug)]
pub(super) struct Policy {
    pub(super) ttl: Option<Duration>,
    pub(super) jitter: f64,
    pub(super) negative_ttl: Option<Duration>,
    pub(super) timeout: Duration,
    pub(super) max_key_len: usize,
    pub(super) max_value_len: usize,
    pub(super) lock: Option<LockPolicy>,
    pub(super) local: Option<LocalPolicy>,
    pub(super) version_refresh: Duration,
    /// How long eviction fences live: the longest load whose value is
    /// still cached.
    pub(super) max_load_time: Duration,
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
            max_load_time: Duration::from_secs(30),
        }
    }
}

/// Builds a [`CacheAside`]; from [`CacheAside::builder`].
#[derive(Debug)]
#[must_use]
pub struct CacheAsideBuilder {
    pub(super) backend: Arc<dyn Backend>,
    pub(super) namespace: String,
    pub(super) policy: Policy,
    pub(super) metrics: Option<KeelMetrics>,
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

    /// The longest a load may take for its value to be cached (default
    /// 30 s); a slower load's value is returned but not cached.
    ///
    /// This is also how long the small marker (the key's *eviction
    /// fence*, `{namespace}:_fence:{key}`) that every miss, `set` and
    /// invalidation of a key leaves in the backend lives. A fill is refused
    /// when the fence moved during its load, so a value loaded before an
    /// invalidation is never cached after it; see the crate docs.
    pub fn max_load_time(mut self, limit: Duration) -> Self {
        self.policy.max_load_time = limit;
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
            || p.max_load_time.is_zero()
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
            local_epoch: AtomicU64::new(0),
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
