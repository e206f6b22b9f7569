//! Running a relay: the loop, its background task and its handle.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::Relay;

impl Relay {
    /// Runs until `shutdown` completes: publishes whatever is pending, then
    /// waits for a commit notification (or the poll interval), and prunes
    /// every [`prune_interval`](super::RelayConfig::prune_interval).
    ///
    /// Database and bus failures are logged and retried with backoff; they
    /// never end the loop. On shutdown the batch in flight is finished and
    /// committed first, so stopping never causes a duplicate.
    pub async fn run<F>(self, shutdown: F)
    where
        F: Future<Output = ()> + Send,
    {
        let wake = Arc::new(Notify::new());
        // Ended with this future, however it ends (an abort drops it).
        let _listener = AbortOnDrop(
            self.source
                .wake_on_commit(wake.clone(), self.config.name.clone()),
        );
        let mut shutdown = std::pin::pin!(shutdown);
        let mut next_prune = Instant::now();
        let mut next_sample = Instant::now();
        let mut errors: u32 = 0;
        info!(relay = %self.config.name, "outbox relay started");

        loop {
            if now_or_never(shutdown.as_mut()) {
                break;
            }
            if Instant::now() >= next_prune {
                match self.prune().await {
                    Ok(0) => {}
                    Ok(n) => debug!(relay = %self.config.name, pruned = n, "pruned outbox"),
                    Err(e) => {
                        warn!(relay = %self.config.name, error = %e, "pruning the outbox failed");
                    }
                }
                next_prune = Instant::now() + self.config.prune_interval;
            }
            if Instant::now() >= next_sample {
                if let Err(e) = self.record_metrics().await {
                    debug!(relay = %self.config.name, error = %e, "sampling the outbox backlog failed");
                }
                next_sample = Instant::now() + self.config.metrics_interval;
            }

            let pause = match self.relay_once().await {
                Ok(report) => {
                    errors = 0;
                    if report.claimed >= self.config.batch_size {
                        // There is probably more: go on at once.
                        continue;
                    }
                    None
                }
                Err(e) => {
                    errors = errors.saturating_add(1);
                    let delay = backoff(
                        self.config.retry_min,
                        self.config.retry_max,
                        errors.saturating_sub(1),
                    );
                    warn!(relay = %self.config.name, error = %e, ?delay, "outbox relay batch failed");
                    Some(delay)
                }
            };

            let wait = pause.unwrap_or(self.config.poll_interval);
            tokio::select! {
                () = &mut shutdown => break,
                () = wake.notified(), if pause.is_none() => {}
                () = tokio::time::sleep(wait) => {}
            }
        }
        info!(relay = %self.config.name, "outbox relay stopped");
    }

    /// Spawns [`run`](Self::run) on the current Tokio runtime.
    #[must_use]
    pub fn spawn(self) -> RelayHandle {
        let (stop, mut stopped) = watch::channel(false);
        let task = tokio::spawn(self.run(async move {
            // An error means the handle is gone: stop too.
            let _ = stopped.wait_for(|s| *s).await;
        }));
        RelayHandle {
            stop,
            task: Some(task),
        }
    }
}

/// A relay running in the background, from [`Relay::spawn`].
///
/// Like every Keel background handle:
/// * [`shutdown`](Self::shutdown)`.await` stops gracefully: the batch in
///   flight is published, marked and committed, then the task ends;
/// * [`abort`](Self::abort)`.await` stops at once, like a crash, and
///   returns once the task has ended: a batch in flight is not marked, its
///   aggregates are let go (the claim's transaction rolls back), and a
///   relay publishes those rows again later (at-least-once);
/// * dropping the handle is an abort that does not wait.
#[derive(Debug)]
pub struct RelayHandle {
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl RelayHandle {
    /// Stops the relay gracefully: the batch in flight is finished and
    /// committed, then the task ends. A panic in the relay is resumed here.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take()
            && let Err(e) = task.await
            && e.is_panic()
        {
            std::panic::resume_unwind(e.into_panic());
        }
    }

    /// Kills the relay at once, like a crash, and waits until its task has
    /// ended: nothing of it runs after this returns. A batch in flight is
    /// not marked; its rows are published again later.
    pub async fn abort(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            // A cancelled task reports `JoinError::Cancelled`; one that
            // ended before the abort reports its own result. Either way
            // it has ended.
            let _ = task.await;
        }
    }

    /// Whether the relay has stopped.
    #[must_use]
    pub fn is_finished(&self) -> bool {
        self.task.as_ref().is_none_or(JoinHandle::is_finished)
    }
}

impl Drop for RelayHandle {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Aborts a helper task when the relay's loop ends or is dropped.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

pub(super) fn backoff(min: Duration, max: Duration, attempt: u32) -> Duration {
    min.saturating_mul(1u32 << attempt.min(20)).min(max)
}

fn now_or_never<F: Future<Output = ()>>(f: std::pin::Pin<&mut F>) -> bool {
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    f.poll(&mut cx).is_ready()
}
