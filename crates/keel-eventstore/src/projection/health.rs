//! Lag, parked counts and stalls of subscriptions and projections, as
//! metrics and as a readiness check.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use keel_core::{HealthCheck, HealthReport, Position, Probe};
use keel_telemetry::KeelMetrics;
use tokio::sync::watch;

use super::runner::ProjectionStatus;
use super::{ProjectionId, ProjectionSupport};
use crate::error::Result;
use crate::event::ReadAll;
use crate::store::SubscriptionSupport;
use crate::subscription::SubscriptionStatus;

/// Counting pending events stops here: a reader that far behind is simply
/// "far behind", and the count stays cheap.
pub const LAG_COUNT_LIMIT: u64 = 100_000;

/// How far a reader is behind the log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Lag {
    /// Stored events after the reader's position that pass its filter (at
    /// most [`LAG_COUNT_LIMIT`]).
    pub events: u64,
    /// When the oldest of them was recorded (`None` when there are none).
    pub oldest: Option<DateTime<Utc>>,
}

impl Lag {
    /// Lag in time: the age of the oldest event not yet handled (zero when
    /// caught up).
    #[must_use]
    pub fn age(&self) -> Duration {
        self.oldest
            .and_then(|t| (Utc::now() - t).to_std().ok())
            .unwrap_or_default()
    }
}

/// Measures how far a position is behind the log.
#[async_trait]
pub trait LogLag: Send + Sync {
    /// The events stored after `after` that pass `filter` (its own start
    /// position is ignored), counting committed events the global read may
    /// not return yet.
    async fn lag_after(&self, after: Position, filter: &ReadAll) -> Result<Lag>;
}

/// What a progress check measures once.
#[derive(Debug)]
pub(crate) struct Progress {
    pub(crate) lag: Lag,
    pub(crate) parked: u64,
    pub(crate) ended: Option<String>,
}

#[async_trait]
pub(crate) trait ProgressSource: Send + Sync + std::fmt::Debug {
    /// The check's name.
    fn label(&self) -> String;
    async fn progress(&self) -> Result<Progress>;
}

/// A readiness check for one subscription or projection: its lag in events
/// and in time, its parked events, and whether it ended.
///
/// * `Unhealthy` when the runner ended with an error (a halt on a parked
///   event, a handler error), when the oldest event it has not handled is
///   older than [`stuck_after`](Self::stuck_after) (default 5 min: it is
///   stuck), or when the lag cannot be measured;
/// * `Degraded` when that age is above
///   [`degraded_after`](Self::degraded_after) (default 30 s) or events are
///   parked;
/// * `Healthy` otherwise.
///
/// Each run also records the gauges `keel.eventstore.projection.lag`
/// (seconds), `keel.eventstore.projection.lag.events` and
/// `keel.eventstore.projection.parked`, attribute `keel.projection`.
/// Get one from [`ProjectionHandle::progress_check`](crate::ProjectionHandle::progress_check)
/// or [`SubscriptionHandle::progress_check`](crate::SubscriptionHandle::progress_check).
#[derive(Clone, Debug)]
pub struct ProgressCheck {
    source: Arc<dyn ProgressSource>,
    name: String,
    degraded_after: Duration,
    stuck_after: Duration,
    timeout: Duration,
    metrics: Option<KeelMetrics>,
}

impl ProgressCheck {
    pub(crate) fn new(source: Arc<dyn ProgressSource>) -> Self {
        Self {
            name: source.label(),
            source,
            degraded_after: Duration::from_secs(30),
            stuck_after: Duration::from_secs(300),
            timeout: Duration::from_secs(2),
            metrics: None,
        }
    }

    /// Renames the check.
    #[must_use]
    pub fn named(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// The lag age above which the check reports `Degraded`.
    #[must_use]
    pub fn degraded_after(mut self, age: Duration) -> Self {
        self.degraded_after = age;
        self
    }

    /// The lag age above which the reader counts as stuck (`Unhealthy`).
    #[must_use]
    pub fn stuck_after(mut self, age: Duration) -> Self {
        self.stuck_after = age;
        self
    }

    /// The time limit of one measurement (default 2 s).
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Records the gauges through `metrics` instead of the global meter
    /// provider's instruments.
    #[must_use]
    pub fn with_metrics(mut self, metrics: KeelMetrics) -> Self {
        self.metrics = Some(metrics);
        self
    }
}

#[async_trait]
impl HealthCheck for ProgressCheck {
    fn name(&self) -> &str {
        &self.name
    }

    fn probes(&self) -> &[Probe] {
        &[Probe::Readiness]
    }

    async fn check(&self) -> HealthReport {
        let started = Instant::now();
        let measured = tokio::time::timeout(self.timeout, self.source.progress()).await;
        let latency = started.elapsed();
        let progress = match measured {
            Err(_) => {
                return HealthReport::unhealthy(
                    latency,
                    format!("no measurement within {:?}", self.timeout),
                );
            }
            Ok(Err(e)) => {
                return HealthReport::unhealthy(latency, format!("cannot measure the lag: {e}"));
            }
            Ok(Ok(p)) => p,
        };
        let age = progress.lag.age();
        self.metrics
            .clone()
            .unwrap_or_else(KeelMetrics::global)
            .record_projection(&self.name, age, progress.lag.events, progress.parked);
        let behind = format!(
            "{} events behind, oldest unhandled {:.1} s old, {} parked",
            progress.lag.events,
            age.as_secs_f64(),
            progress.parked
        );
        if let Some(reason) = progress.ended {
            return HealthReport::unhealthy(latency, format!("stopped: {reason}; {behind}"));
        }
        let behind_at_all = progress.lag.events > 0;
        if behind_at_all && age >= self.stuck_after {
            return HealthReport::unhealthy(latency, format!("stuck: {behind}"));
        }
        if (behind_at_all && age >= self.degraded_after) || progress.parked > 0 {
            return HealthReport::degraded(latency, behind);
        }
        HealthReport::healthy(latency).with_detail(behind)
    }
}

/// A projection's progress: its runner's status and the stored state.
pub(crate) struct ProjectionSource<S: ?Sized> {
    pub(crate) store: Arc<S>,
    pub(crate) id: ProjectionId,
    pub(crate) filter: ReadAll,
    pub(crate) status: watch::Receiver<ProjectionStatus>,
    pub(crate) ended: Arc<Mutex<Option<String>>>,
}

impl<S: ?Sized> std::fmt::Debug for ProjectionSource<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProjectionSource")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl<S> ProgressSource for ProjectionSource<S>
where
    S: ProjectionSupport + LogLag + ?Sized,
{
    fn label(&self) -> String {
        format!("projection:{}", self.id)
    }

    async fn progress(&self) -> Result<Progress> {
        let seen = self.status.borrow().position;
        let position = match seen {
            Some(p) => p,
            None => self
                .store
                .projection_state(&self.id)
                .await?
                .map_or(Position::START, |s| s.checkpoint),
        };
        let lag = self.store.lag_after(position, &self.filter).await?;
        let parked = self.store.parked_events(&self.id).await?.len() as u64;
        let ended = self
            .ended
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        Ok(Progress { lag, parked, ended })
    }
}

/// A subscription's progress: the position its handler reached (the
/// stored checkpoint before it handled anything).
pub(crate) struct SubscriptionSource<S: ?Sized> {
    pub(crate) store: Arc<S>,
    pub(crate) name: String,
    pub(crate) filter: ReadAll,
    pub(crate) status: watch::Receiver<SubscriptionStatus>,
    pub(crate) ended: Arc<Mutex<Option<String>>>,
}

impl<S: ?Sized> std::fmt::Debug for SubscriptionSource<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SubscriptionSource")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl<S> ProgressSource for SubscriptionSource<S>
where
    S: SubscriptionSupport + LogLag + ?Sized,
{
    fn label(&self) -> String {
        format!("subscription:{}", self.name)
    }

    async fn progress(&self) -> Result<Progress> {
        let seen = self.status.borrow().position;
        let position = match seen {
            Some(p) => p,
            None => self
                .store
                .load_checkpoint(&self.name)
                .await?
                .unwrap_or(Position::START),
        };
        let lag = self.store.lag_after(position, &self.filter).await?;
        let ended = self
            .ended
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        Ok(Progress {
            lag,
            parked: 0,
            ended,
        })
    }
}
