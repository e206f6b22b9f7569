//! The contract suite every [`EventBus`] implementation must pass.
//!
//! Each function takes a fresh bus and checks one promise end to end; run
//! them all with `keel_testkit::contract_tests!`:
//!
//! ```ignore
//! keel_testkit::contract_tests! {
//!     factory: || async { (keel_eventbus::InMemoryBus::new(), ()) },
//!     suite: keel_eventbus::testing,
//!     tests: [round_trip_keeps_every_field, poison_message_is_dead_lettered_after_max_attempts],
//! }
//! ```
//!
//! Every test uses its own topic names, so buses may be shared between tests
//! and nothing needs cleaning up. Retries are configured with short backoffs
//! (100 ms to 400 ms); the wait for an expected delivery is bounded by
//! [`PATIENCE`], long enough for a Pub/Sub ack deadline to expire.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use keel_core::{
    CausationId, CorrelationId, Delivery, EventHandler, EventId, HandlerError, Message, Metadata,
    TenantId, TraceContext,
};
use serde_json::json;

use crate::{EventBus, EventBusError, InMemoryBus, RawMessage, SubscriptionConfig};

/// How long a test waits for something that must happen.
///
/// Generous on purpose: after a subscriber shuts down, the emulator may keep
/// a message leased to the closed stream until its ack deadline passes, and
/// more than once on a busy two-core machine. Only failing tests wait this
/// long; passing ones stop as soon as the condition holds.
pub const PATIENCE: Duration = Duration::from_secs(120);

/// A bus under test: an [`EventBus`] that can also give a view of the same
/// broker with auto-creation off.
pub trait TestBus: EventBus + Clone + 'static {
    /// The same broker, with topic and subscription auto-creation off.
    fn without_auto_create(&self) -> Self;
}

impl TestBus for InMemoryBus {
    fn without_auto_create(&self) -> Self {
        self.with_auto_create(false)
    }
}

#[cfg(feature = "pubsub")]
impl TestBus for crate::PubSubBus {
    fn without_auto_create(&self) -> Self {
        self.with_auto_create(false)
    }
}

/// A topic name no other test uses.
#[must_use]
pub fn unique(prefix: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("{prefix}-{}", &id[..12])
}

/// Subscription settings with short backoffs, for tests.
#[must_use]
pub fn fast_config(consumer: &str) -> SubscriptionConfig {
    SubscriptionConfig::new(consumer)
        .with_backoff(Duration::from_millis(100), Duration::from_millis(400))
        .with_ack_deadline(Duration::from_secs(10))
        .with_shutdown_timeout(Duration::from_secs(10))
}

/// Polls `done` every 20 ms until it holds; panics after [`PATIENCE`].
pub async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {PATIENCE:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

type Behaviour = dyn Fn(&Delivery) -> Result<(), HandlerError> + Send + Sync;

/// A handler that records every delivery and decides with a closure.
pub struct Recorder {
    deliveries: Mutex<Vec<Delivery>>,
    handled: Mutex<Vec<Delivery>>,
    behaviour: Box<Behaviour>,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder").finish_non_exhaustive()
    }
}

impl Recorder {
    /// Records, then answers with `behaviour`.
    pub fn new(
        behaviour: impl Fn(&Delivery) -> Result<(), HandlerError> + Send + Sync + 'static,
    ) -> Arc<Self> {
        Arc::new(Self {
            deliveries: Mutex::new(Vec::new()),
            handled: Mutex::new(Vec::new()),
            behaviour: Box::new(behaviour),
        })
    }

    /// Records and succeeds.
    pub fn accepting() -> Arc<Self> {
        Self::new(|_| Ok(()))
    }

    /// Every delivery so far.
    pub fn deliveries(&self) -> Vec<Delivery> {
        self.deliveries.lock().unwrap().clone()
    }

    /// The deliveries that succeeded.
    pub fn handled(&self) -> Vec<Delivery> {
        self.handled.lock().unwrap().clone()
    }

    /// The deliveries of one event.
    pub fn attempts_of(&self, id: EventId) -> Vec<u32> {
        self.deliveries()
            .iter()
            .filter(|d| d.message.event_id == id)
            .map(|d| d.attempt)
            .collect()
    }

    /// Whether the event was handled successfully.
    pub fn was_handled(&self, id: EventId) -> bool {
        self.handled
            .lock()
            .unwrap()
            .iter()
            .any(|d| d.message.event_id == id)
    }
}

#[async_trait]
impl EventHandler for Recorder {
    async fn handle(&self, delivery: &Delivery) -> Result<(), HandlerError> {
        self.deliveries.lock().unwrap().push(delivery.clone());
        (self.behaviour)(delivery)?;
        self.handled.lock().unwrap().push(delivery.clone());
        Ok(())
    }
}

fn msg(n: u64) -> Message {
    Message::new("test.happened", json!({ "n": n }))
}

/// Lists `consumer`'s dead letters on `topic` until at least `expected` are
/// there (a dead letter reaches its subscription some time after the
/// handler gave up) or [`PATIENCE`] runs out; returns the last listing.
pub async fn dead_letters_settled<B: EventBus + ?Sized>(
    bus: &B,
    topic: &str,
    consumer: &str,
    expected: usize,
) -> Vec<crate::DeadLetter> {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let found = bus
            .dead_letters(topic, consumer, expected + 10)
            .await
            .expect("dead letters can be listed");
        if found.len() >= expected || tokio::time::Instant::now() >= deadline {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every field of a message survives the trip: id, type, schema version,
/// payload, correlation and causation ids, trace context, actor, tenant,
/// free metadata, ordering key; the first delivery is attempt 1.
pub async fn round_trip_keeps_every_field<B: TestBus>(bus: B) {
    let topic = unique("roundtrip");
    let config = fast_config("reader");
    let rec = Recorder::accepting();
    let sub = bus.subscribe(&topic, &config, rec.clone()).await.unwrap();
    let metadata = Metadata::new()
        .with_correlation_id(CorrelationId::new())
        .with_causation_id(CausationId::new())
        .with_trace_context(
            TraceContext::new(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                Some("keel=1".into()),
            )
            .unwrap(),
        )
        .with_actor("user:alice")
        .with_tenant(TenantId::new("acme").unwrap())
        .with_extra("source", "contract");
    let mut sent = Message::new(
        "order.placed",
        json!({ "order": "o-1", "lines": [1, 2, 3], "note": "ünïcode" }),
    )
    .with_metadata(metadata);
    sent.schema_version = 2;
    let unordered = msg(2);
    bus.publish(&topic, &[sent.clone(), unordered.clone()])
        .await
        .unwrap();
    wait_until("both messages handled", || rec.handled().len() == 2).await;
    let got = rec
        .handled()
        .into_iter()
        .find(|d| d.message.event_id == sent.event_id)
        .expect("the message arrived");
    assert_eq!(got.message, sent);
    assert_eq!(got.attempt, 1);
    assert_eq!(got.subscription, sub.name());
    assert!(sub.name().ends_with(&format!("{topic}.reader")));
    sub.shutdown().await;
}

/// A handler that fails is called again with a higher attempt number until
/// it succeeds; the message is then not dead-lettered.
pub async fn failed_handler_is_retried_with_attempts<B: TestBus>(bus: B) {
    let topic = unique("retry");
    let config = fast_config("retrier");
    let rec = Recorder::new(|d| {
        if d.attempt < 3 {
            Err(HandlerError::retry("not yet"))
        } else {
            Ok(())
        }
    });
    let sub = bus.subscribe(&topic, &config, rec.clone()).await.unwrap();
    let m = msg(1);
    bus.publish(&topic, std::slice::from_ref(&m)).await.unwrap();
    wait_until("handled on the third attempt", || {
        rec.was_handled(m.event_id)
    })
    .await;
    assert_eq!(rec.attempts_of(m.event_id), [1, 2, 3]);
    sub.shutdown().await;
    assert!(
        bus.dead_letters(&topic, "retrier", 10)
            .await
            .unwrap()
            .is_empty()
    );
}

/// A message whose handler always fails is delivered exactly
/// `max_delivery_attempts` times, then dead-lettered with the last error;
/// other messages on the subscription are handled meanwhile.
pub async fn poison_message_is_dead_lettered_after_max_attempts<B: TestBus>(bus: B) {
    let topic = unique("poison");
    let config = fast_config("victim").with_max_delivery_attempts(5);
    let rec = Recorder::new(|d| {
        if d.message.payload["poison"] == json!(true) {
            Err(HandlerError::retry("cannot digest this"))
        } else {
            Ok(())
        }
    });
    let sub = bus.subscribe(&topic, &config, rec.clone()).await.unwrap();
    let poison = Message::new("test.poison", json!({ "poison": true }));
    let healthy: Vec<Message> = (0..5).map(msg).collect();
    bus.publish(&topic, std::slice::from_ref(&poison))
        .await
        .unwrap();
    bus.publish(&topic, &healthy).await.unwrap();
    wait_until("healthy messages handled", || {
        healthy.iter().all(|m| rec.was_handled(m.event_id))
    })
    .await;
    // List once the last attempt was made: the emulator can stall a publish
    // to a dead-letter topic while a listing holds a stream on it.
    wait_until("the last attempt", || {
        rec.attempts_of(poison.event_id).len() == 5
    })
    .await;
    let dead = dead_letters_settled(&bus, &topic, "victim", 1).await;
    assert_eq!(
        dead.len(),
        1,
        "dead letters {dead:?}; poison attempts {:?}",
        rec.attempts_of(poison.event_id)
    );
    assert_eq!(dead[0].event_id(), Some(poison.event_id));
    assert_eq!(dead[0].message().unwrap(), poison);
    assert_eq!(dead[0].attempts, Some(5));
    let reason = dead[0].reason.clone().unwrap_or_default();
    assert!(reason.contains("cannot digest this"), "{reason}");
    // Give a stray sixth delivery the chance to show up before counting.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(rec.attempts_of(poison.event_id), [1, 2, 3, 4, 5]);
    for m in &healthy {
        assert_eq!(rec.attempts_of(m.event_id), [1]);
    }
    sub.shutdown().await;
}

/// `HandlerError::Reject` dead-letters at once, recording the reason.
pub async fn rejected_message_is_dead_lettered_at_once<B: TestBus>(bus: B) {
    let topic = unique("reject");
    let config = fast_config("picky");
    let rec = Recorder::new(|_| Err(HandlerError::reject("unknown customer")));
    let sub = bus.subscribe(&topic, &config, rec.clone()).await.unwrap();
    let m = msg(1);
    bus.publish(&topic, std::slice::from_ref(&m)).await.unwrap();
    let dead = dead_letters_settled(&bus, &topic, "picky", 1).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].event_id(), Some(m.event_id));
    assert_eq!(dead[0].attempts, Some(1));
    let reason = dead[0].reason.clone().unwrap_or_default();
    assert!(reason.contains("rejected: unknown customer"), "{reason}");
    assert_eq!(
        dead[0].subscription.as_deref(),
        Some(sub.name()),
        "the dead letter names its subscription"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(rec.attempts_of(m.event_id), [1]);
    sub.shutdown().await;
}

/// A panicking handler does not kill the subscriber: the message is
/// redelivered and the next attempt succeeds.
pub async fn panicking_handler_is_retried<B: TestBus>(bus: B) {
    let topic = unique("panic");
    let config = fast_config("fragile");
    let rec = Recorder::new(|d| {
        assert!(d.attempt > 1, "first attempt blows up");
        Ok(())
    });
    let sub = bus.subscribe(&topic, &config, rec.clone()).await.unwrap();
    let first = msg(1);
    bus.publish(&topic, std::slice::from_ref(&first))
        .await
        .unwrap();
    wait_until("handled after the panic", || {
        rec.was_handled(first.event_id)
    })
    .await;
    assert_eq!(rec.attempts_of(first.event_id), [1, 2]);
    // The subscriber is still alive for the next message.
    let second = msg(2);
    bus.publish(&topic, std::slice::from_ref(&second))
        .await
        .unwrap();
    wait_until("next message handled", || rec.was_handled(second.event_id)).await;
    assert!(!sub.is_finished());
    sub.shutdown().await;
}

/// Messages that are not Keel messages (not JSON, missing or invalid
/// attributes) never reach the handler, are dead-lettered with the reason,
/// and do not stop the subscriber.
pub async fn malformed_messages_are_dead_lettered<B: TestBus>(bus: B) {
    let topic = unique("malformed");
    let config = fast_config("strict");
    let rec = Recorder::accepting();
    let sub = bus.subscribe(&topic, &config, rec.clone()).await.unwrap();
    let good = msg(1);
    let template = RawMessage::encode(&msg(0)).unwrap();
    let mut not_json = template.clone();
    not_json.data = b"<xml/>".to_vec();
    not_json
        .attributes
        .insert("keel-event-id".into(), EventId::new().to_string());
    let mut no_type = template.clone();
    no_type.attributes.remove("keel-event-type");
    no_type
        .attributes
        .insert("keel-event-id".into(), EventId::new().to_string());
    let mut bad_version = template.clone();
    bad_version
        .attributes
        .insert("keel-schema-version".into(), "zero".into());
    bad_version
        .attributes
        .insert("keel-event-id".into(), EventId::new().to_string());
    let foreign = RawMessage::new(b"hello".to_vec(), BTreeMap::new());
    let bad = [not_json, no_type, bad_version, foreign];
    bus.publish_raw(&topic, &bad).await.unwrap();
    bus.publish(&topic, std::slice::from_ref(&good))
        .await
        .unwrap();
    wait_until("the good message handled", || {
        rec.was_handled(good.event_id)
    })
    .await;
    let dead = dead_letters_settled(&bus, &topic, "strict", bad.len()).await;
    assert_eq!(dead.len(), bad.len(), "{dead:?}");
    for d in &dead {
        assert!(d.message().is_err());
        let reason = d.reason.clone().unwrap_or_default();
        assert!(reason.starts_with("malformed message"), "{reason}");
    }
    let mut reasons: Vec<String> = dead.iter().filter_map(|d| d.reason.clone()).collect();
    reasons.sort();
    assert!(
        reasons.iter().any(|r| r.contains("not JSON")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("keel-event-type")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("keel-schema-version")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("keel-event-id")),
        "{reasons:?}"
    );
    assert_eq!(
        rec.deliveries().len(),
        1,
        "only the good message reached the handler"
    );
    assert!(!sub.is_finished());
    sub.shutdown().await;
}

/// On an ordered subscription, messages sharing an ordering key are handled
/// one at a time and in publish order, even with concurrent handlers and
/// failures that cause redeliveries; different keys proceed in parallel.
pub async fn ordering_key_order_is_kept<B: TestBus>(bus: B) {
    const KEYS: usize = 4;
    const PER_KEY: u64 = 15;
    let topic = unique("ordered");
    let config = fast_config("sequencer")
        .with_ordered(true)
        .with_max_concurrent_handlers(8);
    let busy: Arc<Mutex<HashSet<String>>> = Arc::default();
    let overlaps = Arc::new(AtomicUsize::new(0));
    let (busy2, overlaps2) = (busy.clone(), overlaps.clone());
    let rec = Recorder::new(move |d| {
        let key = d.message.ordering_key.clone().expect("keyed");
        if !busy2.lock().unwrap().insert(key.clone()) {
            overlaps2.fetch_add(1, Ordering::SeqCst);
        }
        std::thread::sleep(Duration::from_millis(2));
        busy2.lock().unwrap().remove(&key);
        // Every fourth message fails once, forcing redeliveries mid-stream.
        let n = d.message.payload["n"].as_u64().unwrap();
        if n % 4 == 1 && d.attempt == 1 {
            return Err(HandlerError::retry("transient"));
        }
        Ok(())
    });
    let sub = bus.subscribe(&topic, &config, rec.clone()).await.unwrap();
    let mut expected: HashMap<String, Vec<u64>> = HashMap::new();
    for n in 0..PER_KEY {
        let batch: Vec<Message> = (0..KEYS)
            .map(|k| {
                let key = format!("Stream-{k}");
                expected.entry(key.clone()).or_default().push(n);
                msg(n).with_ordering_key(key)
            })
            .collect();
        bus.publish(&topic, &batch).await.unwrap();
    }
    let total = KEYS * PER_KEY as usize;
    wait_until("every ordered message handled", || {
        rec.handled().len() >= total
    })
    .await;
    let mut got: HashMap<String, Vec<u64>> = HashMap::new();
    for d in rec.handled() {
        got.entry(d.message.ordering_key.clone().unwrap())
            .or_default()
            .push(d.message.payload["n"].as_u64().unwrap());
    }
    assert_eq!(got, expected);
    assert_eq!(
        overlaps.load(Ordering::SeqCst),
        0,
        "same-key handlers overlapped"
    );
    sub.shutdown().await;
}

/// Dead letters stay listed until replayed; replaying chosen ones publishes
/// them to the topic again (same event id) and removes only them.
pub async fn dead_letters_can_be_listed_and_replayed<B: TestBus>(bus: B) {
    let topic = unique("replay");
    let config = fast_config("fixer");
    let accept = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let accept2 = accept.clone();
    let rec = Recorder::new(move |_| {
        if accept2.load(Ordering::SeqCst) {
            Ok(())
        } else {
            Err(HandlerError::reject("bug in the handler"))
        }
    });
    let sub = bus.subscribe(&topic, &config, rec.clone()).await.unwrap();
    let messages: Vec<Message> = (0..3).map(msg).collect();
    bus.publish(&topic, &messages).await.unwrap();
    let dead = dead_letters_settled(&bus, &topic, "fixer", 3).await;
    assert_eq!(dead.len(), 3);
    // Listing again still finds them: listing does not consume.
    let again = dead_letters_settled(&bus, &topic, "fixer", 3).await;
    assert_eq!(again.len(), 3);

    accept.store(true, Ordering::SeqCst);
    let chosen = [messages[0].event_id, messages[2].event_id, EventId::new()];
    let replayed = bus
        .replay_dead_letters(&topic, "fixer", &chosen)
        .await
        .unwrap();
    assert_eq!(replayed, 2);
    wait_until("replayed messages handled", || {
        rec.was_handled(messages[0].event_id) && rec.was_handled(messages[2].event_id)
    })
    .await;
    let replayed_delivery = rec
        .handled()
        .into_iter()
        .find(|d| d.message.event_id == messages[0].event_id)
        .unwrap();
    assert_eq!(replayed_delivery.message, messages[0]);
    let left = dead_letters_settled(&bus, &topic, "fixer", 1).await;
    // Re-list after a pause: a replayed dead letter must not come back.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let left_later = dead_letters_settled(&bus, &topic, "fixer", 1).await;
    for l in [&left, &left_later] {
        let ids: Vec<_> = l.iter().filter_map(crate::DeadLetter::event_id).collect();
        assert_eq!(ids, [messages[1].event_id]);
    }
    assert!(!rec.was_handled(messages[1].event_id));
    sub.shutdown().await;
}

/// `shutdown` lets a running handler finish and acks its message: a later
/// subscriber of the same consumer does not see it again.
pub async fn graceful_shutdown_finishes_in_flight<B: TestBus>(bus: B) {
    let topic = unique("shutdown");
    let config = fast_config("worker");
    let started = Arc::new(tokio::sync::Notify::new());
    let finished = Arc::new(AtomicUsize::new(0));
    struct Slow {
        started: Arc<tokio::sync::Notify>,
        finished: Arc<AtomicUsize>,
    }
    #[async_trait]
    impl EventHandler for Slow {
        async fn handle(&self, _: &Delivery) -> Result<(), HandlerError> {
            self.started.notify_one();
            tokio::time::sleep(Duration::from_millis(500)).await;
            self.finished.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }
    let handler = Arc::new(Slow {
        started: started.clone(),
        finished: finished.clone(),
    });
    let sub = bus.subscribe(&topic, &config, handler).await.unwrap();
    let m = msg(1);
    bus.publish(&topic, std::slice::from_ref(&m)).await.unwrap();
    tokio::time::timeout(PATIENCE, started.notified())
        .await
        .expect("the handler started");
    sub.shutdown().await;
    assert_eq!(
        finished.load(Ordering::SeqCst),
        1,
        "shutdown waited for the handler"
    );

    let rec = Recorder::accepting();
    let next = bus.subscribe(&topic, &config, rec.clone()).await.unwrap();
    let sentinel = msg(2);
    bus.publish(&topic, std::slice::from_ref(&sentinel))
        .await
        .unwrap();
    wait_until("sentinel handled", || rec.was_handled(sentinel.event_id)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        rec.attempts_of(m.event_id).is_empty(),
        "a message finished during shutdown was redelivered"
    );
    next.shutdown().await;
}

/// A subscriber that dies mid-handler (its task aborted, nothing acked)
/// loses nothing: the message is redelivered to the next subscriber.
pub async fn killed_subscriber_message_is_redelivered<B: TestBus>(bus: B) {
    let topic = unique("killed");
    let config = fast_config("mortal");
    let started = Arc::new(tokio::sync::Notify::new());
    struct Hang(Arc<tokio::sync::Notify>);
    #[async_trait]
    impl EventHandler for Hang {
        async fn handle(&self, _: &Delivery) -> Result<(), HandlerError> {
            self.0.notify_one();
            std::future::pending::<()>().await;
            Ok(())
        }
    }
    // The doomed subscriber stops extending its lease after 20 s at the
    // latest, so a lease kept alive past the kill (the client's lease keeper
    // can outlive an aborted task in the same process) still runs out well
    // within PATIENCE; a real crash closes the connection and ends it sooner.
    let doomed_config = config.clone().with_max_lease(Duration::from_secs(20));
    let doomed = bus
        .subscribe(&topic, &doomed_config, Arc::new(Hang(started.clone())))
        .await
        .unwrap();
    let m = msg(1);
    bus.publish(&topic, std::slice::from_ref(&m)).await.unwrap();
    tokio::time::timeout(PATIENCE, started.notified())
        .await
        .expect("the handler started");
    drop(doomed);

    let rec = Recorder::accepting();
    let survivor = bus.subscribe(&topic, &config, rec.clone()).await.unwrap();
    wait_until("redelivered to the survivor", || {
        rec.was_handled(m.event_id)
    })
    .await;
    let attempts = rec.attempts_of(m.event_id);
    assert!(
        attempts[0] >= 2,
        "a redelivery counts as a new attempt: {attempts:?}"
    );
    survivor.shutdown().await;
}

/// A handler that takes `pause` per message and tracks what runs: how many
/// handler calls started, how many are running now (a call cancelled
/// mid-way stops counting as running when its future is dropped), and which
/// events finished successfully (the ones the bus then acks).
///
/// Made with [`hanging_after`](Self::hanging_after), only the first calls
/// finish and the later ones never do, so a test can stop a subscriber at a
/// known point however slow the machine is.
pub struct Tracker {
    pause: Duration,
    finishing: usize,
    started: AtomicUsize,
    running: Arc<AtomicUsize>,
    finished: Mutex<Vec<EventId>>,
}

impl std::fmt::Debug for Tracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracker")
            .field("started", &self.started())
            .field("running", &self.running())
            .finish_non_exhaustive()
    }
}

impl Tracker {
    /// A handler that sleeps `pause`, then succeeds.
    #[must_use]
    pub fn new(pause: Duration) -> Arc<Self> {
        Self::hanging_after(pause, usize::MAX)
    }

    /// A handler whose first `finishing` calls sleep `pause`, then succeed;
    /// every later call hangs until it is cancelled.
    #[must_use]
    pub fn hanging_after(pause: Duration, finishing: usize) -> Arc<Self> {
        Arc::new(Self {
            pause,
            finishing,
            started: AtomicUsize::new(0),
            running: Arc::new(AtomicUsize::new(0)),
            finished: Mutex::new(Vec::new()),
        })
    }

    /// Handler calls started so far.
    pub fn started(&self) -> usize {
        self.started.load(Ordering::SeqCst)
    }

    /// Handler calls running now.
    pub fn running(&self) -> usize {
        self.running.load(Ordering::SeqCst)
    }

    /// The events whose handler call finished successfully, in order.
    pub fn finished(&self) -> Vec<EventId> {
        self.finished.lock().unwrap().clone()
    }
}

/// Counts a handler call as running until it is dropped (finished or
/// cancelled).
struct Running(Arc<AtomicUsize>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[async_trait]
impl EventHandler for Tracker {
    async fn handle(&self, delivery: &Delivery) -> Result<(), HandlerError> {
        let nth = self.started.fetch_add(1, Ordering::SeqCst);
        self.running.fetch_add(1, Ordering::SeqCst);
        let _running = Running(self.running.clone());
        if nth >= self.finishing {
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(self.pause).await;
        self.finished
            .lock()
            .unwrap()
            .push(delivery.message.event_id);
        Ok(())
    }
}

/// `abort` stops at once and returns only when every handler it started has
/// ended: afterwards no handler is running, none starts, none finishes
/// (so nothing more is acked).
pub async fn abort_returns_after_handlers_ended<B: TestBus>(bus: B) {
    const CONCURRENT: usize = 8;
    const FINISHING: usize = 12;
    let topic = unique("abort");
    let config = fast_config("aborted").with_max_concurrent_handlers(CONCURRENT);
    // Twelve calls finish, then every handler slot hangs: the abort finds
    // exactly eight handlers running.
    let tracker = Tracker::hanging_after(Duration::from_millis(10), FINISHING);
    let sub = bus
        .subscribe(&topic, &config, tracker.clone())
        .await
        .unwrap();
    let messages: Vec<Message> = (0..40).map(msg).collect();
    bus.publish(&topic, &messages).await.unwrap();
    wait_until("twelve handled, eight hanging", || {
        tracker.finished().len() == FINISHING && tracker.running() == CONCURRENT
    })
    .await;
    sub.abort().await;
    assert_eq!(tracker.running(), 0, "a handler still runs after abort");
    let (started, finished) = (tracker.started(), tracker.finished());
    assert_eq!(started, FINISHING + CONCURRENT);
    // Longer than a handler's pause: a handler left behind would show now.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(tracker.started(), started, "a handler started after abort");
    assert_eq!(
        tracker.finished(),
        finished,
        "a handler finished after abort"
    );
}

/// Subscribers of one consumer share the messages (each handled once);
/// another consumer gets every message too.
pub async fn competing_consumers_share_and_fan_out<B: TestBus>(bus: B) {
    let topic = unique("fanout");
    let a = fast_config("shared");
    let b = fast_config("auditor");
    let (r1, r2, r3) = (
        Recorder::accepting(),
        Recorder::accepting(),
        Recorder::accepting(),
    );
    let s1 = bus.subscribe(&topic, &a, r1.clone()).await.unwrap();
    let s2 = bus.subscribe(&topic, &a, r2.clone()).await.unwrap();
    let s3 = bus.subscribe(&topic, &b, r3.clone()).await.unwrap();
    let messages: Vec<Message> = (0..40).map(msg).collect();
    bus.publish(&topic, &messages).await.unwrap();
    let unique_ids = |recs: &[&Recorder]| {
        recs.iter()
            .flat_map(|r| r.handled())
            .map(|d| d.message.event_id)
            .collect::<HashSet<_>>()
            .len()
    };
    wait_until("the shared consumer handled all", || {
        unique_ids(&[&r1, &r2]) == messages.len()
    })
    .await;
    wait_until("the auditor handled all", || {
        unique_ids(&[&r3]) == messages.len()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let shared_total = r1.handled().len() + r2.handled().len();
    assert_eq!(
        shared_total,
        messages.len(),
        "a shared message was handled twice"
    );
    assert_ne!(s1.name(), s3.name());
    assert_eq!(s1.name(), s2.name());
    for s in [s1, s2, s3] {
        s.shutdown().await;
    }
}

/// With auto-creation off, a missing topic or subscription is a typed error;
/// once provisioned, the strict bus works.
pub async fn missing_resources_without_auto_create<B: TestBus>(bus: B) {
    let strict = bus.without_auto_create();
    let topic = unique("strict");
    let config = fast_config("prod");
    let err = strict.publish(&topic, &[msg(1)]).await.unwrap_err();
    assert_eq!(err.kind(), keel_core::ErrorKind::NotFound, "{err}");
    let err = strict
        .publish_raw(&topic, &[RawMessage::encode(&msg(1)).unwrap()])
        .await
        .unwrap_err();
    assert!(matches!(err, EventBusError::TopicNotFound { .. }), "{err}");
    let err = strict
        .subscribe(&topic, &config, Recorder::accepting())
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            EventBusError::TopicNotFound { .. } | EventBusError::SubscriptionNotFound { .. }
        ),
        "{err}"
    );
    strict.ensure_topic(&topic).await.unwrap();
    let err = strict
        .subscribe(&topic, &config, Recorder::accepting())
        .await
        .unwrap_err();
    assert!(
        matches!(err, EventBusError::SubscriptionNotFound { .. }),
        "{err}"
    );
    // Provisioning is idempotent.
    strict.ensure_subscription(&topic, &config).await.unwrap();
    strict.ensure_subscription(&topic, &config).await.unwrap();
    strict.ensure_topic(&topic).await.unwrap();
    let rec = Recorder::accepting();
    let sub = strict
        .subscribe(&topic, &config, rec.clone())
        .await
        .unwrap();
    let m = msg(1);
    strict
        .publish(&topic, std::slice::from_ref(&m))
        .await
        .unwrap();
    wait_until("handled on the provisioned subscription", || {
        rec.was_handled(m.event_id)
    })
    .await;
    assert!(
        strict
            .dead_letters(&topic, "prod", 5)
            .await
            .unwrap()
            .is_empty(),
        "the dead-letter subscription was provisioned too"
    );
    sub.shutdown().await;
}

/// Bad settings and names are refused with typed errors before anything is
/// created.
pub async fn invalid_settings_are_refused<B: TestBus>(bus: B) {
    let topic = unique("invalid");
    for attempts in [4, 101] {
        let config = fast_config("c").with_max_delivery_attempts(attempts);
        let err = bus
            .subscribe(&topic, &config, Recorder::accepting())
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                EventBusError::InvalidConfig {
                    field: "max_delivery_attempts",
                    ..
                }
            ),
            "{err}"
        );
    }
    let err = bus
        .subscribe("bad topic", &fast_config("c"), Recorder::accepting())
        .await
        .unwrap_err();
    assert!(
        matches!(err, EventBusError::InvalidName { kind: "topic", .. }),
        "{err}"
    );
    let err = bus.publish("9lives", &[msg(1)]).await.unwrap_err();
    assert_eq!(err.kind(), keel_core::ErrorKind::InvalidInput);
    let err = bus
        .dead_letters(&topic, "never-subscribed", 10)
        .await
        .unwrap_err();
    assert!(
        matches!(err, EventBusError::SubscriptionNotFound { .. }),
        "{err}"
    );
}

/// Many messages, random transient failures and some poison: every
/// published message ends up handled or dead-lettered, never both, never
/// lost; effects applied through an inbox happen once per event.
pub async fn many_messages_with_random_failures_are_accounted_for<B: TestBus>(bus: B) {
    const N: u64 = 600;
    let topic = unique("bulk");
    let config = fast_config("bulk")
        .with_max_delivery_attempts(5)
        .with_max_concurrent_handlers(16);
    let max = config.max_delivery_attempts();
    let inbox: Arc<Mutex<HashSet<EventId>>> = Arc::default();
    let effects = Arc::new(AtomicUsize::new(0));
    let gave_up: Arc<Mutex<HashSet<EventId>>> = Arc::default();
    let (inbox2, effects2, gave_up2) = (inbox.clone(), effects.clone(), gave_up.clone());
    let rec = Recorder::new(move |d| {
        let n = d.message.payload["n"].as_u64().unwrap();
        // A cheap deterministic hash of (message, attempt) decides failures:
        // about 30 % of attempts fail, and every 37th message always fails.
        let roll =
            (n.wrapping_mul(2_654_435_761) ^ u64::from(d.attempt).wrapping_mul(40_503)) % 100;
        let fail = n % 37 == 0 || roll < 30;
        if fail {
            if d.attempt >= max {
                gave_up2.lock().unwrap().insert(d.message.event_id);
            }
            return Err(HandlerError::retry(format!("unlucky roll {roll}")));
        }
        if inbox2.lock().unwrap().insert(d.message.event_id) {
            effects2.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    });
    let sub = bus.subscribe(&topic, &config, rec.clone()).await.unwrap();
    let messages: Vec<Message> = (0..N).map(msg).collect();
    for chunk in messages.chunks(100) {
        bus.publish(&topic, chunk).await.unwrap();
    }
    wait_until("every message handled or given up", || {
        inbox.lock().unwrap().len() + gave_up.lock().unwrap().len() == N as usize
    })
    .await;
    let handled = inbox.lock().unwrap().clone();
    let gave_up = gave_up.lock().unwrap().clone();
    assert!(
        handled.is_disjoint(&gave_up),
        "a message was both handled and dead-lettered"
    );
    assert_eq!(effects.load(Ordering::SeqCst), handled.len());
    let dead = dead_letters_settled(&bus, &topic, "bulk", gave_up.len()).await;
    let dead_ids: HashSet<EventId> = dead
        .iter()
        .filter_map(crate::DeadLetter::event_id)
        .collect();
    assert_eq!(
        dead_ids, gave_up,
        "the dead-letter topic holds exactly the given-up messages"
    );
    let published: HashSet<EventId> = messages.iter().map(|m| m.event_id).collect();
    let accounted: HashSet<EventId> = handled.union(&dead_ids).copied().collect();
    assert_eq!(accounted, published, "published = handled + dead-lettered");
    assert!(
        gave_up.len() >= (N / 37) as usize,
        "the poison messages were dead-lettered"
    );
    for id in &gave_up {
        assert_eq!(rec.attempts_of(*id).len(), max as usize, "attempts of {id}");
    }
    sub.shutdown().await;
}
