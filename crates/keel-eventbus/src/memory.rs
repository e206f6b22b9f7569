//! The in-memory bus: Pub/Sub's delivery semantics inside one process.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use keel_core::{EventHandler, EventId, EventPublisher, Message};
use keel_telemetry::KeelMetrics;
use keel_telemetry::metrics::DeadLetterReason;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::bus::{DeadLetter, EventBus, StopSignal, Subscription};
use crate::codec::{RawMessage, WireFormats, encode_batch};
use crate::config::SubscriptionConfig;
use crate::dispatch::{Outcome, Recorder, invoke};
use crate::error::{EventBusError, Result};
use crate::naming::Naming;

/// An event bus that lives in process memory, for tests and single-process
/// tools.
///
/// It is not a simplification of Pub/Sub: it keeps the same observable
/// behaviour, proved by the same contract suite (`keel_eventbus::testing`):
///
/// * a subscription receives the messages published after it was created;
///   competing subscribers of one consumer share them, different consumers
///   each get all of them;
/// * a message is acked only when its handler succeeded; a failed or
///   panicking handler's message is redelivered after an exponential
///   backoff, with the delivery attempt counted;
/// * after the configured attempts, or at once when rejected or malformed,
///   the message moves to the consumer's dead-letter topic, whose
///   subscription keeps it for [listing and replay](EventBus::dead_letters);
/// * on an ordered subscription, messages with the same ordering key are
///   handled one at a time in publish order, a failing one holding back the
///   ones behind it;
/// * a stopped or crashed subscriber's unfinished messages are redelivered.
///
/// Clones share the same broker. [`with_auto_create`](Self::with_auto_create)
/// and [`with_naming`](Self::with_naming) return a view of the same broker
/// with other settings.
#[derive(Clone)]
pub struct InMemoryBus {
    broker: Arc<Broker>,
    naming: Naming,
    auto_create: bool,
    metrics: KeelMetrics,
    formats: WireFormats,
}

impl Default for InMemoryBus {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for InMemoryBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InMemoryBus")
            .field("naming", &self.naming)
            .field("auto_create", &self.auto_create)
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Broker {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Topic name → names of its subscriptions.
    topics: HashMap<String, Vec<String>>,
    subscriptions: HashMap<String, Sub>,
    next_seq: u64,
}

struct Sub {
    topic: String,
    ordered: bool,
    /// `None` for the subscriptions that keep dead letters.
    policy: Option<Policy>,
    /// Waiting messages by publish sequence.
    pending: BTreeMap<u64, Entry>,
    in_flight: HashMap<u64, Entry>,
    busy_keys: HashSet<String>,
    notify: Arc<Notify>,
}

struct Policy {
    config: SubscriptionConfig,
    dead_letter_topic: String,
}

#[derive(Clone)]
struct Entry {
    raw: RawMessage,
    attempts: u32,
    not_before: Instant,
}

enum Pick {
    Got {
        seq: u64,
        raw: RawMessage,
        attempt: u32,
    },
    Wait(Option<Instant>),
}

impl State {
    fn publish(&mut self, topic: &str, raw: &RawMessage) {
        let now = Instant::now();
        let seq = self.next_seq;
        self.next_seq += 1;
        let subs = self.topics.get(topic).cloned().unwrap_or_default();
        for name in subs {
            if let Some(sub) = self.subscriptions.get_mut(&name) {
                sub.pending.insert(
                    seq,
                    Entry {
                        raw: raw.clone(),
                        attempts: 0,
                        not_before: now,
                    },
                );
                sub.notify.notify_waiters();
            }
        }
    }

    fn pick(&mut self, name: &str) -> Pick {
        let Some(sub) = self.subscriptions.get_mut(name) else {
            return Pick::Wait(None);
        };
        let now = Instant::now();
        let mut blocked: HashSet<&str> = HashSet::new();
        let mut earliest: Option<Instant> = None;
        let mut found = None;
        for (seq, e) in &sub.pending {
            let key = if sub.ordered {
                e.raw.ordering_key.as_deref()
            } else {
                None
            };
            if let Some(k) = key
                && (sub.busy_keys.contains(k) || blocked.contains(k))
            {
                continue;
            }
            if e.not_before > now {
                earliest = Some(earliest.map_or(e.not_before, |t| t.min(e.not_before)));
                if let Some(k) = key {
                    // Later messages with this key must wait for this one.
                    blocked.insert(k);
                }
                continue;
            }
            found = Some(*seq);
            break;
        }
        let Some(seq) = found else {
            return Pick::Wait(earliest);
        };
        let mut entry = sub.pending.remove(&seq).expect("picked entry exists");
        entry.attempts += 1;
        if sub.ordered
            && let Some(k) = &entry.raw.ordering_key
        {
            sub.busy_keys.insert(k.clone());
        }
        let picked = Pick::Got {
            seq,
            raw: entry.raw.clone(),
            attempt: entry.attempts,
        };
        sub.in_flight.insert(seq, entry);
        picked
    }

    /// Settles an in-flight delivery; says why when it was dead-lettered.
    fn complete(&mut self, name: &str, seq: u64, outcome: Outcome) -> Option<DeadLetterReason> {
        let sub = self.subscriptions.get_mut(name)?;
        let mut entry = sub.in_flight.remove(&seq)?;
        if let Some(k) = &entry.raw.ordering_key {
            sub.busy_keys.remove(k);
        }
        sub.notify.notify_waiters();
        let Some(policy) = &sub.policy else {
            // A dead-letter keeping subscription has no policy: redeliver.
            if outcome != Outcome::Ack {
                sub.pending.insert(seq, entry);
            }
            return None;
        };
        match outcome.with_limit(entry.attempts, policy.config.max_delivery_attempts()) {
            Outcome::Ack => None,
            Outcome::Retry(_) => {
                entry.not_before = Instant::now() + policy.config.backoff_after(entry.attempts);
                sub.pending.insert(seq, entry);
                None
            }
            Outcome::DeadLetter(why, reason) => {
                let copy = entry.raw.dead_letter_copy(&reason, entry.attempts, name);
                let dlq = policy.dead_letter_topic.clone();
                self.publish(&dlq, &copy);
                Some(why)
            }
        }
    }
}

/// Returns an in-flight message to its subscription when the handler task
/// ends without an outcome (the subscriber was aborted).
struct InFlight {
    broker: Arc<Broker>,
    subscription: String,
    seq: u64,
    done: bool,
}

impl InFlight {
    fn complete(mut self, outcome: Outcome) -> Option<DeadLetterReason> {
        self.done = true;
        lock(&self.broker).complete(&self.subscription, self.seq, outcome)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if !self.done {
            // A retry: never a dead letter, nothing to count.
            let _ = lock(&self.broker).complete(
                &self.subscription,
                self.seq,
                Outcome::Retry("the subscriber stopped before the handler finished".into()),
            );
        }
    }
}

fn lock(broker: &Broker) -> MutexGuard<'_, State> {
    // State changes are single assignments under the lock; a panic elsewhere
    // cannot leave it half-updated, so a poisoned lock is still usable.
    broker
        .state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl InMemoryBus {
    /// An empty bus that creates topics and subscriptions on first use. It
    /// records the standard bus metrics through the global meter provider's
    /// instruments as they are now (build it after `keel_telemetry::init`),
    /// or through those given to [`with_metrics`](Self::with_metrics).
    #[must_use]
    pub fn new() -> Self {
        Self {
            broker: Arc::new(Broker::default()),
            naming: Naming::new(),
            auto_create: true,
            metrics: KeelMetrics::global(),
            formats: WireFormats::new(),
        }
    }

    /// The same broker, recording publishes, acks, nacks, dead letters and
    /// handler durations through `metrics` (for publishes from this handle
    /// and subscriptions started from it).
    #[must_use]
    pub fn with_metrics(&self, metrics: KeelMetrics) -> Self {
        Self {
            metrics,
            ..self.clone()
        }
    }

    /// The same broker with auto-creation on or off. With it off, publishing
    /// to a missing topic or subscribing to a missing subscription is an
    /// error, as with a production Pub/Sub setup.
    #[must_use]
    pub fn with_auto_create(&self, on: bool) -> Self {
        Self {
            auto_create: on,
            ..self.clone()
        }
    }

    /// The same broker, publishing from this handle in the formats
    /// `formats` gives each topic (JSON unless told otherwise). Consumers
    /// read every format, whichever handle they subscribed through.
    #[must_use]
    pub fn with_wire_formats(&self, formats: WireFormats) -> Self {
        Self {
            formats,
            ..self.clone()
        }
    }

    /// The same broker with another naming convention.
    #[must_use]
    pub fn with_naming(&self, naming: Naming) -> Self {
        Self {
            naming,
            ..self.clone()
        }
    }

    /// How many messages of the consumer's subscription wait for delivery or
    /// are being handled.
    pub fn backlog(&self, topic: &str, consumer: &str) -> Result<usize> {
        let name = self.naming.subscription(topic, consumer)?;
        let state = lock(&self.broker);
        let sub = state
            .subscriptions
            .get(&name)
            .ok_or(EventBusError::SubscriptionNotFound { subscription: name })?;
        Ok(sub.pending.len() + sub.in_flight.len())
    }

    fn topic_name(&self, topic: &str) -> Result<String> {
        let name = self.naming.topic(topic)?;
        let mut state = lock(&self.broker);
        if !state.topics.contains_key(&name) {
            if !self.auto_create {
                return Err(EventBusError::TopicNotFound { topic: name });
            }
            state.topics.insert(name.clone(), Vec::new());
        }
        Ok(name)
    }

    fn publish_encoded(&self, topic: &str, messages: &[RawMessage]) -> Result<()> {
        let started = Instant::now();
        let result = self.topic_name(topic).map(|name| {
            let mut state = lock(&self.broker);
            for m in messages {
                state.publish(&name, m);
            }
        });
        self.metrics.record_publish(
            topic,
            messages.len() as u64,
            started.elapsed(),
            result.is_ok(),
        );
        result
    }
}

#[async_trait]
impl EventPublisher for InMemoryBus {
    async fn publish(&self, topic: &str, messages: &[Message]) -> keel_core::Result<()> {
        // Encode everything first: a batch with one bad message publishes
        // nothing.
        let raw = encode_batch(messages, self.formats.for_topic(topic))?;
        self.publish_encoded(topic, &raw)?;
        Ok(())
    }
}

#[async_trait]
impl EventBus for InMemoryBus {
    async fn publish_raw(&self, topic: &str, messages: &[RawMessage]) -> Result<()> {
        self.publish_encoded(topic, messages)
    }

    async fn ensure_topic(&self, topic: &str) -> Result<()> {
        let name = self.naming.topic(topic)?;
        lock(&self.broker).topics.entry(name).or_default();
        Ok(())
    }

    async fn ensure_subscription(&self, topic: &str, config: &SubscriptionConfig) -> Result<()> {
        config.validate()?;
        let consumer = config.consumer();
        let topic_name = self.naming.topic(topic)?;
        let sub_name = self.naming.subscription(topic, consumer)?;
        let dlq_topic = self.naming.dead_letter_topic(topic, consumer)?;
        let dlq_sub = self.naming.dead_letter_subscription(topic, consumer)?;
        let mut state = lock(&self.broker);
        let state = &mut *state;
        for (t, s) in [(&topic_name, &sub_name), (&dlq_topic, &dlq_sub)] {
            let subs = state.topics.entry(t.clone()).or_default();
            if !subs.contains(s) {
                subs.push(s.clone());
            }
        }
        let new_sub = |topic: &str, ordered: bool, policy: Option<Policy>| Sub {
            topic: topic.to_owned(),
            ordered,
            policy,
            pending: BTreeMap::new(),
            in_flight: HashMap::new(),
            busy_keys: HashSet::new(),
            notify: Arc::new(Notify::new()),
        };
        let policy = Policy {
            config: config.clone(),
            dead_letter_topic: dlq_topic.clone(),
        };
        match state.subscriptions.get_mut(&sub_name) {
            Some(existing) => {
                if existing.ordered != config.ordered() {
                    tracing::warn!(
                        subscription = %sub_name,
                        "ordering cannot change on an existing subscription; keeping ordered = {}",
                        existing.ordered
                    );
                }
                // Retry and dead-letter settings follow the latest config, as
                // the Pub/Sub backend updates them.
                existing.policy = Some(policy);
            }
            None => {
                state.subscriptions.insert(
                    sub_name.clone(),
                    new_sub(&topic_name, config.ordered(), Some(policy)),
                );
            }
        }
        state
            .subscriptions
            .entry(dlq_sub.clone())
            .or_insert_with(|| new_sub(&dlq_topic, false, None));
        Ok(())
    }

    async fn subscribe(
        &self,
        topic: &str,
        config: &SubscriptionConfig,
        handler: Arc<dyn EventHandler>,
    ) -> Result<Subscription> {
        config.validate()?;
        let name = self.naming.subscription(topic, config.consumer())?;
        if self.auto_create {
            self.ensure_subscription(topic, config).await?;
        }
        let notify = {
            let state = lock(&self.broker);
            let topic_name = self.naming.topic(topic)?;
            if !state.topics.contains_key(&topic_name) {
                return Err(EventBusError::TopicNotFound { topic: topic_name });
            }
            match state.subscriptions.get(&name) {
                Some(sub) if sub.topic == topic_name => sub.notify.clone(),
                _ => return Err(EventBusError::SubscriptionNotFound { subscription: name }),
            }
        };
        let broker = self.broker.clone();
        let config = config.clone();
        let metrics = self.metrics.clone();
        Ok(Subscription::start(name.clone(), move |stop| {
            run(broker, name, config, handler, notify, metrics, stop)
        }))
    }

    async fn dead_letters(
        &self,
        topic: &str,
        consumer: &str,
        limit: usize,
    ) -> Result<Vec<DeadLetter>> {
        let name = self.naming.dead_letter_subscription(topic, consumer)?;
        let state = lock(&self.broker);
        let sub = state
            .subscriptions
            .get(&name)
            .ok_or(EventBusError::SubscriptionNotFound { subscription: name })?;
        Ok(sub
            .pending
            .values()
            .take(limit)
            .map(|e| DeadLetter::from_dead_letter_copy(&e.raw))
            .collect())
    }

    async fn replay_dead_letters(
        &self,
        topic: &str,
        consumer: &str,
        event_ids: &[EventId],
    ) -> Result<usize> {
        let topic_name = self.naming.topic(topic)?;
        let name = self.naming.dead_letter_subscription(topic, consumer)?;
        let wanted: HashSet<EventId> = event_ids.iter().copied().collect();
        let mut state = lock(&self.broker);
        let sub = state
            .subscriptions
            .get_mut(&name)
            .ok_or(EventBusError::SubscriptionNotFound { subscription: name })?;
        let chosen: Vec<u64> = sub
            .pending
            .iter()
            .filter(|(_, e)| e.raw.event_id().is_some_and(|id| wanted.contains(&id)))
            .map(|(seq, _)| *seq)
            .collect();
        let mut replayed = Vec::new();
        let mut seen = HashSet::new();
        for seq in chosen {
            let entry = sub.pending.remove(&seq).expect("chosen entry exists");
            // A message dead-lettered twice is replayed once.
            if seen.insert(entry.raw.event_id()) {
                replayed.push(entry.raw.without_dead_letter_attributes());
            }
        }
        for raw in &replayed {
            state.publish(&topic_name, raw);
        }
        Ok(replayed.len())
    }
}

async fn run(
    broker: Arc<Broker>,
    name: String,
    config: SubscriptionConfig,
    handler: Arc<dyn EventHandler>,
    notify: Arc<Notify>,
    metrics: KeelMetrics,
    mut stop: StopSignal,
) {
    let mut running = JoinSet::new();
    let limit = config.max_concurrent_handlers();
    loop {
        if stop.is_stopped() {
            break;
        }
        while running.try_join_next().is_some() {}
        if running.len() >= limit {
            tokio::select! {
                () = stop.stopped() => break,
                _ = running.join_next() => continue,
            }
        }
        let notified = notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let picked = lock(&broker).pick(&name);
        match picked {
            Pick::Got { seq, raw, attempt } => {
                let guard = InFlight {
                    broker: broker.clone(),
                    subscription: name.clone(),
                    seq,
                    done: false,
                };
                let handler = handler.clone();
                let name = name.clone();
                let timeout = config.handler_timeout();
                let metrics = metrics.clone();
                let max_attempts = config.max_delivery_attempts();
                running.spawn(async move {
                    let recorder = Recorder {
                        metrics: &metrics,
                        max_attempts,
                    };
                    let outcome = invoke(&*handler, &raw, attempt, &name, timeout, &recorder).await;
                    if let Some(why) = guard.complete(outcome) {
                        recorder.dead_lettered(&name, why);
                    }
                });
            }
            Pick::Wait(until) => {
                let sleep = async {
                    match until {
                        Some(t) => tokio::time::sleep_until(t).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    () = stop.stopped() => break,
                    () = &mut notified => {}
                    () = sleep => {}
                    Some(_) = running.join_next(), if !running.is_empty() => {}
                }
            }
        }
    }
    if stop.is_aborted() {
        // Cancel the handlers and wait until each has ended: their messages
        // go back unacked (the in-flight guards), and none runs afterwards.
        running.shutdown().await;
        return;
    }
    // Graceful stop: let running handlers finish, then release the rest.
    let drain = async { while running.join_next().await.is_some() {} };
    if tokio::time::timeout(config.shutdown_timeout(), drain)
        .await
        .is_err()
    {
        tracing::warn!(subscription = %name, "shutdown timeout: releasing unfinished messages");
        running.shutdown().await;
    }
}
