//! Running a relay: the loop, its background task and its handle.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::Relay;
use crate::writer::NOTIFY_CHANNEL;

impl Relay {
    /// Runs until `shutdown` completes: publishes whatever is pending, then
    /// waits for a notification (or the poll interval), and prunes every
    /// [`prune_interval`](RelayConfig::prune_interval).
    ///
    /// Database and bus failures are logged and retried with backoff; they
    /// never end the loop. On shutdown the batch in flight is finished and
    /// committed first, so stopping never causes a duplicate.
    pub async fn run<F>(self, shutdown: F)
    where
        F: Future<Output = ()> + Send,
    {
        let wake = Arc::new(Notify::new());
        let listener = tokio::spawn(listen(
            self.pool.clone(),
            wake.clone(),
            self.config.name.clone(),
        ));
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
        listener.abort();
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
        RelayHandle { stop, task }
    }
}

/// A relay running in the background, from [`Relay::spawn`].
///
/// Dropping the handle stops the relay after its batch in flight.
#[derive(Debug)]
pub struct RelayHandle {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl RelayHandle {
    /// Stops the relay gracefully: the batch in flight is finished and
    /// committed, then the task ends.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        if let Err(e) = self.task.await
            && e.is_panic()
        {
            std::panic::resume_unwind(e.into_panic());
        }
    }

    /// Kills the relay at once, like a crash: a batch in flight is not
    /// marked, its rows are unlocked when the connection is rolled back, and
    /// another relay publishes them again.
    pub fn abort(&self) {
        self.task.abort();
    }

    /// Whether the relay has stopped.
    #[must_use]
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }
}

/// Turns notifications on [`NOTIFY_CHANNEL`] into wake-ups, reconnecting
/// after failures. Notifications lost meanwhile are covered by polling.
async fn listen(pool: PgPool, wake: Arc<Notify>, name: String) {
    let mut failures: u32 = 0;
    loop {
        let result = async {
            let mut listener = PgListener::connect_with(&pool).await?;
            listener.listen(NOTIFY_CHANNEL).await?;
            // Anything committed while (re)connecting went unnoticed.
            wake.notify_one();
            loop {
                listener.recv().await?;
                wake.notify_one();
            }
            #[allow(unreachable_code)] // gives the async block its type
            Ok::<(), sqlx::Error>(())
        }
        .await;
        if let Err(e) = result {
            failures = failures.saturating_add(1);
            let delay = backoff(
                Duration::from_millis(200),
                Duration::from_secs(30),
                failures.min(20) - 1,
            );
            warn!(relay = %name, error = %e, ?delay, "outbox listener failed; polling meanwhile");
            tokio::time::sleep(delay).await;
        }
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
