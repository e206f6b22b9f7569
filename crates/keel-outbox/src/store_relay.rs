//! The event store as its own outbox: forwarding the global log to the bus.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use keel_core::{BoxError, EventPublisher, Message};
use keel_eventstore::{
    BatchFailure, Delivery, EventStore, RecordedEvent, Subscription, SubscriptionHandle,
    SubscriptionHandler, SubscriptionOptions, SubscriptionStatus, SubscriptionSupport,
};
use tokio::sync::{oneshot, watch};
use tracing::warn;

use crate::error::{OutboxError, Result};

type Router = dyn Fn(&RecordedEvent) -> Option<String> + Send + Sync;

/// Publishes the events of an event store's global log to the bus, in log
/// order, from a durable checkpoint.
///
/// An event-sourced service needs no outbox table: its events are already
/// committed atomically with the change, in the store. This relay follows
/// the store's global log with a catch-up subscription (one active instance
/// per subscription name across processes; the checkpoint lives in the
/// store) and publishes each event it routes to a topic, with
/// * the stored event id as the message's event id, so consumers
///   deduplicate;
/// * the stream id as the ordering key.
///
/// Consecutive events bound for one topic go out in one publish call (up
/// to [`max_batch`](Self::max_batch) events), so the relay's throughput is
/// not one bus round trip per event; order is kept, within each ordering
/// key and across topics.
///
/// A failed publish is retried with backoff until it succeeds, holding the
/// log (the checkpoint must not pass an unpublished event). A retried batch
/// is published whole again, so some of its messages may arrive twice;
/// after a crash, events after the last checkpoint are published again:
/// at-least-once either way.
pub struct EventStoreRelay {
    publisher: Arc<dyn EventPublisher>,
    router: Arc<Router>,
    publish_timeout: Duration,
    retry_min: Duration,
    retry_max: Duration,
    max_batch: usize,
}

/// The default of [`EventStoreRelay::max_batch`].
pub const DEFAULT_STORE_RELAY_BATCH: usize = 100;

/// The largest [`EventStoreRelay::max_batch`]: Pub/Sub takes at most 1,000
/// messages in one publish request.
pub const MAX_STORE_RELAY_BATCH: usize = 1_000;

impl fmt::Debug for EventStoreRelay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventStoreRelay")
            .field("publish_timeout", &self.publish_timeout)
            .field("retry_min", &self.retry_min)
            .field("retry_max", &self.retry_max)
            .field("max_batch", &self.max_batch)
            .finish_non_exhaustive()
    }
}

impl EventStoreRelay {
    /// A relay publishing through `publisher`; `route` names the topic of
    /// each event, or `None` to leave it unpublished (internal events).
    pub fn new<F>(publisher: Arc<dyn EventPublisher>, route: F) -> Self
    where
        F: Fn(&RecordedEvent) -> Option<String> + Send + Sync + 'static,
    {
        Self {
            publisher,
            router: Arc::new(route),
            publish_timeout: Duration::from_secs(30),
            retry_min: Duration::from_millis(200),
            retry_max: Duration::from_secs(60),
            max_batch: DEFAULT_STORE_RELAY_BATCH,
        }
    }

    /// The most consecutive events published in one call to the bus
    /// (default [`DEFAULT_STORE_RELAY_BATCH`], at most
    /// [`MAX_STORE_RELAY_BATCH`]); 1 publishes one event at a time. A
    /// batch is also cut where the topic changes and at the subscription's
    /// checkpoint boundaries
    /// ([`SubscriptionOptions::checkpoint_every_events`]).
    #[must_use]
    pub fn max_batch(mut self, events: usize) -> Self {
        self.max_batch = events;
        self
    }

    /// How long one publish may take before it counts as failed (default
    /// 30 s).
    #[must_use]
    pub fn publish_timeout(mut self, timeout: Duration) -> Self {
        self.publish_timeout = timeout;
        self
    }

    /// The retry delays after a failed publish: from `min`, doubling, up to
    /// `max` (default 200 ms to 60 s).
    #[must_use]
    pub fn retry_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.retry_min = min;
        self.retry_max = max.max(min);
        self
    }

    /// Starts forwarding `store`'s global log as subscription
    /// `options.name` (its checkpoint key), on a Tokio task.
    ///
    /// # Errors
    ///
    /// [`OutboxError::Invalid`] when the subscription name is empty, the
    /// publish timeout or retry delay is zero, or
    /// [`max_batch`](Self::max_batch) is not between 1 and
    /// [`MAX_STORE_RELAY_BATCH`].
    pub fn spawn<S>(
        self,
        store: Arc<S>,
        options: SubscriptionOptions,
    ) -> Result<EventStoreRelayHandle>
    where
        S: EventStore + SubscriptionSupport + ?Sized + 'static,
    {
        if options.name.is_empty() {
            return Err(OutboxError::invalid("name", "must not be empty"));
        }
        if self.publish_timeout.is_zero() || self.retry_min.is_zero() {
            return Err(OutboxError::invalid(
                "publish_timeout",
                "publish timeout and retry delay must be positive",
            ));
        }
        if !(1..=MAX_STORE_RELAY_BATCH).contains(&self.max_batch) {
            return Err(OutboxError::invalid(
                "max_batch",
                format!("must be between 1 and {MAX_STORE_RELAY_BATCH}"),
            ));
        }
        let (stop, stopping) = watch::channel(false);
        let interrupted = Arc::new(AtomicBool::new(false));
        let (alive, ended) = oneshot::channel();
        let handler = Forward {
            name: options.name.clone(),
            _alive: alive,
            relay: self,
            stopping,
            interrupted: interrupted.clone(),
        };
        let subscription = Subscription::spawn(store, options, handler);
        Ok(EventStoreRelayHandle {
            subscription: Some(subscription),
            stop,
            interrupted,
            ended: Some(ended),
        })
    }
}

/// A running [`EventStoreRelay`].
///
/// Like every Keel background handle:
/// * [`shutdown`](Self::shutdown)`.await` stops gracefully: a publish in
///   flight finishes (one being retried is abandoned and published again
///   on restart), the checkpoint is stored, then it returns;
/// * [`abort`](Self::abort)`.await` stops at once, like a crash, and
///   returns once the relay's task has ended: no final checkpoint, so the
///   events since the last one are published again by the next relay;
/// * dropping the handle is an abort that does not wait.
#[derive(Debug)]
pub struct EventStoreRelayHandle {
    subscription: Option<SubscriptionHandle>,
    stop: watch::Sender<bool>,
    interrupted: Arc<AtomicBool>,
    /// Closed when the relay's handler is dropped, which happens when the
    /// subscription's task ends (normally or aborted).
    ended: Option<oneshot::Receiver<()>>,
}

impl EventStoreRelayHandle {
    /// The subscription's status: leadership, last position forwarded,
    /// events handled.
    #[must_use]
    pub fn status(&self) -> SubscriptionStatus {
        self.subscription
            .as_ref()
            .map(SubscriptionHandle::status)
            .unwrap_or_default()
    }

    /// Waits until the status satisfies `f` (or the relay ends).
    pub async fn wait_for(
        &mut self,
        f: impl Fn(&SubscriptionStatus) -> bool,
    ) -> SubscriptionStatus {
        match self.subscription.as_mut() {
            Some(subscription) => subscription.wait_for(f).await,
            None => SubscriptionStatus::default(),
        }
    }

    /// Stops gracefully: a publish in flight finishes (one being retried is
    /// abandoned and published again on restart), and the checkpoint is
    /// stored.
    ///
    /// # Errors
    ///
    /// [`OutboxError::EventStore`] when the relay had already failed: an
    /// event that cannot be turned into a message, or a store error.
    pub async fn shutdown(mut self) -> Result<()> {
        let _ = self.stop.send(true);
        let Some(subscription) = self.subscription.take() else {
            return Ok(());
        };
        match subscription.shutdown().await {
            Ok(()) => Ok(()),
            Err(_) if self.interrupted.load(Ordering::SeqCst) => Ok(()),
            Err(e) => Err(OutboxError::EventStore(e.into())),
        }
    }

    /// Ends the relay at once, like a crash, and waits until its task has
    /// ended: no publish of it runs after this returns. No final
    /// checkpoint, so events since the last one are published again by the
    /// next relay.
    pub async fn abort(mut self) {
        if let Some(subscription) = self.subscription.take() {
            subscription.abort().await;
        }
        if let Some(ended) = self.ended.take() {
            // Never sent: an error means the handler was dropped with the
            // task.
            let _ = ended.await;
        }
    }
}

impl Drop for EventStoreRelayHandle {
    fn drop(&mut self) {
        // Dropping the subscription's handle aborts its task without
        // waiting.
        drop(self.subscription.take());
    }
}

struct Forward {
    name: String,
    /// Dropped with the handler, i.e. when the subscription's task ends:
    /// tells [`EventStoreRelayHandle::abort`] that nothing runs any more.
    _alive: oneshot::Sender<()>,
    relay: EventStoreRelay,
    stopping: watch::Receiver<bool>,
    interrupted: Arc<AtomicBool>,
}

/// Turns a stored event into the message published for it.
fn to_message(event: &RecordedEvent) -> Result<Message, keel_eventstore::EventStoreError> {
    let mut message = Message::new(event.event_type.clone(), event.payload_value()?)
        .with_event_id(event.event_id)
        .with_metadata(event.metadata.get().clone())
        .with_ordering_key(event.stream_id.as_str());
    message.schema_version = event.schema_version;
    Ok(message)
}

impl Forward {
    /// Publishes `messages` (the events from `first` on, all routed to
    /// `topic`) in one call, retrying with backoff until it succeeds or the
    /// relay is stopping.
    async fn publish(
        &self,
        topic: &str,
        messages: &[Message],
        first: &RecordedEvent,
    ) -> std::result::Result<(), BoxError> {
        let mut delay = self.relay.retry_min;
        loop {
            let error = match tokio::time::timeout(
                self.relay.publish_timeout,
                self.relay.publisher.publish(topic, messages),
            )
            .await
            {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(source)) => OutboxError::Publish {
                    topic: topic.to_owned(),
                    source,
                },
                Err(_) => OutboxError::PublishTimeout {
                    topic: topic.to_owned(),
                    after: self.relay.publish_timeout,
                },
            };
            warn!(relay = %self.name, position = %first.position, event_id = %first.event_id,
                  events = messages.len(), error = %error, ?delay,
                  "publishing stored events failed; will retry");
            let mut stopping = self.stopping.clone();
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                _ = stopping.wait_for(|s| *s) => {
                    self.interrupted.store(true, Ordering::SeqCst);
                    return Err(Box::new(error));
                }
            }
            delay = (delay * 2).min(self.relay.retry_max);
        }
    }

    /// Publishes `group`, if any; a failure names the group's first event
    /// as the one the relay stops before.
    async fn flush(&self, group: Option<Group<'_>>) -> std::result::Result<(), BatchFailure> {
        match group {
            Some(g) => self
                .publish(&g.topic, &g.messages, g.first)
                .await
                .map_err(|source| BatchFailure::new(g.from, source)),
            None => Ok(()),
        }
    }
}

/// Consecutive messages bound for one topic, not yet published.
struct Group<'a> {
    topic: String,
    /// Index in the batch of the first event in the group.
    from: usize,
    first: &'a RecordedEvent,
    messages: Vec<Message>,
}

#[async_trait]
impl SubscriptionHandler for Forward {
    async fn handle(&self, event: &RecordedEvent) -> std::result::Result<(), BoxError> {
        // A batch of one: the same path as every batch.
        self.handle_batch(&[Delivery::new(event, false)])
            .await
            .map_err(|failure| failure.source)
    }

    fn max_batch(&self) -> usize {
        self.relay.max_batch
    }

    async fn handle_batch(
        &self,
        deliveries: &[Delivery<'_>],
    ) -> std::result::Result<(), BatchFailure> {
        let mut group: Option<Group<'_>> = None;
        for (i, delivery) in deliveries.iter().enumerate() {
            let event = delivery.event();
            let Some(topic) = (self.relay.router)(event) else {
                continue;
            };
            let message = match to_message(event) {
                Ok(message) => message,
                Err(e) => {
                    // What comes before it still goes out; the relay then
                    // stops before this event.
                    self.flush(group).await?;
                    return Err(BatchFailure::new(i, e));
                }
            };
            match &mut group {
                Some(g) if g.topic == topic => g.messages.push(message),
                _ => {
                    self.flush(group.take()).await?;
                    group = Some(Group {
                        topic,
                        from: i,
                        first: event,
                        messages: vec![message],
                    });
                }
            }
        }
        self.flush(group).await
    }
}
