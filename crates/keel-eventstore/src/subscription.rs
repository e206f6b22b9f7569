//! Catch-up subscriptions over the global log: durable checkpoints, live
//! tail, one active consumer per name.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use futures::TryStreamExt;
use keel_core::{BoxError, Position};
use keel_telemetry::KeelMetrics;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::error::{EventStoreError, Result};
use crate::event::{ReadAll, RecordedEvent};
use crate::projection::{LogLag, ProgressCheck, SubscriptionSource};
use crate::store::{EventStore, SubscriptionSupport};

/// One event handed to a [`SubscriptionHandler`], with what the
/// subscription knows about earlier deliveries of it.
#[derive(Clone, Copy, Debug)]
pub struct Delivery<'a> {
    event: &'a RecordedEvent,
    redelivery: bool,
}

impl<'a> Delivery<'a> {
    /// A delivery of `event`; `redelivery` as [`is_redelivery`](Self::is_redelivery)
    /// reports it (for testing handlers).
    #[must_use]
    pub fn new(event: &'a RecordedEvent, redelivery: bool) -> Self {
        Self { event, redelivery }
    }

    /// The event.
    #[must_use]
    pub fn event(&self) -> &'a RecordedEvent {
        self.event
    }

    /// Whether this event may have been handed to a handler of this
    /// subscription before: it is at or before the furthest position an
    /// earlier run of the subscription had started delivering (that run
    /// crashed, failed or lost leadership before storing a checkpoint past
    /// it). `false` means this is certainly the first delivery.
    #[must_use]
    pub fn is_redelivery(&self) -> bool {
        self.redelivery
    }
}

impl std::ops::Deref for Delivery<'_> {
    type Target = RecordedEvent;

    fn deref(&self) -> &RecordedEvent {
        self.event
    }
}

/// Handles the events a subscription delivers.
///
/// Delivery is at least once: after a crash or a leadership change, events
/// after the last stored checkpoint are delivered again, so handlers must be
/// idempotent (for example by remembering the last position they applied).
/// A handler that wants to know whether an event may be such a repeat
/// overrides [`handle_delivery`](Self::handle_delivery) as well, which the
/// subscription calls (by default it forwards to [`handle`](Self::handle)).
/// For read models in PostgreSQL, a [`Projection`](crate::Projection) run by
/// a [`ProjectionRunner`](crate::ProjectionRunner) needs no idempotence:
/// its effects commit exactly once.
#[async_trait]
pub trait SubscriptionHandler: Send + Sync {
    /// Handles one event. An error stops the subscription; the checkpoint
    /// stays before this event, so it is delivered again on restart.
    async fn handle(&self, event: &RecordedEvent) -> std::result::Result<(), BoxError>;

    /// Handles one delivery; the subscription calls this. The default
    /// forwards the event to [`handle`](Self::handle).
    async fn handle_delivery(&self, delivery: Delivery<'_>) -> std::result::Result<(), BoxError> {
        self.handle(delivery.event()).await
    }

    /// The most deliveries the subscription hands to one
    /// [`handle_batch`](Self::handle_batch) call. The default, 1, keeps
    /// one event per call; a handler whose work is cheaper in groups
    /// (publishing, bulk writes) returns more and overrides
    /// `handle_batch`. The subscription also cuts batches at its
    /// checkpoint boundaries
    /// ([`checkpoint_every_events`](SubscriptionOptions::checkpoint_every_events)).
    fn max_batch(&self) -> usize {
        1
    }

    /// Handles consecutive deliveries, in log order (at most
    /// [`max_batch`](Self::max_batch) of them); the subscription calls
    /// this. The default hands them to
    /// [`handle_delivery`](Self::handle_delivery) one by one.
    ///
    /// On failure, [`BatchFailure::handled`] says how many deliveries at
    /// the start of the batch were handled: the subscription moves past
    /// those and stops before the next one, which is delivered again on
    /// restart (with every later one).
    async fn handle_batch(
        &self,
        deliveries: &[Delivery<'_>],
    ) -> std::result::Result<(), BatchFailure> {
        for (handled, delivery) in deliveries.iter().enumerate() {
            self.handle_delivery(*delivery)
                .await
                .map_err(|source| BatchFailure { handled, source })?;
        }
        Ok(())
    }
}

/// Why [`SubscriptionHandler::handle_batch`] stopped: how many deliveries
/// at the start of the batch it handled, and the error of the next one.
#[derive(Debug)]
#[non_exhaustive]
pub struct BatchFailure {
    /// Deliveries at the start of the batch that were handled (their
    /// effects are done; the subscription will not deliver them again
    /// unless it crashes before its next checkpoint).
    pub handled: usize,
    /// What went wrong with the delivery right after them.
    pub source: BoxError,
}

impl BatchFailure {
    /// The first `handled` deliveries were handled; the next failed with
    /// `source`.
    #[must_use]
    pub fn new(handled: usize, source: impl Into<BoxError>) -> Self {
        Self {
            handled,
            source: source.into(),
        }
    }
}

#[async_trait]
impl<T: SubscriptionHandler + ?Sized> SubscriptionHandler for Arc<T> {
    async fn handle(&self, event: &RecordedEvent) -> std::result::Result<(), BoxError> {
        (**self).handle(event).await
    }

    async fn handle_delivery(&self, delivery: Delivery<'_>) -> std::result::Result<(), BoxError> {
        (**self).handle_delivery(delivery).await
    }

    fn max_batch(&self) -> usize {
        (**self).max_batch()
    }

    async fn handle_batch(
        &self,
        deliveries: &[Delivery<'_>],
    ) -> std::result::Result<(), BatchFailure> {
        (**self).handle_batch(deliveries).await
    }
}

/// How a subscription reads, checkpoints and waits.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct SubscriptionOptions {
    /// The subscription's name: the key of its checkpoint and its leadership.
    pub name: String,
    /// Which events it receives (the filter's start position is ignored: the
    /// checkpoint decides where to start).
    pub filter: ReadAll,
    /// Events fetched per read (default 500).
    pub batch_size: u64,
    /// Store the checkpoint after this many handled events (default 100)…
    pub checkpoint_every_events: u64,
    /// …or after this much time with unsaved progress (default 1 s), and
    /// always on a graceful stop.
    pub checkpoint_interval: Duration,
    /// How long a caught-up subscription waits for a notification before
    /// polling anyway (default 500 ms).
    pub poll_interval: Duration,
    /// How often a follower tries to take over leadership (default 1 s).
    pub leadership_retry: Duration,
    /// Where `keel.eventstore.subscription.*` is recorded (default
    /// [`KeelMetrics::global`], taken when the options are made).
    pub metrics: KeelMetrics,
}

impl SubscriptionOptions {
    /// Options with defaults for the subscription `name`.
    #[must_use]
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            filter: ReadAll::from_start(),
            batch_size: 500,
            checkpoint_every_events: 100,
            checkpoint_interval: Duration::from_secs(1),
            poll_interval: Duration::from_millis(500),
            leadership_retry: Duration::from_secs(1),
            metrics: KeelMetrics::global(),
        }
    }

    /// Records the subscription's metrics with these instruments.
    #[must_use]
    pub fn metrics(mut self, metrics: KeelMetrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// Receive only events passing this filter.
    #[must_use]
    pub fn filter(mut self, filter: ReadAll) -> Self {
        self.filter = filter;
        self
    }

    /// Sets the read batch size (at least 1).
    #[must_use]
    pub fn batch_size(mut self, n: u64) -> Self {
        self.batch_size = n.max(1);
        self
    }

    /// Sets when checkpoints are stored: every `events` handled events or
    /// after `interval` with unsaved progress.
    #[must_use]
    pub fn checkpoint(mut self, events: u64, interval: Duration) -> Self {
        self.checkpoint_every_events = events.max(1);
        self.checkpoint_interval = interval;
        self
    }

    /// Sets the polling fallback interval.
    #[must_use]
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// Sets how often a follower tries to take over.
    #[must_use]
    pub fn leadership_retry(mut self, interval: Duration) -> Self {
        self.leadership_retry = interval;
        self
    }
}

/// What a running subscription reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SubscriptionStatus {
    /// Whether this instance is the active consumer.
    pub leader: bool,
    /// The position of the last event handled by this instance.
    pub position: Option<Position>,
    /// Events handled by this instance.
    pub handled: u64,
}

/// A running subscription.
///
/// Keel's rule for background handles: [`shutdown`](Self::shutdown) stops
/// gracefully (finishes the event in hand, stores the final checkpoint,
/// lets go of leadership); [`abort`](Self::abort) stops at once, like a
/// crash (no final checkpoint: the events since the last one are delivered
/// again on restart), and returns once the task has ended; dropping the
/// handle aborts without waiting.
#[derive(Debug)]
pub struct SubscriptionHandle {
    stop: watch::Sender<bool>,
    status: watch::Receiver<SubscriptionStatus>,
    task: Option<JoinHandle<Result<()>>>,
    name: String,
    filter: ReadAll,
    ended: Arc<Mutex<Option<String>>>,
}

impl SubscriptionHandle {
    /// The latest status.
    #[must_use]
    pub fn status(&self) -> SubscriptionStatus {
        *self.status.borrow()
    }

    /// Waits until the status satisfies `f` or the subscription ends.
    pub async fn wait_for(
        &mut self,
        f: impl Fn(&SubscriptionStatus) -> bool,
    ) -> SubscriptionStatus {
        if let Ok(s) = self.status.wait_for(|s| f(s)).await {
            return *s;
        }
        *self.status.borrow()
    }

    /// A health check reporting this subscription's lag behind `store`'s
    /// log and whether it ended with an error (see [`ProgressCheck`]);
    /// register it with the service's health registry.
    #[must_use]
    pub fn progress_check<S>(&self, store: Arc<S>) -> ProgressCheck
    where
        S: SubscriptionSupport + LogLag + ?Sized + 'static,
    {
        ProgressCheck::new(Arc::new(SubscriptionSource {
            store,
            name: self.name.clone(),
            filter: self.filter.clone(),
            status: self.status.clone(),
            ended: Arc::clone(&self.ended),
        }))
    }

    /// Stops gracefully: finishes the event in hand, stores the checkpoint,
    /// lets go of leadership. Returns the subscription's outcome.
    ///
    /// # Errors
    ///
    /// The error that ended the subscription before, if one did (a
    /// handler error, a store failure).
    pub async fn shutdown(self) -> Result<()> {
        let _ = self.stop.send(true);
        self.join().await
    }

    /// Waits for the subscription to end by itself (a handler error).
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
                "subscription task failed: {e}"
            ))),
        }
    }

    /// Ends the subscription at once, like a crash (no final checkpoint),
    /// and returns when its task has ended: no handler runs afterwards.
    pub async fn abort(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }
}

impl Drop for SubscriptionHandle {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Starts catch-up subscriptions.
#[derive(Debug)]
pub struct Subscription;

impl Subscription {
    /// Starts subscription `options.name` on a Tokio task.
    ///
    /// The task waits to lead the name (one active consumer per name across
    /// processes), reads the global log from the stored checkpoint, hands
    /// each event to `handler` in order, stores checkpoints as configured,
    /// and once caught up waits for new events (notification or polling).
    /// When leadership is lost it stops delivering and queues again.
    pub fn spawn<S, H>(
        store: Arc<S>,
        options: SubscriptionOptions,
        handler: H,
    ) -> SubscriptionHandle
    where
        S: EventStore + SubscriptionSupport + ?Sized + 'static,
        H: SubscriptionHandler + 'static,
    {
        let (stop_tx, stop_rx) = watch::channel(false);
        let (status_tx, status_rx) = watch::channel(SubscriptionStatus::default());
        let ended = Arc::new(Mutex::new(None));
        let (name, filter) = (options.name.clone(), options.filter.clone());
        let outcome = Arc::clone(&ended);
        let task = tokio::spawn(async move {
            let r = run(store, options, handler, stop_rx, status_tx).await;
            if let Err(e) = &r {
                *outcome.lock().unwrap_or_else(PoisonError::into_inner) = Some(e.to_string());
            }
            r
        });
        SubscriptionHandle {
            stop: stop_tx,
            status: status_rx,
            task: Some(task),
            name,
            filter,
            ended,
        }
    }
}

/// Resolves once a stop was requested; never when the handle was dropped
/// (a dropped handle leaves the subscription running).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    if stop.wait_for(|s| *s).await.is_err() {
        std::future::pending::<()>().await;
    }
}

enum Exit {
    Stopped,
    LostLeadership,
}

async fn run<S, H>(
    store: Arc<S>,
    options: SubscriptionOptions,
    handler: H,
    mut stop: watch::Receiver<bool>,
    status: watch::Sender<SubscriptionStatus>,
) -> Result<()>
where
    S: EventStore + SubscriptionSupport + ?Sized,
    H: SubscriptionHandler,
{
    if options.name.is_empty() {
        return Err(EventStoreError::invalid(
            "subscription",
            "the name must not be empty",
        ));
    }
    loop {
        if *stop.borrow() {
            return Ok(());
        }
        let acquired = tokio::select! {
            r = store.acquire_leadership(&options.name, options.leadership_retry) => r,
            () = stopped(&mut stop) => return Ok(()),
        };
        let leadership = match acquired {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(subscription = %options.name, error = %e, "cannot contend for leadership; retrying");
                tokio::select! {
                    () = tokio::time::sleep(options.leadership_retry) => continue,
                    () = stopped(&mut stop) => return Ok(()),
                }
            }
        };
        status.send_modify(|s| s.leader = true);
        tracing::info!(subscription = %options.name, "leading the subscription");
        let outcome = lead(&*store, &options, &handler, &mut stop, &status, leadership).await;
        status.send_modify(|s| s.leader = false);
        match outcome {
            Ok(Exit::Stopped) => return Ok(()),
            Ok(Exit::LostLeadership) => {
                tracing::warn!(subscription = %options.name, "lost leadership; queueing again");
                // Give the followers the first chance: a leader whose
                // connection flaps should not snatch leadership straight back.
                tokio::select! {
                    () = tokio::time::sleep(options.leadership_retry) => {}
                    () = stopped(&mut stop) => return Ok(()),
                }
            }
            Err(e @ EventStoreError::Handler { .. }) => return Err(e),
            Err(e) => {
                tracing::warn!(subscription = %options.name, error = %e, "store error; restarting from the checkpoint");
                tokio::select! {
                    () = tokio::time::sleep(options.leadership_retry) => {}
                    () = stopped(&mut stop) => return Ok(()),
                }
            }
        }
    }
}

async fn lead<S, H>(
    store: &S,
    options: &SubscriptionOptions,
    handler: &H,
    stop: &mut watch::Receiver<bool>,
    status: &watch::Sender<SubscriptionStatus>,
    mut leadership: Box<dyn crate::store::Leadership>,
) -> Result<Exit>
where
    S: EventStore + SubscriptionSupport + ?Sized,
    H: SubscriptionHandler,
{
    let name = options.name.as_str();
    let mut signal = store.event_signal().await?;
    let mut position = store
        .load_checkpoint(name)
        .await?
        .unwrap_or(Position::START);
    let mut saved = position;
    // Where an earlier run had started delivering: events up to there may
    // have been handled before.
    let resumed_from = store.load_delivered(name).await?;
    let mut delivering = resumed_from;
    let mut since_save = 0u64;
    let mut last_save = Instant::now();
    loop {
        if *stop.borrow() {
            if position != saved {
                store.save_checkpoint(name, position).await?;
            }
            return Ok(Exit::Stopped);
        }
        let filter = ReadAll {
            after: position,
            limit: Some(options.batch_size),
            ..options.filter.clone()
        };
        let read = tokio::select! {
            r = store.read_all(filter).try_collect::<Vec<_>>() => r?,
            () = stopped(stop) => continue,
        };
        let full = read.len() as u64 >= options.batch_size;
        if let Some(last) = read.last()
            && delivering.is_none_or(|d| d < last.position)
        {
            store.save_delivered(name, last.position).await?;
            delivering = Some(last.position);
        }
        let mut handled = 0u64;
        let most = handler.max_batch().max(1);
        let mut rest = read.as_slice();
        while !rest.is_empty() {
            // A batch never crosses a checkpoint boundary, so checkpoints
            // fall where they would one event at a time.
            let room = options
                .checkpoint_every_events
                .saturating_sub(since_save)
                .max(1);
            let take = rest
                .len()
                .min(most)
                .min(usize::try_from(room).unwrap_or(usize::MAX));
            let (batch, tail) = rest.split_at(take);
            rest = tail;
            let deliveries: Vec<Delivery<'_>> = batch
                .iter()
                .map(|event| {
                    Delivery::new(event, resumed_from.is_some_and(|d| event.position <= d))
                })
                .collect();
            let outcome = handler.handle_batch(&deliveries).await;
            // A failure that claims the whole batch still stops before its
            // last event: something in it went wrong.
            let done = match &outcome {
                Ok(()) => take,
                Err(failure) => failure.handled.min(take - 1),
            };
            for event in &batch[..done] {
                position = event.position;
                handled += 1;
                since_save += 1;
                status.send_modify(|s| {
                    s.position = Some(position);
                    s.handled += 1;
                });
            }
            if let Err(BatchFailure { source, .. }) = outcome {
                let event = &batch[done];
                options
                    .metrics
                    .record_subscription(name, handled, lag_of(event));
                options.metrics.record_subscription_failure(name);
                tracing::error!(
                    subscription = %name,
                    position = %event.position,
                    event_id = %event.event_id,
                    error = %source,
                    "the handler failed; the subscription stops before this event"
                );
                if position != saved {
                    store.save_checkpoint(name, position).await?;
                }
                return Err(EventStoreError::Handler {
                    subscription: name.to_owned(),
                    position: event.position,
                    source,
                });
            }
            if since_save >= options.checkpoint_every_events
                || last_save.elapsed() >= options.checkpoint_interval
            {
                store.save_checkpoint(name, position).await?;
                saved = position;
                since_save = 0;
                last_save = Instant::now();
            }
        }
        // Behind while the batch came back full; caught up otherwise.
        let lag = match read.last() {
            Some(last) if full => lag_of(last),
            _ => Duration::ZERO,
        };
        options.metrics.record_subscription(name, handled, lag);
        if !full {
            if position != saved && last_save.elapsed() >= options.checkpoint_interval {
                store.save_checkpoint(name, position).await?;
                saved = position;
                since_save = 0;
                last_save = Instant::now();
            }
            let wait = if position != saved {
                options.poll_interval.min(options.checkpoint_interval)
            } else {
                options.poll_interval
            };
            tokio::select! {
                () = signal.wait(wait) => {}
                () = stopped(stop) => {}
            }
        }
        if !leadership.is_held().await {
            return Ok(Exit::LostLeadership);
        }
    }
}

/// How long ago `event` was recorded (zero if the clocks disagree).
fn lag_of(event: &RecordedEvent) -> Duration {
    (chrono::Utc::now() - event.recorded_at)
        .to_std()
        .unwrap_or(Duration::ZERO)
}
