//! The Redis health check, on `keel_core`'s [`HealthCheck`] port.

use std::time::Duration;

use async_trait::async_trait;
use keel_core::ports::health::ProbeLimits;
use keel_core::{HealthCheck, HealthReport};

use crate::redis::RedisCache;

/// Default time limit of the Redis readiness check.
pub const DEFAULT_REDIS_HEALTH_TIMEOUT: Duration = Duration::from_secs(1);
/// Default latency above which the Redis readiness check reports
/// `Degraded`.
pub const DEFAULT_REDIS_DEGRADED_AFTER: Duration = Duration::from_millis(250);

/// Readiness: a `PING` over the cache's connection within a time limit.
///
/// * `Healthy` when Redis answers in time;
/// * `Degraded` when it answers slower than `degraded_after`;
/// * `Unhealthy` when the `PING` fails or does not answer in time (Redis
///   down, unreachable, or refusing the credentials).
///
/// A cache outage only slows reads down (they fall back to their loaders),
/// so services usually register it as non-critical:
///
/// ```no_run
/// # async fn demo(redis: keel_cache::RedisCache, registry: keel_telemetry::HealthRegistry) {
/// use keel_telemetry::CheckOptions;
/// registry.register_with(redis.readiness_check(), CheckOptions::new().non_critical());
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct RedisReadiness {
    redis: RedisCache,
    name: String,
    limits: ProbeLimits,
}

impl RedisReadiness {
    /// A readiness check named `redis`, with a 1 s limit, degraded above
    /// 250 ms.
    #[must_use]
    pub fn new(redis: RedisCache) -> Self {
        Self {
            redis,
            name: "redis".to_owned(),
            limits: ProbeLimits::new(DEFAULT_REDIS_HEALTH_TIMEOUT, DEFAULT_REDIS_DEGRADED_AFTER),
        }
    }

    /// Renames the check (e.g. `redis-sessions`).
    #[must_use]
    pub fn named(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// The time limit for the `PING`, reconnecting included.
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.limits.timeout = timeout;
        self
    }

    /// The latency above which the check reports `Degraded`.
    #[must_use]
    pub fn degraded_after(mut self, threshold: Duration) -> Self {
        self.limits.degraded_after = threshold;
        self
    }
}

#[async_trait]
impl HealthCheck for RedisReadiness {
    fn name(&self) -> &str {
        &self.name
    }

    async fn check(&self) -> HealthReport {
        // The connection manager retries a dropped connection several times
        // with backoff; the limit here bounds all of it.
        self.limits.run(self.redis.ping(), tokio::time::sleep).await
    }
}

impl RedisCache {
    /// The readiness check (`PING` within a time limit); see
    /// [`RedisReadiness`].
    #[must_use]
    pub fn readiness_check(&self) -> RedisReadiness {
        RedisReadiness::new(self.clone())
    }
}
