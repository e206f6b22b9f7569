//! The health registry: the checks each adapter registers, run for the
//! liveness and readiness probes with per-check timeouts and a short cache.
//!
//! Adapters implement the [`HealthCheck`] port (PostgreSQL, Redis,
//! Pub/Sub, or anything custom) and the composition root registers them.
//! `keel-http` serves [`HealthRegistry::report`] as `/health/live` and
//! `/health/ready`; `keel-grpc` serves it as the standard gRPC health
//! service.
//!
//! * Every check runs in its own task with a time limit: a check that
//!   hangs is reported unhealthy after its timeout, one that panics is
//!   reported unhealthy, and neither delays the others.
//! * Reports are cached for a short time (one second by default) and
//!   computed once for all concurrent callers, so a burst of probes does
//!   not become a burst of database round trips.
//! * A check registered as non-critical can at worst make the probe
//!   degraded, never unhealthy.

use std::borrow::Cow;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use keel_core::{HealthCheck, HealthReport, HealthStatus, Probe};
use serde::Serialize;
use tokio::sync::Mutex;
use tokio::time::Instant;

/// How long a check may take when no timeout is given at registration.
pub const DEFAULT_CHECK_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a probe's report is reused.
pub const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(1);

/// How one check is run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CheckOptions {
    timeout: Option<Duration>,
    critical: bool,
}

impl Default for CheckOptions {
    fn default() -> Self {
        Self::new()
    }
}

impl CheckOptions {
    /// Critical, with the registry's default timeout.
    #[must_use]
    pub const fn new() -> Self {
        Self {
            timeout: None,
            critical: true,
        }
    }

    /// The time limit for this check.
    #[must_use]
    pub const fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// A non-critical check (an optional cache, a reporting replica): when
    /// it fails the probe is degraded, still serving.
    #[must_use]
    pub const fn non_critical(mut self) -> Self {
        self.critical = false;
        self
    }
}

struct Entry {
    check: Arc<dyn HealthCheck>,
    timeout: Duration,
    critical: bool,
}

struct Cached {
    at: Instant,
    generation: u64,
    report: ProbeReport,
}

struct Inner {
    checks: RwLock<Vec<Entry>>,
    cache_ttl: Duration,
    default_timeout: Duration,
    show_details: bool,
    /// Bumped by every registration, so no report from before it is reused.
    generation: AtomicU64,
    liveness: Mutex<Option<Cached>>,
    readiness: Mutex<Option<Cached>>,
}

/// The service's health checks, grouped by probe. Cheap to clone; clones
/// share checks and cache.
///
/// ```
/// use std::time::Duration;
/// use keel_core::{HealthCheck, HealthReport, Probe};
/// use keel_telemetry::health::{CheckOptions, HealthRegistry};
///
/// struct Always;
/// #[async_trait::async_trait]
/// impl HealthCheck for Always {
///     fn name(&self) -> &str { "always" }
///     async fn check(&self) -> HealthReport { HealthReport::healthy(Duration::ZERO) }
/// }
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let registry = HealthRegistry::builder().cache_ttl(Duration::from_millis(500)).build();
/// registry.register_with(Always, CheckOptions::new().timeout(Duration::from_secs(1)));
/// let ready = registry.report(Probe::Readiness).await;
/// assert!(ready.is_serving());
/// assert_eq!(ready.checks[0].name, "always");
/// # }
/// ```
#[derive(Clone)]
pub struct HealthRegistry {
    inner: Arc<Inner>,
}

impl fmt::Debug for HealthRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<String> = self
            .inner
            .checks
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|e| e.check.name().to_owned())
            .collect();
        f.debug_struct("HealthRegistry")
            .field("checks", &names)
            .field("cache_ttl", &self.inner.cache_ttl)
            .field("default_timeout", &self.inner.default_timeout)
            .field("show_details", &self.inner.show_details)
            .finish()
    }
}

impl Default for HealthRegistry {
    fn default() -> Self {
        Self::new()
    }
}

/// Builds a [`HealthRegistry`].
#[derive(Clone, Debug)]
pub struct HealthRegistryBuilder {
    cache_ttl: Duration,
    default_timeout: Duration,
    show_details: bool,
}

impl HealthRegistryBuilder {
    /// How long a probe's report is reused (default one second; zero
    /// turns caching off).
    #[must_use]
    pub fn cache_ttl(mut self, ttl: Duration) -> Self {
        self.cache_ttl = ttl;
        self
    }

    /// The time limit for checks registered without one (default 3 s).
    #[must_use]
    pub fn default_timeout(mut self, timeout: Duration) -> Self {
        self.default_timeout = timeout;
        self
    }

    /// Whether reports include each check's detail text (default `false`:
    /// health endpoints are often reachable from outside, and details can
    /// name hosts). Details are always logged when a check fails.
    #[must_use]
    pub fn show_details(mut self, show: bool) -> Self {
        self.show_details = show;
        self
    }

    /// Builds the empty registry.
    #[must_use]
    pub fn build(self) -> HealthRegistry {
        HealthRegistry {
            inner: Arc::new(Inner {
                checks: RwLock::new(Vec::new()),
                cache_ttl: self.cache_ttl,
                default_timeout: self.default_timeout,
                show_details: self.show_details,
                generation: AtomicU64::new(0),
                liveness: Mutex::new(None),
                readiness: Mutex::new(None),
            }),
        }
    }
}

impl HealthRegistry {
    /// An empty registry with the defaults.
    #[must_use]
    pub fn new() -> Self {
        Self::builder().build()
    }

    /// Configures a registry.
    #[must_use]
    pub fn builder() -> HealthRegistryBuilder {
        HealthRegistryBuilder {
            cache_ttl: DEFAULT_CACHE_TTL,
            default_timeout: DEFAULT_CHECK_TIMEOUT,
            show_details: false,
        }
    }

    /// Registers a critical check with the default timeout, for the probes
    /// it declares ([`HealthCheck::probes`]).
    pub fn register(&self, check: impl HealthCheck + 'static) -> &Self {
        self.register_shared(Arc::new(check), CheckOptions::new())
    }

    /// Registers a check with options.
    pub fn register_with(&self, check: impl HealthCheck + 'static, options: CheckOptions) -> &Self {
        self.register_shared(Arc::new(check), options)
    }

    /// Registers a shared check with options.
    pub fn register_shared(&self, check: Arc<dyn HealthCheck>, options: CheckOptions) -> &Self {
        let entry = Entry {
            check,
            timeout: options.timeout.unwrap_or(self.inner.default_timeout),
            critical: options.critical,
        };
        self.inner
            .checks
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push(entry);
        self.inner.generation.fetch_add(1, Ordering::SeqCst);
        self
    }

    /// Names of the registered checks.
    #[must_use]
    pub fn check_names(&self) -> Vec<String> {
        self.inner
            .checks
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|e| e.check.name().to_owned())
            .collect()
    }

    /// The liveness report.
    pub async fn liveness(&self) -> ProbeReport {
        self.report(Probe::Liveness).await
    }

    /// The readiness report.
    pub async fn readiness(&self) -> ProbeReport {
        self.report(Probe::Readiness).await
    }

    /// The report for `probe`: cached if fresh, otherwise computed once by
    /// running the probe's checks concurrently, each within its timeout.
    pub async fn report(&self, probe: Probe) -> ProbeReport {
        let slot = match probe {
            Probe::Liveness => &self.inner.liveness,
            Probe::Readiness => &self.inner.readiness,
        };
        // Holding the lock while checking makes concurrent callers wait
        // for one run instead of starting their own.
        let mut cached = slot.lock().await;
        let generation = self.inner.generation.load(Ordering::SeqCst);
        if let Some(c) = cached.as_ref()
            && c.generation == generation
            && c.at.elapsed() < self.inner.cache_ttl
        {
            return c.report.clone();
        }
        let report = self.run(probe).await;
        *cached = Some(Cached {
            at: Instant::now(),
            generation,
            report: report.clone(),
        });
        report
    }

    async fn run(&self, probe: Probe) -> ProbeReport {
        let selected: Vec<(Arc<dyn HealthCheck>, Duration, bool)> = self
            .inner
            .checks
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|e| e.check.applies_to(probe))
            .map(|e| (Arc::clone(&e.check), e.timeout, e.critical))
            .collect();
        let checked_at = Utc::now();
        let results = futures::future::join_all(
            selected
                .into_iter()
                .map(|(check, timeout, critical)| run_one(check, timeout, critical)),
        )
        .await;
        let mut status = HealthStatus::Healthy;
        let mut checks = Vec::with_capacity(results.len());
        for (name, critical, report) in results {
            let effective = if critical {
                report.status
            } else {
                report.status.min(HealthStatus::Degraded)
            };
            status = status.worst(effective);
            if report.status != HealthStatus::Healthy {
                tracing::warn!(
                    probe = probe.as_str(),
                    check = %name,
                    status = report.status.as_str(),
                    critical,
                    detail = %report.detail,
                    "health check not healthy"
                );
            }
            checks.push(CheckResult {
                name,
                status: report.status,
                critical,
                latency: report.latency,
                detail: if self.inner.show_details && !report.detail.is_empty() {
                    Some(report.detail.into_owned())
                } else {
                    None
                },
            });
        }
        ProbeReport {
            probe,
            status,
            checked_at,
            checks,
        }
    }
}

async fn run_one(
    check: Arc<dyn HealthCheck>,
    timeout: Duration,
    critical: bool,
) -> (String, bool, HealthReport) {
    let name = check.name().to_owned();
    let started = Instant::now();
    // A task of its own: a panic is contained, and a check that ignores
    // its own time limit is abandoned (aborted) at ours.
    let task = tokio::spawn(async move { check.check().await });
    let abort = task.abort_handle();
    let report = match tokio::time::timeout(timeout, task).await {
        Ok(Ok(report)) => report,
        Ok(Err(join)) if join.is_panic() => {
            HealthReport::unhealthy(started.elapsed(), "the check panicked")
        }
        Ok(Err(_)) => HealthReport::unhealthy(started.elapsed(), "the check was cancelled"),
        Err(_) => {
            abort.abort();
            HealthReport::unhealthy(
                started.elapsed(),
                Cow::Owned(format!("no answer within {timeout:?}")),
            )
        }
    };
    (name, critical, report)
}

/// The outcome of one probe: the overall status and each check's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct ProbeReport {
    /// Which probe this answers.
    #[serde(serialize_with = "ser_probe")]
    pub probe: Probe,
    /// The worst status among the checks (non-critical ones count as
    /// degraded at worst); healthy when there are none.
    #[serde(serialize_with = "ser_status")]
    pub status: HealthStatus,
    /// When the checks ran (the report may be served from the cache).
    pub checked_at: DateTime<Utc>,
    /// Each check's result, in registration order.
    pub checks: Vec<CheckResult>,
}

impl ProbeReport {
    /// Whether the service should get traffic (readiness) or be left
    /// running (liveness): healthy or degraded.
    #[must_use]
    pub fn is_serving(&self) -> bool {
        self.status.is_serving()
    }

    /// The result of the check named `name`.
    #[must_use]
    pub fn check(&self, name: &str) -> Option<&CheckResult> {
        self.checks.iter().find(|c| c.name == name)
    }
}

/// One check's result within a [`ProbeReport`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct CheckResult {
    /// The check's name.
    pub name: String,
    /// Its status.
    #[serde(serialize_with = "ser_status")]
    pub status: HealthStatus,
    /// Whether its failure makes the probe fail.
    pub critical: bool,
    /// How long it took (serialized as `latency_ms`).
    #[serde(rename = "latency_ms", serialize_with = "ser_millis")]
    pub latency: Duration,
    /// Its explanation, when the registry shows details.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

fn ser_status<S: serde::Serializer>(s: &HealthStatus, ser: S) -> Result<S::Ok, S::Error> {
    ser.serialize_str(s.as_str())
}

fn ser_probe<S: serde::Serializer>(p: &Probe, ser: S) -> Result<S::Ok, S::Error> {
    ser.serialize_str(p.as_str())
}

fn ser_millis<S: serde::Serializer>(d: &Duration, ser: S) -> Result<S::Ok, S::Error> {
    ser.serialize_f64((d.as_secs_f64() * 1_000_000.0).round() / 1000.0)
}
