//! The running projection: status, lag, readiness, rebuild, stop.

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use keel_core::{HealthCheck, HealthReport, Probe};
use keel_eventstore::{EventStore, Subscription, SubscriptionHandle, SubscriptionSupport};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{ProjectionStatus, RebuildReport, Shared, create_with_settings};
use crate::engine::Wait;
use crate::error::{Result, SearchError};
use crate::names::IndexName;

/// A running projection.
///
/// Keel's rule for background handles: [`shutdown`](Self::shutdown) stops
/// gracefully (the subscription finishes the event in hand and stores its
/// checkpoint); [`abort`](Self::abort) stops at once and returns once the
/// tasks have ended; dropping the handle aborts without waiting.
pub struct ProjectionHandle<S: ?Sized> {
    pub(super) shared: Arc<Shared<S>>,
    pub(super) live: Option<SubscriptionHandle>,
    pub(super) monitor: Option<JoinHandle<()>>,
    pub(super) stop: watch::Sender<bool>,
}

impl<S: ?Sized> fmt::Debug for ProjectionHandle<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProjectionHandle")
            .field("index", &self.shared.index)
            .field("name", &self.shared.options.name)
            .finish_non_exhaustive()
    }
}

impl<S> ProjectionHandle<S>
where
    S: EventStore + SubscriptionSupport + ?Sized + 'static,
{
    /// The latest status (lag as of the last measurement).
    #[must_use]
    pub fn status(&self) -> ProjectionStatus {
        self.shared
            .status
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The index the projection writes.
    #[must_use]
    pub fn index(&self) -> &IndexName {
        &self.shared.index
    }

    /// Measures the lag now (and publishes it).
    ///
    /// # Errors
    ///
    /// [`SearchError::Unavailable`] when the log cannot be read.
    pub async fn lag(&self) -> Result<(u64, Duration)> {
        self.shared.measure().await
    }

    /// Waits until no event is waiting, or fails after `timeout`.
    ///
    /// # Errors
    ///
    /// [`SearchError::Timeout`]; [`SearchError::Unavailable`] when the
    /// projection stopped with an error or the log cannot be read.
    pub async fn wait_caught_up(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(why) = self.status().failed {
                return Err(SearchError::Unavailable {
                    message: format!("the projection stopped: {why}"),
                    source: None,
                });
            }
            let (events, _) = self.shared.measure().await?;
            if events == 0 {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(SearchError::Timeout {
                    operation: format!("catching up projection {}", self.shared.options.name),
                    after: timeout,
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A readiness check for the service's health registry: unhealthy when
    /// more than [`ProjectionOptions::max_ready_lag`](super::ProjectionOptions::max_ready_lag) events wait, the log
    /// cannot be read, or the projection stopped with an error.
    #[must_use]
    pub fn readiness(&self) -> Arc<dyn HealthCheck> {
        Arc::new(Readiness {
            shared: Arc::clone(&self.shared) as Arc<dyn Measure>,
            name: format!("search-projection-{}", self.shared.options.name),
        })
    }

    /// Replays the whole log (from position 0) into a new index with the
    /// projection's settings (so a rebuild also rolls out changed
    /// settings), then swaps it in for the live one once it has caught
    /// up, and resumes the live projection from there. The old contents
    /// are deleted afterwards. Searches keep using the old index until the
    /// atomic swap.
    ///
    /// On failure or timeout the live projection is restarted as it was
    /// and the new index deleted.
    ///
    /// # Errors
    ///
    /// [`SearchError::Timeout`] when the new index did not catch up within
    /// `timeout`; what the engine or the store reports.
    pub async fn rebuild(&mut self, timeout: Duration) -> Result<RebuildReport> {
        let started = Instant::now();
        let shared = Arc::clone(&self.shared);
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let shadow = IndexName::new(format!("{}__rebuild_{}", shared.index, &suffix[..8]))?;
        let rebuild_name = format!("{}-rebuild-{}", shared.options.name, &suffix[..8]);
        let wait = Wait::applied(shared.options.write_timeout);
        if let Err(e) = create_with_settings(
            &*shared.engine,
            &shadow,
            &shared.primary_key,
            &shared.settings,
            wait,
        )
        .await
        {
            let _ = shared.engine.delete_index(&shadow, wait).await;
            return Err(e);
        }
        shared
            .status
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .rebuilding = true;
        let rebuild_status = Arc::new(Mutex::new(ProjectionStatus::default()));
        let rebuild = Subscription::spawn(
            Arc::clone(&shared.store),
            shared.options.subscription_for(&rebuild_name),
            shared.handler(shadow.clone(), Arc::clone(&rebuild_status)),
        );
        let outcome = self
            .finish_rebuild(
                &shadow,
                &rebuild_name,
                rebuild,
                &rebuild_status,
                started,
                timeout,
            )
            .await;
        shared
            .status
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .rebuilding = false;
        if outcome.is_err() {
            let _ = shared.engine.delete_index(&shadow, wait).await;
            if self.live.is_none() {
                self.live = Some(shared.spawn_live());
            }
        }
        outcome
    }

    async fn finish_rebuild(
        &mut self,
        shadow: &IndexName,
        rebuild_name: &str,
        rebuild: SubscriptionHandle,
        rebuild_status: &Arc<Mutex<ProjectionStatus>>,
        started: Instant,
        timeout: Duration,
    ) -> Result<RebuildReport> {
        let shared = Arc::clone(&self.shared);
        let deadline = started + timeout;
        let rebuild_position = || {
            rebuild_status
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .position
        };
        let store_err = |e: keel_eventstore::EventStoreError| SearchError::Unavailable {
            message: "the event store failed during a rebuild".to_owned(),
            source: Some(Box::new(e)),
        };
        // 1. Let the new index catch up with the live one's neighbourhood.
        let mut live_stopped = false;
        loop {
            let (waiting, _) = shared
                .lag_after(rebuild_position(), shared.options.max_ready_lag.max(1) + 1)
                .await?;
            if !live_stopped && waiting <= shared.options.max_ready_lag {
                // 2. Stop the live projection: from here only the rebuild
                //    moves, so it can reach the head of the log.
                if let Some(live) = self.live.take() {
                    live.shutdown().await.map_err(store_err)?;
                }
                live_stopped = true;
            }
            if live_stopped && waiting == 0 {
                break;
            }
            let failed = rebuild_status
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .failed
                .clone();
            if let Some(why) = failed {
                rebuild.abort().await;
                return Err(SearchError::Unavailable {
                    message: why,
                    source: None,
                });
            }
            if Instant::now() >= deadline {
                rebuild.abort().await;
                return Err(SearchError::Timeout {
                    operation: format!("rebuilding search index {}", shared.index),
                    after: timeout,
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // 3. Stop the rebuild (it stores its checkpoint), swap, and move
        //    the live checkpoint to where the rebuild ended.
        rebuild.shutdown().await.map_err(store_err)?;
        let position = rebuild_position();
        let wait = Wait::applied(shared.options.write_timeout);
        shared
            .engine
            .swap_indexes(&shared.index, shadow, wait)
            .await?;
        if let Some(p) = position {
            shared
                .store
                .save_checkpoint(&shared.options.name, p)
                .await
                .map_err(store_err)?;
            shared
                .status
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .position = Some(p);
        }
        self.live = Some(shared.spawn_live());
        if let Err(e) = shared.engine.delete_index(shadow, wait).await {
            tracing::warn!(index = %shadow, error = %e, "cannot delete the replaced search index");
        }
        tracing::info!(projection = %shared.options.name, subscription = rebuild_name, "search index rebuilt and swapped in");
        let documents = shared.engine.document_count(&shared.index).await?;
        Ok(RebuildReport {
            position,
            documents,
            took: started.elapsed(),
        })
    }

    /// Stops gracefully: the subscription finishes the event in hand and
    /// stores its checkpoint.
    ///
    /// # Errors
    ///
    /// The error that stopped the subscription earlier, if any.
    pub async fn shutdown(mut self) -> Result<()> {
        let _ = self.stop.send(true);
        if let Some(m) = self.monitor.take() {
            let _ = m.await;
        }
        match self.live.take() {
            Some(live) => live.shutdown().await.map_err(|e| SearchError::Unavailable {
                message: "the projection's subscription failed".to_owned(),
                source: Some(Box::new(e)),
            }),
            None => Ok(()),
        }
    }

    /// Stops at once, like a crash (no final checkpoint), and returns when
    /// the tasks have ended.
    pub async fn abort(mut self) {
        if let Some(m) = self.monitor.take() {
            m.abort();
            let _ = m.await;
        }
        if let Some(live) = self.live.take() {
            live.abort().await;
        }
    }
}

impl<S: ?Sized> Drop for ProjectionHandle<S> {
    fn drop(&mut self) {
        if let Some(m) = self.monitor.take() {
            m.abort();
        }
    }
}

/// Lag measurement, without the store's type (for the health check).
#[async_trait]
trait Measure: Send + Sync {
    async fn measure_now(&self) -> Result<(u64, Duration)>;
    fn max_ready_lag(&self) -> u64;
    fn failed(&self) -> Option<String>;
}

#[async_trait]
impl<S> Measure for Shared<S>
where
    S: EventStore + SubscriptionSupport + ?Sized + 'static,
{
    async fn measure_now(&self) -> Result<(u64, Duration)> {
        self.measure().await
    }

    fn max_ready_lag(&self) -> u64 {
        self.options.max_ready_lag
    }

    fn failed(&self) -> Option<String> {
        self.status
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .failed
            .clone()
    }
}

struct Readiness {
    shared: Arc<dyn Measure>,
    name: String,
}

#[async_trait]
impl HealthCheck for Readiness {
    fn name(&self) -> &str {
        &self.name
    }

    fn probes(&self) -> &[Probe] {
        &[Probe::Readiness]
    }

    async fn check(&self) -> HealthReport {
        let started = Instant::now();
        if let Some(why) = self.shared.failed() {
            return HealthReport::unhealthy(
                started.elapsed(),
                format!("projection stopped: {why}"),
            );
        }
        let max = self.shared.max_ready_lag();
        match tokio::time::timeout(Duration::from_secs(5), self.shared.measure_now()).await {
            Err(_) => HealthReport::unhealthy(started.elapsed(), "no lag measurement within 5s"),
            Ok(Err(e)) => {
                HealthReport::unhealthy(started.elapsed(), format!("cannot measure lag: {e}"))
            }
            Ok(Ok((events, age))) if events > max => HealthReport::unhealthy(
                started.elapsed(),
                format!(
                    "more than {max} events behind (oldest waiting {:.1}s)",
                    age.as_secs_f64()
                ),
            ),
            Ok(Ok((0, _))) => HealthReport::healthy(started.elapsed()),
            Ok(Ok((events, age))) => HealthReport::healthy(started.elapsed()).with_detail(format!(
                "{events} events behind (oldest waiting {:.1}s)",
                age.as_secs_f64()
            )),
        }
    }
}
