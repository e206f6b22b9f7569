//! The health-check port: every dependency (database, broker, cache) reports
//! whether it can serve, how long the check took, and why not.
//!
//! A service collects its checks (as `Arc<dyn HealthCheck>`) in a registry
//! that serves liveness and readiness endpoints. Which probe a check feeds is
//! part of the check: a database outage should take an instance out of load
//! balancing ([`Probe::Readiness`]) without getting it restarted
//! ([`Probe::Liveness`]), since a restart would not bring the database back.

use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

use async_trait::async_trait;

/// How healthy a component is.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub enum HealthStatus {
    /// Works as expected.
    Healthy,
    /// Works, but slowly or close to a limit; still serves traffic.
    Degraded,
    /// Does not work.
    Unhealthy,
}

impl HealthStatus {
    /// A stable lower-case name: `healthy`, `degraded` or `unhealthy`.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            HealthStatus::Healthy => "healthy",
            HealthStatus::Degraded => "degraded",
            HealthStatus::Unhealthy => "unhealthy",
        }
    }

    /// Whether a component in this state can serve (healthy or degraded).
    #[must_use]
    pub const fn is_serving(self) -> bool {
        !matches!(self, HealthStatus::Unhealthy)
    }

    /// The worse of two statuses; folds many checks into one.
    ///
    /// ```
    /// use keel_core::HealthStatus::*;
    /// assert_eq!(Healthy.worst(Degraded), Degraded);
    /// assert_eq!(Unhealthy.worst(Degraded), Unhealthy);
    /// ```
    #[must_use]
    pub fn worst(self, other: HealthStatus) -> HealthStatus {
        self.max(other)
    }
}

impl fmt::Display for HealthStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The two questions an orchestrator asks.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Probe {
    /// "Is this process alive, or should it be restarted?" Only checks whose
    /// failure a restart can fix belong here.
    Liveness,
    /// "Can this instance serve traffic now?" Dependencies belong here.
    Readiness,
}

impl Probe {
    /// A stable lower-case name: `liveness` or `readiness`.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Probe::Liveness => "liveness",
            Probe::Readiness => "readiness",
        }
    }
}

impl fmt::Display for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The outcome of one health check.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct HealthReport {
    /// How healthy the component is.
    pub status: HealthStatus,
    /// How long the check took.
    pub latency: Duration,
    /// A short explanation for people, free of secrets (empty when
    /// healthy and there is nothing to add).
    pub detail: Cow<'static, str>,
}

impl HealthReport {
    /// A healthy report.
    #[must_use]
    pub fn healthy(latency: Duration) -> Self {
        Self {
            status: HealthStatus::Healthy,
            latency,
            detail: Cow::Borrowed(""),
        }
    }

    /// A degraded report with a reason.
    pub fn degraded(latency: Duration, detail: impl Into<Cow<'static, str>>) -> Self {
        Self {
            status: HealthStatus::Degraded,
            latency,
            detail: detail.into(),
        }
    }

    /// An unhealthy report with a reason.
    pub fn unhealthy(latency: Duration, detail: impl Into<Cow<'static, str>>) -> Self {
        Self {
            status: HealthStatus::Unhealthy,
            latency,
            detail: detail.into(),
        }
    }

    /// Replaces the detail.
    #[must_use]
    pub fn with_detail(mut self, detail: impl Into<Cow<'static, str>>) -> Self {
        self.detail = detail.into();
        self
    }
}

/// One health check of one component.
///
/// Implementations bound their own running time (a check that hangs is
/// reported as unhealthy by the check itself, not by the caller's timeout)
/// and never panic or return errors: every failure is a report.
///
/// ```
/// use std::time::{Duration, Instant};
/// use keel_core::{HealthCheck, HealthReport, Probe};
///
/// struct DiskSpace;
///
/// #[async_trait::async_trait]
/// impl HealthCheck for DiskSpace {
///     fn name(&self) -> &str { "disk" }
///     fn probes(&self) -> &[Probe] { &[Probe::Liveness, Probe::Readiness] }
///     async fn check(&self) -> HealthReport {
///         let started = Instant::now();
///         HealthReport::healthy(started.elapsed())
///     }
/// }
///
/// let checks: Vec<std::sync::Arc<dyn HealthCheck>> = vec![std::sync::Arc::new(DiskSpace)];
/// assert!(checks[0].applies_to(Probe::Liveness));
/// ```
#[async_trait]
pub trait HealthCheck: Send + Sync {
    /// A short, stable name, e.g. `postgres` or `pubsub`.
    fn name(&self) -> &str;

    /// The probes this check feeds (readiness only, unless overridden).
    fn probes(&self) -> &[Probe] {
        &[Probe::Readiness]
    }

    /// Whether this check feeds `probe`.
    fn applies_to(&self, probe: Probe) -> bool {
        self.probes().contains(&probe)
    }

    /// Runs the check.
    async fn check(&self) -> HealthReport;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_order_from_good_to_bad() {
        assert!(HealthStatus::Healthy < HealthStatus::Degraded);
        assert!(HealthStatus::Degraded < HealthStatus::Unhealthy);
        assert!(HealthStatus::Degraded.is_serving());
        assert!(!HealthStatus::Unhealthy.is_serving());
        assert_eq!(HealthStatus::Unhealthy.to_string(), "unhealthy");
    }

    #[test]
    fn reports() {
        let r = HealthReport::degraded(Duration::from_millis(3), "slow");
        assert_eq!(r.status, HealthStatus::Degraded);
        assert_eq!(r.detail, "slow");
        assert_eq!(HealthReport::healthy(Duration::ZERO).detail, "");
    }
}
