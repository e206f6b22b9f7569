//! Health checks for the database, on `keel_core`'s [`HealthCheck`] port.

use std::time::{Duration, Instant};

use async_trait::async_trait;
use keel_core::{HealthCheck, HealthReport, Probe};

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
    timeout: Duration,
    degraded_after: Duration,
}

impl DatabaseReadiness {
    /// A readiness check named `postgres`, with a 2 s limit, degraded
    /// above 500 ms.
    #[must_use]
    pub fn new(db: Database) -> Self {
        Self {
            db,
            name: "postgres".to_owned(),
            timeout: DEFAULT_HEALTH_TIMEOUT,
            degraded_after: DEFAULT_DEGRADED_AFTER,
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
        self.timeout = timeout;
        self
    }

    /// The latency above which the check reports `Degraded`.
    #[must_use]
    pub fn degraded_after(mut self, threshold: Duration) -> Self {
        self.degraded_after = threshold;
        self
    }
}

#[async_trait]
impl HealthCheck for DatabaseReadiness {
    fn name(&self) -> &str {
        &self.name
    }

    fn probes(&self) -> &[Probe] {
        &[Probe::Readiness]
    }

    async fn check(&self) -> HealthReport {
        let started = Instant::now();
        if self.db.is_closed() {
            return HealthReport::unhealthy(started.elapsed(), "the pool is closed");
        }
        let ping = async {
            let mut conn = self.db.acquire().await?;
            let one: i32 = sqlx::query_scalar("SELECT 1")
                .fetch_one(&mut *conn)
                .await
                .map_err(|e| self.db.classify(e))?;
            Ok::<_, crate::DatabaseError>(one)
        };
        let outcome = tokio::time::timeout(self.timeout, ping).await;
        let latency = started.elapsed();
        match outcome {
            Err(_) => {
                HealthReport::unhealthy(latency, format!("no answer within {:?}", self.timeout))
            }
            Ok(Err(e)) => HealthReport::unhealthy(latency, e.to_string()),
            Ok(Ok(1)) => {
                // A probe is a natural moment to refresh the pool gauges.
                self.db.record_pool_metrics();
                let stats = self.db.stats();
                if latency > self.degraded_after {
                    HealthReport::degraded(latency, format!("slow: answered in {latency:?}"))
                } else if stats.size >= stats.max_connections && stats.idle == 0 {
                    HealthReport::degraded(
                        latency,
                        format!("pool saturated: all {} connections in use", stats.size),
                    )
                } else {
                    HealthReport::healthy(latency)
                }
            }
            Ok(Ok(other)) => HealthReport::unhealthy(latency, format!("SELECT 1 returned {other}")),
        }
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
