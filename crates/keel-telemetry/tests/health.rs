//! The registry with real checks: hanging, panicking, failing, counting.
//! Time is paused, so timeouts and cache expiry are exact and instant.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use keel_core::{HealthCheck, HealthReport, HealthStatus, Probe};
use keel_telemetry::health::{CheckOptions, HealthRegistry};

/// A check that answers with a fixed status after a delay and counts runs.
struct Fixed {
    name: &'static str,
    status: HealthStatus,
    delay: Duration,
    probes: &'static [Probe],
    runs: Arc<AtomicUsize>,
}

impl Fixed {
    fn new(name: &'static str, status: HealthStatus) -> Self {
        Self {
            name,
            status,
            delay: Duration::ZERO,
            probes: &[Probe::Readiness],
            runs: Arc::default(),
        }
    }
    fn delayed(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }
    fn probes(mut self, probes: &'static [Probe]) -> Self {
        self.probes = probes;
        self
    }
}

#[async_trait]
impl HealthCheck for Fixed {
    fn name(&self) -> &str {
        self.name
    }
    fn probes(&self) -> &[Probe] {
        self.probes
    }
    async fn check(&self) -> HealthReport {
        self.runs.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(self.delay).await;
        HealthReport {
            status: self.status,
            latency: self.delay,
            detail: format!("{} says {}", self.name, self.status).into(),
        }
    }
}

/// A check that never answers.
struct Hangs;

#[async_trait]
impl HealthCheck for Hangs {
    fn name(&self) -> &str {
        "hangs"
    }
    async fn check(&self) -> HealthReport {
        std::future::pending().await
    }
}

/// A check with a bug.
struct Panics;

#[async_trait]
impl HealthCheck for Panics {
    fn name(&self) -> &str {
        "panics"
    }
    async fn check(&self) -> HealthReport {
        panic!("bug in the check")
    }
}

#[tokio::test(start_paused = true)]
async fn a_hanging_check_is_unhealthy_after_its_timeout_and_others_still_report() {
    let registry = HealthRegistry::builder().show_details(true).build();
    registry.register(Fixed::new("postgres", HealthStatus::Healthy));
    registry.register_with(
        Hangs,
        CheckOptions::new().timeout(Duration::from_millis(250)),
    );
    let report = registry.readiness().await;
    assert_eq!(report.status, HealthStatus::Unhealthy);
    assert!(!report.is_serving());
    let hung = report.check("hangs").unwrap();
    assert_eq!(hung.status, HealthStatus::Unhealthy);
    assert_eq!(hung.detail.as_deref(), Some("no answer within 250ms"));
    assert!(hung.latency >= Duration::from_millis(250));
    assert_eq!(
        report.check("postgres").unwrap().status,
        HealthStatus::Healthy
    );
}

#[tokio::test]
async fn a_panicking_check_is_unhealthy() {
    let registry = HealthRegistry::builder().show_details(true).build();
    registry.register(Panics);
    let report = registry.readiness().await;
    assert_eq!(report.status, HealthStatus::Unhealthy);
    assert_eq!(
        report.check("panics").unwrap().detail.as_deref(),
        Some("the check panicked")
    );
}

#[tokio::test]
async fn non_critical_failures_degrade_but_keep_serving() {
    let registry = HealthRegistry::new();
    registry.register(Fixed::new("postgres", HealthStatus::Healthy));
    registry.register_with(
        Fixed::new("redis", HealthStatus::Unhealthy),
        CheckOptions::new().non_critical(),
    );
    let report = registry.readiness().await;
    assert_eq!(report.status, HealthStatus::Degraded);
    assert!(report.is_serving());
    let redis = report.check("redis").unwrap();
    assert_eq!(redis.status, HealthStatus::Unhealthy);
    assert!(!redis.critical);
}

#[tokio::test]
async fn liveness_and_readiness_run_their_own_checks() {
    let registry = HealthRegistry::new();
    registry.register(Fixed::new("postgres", HealthStatus::Unhealthy));
    registry.register(Fixed::new("event-loop", HealthStatus::Healthy).probes(&[Probe::Liveness]));
    let live = registry.liveness().await;
    assert!(live.is_serving());
    assert_eq!(
        live.checks
            .iter()
            .map(|c| c.name.as_str())
            .collect::<Vec<_>>(),
        ["event-loop"]
    );
    let ready = registry.readiness().await;
    assert!(!ready.is_serving());
    assert_eq!(
        ready
            .checks
            .iter()
            .map(|c| c.name.as_str())
            .collect::<Vec<_>>(),
        ["postgres"]
    );
    // No checks at all: alive.
    assert!(HealthRegistry::new().liveness().await.is_serving());
}

#[tokio::test(start_paused = true)]
async fn reports_are_cached_and_computed_once_for_concurrent_callers() {
    let registry = HealthRegistry::builder()
        .cache_ttl(Duration::from_secs(2))
        .build();
    let check = Fixed::new("postgres", HealthStatus::Healthy).delayed(Duration::from_millis(50));
    let runs = Arc::clone(&check.runs);
    registry.register(check);

    let reports = futures::future::join_all((0..20).map(|_| {
        let r = registry.clone();
        async move { r.readiness().await }
    }))
    .await;
    assert_eq!(runs.load(Ordering::SeqCst), 1, "one run for 20 callers");
    assert!(reports.iter().all(|r| *r == reports[0]));

    tokio::time::advance(Duration::from_secs(1)).await;
    registry.readiness().await;
    assert_eq!(runs.load(Ordering::SeqCst), 1, "still fresh");

    tokio::time::advance(Duration::from_secs(2)).await;
    registry.readiness().await;
    assert_eq!(runs.load(Ordering::SeqCst), 2, "expired");

    // Registering a check drops the cached report.
    registry.register(Fixed::new("redis", HealthStatus::Healthy));
    let report = registry.readiness().await;
    assert_eq!(runs.load(Ordering::SeqCst), 3);
    assert_eq!(report.checks.len(), 2);
}

#[tokio::test]
async fn details_are_hidden_unless_asked_for_and_json_has_a_stable_shape() {
    let hidden = HealthRegistry::new();
    hidden.register(Fixed::new("postgres", HealthStatus::Degraded));
    let report = hidden.readiness().await;
    assert_eq!(report.check("postgres").unwrap().detail, None);
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["probe"], "readiness");
    assert_eq!(json["status"], "degraded");
    assert_eq!(json["checks"][0]["name"], "postgres");
    assert_eq!(json["checks"][0]["status"], "degraded");
    assert_eq!(json["checks"][0]["critical"], true);
    assert!(json["checks"][0]["latency_ms"].is_number());
    assert!(json["checks"][0].get("detail").is_none());
    assert!(json["checked_at"].as_str().unwrap().ends_with('Z'));

    let shown = HealthRegistry::builder().show_details(true).build();
    shown.register(Fixed::new("postgres", HealthStatus::Degraded));
    let json = serde_json::to_value(shown.readiness().await).unwrap();
    assert_eq!(json["checks"][0]["detail"], "postgres says degraded");
}
