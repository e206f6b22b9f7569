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

use crate::{EventBus, EventBusError, InMemoryBus, RawMessage, SubscriptionConfig, WireFormats};

mod admin;
mod delivery;
mod formats;
mod lifecycle;

pub use admin::*;
pub use delivery::*;
pub use formats::*;
pub use lifecycle::*;

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

    /// The same broker, publishing in the formats `formats` gives each
    /// topic.
    fn with_formats(&self, formats: WireFormats) -> Self;
}

impl TestBus for InMemoryBus {
    fn without_auto_create(&self) -> Self {
        self.with_auto_create(false)
    }

    fn with_formats(&self, formats: WireFormats) -> Self {
        self.with_wire_formats(formats)
    }
}

#[cfg(feature = "pubsub")]
impl TestBus for crate::PubSubBus {
    fn without_auto_create(&self) -> Self {
        self.with_auto_create(false)
    }

    fn with_formats(&self, formats: WireFormats) -> Self {
        self.with_wire_formats(formats)
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
