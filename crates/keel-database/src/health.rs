//! Health checks for the database, on `keel_core`'s [`HealthCheck`] port.

use std::time::{Duration, Instant};

use async_trait::async_trait;
use keel_core::ports::health::ProbeLimits;
use keel_core::{HealthCheck, HealthReport, HealthStatus, Probe};

use crate::pool::Database;

/// Default time limit of the readiness check.
pub const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(2);
/// Default latency above which the readiness check reports `Degraded`.
pub const DEFAULT_DEGRADED_AFTER: Duration = Duration::from_millis(500);

/// Readiness: acquires a connection and runs `SELECT 1` within a time limit.
///
/// * `Healthy` when it answers in time;
/// * `Degraded` when it answers but slower than `degraded_after`, or when
///   every connection is in use (the next caller will have to wait);
/// * `Unhealthy` when it fails, times out, or the pool is closed.
///
/// The reported latency covers acquiring the connection and the query.
///
/// ```no_run
/// # async fn demo(db: keel_database::Database) {
/// use keel_core::{HealthCheck, HealthStatus};
/// let check = db.readiness_check();
/// let report = check.check().await;
/// if report.status == HealthStatus::Unhealthy {
///     eprintln!("postgres: {} after {:?}", report.detail, report.latency);
/// }
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct DatabaseReadiness {
    db: Database,
    name: String,
    limits: ProbeLimits,
}

impl DatabaseReadiness {
    /// A readiness check named `postgres`, with a 2 s limit, degraded
    /// above 500 ms.
    #[must_use]
    pub fn new(db: Database) -> Self {
        Self {
            db,
            name: "postgres".to_owned(),
            limits: ProbeLimits::new(DEFAULT_HEALTH_TIMEOUT, DEFAULT_DEGRADED_AFTER),
        }
    }

    /// Renames the check (e.g. `postgres-replica`).
    #[must_use]
    pub fn named(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// The time limit for acquiring a connection and running the query.
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
impl HealthCheck for DatabaseReadiness {
    fn name(&self) -> &str {
        &self.name
    }

    async fn check(&self) -> HealthReport {
        let started = Instant::now();
        if self.db.is_closed() {
            return HealthReport::unhealthy(started.elapsed(), "the pool is closed");
        }
        let ping = async {
            let mut conn = self.db.acquire().await.map_err(|e| e.to_string())?;
            let one: Option<i32> = sqlx::query_scalar!("SELECT 1")
                .fetch_one(&mut *conn)
                .await
                .map_err(|e| self.db.classify(e).to_string())?;
            if one == Some(1) {
                Ok(())
            } else {
                Err(format!("SELECT 1 returned {one:?}"))
            }
        };
        let report = self.limits.run(ping, tokio::time::sleep).await;
        if report.status == HealthStatus::Unhealthy {
            return report;
        }
        // A probe is a natural moment to refresh the pool gauges.
        self.db.record_pool_metrics();
        let stats = self.db.stats();
        // Slowness is the better explanation when both apply.
        if report.status == HealthStatus::Healthy
            && stats.size >= stats.max_connections
            && stats.idle == 0
        {
            return HealthReport::degraded(
                report.latency,
                format!("pool saturated: all {} connections in use", stats.size),
            );
        }
        report
    }
}

/// Liveness: healthy unless the pool was closed. It never touches the
/// network, so a database outage makes the instance unready without getting
/// it restarted.
#[derive(Clone, Debug)]
pub struct DatabaseLiveness {
    db: Database,
}

impl DatabaseLiveness {
    /// A liveness check named `postgres`.
    #[must_use]
    pub fn new(db: Database) -> Self {
        Self { db }
    }
}

#[async_trait]
impl HealthCheck for DatabaseLiveness {
    fn name(&self) -> &str {
        "postgres"
    }

    fn probes(&self) -> &[Probe] {
        &[Probe::Liveness]
    }

    async fn check(&self) -> HealthReport {
        let started = Instant::now();
        if self.db.is_closed() {
            HealthReport::unhealthy(started.elapsed(), "the pool is closed")
        } else {
            HealthReport::healthy(started.elapsed())
        }
    }
}

impl Database {
    /// The readiness check (`SELECT 1` within a time limit); see
    /// [`DatabaseReadiness`].
    #[must_use]
    pub fn readiness_check(&self) -> DatabaseReadiness {
        DatabaseReadiness::new(self.clone())
    }

    /// The liveness check (the pool is open); see [`DatabaseLiveness`].
    #[must_use]
    pub fn liveness_check(&self) -> DatabaseLiveness {
        DatabaseLiveness::new(self.clone())
    }
}
