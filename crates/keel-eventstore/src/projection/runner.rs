//! The projection runner: reads the log, applies batches in one unit of
//! work with the checkpoint, retries and parks poison events.

use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use keel_core::uow::TransactionSource;
use keel_core::{BoxError, Position};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::health::{ProgressCheck, ProjectionSource};
use super::{
    LogLag, ParkedEvent, PoisonAction, Projection, ProjectionId, ProjectionOptions,
    ProjectionSupport,
};
use crate::error::{EventStoreError, Result};
use crate::event::{ReadAll, ReadStream, RecordedEvent};
use crate::store::{EventStore, SubscriptionSupport};

/// What a running projection reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ProjectionStatus {
    /// Whether this instance is the active runner of its version.
    pub leader: bool,
    /// The committed checkpoint, once known.
    pub position: Option<Position>,
    /// When the last applied event was recorded.
    pub last_recorded_at: Option<DateTime<Utc>>,
    /// Events applied (committed) by this instance.
    pub applied: u64,
    /// Whether the last read found nothing after the checkpoint.
    pub caught_up: bool,
    /// Events this instance parked.
    pub parked: u64,
    /// Whether the runner stopped on a parked event ([`PoisonAction::Halt`]).
    pub halted: bool,
}

/// A running projection.
///
/// Keel's rule for background handles: [`shutdown`](Self::shutdown) stops
/// gracefully (finishes the transaction in hand); [`abort`](Self::abort)
/// stops at once, like a crash (the transaction in hand rolls back, so its
/// events are applied again, once, on restart), and returns when the task
/// has ended; dropping the handle aborts without waiting.
#[derive(Debug)]
pub struct ProjectionHandle {
    stop: watch::Sender<bool>,
    status: watch::Receiver<ProjectionStatus>,
    task: Option<JoinHandle<Result<()>>>,
    check: ProgressCheck,
}

impl ProjectionHandle {
    /// The latest status.
    #[must_use]
    pub fn status(&self) -> ProjectionStatus {
        *self.status.borrow()
    }

    /// Waits until the status satisfies `f` or the runner ends.
    pub async fn wait_for(&mut self, f: impl Fn(&ProjectionStatus) -> bool) -> ProjectionStatus {
        if let Ok(s) = self.status.wait_for(|s| f(s)).await {
            return *s;
        }
        *self.status.borrow()
    }

    /// A health check reporting this projection's lag, parked events and
    /// whether it halted (see [`ProgressCheck`]); register it with the
    /// service's health registry.
    #[must_use]
    pub fn progress_check(&self) -> ProgressCheck {
        self.check.clone()
    }

    /// Stops gracefully and returns the runner's outcome.
    ///
    /// # Errors
    ///
    /// The error that ended the runner before, if one did
    /// ([`EventStoreError::Parked`] under [`PoisonAction::Halt`]).
    pub async fn shutdown(self) -> Result<()> {
        let _ = self.stop.send(true);
        self.join().await
    }

    /// Waits for the runner to end by itself (a halt on a parked event).
    ///
    /// # Errors
    ///
    /// The error that ended it.
    pub async fn join(mut self) -> Result<()> {
        let Some(task) = self.task.take() else {
            return Ok(());
        };
        match task.await {
            Ok(r) => r,
            Err(e) => Err(EventStoreError::Corrupt(format!(
                "projection task failed: {e}"
            ))),
        }
    }

    /// Ends the runner at once, like a crash, and returns when its task has
    /// ended: no handler runs afterwards and the open transaction is rolled
    /// back.
    pub async fn abort(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }
}

impl Drop for ProjectionHandle {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Starts projection runners and replays parked events.
#[derive(Debug)]
pub struct ProjectionRunner;

impl ProjectionRunner {
    /// Starts projection `options.id` on a Tokio task.
    ///
    /// The task waits to lead the projection's version (one active runner
    /// per version across processes), reads the log after the stored
    /// checkpoint, and for each batch begins a unit of work on
    /// `transactions`, hands it to `projection` with every event, moves the
    /// checkpoint in the same unit of work and commits. A failing event is
    /// retried alone in its own unit of work, then parked. Once caught up
    /// it marks the version caught up, makes it active (see
    /// [`ProjectionOptions::activate_when_caught_up`]) and waits for new
    /// events.
    ///
    /// `transactions` must begin the units of work `store` joins: a
    /// `keel_database::Database` on the store's database for
    /// [`PostgresEventStore`](crate::PostgresEventStore),
    /// [`MemoryTransactions`](keel_core::uow::MemoryTransactions) for
    /// [`InMemoryEventStore`](crate::InMemoryEventStore).
    pub fn spawn<S, P>(
        store: Arc<S>,
        transactions: Arc<dyn TransactionSource>,
        options: ProjectionOptions,
        projection: P,
    ) -> ProjectionHandle
    where
        S: EventStore + SubscriptionSupport + ProjectionSupport + LogLag + ?Sized + 'static,
        P: Projection + 'static,
    {
        let (stop_tx, stop_rx) = watch::channel(false);
        let (status_tx, status_rx) = watch::channel(ProjectionStatus::default());
        let ended = Arc::new(Mutex::new(None));
        let check = ProgressCheck::new(Arc::new(ProjectionSource {
            store: Arc::clone(&store),
            id: options.id.clone(),
            filter: options.filter.clone(),
            status: status_rx.clone(),
            ended: Arc::clone(&ended),
        }));
        let runner = Runner {
            store,
            transactions,
            options,
            projection,
            status: status_tx,
        };
        let task = tokio::spawn(async move {
            let outcome = runner.run(stop_rx).await;
            if let Err(e) = &outcome {
                *ended
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(e.to_string());
            }
            outcome
        });
        ProjectionHandle {
            stop: stop_tx,
            status: status_rx,
            task: Some(task),
            check,
        }
    }

    /// Replays the parked event of `id` at `position` through `projection`,
    /// in one unit of work that also removes it from the parked list (and,
    /// for an event the runner halted on, moves the checkpoint past it).
    ///
    /// Returns `false` when no such event is parked (any more): replaying
    /// twice, or racing another replay or the runner, applies it once.
    ///
    /// # Errors
    ///
    /// [`EventStoreError::Parked`] when the handler fails again (nothing is
    /// written, the event stays parked); store and commit failures.
    pub async fn replay_parked<S, P>(
        store: &S,
        transactions: &dyn TransactionSource,
        projection: &P,
        id: &ProjectionId,
        position: Position,
    ) -> Result<bool>
    where
        S: EventStore + ProjectionSupport + ?Sized,
        P: Projection + ?Sized,
    {
        let Some(parked) = store
            .parked_events(id)
            .await?
            .into_iter()
            .find(|p| p.position == position)
        else {
            return Ok(false);
        };
        let event = store
            .read_stream(
                &parked.stream_id,
                ReadStream::forward().from(parked.stream_version).limit(1),
            )
            .try_next()
            .await?
            .filter(|e| e.event_id == parked.event_id)
            .ok_or_else(|| {
                EventStoreError::Corrupt(format!(
                    "parked event {} of projection {id} is not in the log",
                    parked.event_id
                ))
            })?;
        let checkpoint = store
            .projection_state(id)
            .await?
            .ok_or_else(|| super::unknown(id))?
            .checkpoint;
        let mut tx = transactions.begin().await?;
        let outcome: Result<bool> = async {
            let Some(parked) = store.unpark_event(&mut *tx, id, position).await? else {
                return Ok(false);
            };
            projection
                .apply(&event, &mut *tx)
                .await
                .map_err(|source| EventStoreError::Parked {
                    projection: id.to_string(),
                    position,
                    attempts: 1,
                    source,
                })?;
            if !parked.skipped && checkpoint < position {
                store
                    .advance_projection(&mut *tx, id, checkpoint, position)
                    .await?;
            }
            Ok(true)
        }
        .await;
        match outcome {
            Ok(true) => {
                tx.commit().await?;
                Ok(true)
            }
            other => {
                let _ = tx.rollback().await;
                other
            }
        }
    }
}

struct Runner<S: ?Sized, P> {
    store: Arc<S>,
    transactions: Arc<dyn TransactionSource>,
    options: ProjectionOptions,
    projection: P,
    status: watch::Sender<ProjectionStatus>,
}

enum Exit {
    Stopped,
    LostLeadership,
    /// A mistake no retry fixes (a unit of work the store cannot join).
    Fatal(EventStoreError),
}

/// Resolves once a stop was requested; never when the handle was dropped.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    if stop.wait_for(|s| *s).await.is_err() {
        std::future::pending::<()>().await;
    }
}

impl<S, P> Runner<S, P>
where
    S: EventStore + SubscriptionSupport + ProjectionSupport + LogLag + ?Sized,
    P: Projection,
{
    async fn run(self, mut stop: watch::Receiver<bool>) -> Result<()> {
        let id = &self.options.id;
        let retry = self.options.leadership_retry;
        let leadership_name = id.leadership_name();
        loop {
            if *stop.borrow() {
                return Ok(());
            }
            let acquired = tokio::select! {
                r = self.store.acquire_leadership(&leadership_name, retry) => r,
                () = stopped(&mut stop) => return Ok(()),
            };
            let leadership = match acquired {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(projection = %id, error = %e, "cannot contend for leadership; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(retry) => continue,
                        () = stopped(&mut stop) => return Ok(()),
                    }
                }
            };
            self.status.send_modify(|s| s.leader = true);
            tracing::info!(projection = %id, "leading the projection");
            let outcome = self.lead(&mut stop, leadership).await;
            self.status.send_modify(|s| s.leader = false);
            match outcome {
                Ok(Exit::Stopped) => return Ok(()),
                Ok(Exit::LostLeadership) => {
                    tracing::warn!(projection = %id, "lost leadership; queueing again");
                }
                Ok(Exit::Fatal(e)) => {
                    tracing::error!(projection = %id, error = %e, "the projection cannot run");
                    return Err(e);
                }
                Err(e @ EventStoreError::Parked { .. }) => {
                    self.status.send_modify(|s| s.halted = true);
                    tracing::error!(projection = %id, error = %e, "projection halted on a parked event");
                    return Err(e);
                }
                Err(e) => {
                    tracing::warn!(projection = %id, error = %e, "store error; resuming from the checkpoint");
                }
            }
            tokio::select! {
                () = tokio::time::sleep(retry) => {}
                () = stopped(&mut stop) => return Ok(()),
            }
        }
    }

    async fn lead(
        &self,
        stop: &mut watch::Receiver<bool>,
        mut leadership: Box<dyn crate::store::Leadership>,
    ) -> Result<Exit> {
        let id = &self.options.id;
        let mut signal = self.store.event_signal().await?;
        let state = self.store.register_projection(id).await?;
        let mut position = state.checkpoint;
        // Handed units of work of another backend, every batch would fail
        // to move the checkpoint: say so once and stop instead.
        let mut probe = self.transactions.begin().await?;
        let joined = self
            .store
            .advance_projection(&mut *probe, id, position, position)
            .await;
        let _ = probe.rollback().await;
        match joined {
            Err(EventStoreError::Core(e @ keel_core::Error::Internal { .. })) => {
                return Ok(Exit::Fatal(EventStoreError::Core(e)));
            }
            Err(e) => return Err(e),
            Ok(()) => {}
        }
        self.status.send_modify(|s| s.position = Some(position));
        let mut activated = false;
        loop {
            if *stop.borrow() {
                return Ok(Exit::Stopped);
            }
            let filter = ReadAll {
                after: position,
                limit: Some(self.options.batch_size),
                ..self.options.filter.clone()
            };
            let batch: Vec<RecordedEvent> = tokio::select! {
                r = self.store.read_all(filter).try_collect() => r?,
                () = stopped(stop) => continue,
            };
            if batch.is_empty() {
                if !activated {
                    self.store.mark_caught_up(id).await?;
                    if self.options.activate_when_caught_up {
                        self.store.activate_projection(id, true).await?;
                    }
                    activated = true;
                }
                self.status.send_modify(|s| s.caught_up = true);
                tokio::select! {
                    () = signal.wait(self.options.poll_interval) => {}
                    () = stopped(stop) => {}
                }
            } else {
                self.status.send_modify(|s| s.caught_up = false);
                match self.apply_batch(&batch, position, stop).await? {
                    Some(p) => position = p,
                    None => return Ok(Exit::Stopped),
                }
            }
            if !leadership.is_held().await {
                return Ok(Exit::LostLeadership);
            }
        }
    }

    fn applied(&self, event: &RecordedEvent) {
        self.status.send_modify(|s| {
            s.position = Some(event.position);
            s.last_recorded_at = Some(event.recorded_at);
            s.applied += 1;
        });
    }

    /// Applies a batch in one unit of work; if an event fails, applies the
    /// batch again one event per unit of work. Returns the new checkpoint,
    /// or `None` when stopped while waiting to retry.
    async fn apply_batch(
        &self,
        batch: &[RecordedEvent],
        from: Position,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<Option<Position>> {
        let id = &self.options.id;
        let mut tx = self.transactions.begin().await?;
        let mut failed = false;
        for event in batch {
            if let Err(error) = self.projection.apply(event, &mut *tx).await {
                tracing::debug!(projection = %id, position = %event.position, %error, "a batch failed; applying it one event at a time");
                failed = true;
                break;
            }
        }
        if !failed && let Some(last) = batch.last() {
            if let Err(e) = self
                .store
                .advance_projection(&mut *tx, id, from, last.position)
                .await
            {
                let _ = tx.rollback().await;
                return Err(e);
            }
            tx.commit().await?;
            for event in batch {
                self.applied(event);
            }
            return Ok(Some(last.position));
        }
        let _ = tx.rollback().await;
        let mut at = from;
        for event in batch {
            match self.apply_one(event, at, stop).await? {
                Some(p) => at = p,
                None => return Ok(None),
            }
        }
        Ok(Some(at))
    }

    /// Applies one event in its own unit of work, retrying with backoff,
    /// then parks it.
    async fn apply_one(
        &self,
        event: &RecordedEvent,
        from: Position,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<Option<Position>> {
        let id = &self.options.id;
        let retry = self.options.retry;
        let mut last_error: Option<BoxError> = None;
        for attempt in 1..=retry.attempts.max(1) {
            let mut tx = self.transactions.begin().await?;
            match self.projection.apply(event, &mut *tx).await {
                Ok(()) => {
                    if let Err(e) = self
                        .store
                        .advance_projection(&mut *tx, id, from, event.position)
                        .await
                    {
                        let _ = tx.rollback().await;
                        return Err(e);
                    }
                    tx.commit().await?;
                    self.applied(event);
                    return Ok(Some(event.position));
                }
                Err(error) => {
                    let _ = tx.rollback().await;
                    tracing::warn!(projection = %id, position = %event.position, attempt, %error, "the handler failed");
                    last_error = Some(error);
                    if attempt < retry.attempts {
                        tokio::select! {
                            () = tokio::time::sleep(retry.delay(attempt)) => {}
                            () = stopped(stop) => return Ok(None),
                        }
                    }
                }
            }
        }
        let error = last_error.unwrap_or_else(|| "the handler failed".into());
        let skip = self.options.on_poison == PoisonAction::SkipAndContinue;
        let parked = ParkedEvent::of(event, retry.attempts.max(1), &error.to_string(), skip);
        let mut tx = self.transactions.begin().await?;
        let written = async {
            self.store.park_event(&mut *tx, id, &parked).await?;
            if skip {
                self.store
                    .advance_projection(&mut *tx, id, from, event.position)
                    .await?;
            }
            Ok::<_, EventStoreError>(())
        }
        .await;
        if let Err(e) = written {
            let _ = tx.rollback().await;
            return Err(e);
        }
        tx.commit().await?;
        self.status.send_modify(|s| s.parked += 1);
        tracing::error!(projection = %id, position = %event.position, event_type = %event.event_type, skipped = skip, "parked an event the handler keeps failing on");
        if skip {
            self.status.send_modify(|s| {
                s.position = Some(event.position);
                s.last_recorded_at = Some(event.recorded_at);
            });
            Ok(Some(event.position))
        } else {
            Err(EventStoreError::Parked {
                projection: id.to_string(),
                position: event.position,
                attempts: retry.attempts.max(1),
                source: error,
            })
        }
    }
}
