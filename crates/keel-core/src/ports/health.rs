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
use std::future::{Future, poll_fn};
use std::pin::pin;
use std::task::Poll;
use std::time::{Duration, Instant};

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

/// The two limits of a check that probes a dependency over the network, and
/// the rule that turns a probe's outcome into a [`HealthReport`].
///
/// [`run`](Self::run) times the probe, bounds it with `timeout`, and reports:
///
/// * `Unhealthy`, "no answer within {timeout}", when the probe does not
///   finish in time;
/// * `Unhealthy`, with the error's text, when the probe fails;
/// * `Degraded`, "slow: answered in {latency}", when it succeeds but took
///   longer than `degraded_after`;
/// * `Healthy` otherwise.
///
/// `keel-core` has no runtime, so the caller passes its timer (for tokio,
/// `tokio::time::sleep`).
///
/// ```
/// use std::time::Duration;
/// use keel_core::HealthStatus;
/// use keel_core::ports::health::ProbeLimits;
///
/// # block_on(async {
/// let limits = ProbeLimits::new(Duration::from_secs(1), Duration::from_millis(250));
/// let ping = async { Ok::<(), std::io::Error>(()) };
/// let report = limits.run(ping, tokio::time::sleep).await;
/// assert_eq!(report.status, HealthStatus::Healthy);
/// # });
/// # fn block_on(f: impl std::future::Future<Output = ()>) {
/// #     let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
/// #     rt.block_on(f)
/// # }
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct ProbeLimits {
    /// How long the probe may run before it counts as failed.
    pub timeout: Duration,
    /// The latency above which a successful probe reports `Degraded`.
    pub degraded_after: Duration,
}

impl ProbeLimits {
    /// Limits with this time limit and this "slow" threshold.
    #[must_use]
    pub const fn new(timeout: Duration, degraded_after: Duration) -> Self {
        Self {
            timeout,
            degraded_after,
        }
    }

    /// Runs `probe` under [`timeout`](Self::timeout), timed from this call,
    /// and maps the outcome to a report (see the type's docs).
    ///
    /// `sleep` makes the timer: it is called once with the time limit, and
    /// the probe loses once the future it returns completes. The probe is
    /// polled first, so an answer that is ready at the deadline still counts.
    pub async fn run<P, E, S>(&self, probe: P, sleep: impl FnOnce(Duration) -> S) -> HealthReport
    where
        P: Future<Output = Result<(), E>>,
        E: fmt::Display,
        S: Future<Output = ()>,
    {
        let started = Instant::now();
        let mut probe = pin!(probe);
        let mut timer = pin!(sleep(self.timeout));
        let outcome = poll_fn(|cx| {
            if let Poll::Ready(answer) = probe.as_mut().poll(cx) {
                return Poll::Ready(Some(answer));
            }
            timer.as_mut().poll(cx).map(|()| None)
        })
        .await;
        self.report(outcome, started.elapsed())
    }

    /// Maps a probe's outcome (`None` when it did not answer in time) and
    /// its latency to a report; [`run`](Self::run) without the timing, for
    /// checks that bound their probe some other way.
    #[must_use]
    pub fn report<E: fmt::Display>(
        &self,
        outcome: Option<Result<(), E>>,
        latency: Duration,
    ) -> HealthReport {
        match outcome {
            None => {
                HealthReport::unhealthy(latency, format!("no answer within {:?}", self.timeout))
            }
            Some(Err(e)) => HealthReport::unhealthy(latency, e.to_string()),
            Some(Ok(())) if latency > self.degraded_after => {
                HealthReport::degraded(latency, format!("slow: answered in {latency:?}"))
            }
            Some(Ok(())) => HealthReport::healthy(latency),
        }
    }
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

    const LIMITS: ProbeLimits =
        ProbeLimits::new(Duration::from_secs(3600), Duration::from_secs(3600));

    /// A timer that never fires: the probe always wins.
    fn never(_: Duration) -> std::future::Pending<()> {
        std::future::pending()
    }

    #[tokio::test]
    async fn a_probe_that_answers_in_time_is_healthy() {
        let report = LIMITS.run(async { Ok::<(), String>(()) }, never).await;
        assert_eq!(report.status, HealthStatus::Healthy, "{report:?}");
        assert_eq!(report.detail, "");
    }

    #[tokio::test]
    async fn a_probe_slower_than_the_threshold_is_degraded() {
        let limits = ProbeLimits::new(Duration::from_secs(3600), Duration::from_millis(1));
        let slow = async {
            // Blocking on purpose: the probe cannot finish in under 2 ms.
            std::thread::sleep(Duration::from_millis(2));
            Ok::<(), String>(())
        };
        let report = limits.run(slow, never).await;
        assert_eq!(report.status, HealthStatus::Degraded, "{report:?}");
        assert!(report.latency >= Duration::from_millis(2));
        assert_eq!(
            report.detail,
            format!("slow: answered in {:?}", report.latency)
        );
    }

    #[test]
    fn the_threshold_itself_is_not_slow() {
        let limits = ProbeLimits::new(Duration::from_secs(1), Duration::from_millis(250));
        let at = limits.report(Some(Ok::<(), String>(())), Duration::from_millis(250));
        assert_eq!(at.status, HealthStatus::Healthy);
        let above = limits.report(Some(Ok::<(), String>(())), Duration::from_millis(251));
        assert_eq!(above.status, HealthStatus::Degraded);
        assert_eq!(above.latency, Duration::from_millis(251));
    }

    #[tokio::test]
    async fn a_probe_that_never_answers_times_out() {
        let limits = ProbeLimits::new(Duration::from_millis(20), Duration::ZERO);
        let mut asked = None;
        let timer = |limit| {
            asked = Some(limit);
            std::future::ready(())
        };
        let report = limits
            .run(std::future::pending::<Result<(), String>>(), timer)
            .await;
        assert_eq!(asked, Some(Duration::from_millis(20)));
        assert_eq!(report.status, HealthStatus::Unhealthy, "{report:?}");
        assert_eq!(report.detail, "no answer within 20ms");
    }

    #[tokio::test]
    async fn an_answer_ready_at_the_deadline_still_counts() {
        let ready_timer = |_| std::future::ready(());
        let report = LIMITS
            .run(async { Ok::<(), String>(()) }, ready_timer)
            .await;
        assert_eq!(report.status, HealthStatus::Healthy, "{report:?}");
    }

    #[tokio::test]
    async fn a_failing_probe_is_unhealthy_with_its_error() {
        let refused = async {
            Err::<(), _>(std::io::Error::new(
                std::io::ErrorKind::ConnectionRefused,
                "connection refused",
            ))
        };
        let report = LIMITS.run(refused, never).await;
        assert_eq!(report.status, HealthStatus::Unhealthy, "{report:?}");
        assert_eq!(report.detail, "connection refused");
    }
}
