//! The bus trait both backends implement, the subscription handle and dead
//! letters.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use keel_core::{EventHandler, EventId, EventPublisher, Message};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::codec::{self, MalformedMessage, RawMessage};
use crate::config::SubscriptionConfig;
use crate::error::Result;

/// A publish/subscribe bus with retries and dead letters.
///
/// Implemented by [`InMemoryBus`](crate::InMemoryBus) and, with the `pubsub`
/// feature, `PubSubBus`; both pass the same contract suite (`keel_eventbus::testing`, feature `testing`).
/// Object-safe: hold it as `Arc<dyn EventBus>`.
///
/// `topic` and `consumer` arguments are logical names; the bus maps them to
/// broker names with its [`Naming`](crate::Naming).
#[async_trait]
pub trait EventBus: EventPublisher + fmt::Debug {
    /// Publishes messages that are already encoded (for example, forwarded
    /// from another system). Keel messages go through
    /// [`EventPublisher::publish`].
    async fn publish_raw(&self, topic: &str, messages: &[RawMessage]) -> Result<()>;

    /// Creates the topic if it does not exist (idempotent; ignores the
    /// auto-creation setting: this is the explicit provisioning call).
    async fn ensure_topic(&self, topic: &str) -> Result<()>;

    /// Creates the topic, the consumer's subscription, its dead-letter topic
    /// and the subscription that keeps dead letters, as needed (idempotent).
    /// Messages published to a topic before a subscription exists are not
    /// delivered to it.
    async fn ensure_subscription(&self, topic: &str, config: &SubscriptionConfig) -> Result<()>;

    /// Starts handling the consumer's messages from `topic` in the
    /// background, until the returned [`Subscription`] is shut down or
    /// dropped. Creates what is missing first when auto-creation is on.
    ///
    /// Several subscriptions with the same consumer compete for messages (each
    /// message goes to one of them); different consumers each get every
    /// message.
    async fn subscribe(
        &self,
        topic: &str,
        config: &SubscriptionConfig,
        handler: Arc<dyn EventHandler>,
    ) -> Result<Subscription>;

    /// Up to `limit` of the consumer's dead letters, oldest first where the
    /// broker allows. Reading does not remove them.
    async fn dead_letters(
        &self,
        topic: &str,
        consumer: &str,
        limit: usize,
    ) -> Result<Vec<DeadLetter>>;

    /// Publishes the chosen dead letters (by Keel event id) back to `topic`
    /// as they were originally published, and removes them from the dead
    /// letters. Returns how many were replayed; ids not found are skipped.
    ///
    /// Replaying publishes to the topic, so every consumer of it sees the
    /// message again; consumers deduplicate by event id.
    async fn replay_dead_letters(
        &self,
        topic: &str,
        consumer: &str,
        event_ids: &[EventId],
    ) -> Result<usize>;

    /// For a clean exit: waits for buffered publishes to go out and releases
    /// what the bus holds open besides subscriptions (which stop with their
    /// own [`Subscription::shutdown`]). The bus stays usable afterwards. The
    /// default does nothing, for buses that buffer nothing.
    async fn close(&self) {}
}

/// A message that was dead-lettered, with why.
#[derive(Clone, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub struct DeadLetter {
    /// The message as originally published (bookkeeping attributes removed).
    pub raw: RawMessage,
    /// Why it was dead-lettered, when Keel did it (the broker's own
    /// dead-lettering records no reason).
    pub reason: Option<String>,
    /// How many deliveries were attempted.
    pub attempts: Option<u32>,
    /// The subscription it came from.
    pub subscription: Option<String>,
}

impl DeadLetter {
    pub(crate) fn from_dead_letter_copy(copy: &RawMessage) -> Self {
        let attempts = copy
            .attributes
            .get(codec::DEAD_LETTER_ATTEMPTS)
            .or_else(|| copy.attributes.get(codec::PUBSUB_DELIVERY_COUNT))
            .and_then(|v| v.parse().ok());
        Self {
            raw: copy.without_dead_letter_attributes(),
            reason: copy.attributes.get(codec::DEAD_LETTER_REASON).cloned(),
            attempts,
            subscription: copy
                .attributes
                .get(codec::DEAD_LETTER_SUBSCRIPTION)
                .cloned(),
        }
    }

    /// The Keel event id, when the message carries a valid one.
    #[must_use]
    pub fn event_id(&self) -> Option<EventId> {
        self.raw.event_id()
    }

    /// The decoded message, or why it cannot be decoded.
    pub fn message(&self) -> Result<Message, MalformedMessage> {
        self.raw.decode()
    }
}

/// A running subscription: handlers run in the background until it stops.
///
/// Every background handle in Keel follows one lifecycle rule:
///
/// * [`shutdown`](Self::shutdown) stops gracefully: no new messages, running
///   handlers finish (up to the configured
///   [shutdown timeout](SubscriptionConfig::shutdown_timeout)) and their
///   messages are acked or nacked, messages not yet started are released for
///   redelivery. It returns when everything is settled.
/// * [`abort`](Self::abort) stops at once, like a crash: running handlers
///   are cancelled and nothing in flight is acked; their messages are
///   redelivered. It returns only once the background task and every
///   handler it started have ended, so no handler runs and nothing is acked
///   afterwards.
/// * Dropping the handle is an abort without the wait: the same cancellation,
///   but a handler busy in a poll may finish that poll after the drop.
#[must_use = "dropping a Subscription aborts it"]
pub struct Subscription {
    name: String,
    stop: watch::Sender<Stop>,
    task: Option<JoinHandle<()>>,
}

impl Subscription {
    pub(crate) fn start<F>(name: String, worker: impl FnOnce(StopSignal) -> F) -> Self
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let (stop, rx) = watch::channel(Stop::Run);
        let task = tokio::spawn(worker(StopSignal(rx)));
        Self {
            name,
            stop,
            task: Some(task),
        }
    }

    /// The broker-side subscription name.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the background task has ended.
    #[must_use]
    pub fn is_finished(&self) -> bool {
        self.task.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Stops gracefully: no new messages, running handlers finish and are
    /// acked or nacked, messages not yet started are released. Returns when
    /// everything is settled.
    ///
    /// Cancelling the returned future (dropping it) aborts the subscription.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(Stop::Graceful);
        self.join("shutdown").await;
    }

    /// Stops at once, as if the process died: running handlers are
    /// cancelled, nothing in flight is acked, and every unfinished message is
    /// redelivered. Returns once the background task and all its handlers
    /// have ended.
    pub async fn abort(mut self) {
        // The task cancels its handlers and waits for them: aborting the task
        // from outside would drop them without waiting.
        let _ = self.stop.send(Stop::Abort);
        self.join("abort").await;
    }

    /// Waits for the task, keeping it in `self` meanwhile so that a
    /// cancelled wait still aborts it on drop.
    async fn join(&mut self, during: &str) {
        if let Some(task) = self.task.as_mut() {
            if let Err(e) = task.await
                && e.is_panic()
            {
                tracing::error!(subscription = %self.name, during, "subscriber task panicked");
            }
            self.task = None;
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription")
            .field("name", &self.name)
            .field("finished", &self.is_finished())
            .finish()
    }
}

/// What the handle asked its task to do.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Stop {
    /// Keep going.
    Run,
    /// Finish what is running, then stop.
    Graceful,
    /// Cancel what is running, wait for it to end, then stop.
    Abort,
}

/// Tells a subscriber task to stop.
#[derive(Clone, Debug)]
pub(crate) struct StopSignal(watch::Receiver<Stop>);

impl StopSignal {
    /// Resolves once a stop (graceful or abort) was asked for.
    pub(crate) async fn stopped(&mut self) {
        // An error means the handle is gone; the task is being aborted anyway.
        let _ = self.0.wait_for(|stop| *stop != Stop::Run).await;
    }

    pub(crate) fn is_stopped(&self) -> bool {
        *self.0.borrow() != Stop::Run
    }

    pub(crate) fn is_aborted(&self) -> bool {
        *self.0.borrow() == Stop::Abort
    }
}
