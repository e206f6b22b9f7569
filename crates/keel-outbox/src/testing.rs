//! The contract suite: rules every outbox, relay and inbox variant keeps,
//! run against PostgreSQL and in memory alike (feature `testing`).
//!
//! Each rule is a `pub async fn rule(subject: Subject)` that panics when
//! the subject breaks it; `tests/contract_memory.rs` and
//! `tests/contract_postgres.rs` run them all with
//! `keel_testkit::contract_tests!`. A service with its own outbox or inbox
//! store runs them by building a [`Subject`] around it.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use keel_core::uow::{MemoryTransactions, TransactionSource};
use keel_core::{Delivery, EventHandler, EventPublisher, HandlerError, Message};
use serde_json::json;

use crate::{
    InMemoryInbox, InMemoryOutbox, Inbox, InboxHandler, InboxStore, Outbox, OutboxMessage, PgInbox,
    PgOutbox, Relay, RelayConfig,
};

/// Builds a relay over the subject's outbox.
pub type RelayFactory = Arc<dyn Fn(Arc<dyn EventPublisher>, RelayConfig) -> Relay + Send + Sync>;

/// What the rules run against: one backend's transactions, outbox, inbox
/// store and relay.
#[derive(Clone)]
pub struct Subject {
    /// Begins the transactions the rules write in.
    pub transactions: Arc<dyn TransactionSource>,
    /// The outbox under test.
    pub outbox: Arc<dyn Outbox>,
    /// The inbox store under test.
    pub inbox: Arc<dyn InboxStore>,
    /// Builds relays over `outbox`.
    pub relay: RelayFactory,
}

impl fmt::Debug for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subject")
            .field("outbox", &self.outbox)
            .field("inbox", &self.inbox)
            .finish_non_exhaustive()
    }
}

impl Subject {
    /// The in-memory variants.
    #[must_use]
    pub fn in_memory() -> Self {
        let outbox = InMemoryOutbox::new();
        let relayed = outbox.clone();
        Self {
            transactions: Arc::new(MemoryTransactions::new()),
            outbox: Arc::new(outbox),
            inbox: Arc::new(InMemoryInbox::new()),
            relay: Arc::new(move |publisher, config| {
                Relay::in_memory(&relayed, publisher, config).expect("a valid relay config")
            }),
        }
    }

    /// The PostgreSQL variants on `db` (migrated with Keel's outbox and
    /// inbox tables).
    #[must_use]
    pub fn postgres(db: &keel_database::Database) -> Self {
        let pool = db.pool().clone();
        Self {
            transactions: Arc::new(db.clone()),
            outbox: Arc::new(PgOutbox::new()),
            inbox: Arc::new(PgInbox::new(pool.clone())),
            relay: Arc::new(move |publisher, config| {
                Relay::new(pool.clone(), publisher, config).expect("a valid relay config")
            }),
        }
    }
}

/// A publisher that keeps what it publishes, and fails the first
/// `failures` calls (before publishing anything).
#[derive(Debug, Default)]
pub struct Tape {
    published: Mutex<Vec<(String, Message)>>,
    failures: Mutex<usize>,
}

impl Tape {
    /// A tape that fails its first `failures` publish calls.
    #[must_use]
    pub fn failing(failures: usize) -> Self {
        Self {
            published: Mutex::default(),
            failures: Mutex::new(failures),
        }
    }

    /// Every message published, with its topic, in publish order.
    #[must_use]
    pub fn published(&self) -> Vec<(String, Message)> {
        self.published.lock().expect("tape lock").clone()
    }

    /// The `seq` payload field of each message, per ordering key, in
    /// publish order.
    #[must_use]
    pub fn sequences(&self) -> HashMap<String, Vec<u64>> {
        let mut by_key: HashMap<String, Vec<u64>> = HashMap::new();
        for (_, m) in self.published() {
            by_key
                .entry(m.ordering_key.clone().unwrap_or_default())
                .or_default()
                .push(m.payload["seq"].as_u64().unwrap_or(u64::MAX));
        }
        by_key
    }
}

#[async_trait]
impl EventPublisher for Tape {
    async fn publish(&self, topic: &str, messages: &[Message]) -> keel_core::Result<()> {
        {
            let mut left = self.failures.lock().expect("tape lock");
            if *left > 0 {
                *left -= 1;
                return Err(keel_core::Error::unavailable(
                    "bus",
                    "the test bus is down",
                    std::io::Error::other("down"),
                ));
            }
        }
        let mut published = self.published.lock().expect("tape lock");
        published.extend(messages.iter().map(|m| (topic.to_owned(), m.clone())));
        Ok(())
    }
}

const WAIT: Duration = Duration::from_secs(30);

fn config() -> RelayConfig {
    RelayConfig::default()
        .with_poll_interval(Duration::from_millis(20))
        .with_retry_backoff(Duration::from_millis(5), Duration::from_millis(20))
        .with_batch_size(50)
        .with_scan_window(500)
}

/// Message `seq` of aggregate `Order`/`aggregate`.
fn event(aggregate: &str, seq: u64) -> OutboxMessage {
    OutboxMessage::new(
        "orders",
        "Order",
        aggregate,
        Message::new(
            "order.changed",
            json!({ "aggregate": aggregate, "seq": seq }),
        ),
    )
}

/// Writes `messages` in one transaction, committed or rolled back.
async fn write(subject: &Subject, messages: &[OutboxMessage], commit: bool) {
    let mut tx = subject.transactions.begin().await.expect("begin");
    subject
        .outbox
        .within(&mut *tx)
        .write_all(messages)
        .await
        .expect("write");
    if commit {
        tx.commit().await.expect("commit");
    } else {
        tx.rollback().await.expect("rollback");
    }
}

/// Runs `relay` until it has published `expected` messages into `tape`
/// and the outbox is empty, failing after [`WAIT`].
async fn drain(relay: &Relay, tape: &Tape, expected: usize) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let report = relay.relay_once().await.expect("relay_once");
        let pending = relay.stats().await.expect("stats").pending;
        if report.claimed == 0 && pending == 0 && tape.published().len() >= expected {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the relay did not publish {expected} messages in {WAIT:?} (published {}, pending {pending})",
            tape.published().len()
        );
        if report.claimed == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// Written in a transaction that rolls back: never published.
pub async fn rolled_back_writes_are_never_published(subject: Subject) {
    write(&subject, &[event("a", 1), event("a", 2)], false).await;
    write(&subject, &[event("b", 1)], true).await;
    let tape = Arc::new(Tape::default());
    let relay = (subject.relay)(tape.clone(), config());
    drain(&relay, &tape, 1).await;
    let published = tape.published();
    assert_eq!(
        published.len(),
        1,
        "only the committed message: {published:?}"
    );
    assert_eq!(published[0].1.payload["aggregate"], "b");
}

/// Committed: published exactly once, each aggregate in commit order, as
/// written (topic, event id, payload, ordering key).
pub async fn committed_writes_are_published_once_in_order(subject: Subject) {
    let written: Vec<OutboxMessage> = (1..=5)
        .flat_map(|n| [event("a", n), event("b", n)])
        .collect();
    for pair in written.chunks(3) {
        write(&subject, pair, true).await;
    }
    let tape = Arc::new(Tape::default());
    let relay = (subject.relay)(tape.clone(), config());
    drain(&relay, &tape, written.len()).await;
    assert_eq!(relay.relay_once().await.expect("relay_once").claimed, 0);

    let published = tape.published();
    assert_eq!(published.len(), written.len(), "each message once");
    for m in &written {
        let (topic, got) = published
            .iter()
            .find(|(_, p)| p.event_id == m.message().event_id)
            .expect("every committed message is published");
        assert_eq!(topic, m.topic());
        assert_eq!(got.payload, m.message().payload);
        assert_eq!(got.event_type, m.message().event_type);
        assert_eq!(got.ordering_key.as_deref(), Some(m.ordering_key().as_str()));
    }
    let sequences = tape.sequences();
    assert_eq!(sequences["Order-a"], vec![1, 2, 3, 4, 5]);
    assert_eq!(sequences["Order-b"], vec![1, 2, 3, 4, 5]);
}

/// Many concurrent writers (8 tasks × 25 transactions, every fifth rolled
/// back) with two relays publishing meanwhile: published = committed,
/// nothing twice, each aggregate in commit order.
pub async fn concurrent_writers_publish_exactly_what_committed(subject: Subject) {
    const TASKS: u64 = 8;
    const TRANSACTIONS: u64 = 25;
    let tape = Arc::new(Tape::default());
    let relays = [
        (subject.relay)(tape.clone(), config().with_name("one")).spawn(),
        (subject.relay)(tape.clone(), config().with_name("two")).spawn(),
    ];
    let mut writers = Vec::new();
    for task in 0..TASKS {
        let subject = subject.clone();
        writers.push(tokio::spawn(async move {
            let mut committed = Vec::new();
            let mut seq = 0;
            for n in 0..TRANSACTIONS {
                let commit = n % 5 != 4;
                // Two aggregates per task, written by alternate
                // transactions, two messages each time.
                let own = format!("t{task}-{}", n % 2);
                seq += 1;
                let messages = vec![event(&own, seq), event(&own, seq + 1)];
                seq += 1;
                write(&subject, &messages, commit).await;
                if commit {
                    committed.extend(messages.iter().map(|m| m.message().event_id));
                }
            }
            committed
        }));
    }
    let mut committed = Vec::new();
    for writer in writers {
        committed.extend(writer.await.expect("writer task"));
    }

    let deadline = tokio::time::Instant::now() + WAIT;
    while tape.published().len() < committed.len() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "published {} of {} committed messages",
            tape.published().len(),
            committed.len()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for relay in relays {
        relay.shutdown().await;
    }

    let published = tape.published();
    let mut counts: HashMap<_, usize> = HashMap::new();
    for (_, m) in &published {
        *counts.entry(m.event_id).or_default() += 1;
    }
    assert!(
        counts.values().all(|&n| n == 1),
        "no message published twice"
    );
    assert_eq!(counts.len(), committed.len(), "published = committed");
    assert!(committed.iter().all(|id| counts.contains_key(id)));
    for (key, seqs) in tape.sequences() {
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "aggregate {key} published out of commit order: {seqs:?}"
        );
    }
}

/// Oversize and malformed messages are refused with `Error::Invalid`
/// before anything is written (the transaction stays usable); a duplicate
/// event id within one call is `AlreadyExists`.
pub async fn bad_messages_are_refused_before_anything_is_written(subject: Subject) {
    let huge = OutboxMessage::new(
        "orders",
        "Order",
        "a",
        Message::new(
            "order.changed",
            json!("x".repeat(crate::DEFAULT_MAX_PAYLOAD_BYTES + 1)),
        ),
    );
    let nul = OutboxMessage::new("orders", "Order", "a", Message::new("e", json!("a\u{0}b")));
    let bad: Vec<(OutboxMessage, &str)> = vec![
        (huge, "payload"),
        (nul, "payload"),
        (
            OutboxMessage::new("", "Order", "a", Message::new("e", json!(1))),
            "topic",
        ),
        (
            OutboxMessage::new("orders", "", "a", Message::new("e", json!(1))),
            "aggregate_type",
        ),
        (
            OutboxMessage::new(
                "orders",
                "Order",
                "x".repeat(10_000),
                Message::new("e", json!(1)),
            ),
            "aggregate_id",
        ),
        (
            OutboxMessage::new("orders", "Order", "a\u{0}\n", Message::new("e", json!(1))),
            "aggregate_id",
        ),
        (
            OutboxMessage::new("orders", "Order", "a", Message::new("", json!(1))),
            "event_type",
        ),
    ];
    let good = event("a", 1);
    let mut tx = subject.transactions.begin().await.expect("begin");
    for (message, field) in &bad {
        let err = subject
            .outbox
            .within(&mut *tx)
            .write_all(&[good.clone(), message.clone()])
            .await
            .expect_err("refused");
        match &err {
            keel_core::Error::Invalid(invalid) => assert_eq!(invalid.field, *field, "{err}"),
            other => panic!("expected Invalid {field}, got {other:?}"),
        }
        assert!(err.to_string().len() < 300, "the message is bounded: {err}");
        assert!(!err.to_string().contains('\n'), "no raw newline: {err}");
    }
    let twice = subject
        .outbox
        .within(&mut *tx)
        .write_all(&[good.clone(), good.clone()])
        .await
        .expect_err("duplicate");
    assert!(
        matches!(twice, keel_core::Error::AlreadyExists { .. }),
        "{twice:?}"
    );

    // Nothing was written, and the transaction is still usable.
    let second = event("a", 2);
    subject
        .outbox
        .within(&mut *tx)
        .write(&second)
        .await
        .expect("a good write");
    tx.commit().await.expect("commit");
    let tape = Arc::new(Tape::default());
    let relay = (subject.relay)(tape.clone(), config());
    drain(&relay, &tape, 1).await;
    let published = tape.published();
    assert_eq!(published.len(), 1, "{published:?}");
    assert_eq!(published[0].1.event_id, second.message().event_id);
}

/// A failing publisher: the rows are retried with backoff until it
/// recovers; nothing is lost, nothing is reordered, the failure shows in
/// the stats meanwhile.
pub async fn failed_publishes_are_retried_and_nothing_is_lost(subject: Subject) {
    let written: Vec<OutboxMessage> = (1..=6).map(|n| event("a", n)).collect();
    write(&subject, &written, true).await;
    let tape = Arc::new(Tape::failing(3));
    let relay = (subject.relay)(
        tape.clone(),
        config().with_batch_size(2).with_scan_window(2),
    );
    let report = relay.relay_once().await.expect("relay_once");
    assert_eq!((report.published, report.failed), (0, 1), "{report:?}");
    let stats = relay.stats().await.expect("stats");
    assert_eq!((stats.pending, stats.retrying), (6, 1), "{stats:?}");
    drain(&relay, &tape, written.len()).await;
    assert_eq!(tape.sequences()["Order-a"], vec![1, 2, 3, 4, 5, 6]);
    assert_eq!(relay.stats().await.expect("stats").retrying, 0);
}

/// Counts its runs and writes one outbox message per run through the
/// inbox's transaction; fails while `fail` is set.
struct Work {
    outbox: Arc<dyn Outbox>,
    runs: Mutex<usize>,
    fail: Mutex<bool>,
}

#[async_trait]
impl InboxHandler for Work {
    async fn handle(
        &self,
        tx: &mut dyn keel_core::uow::Transaction,
        delivery: &Delivery,
    ) -> Result<(), HandlerError> {
        *self.runs.lock().expect("lock") += 1;
        let done = Message::new(
            "work.done",
            json!({ "for": delivery.message.event_id, "seq": 1 }),
        );
        self.outbox
            .within(tx)
            .write(&OutboxMessage::new("work", "Work", "w", done))
            .await
            .map_err(HandlerError::retry)?;
        if *self.fail.lock().expect("lock") {
            return Err(HandlerError::retry(keel_core::Error::internal_msg(
                "failing on purpose",
            )));
        }
        Ok(())
    }
}

fn inbox(subject: &Subject, consumer: &str, fail: bool) -> Arc<Inbox<Work>> {
    let work = Work {
        outbox: subject.outbox.clone(),
        runs: Mutex::new(0),
        fail: Mutex::new(fail),
    };
    Arc::new(
        Inbox::new(
            subject.inbox.clone(),
            subject.transactions.clone(),
            consumer,
            work,
        )
        .expect("a valid consumer"),
    )
}

async fn published_work(subject: &Subject) -> usize {
    let tape = Arc::new(Tape::default());
    let relay = (subject.relay)(tape.clone(), config());
    drain(&relay, &tape, 0).await;
    tape.published().iter().filter(|(t, _)| t == "work").count()
}

/// A redelivered message is acknowledged without running the work again;
/// another consumer of the same event does its own work.
pub async fn redelivered_message_is_acked_without_running_the_work_again(subject: Subject) {
    let handler = inbox(&subject, "stats", false);
    let message = Message::new("order.placed", json!({ "n": 1 }));
    for attempt in 1..=3 {
        handler
            .handle(&Delivery::new(message.clone(), attempt, "orders"))
            .await
            .expect("handled or acknowledged");
    }
    assert_eq!(*handler.handler().runs.lock().expect("lock"), 1);
    assert!(
        handler
            .has_handled(message.event_id)
            .await
            .expect("has_handled")
    );
    let other = inbox(&subject, "billing", false);
    other
        .handle(&Delivery::new(message, 1, "orders"))
        .await
        .expect("handled");
    assert_eq!(*other.handler().runs.lock().expect("lock"), 1);
    assert_eq!(published_work(&subject).await, 2);
}

/// A handler failure rolls back its work and the mark: the redelivery runs
/// the work again, and only the successful run's work is kept.
pub async fn handler_failure_rolls_back_work_and_mark(subject: Subject) {
    let handler = inbox(&subject, "stats", true);
    let message = Message::new("order.placed", json!({ "n": 1 }));
    assert!(
        handler
            .handle(&Delivery::new(message.clone(), 1, "orders"))
            .await
            .is_err()
    );
    assert!(
        !handler
            .has_handled(message.event_id)
            .await
            .expect("has_handled")
    );
    assert_eq!(
        published_work(&subject).await,
        0,
        "the failed run's work is gone"
    );
    *handler.handler().fail.lock().expect("lock") = false;
    handler
        .handle(&Delivery::new(message.clone(), 2, "orders"))
        .await
        .expect("handled");
    assert_eq!(*handler.handler().runs.lock().expect("lock"), 2);
    assert!(
        handler
            .has_handled(message.event_id)
            .await
            .expect("has_handled")
    );
    assert_eq!(published_work(&subject).await, 1);
}

/// Eight deliveries of one event at once, each retried until acknowledged:
/// the work is committed once.
pub async fn concurrent_duplicate_deliveries_do_the_work_once(subject: Subject) {
    let handler = inbox(&subject, "stats", false);
    let message = Message::new("order.placed", json!({ "n": 1 }));
    let mut deliveries = Vec::new();
    for n in 0..8 {
        let handler = handler.clone();
        let message = message.clone();
        deliveries.push(tokio::spawn(async move {
            for attempt in 1..=50 {
                if handler
                    .handle(&Delivery::new(message.clone(), attempt, format!("sub-{n}")))
                    .await
                    .is_ok()
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            panic!("delivery {n} was never acknowledged");
        }));
    }
    for delivery in deliveries {
        delivery.await.expect("delivery task");
    }
    assert_eq!(published_work(&subject).await, 1, "the work committed once");
}

/// The names of every rule, in order. The `tests:` lists of
/// `tests/contract_memory.rs` and `tests/contract_postgres.rs` name the
/// same rules, so both implementations prove all of them.
pub const RULES: &[&str] = &[
    "rolled_back_writes_are_never_published",
    "committed_writes_are_published_once_in_order",
    "concurrent_writers_publish_exactly_what_committed",
    "bad_messages_are_refused_before_anything_is_written",
    "failed_publishes_are_retried_and_nothing_is_lost",
    "redelivered_message_is_acked_without_running_the_work_again",
    "handler_failure_rolls_back_work_and_mark",
    "concurrent_duplicate_deliveries_do_the_work_once",
];
