//! The inbox against a real PostgreSQL, driven directly and through Keel's
//! in-memory bus.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use common::*;
use keel_core::{Delivery, EventHandler, EventPublisher, HandlerError, Message};
use keel_eventbus::InMemoryBus;
use keel_outbox::{Inbox, InboxHandler, OutboxError, Relay, RelayConfig};
use serde_json::json;
use sqlx::PgPool;

const WAIT: Duration = Duration::from_secs(60);

/// Records its effect in the inbox's transaction, then fails when told to.
struct Effect {
    calls: AtomicUsize,
    fail_rate: f64,
    fail_first: AtomicUsize,
    hold: Duration,
}

impl Effect {
    fn new() -> Self {
        Self {
            calls: AtomicUsize::new(0),
            fail_rate: 0.0,
            fail_first: AtomicUsize::new(0),
            hold: Duration::ZERO,
        }
    }
}

#[async_trait]
impl InboxHandler for Effect {
    async fn handle(
        &self,
        tx: &mut dyn keel_core::uow::Transaction,
        delivery: &Delivery,
    ) -> Result<(), HandlerError> {
        let tx = keel_database::UnitOfWork::join(tx)
            .map_err(HandlerError::retry)?
            .conn();
        self.calls.fetch_add(1, Ordering::SeqCst);
        sqlx::query("INSERT INTO effects (event_id) VALUES ($1)")
            .bind(delivery.message.event_id.as_uuid())
            .execute(&mut *tx)
            .await
            .map_err(HandlerError::retry)?;
        if !self.hold.is_zero() {
            tokio::time::sleep(self.hold).await;
        }
        let fail_first = self
            .fail_first
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if fail_first || rand::random_bool(self.fail_rate) {
            return Err(HandlerError::retry(std::io::Error::other(
                "flaky downstream",
            )));
        }
        Ok(())
    }
}

async fn effects_table(pool: &PgPool) {
    sqlx::query("CREATE TABLE effects (event_id uuid NOT NULL)")
        .execute(pool)
        .await
        .unwrap();
}

/// (events with at least one effect, total effects, events with more than one)
async fn effects(pool: &PgPool) -> (i64, i64, i64) {
    sqlx::query_as(
        "SELECT count(*), coalesce(sum(n), 0)::int8, count(*) FILTER (WHERE n > 1) \
         FROM (SELECT event_id, count(*) AS n FROM effects GROUP BY event_id) e",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

fn delivery(message: Message, attempt: u32) -> Delivery {
    Delivery::new(message, attempt, "test-subscription")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_message_is_acknowledged_without_running_the_work_again() {
    let db = database().await;
    effects_table(db.pool()).await;
    let inbox = Inbox::postgres(&database_of(db.pool()), "billing.invoice", Effect::new()).unwrap();
    let message = Message::new("order.placed", json!({ "order": 1 }));

    assert!(!inbox.has_handled(message.event_id).await.unwrap());
    inbox.handle(&delivery(message.clone(), 1)).await.unwrap();
    inbox.handle(&delivery(message.clone(), 2)).await.unwrap();
    inbox.handle(&delivery(message.clone(), 3)).await.unwrap();

    assert_eq!(inbox.handler().calls.load(Ordering::SeqCst), 1);
    assert_eq!(effects(db.pool()).await, (1, 1, 0));
    assert!(inbox.has_handled(message.event_id).await.unwrap());

    // Another consumer of the same event does its own work, once.
    let other = Inbox::postgres(&database_of(db.pool()), "stats.count", Effect::new()).unwrap();
    other.handle(&delivery(message.clone(), 1)).await.unwrap();
    other.handle(&delivery(message, 2)).await.unwrap();
    assert_eq!(other.handler().calls.load(Ordering::SeqCst), 1);
    assert_eq!(effects(db.pool()).await, (1, 2, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_handler_rolls_back_its_work_and_its_record() {
    let db = database().await;
    effects_table(db.pool()).await;
    let handler = Effect::new();
    handler.fail_first.store(2, Ordering::SeqCst);
    let inbox = Inbox::postgres(&database_of(db.pool()), "billing.invoice", handler).unwrap();
    let message = Message::new("order.placed", json!({ "order": 1 }));

    for attempt in 1..=2 {
        let err = inbox
            .handle(&delivery(message.clone(), attempt))
            .await
            .unwrap_err();
        assert!(matches!(err, HandlerError::Retry(_)), "{err}");
        assert_eq!(effects(db.pool()).await, (0, 0, 0), "work rolled back");
        assert!(!inbox.has_handled(message.event_id).await.unwrap());
    }
    inbox.handle(&delivery(message.clone(), 3)).await.unwrap();
    inbox.handle(&delivery(message.clone(), 4)).await.unwrap();
    assert_eq!(inbox.handler().calls.load(Ordering::SeqCst), 3);
    assert_eq!(effects(db.pool()).await, (1, 1, 0));
}

struct Refuse;

#[async_trait]
impl InboxHandler for Refuse {
    async fn handle(
        &self,
        tx: &mut dyn keel_core::uow::Transaction,
        delivery: &Delivery,
    ) -> Result<(), HandlerError> {
        let tx = keel_database::UnitOfWork::join(tx)
            .map_err(HandlerError::retry)?
            .conn();
        sqlx::query("INSERT INTO effects (event_id) VALUES ($1)")
            .bind(delivery.message.event_id.as_uuid())
            .execute(&mut *tx)
            .await
            .map_err(HandlerError::retry)?;
        Err(HandlerError::reject(std::io::Error::other(
            "unknown event type",
        )))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejection_reaches_the_bus_and_records_nothing() {
    let db = database().await;
    effects_table(db.pool()).await;
    let inbox = Inbox::postgres(&database_of(db.pool()), "billing.invoice", Refuse).unwrap();
    let message = Message::new("order.unknown", json!({}));
    let err = inbox
        .handle(&delivery(message.clone(), 1))
        .await
        .unwrap_err();
    assert!(matches!(err, HandlerError::Reject(_)), "{err}");
    assert!(!inbox.has_handled(message.event_id).await.unwrap());
    assert_eq!(effects(db.pool()).await, (0, 0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_duplicate_deliveries_run_the_work_exactly_once() {
    let db = database().await;
    effects_table(db.pool()).await;
    let mut handler = Effect::new();
    // Hold the transaction open so the duplicates really overlap with it.
    handler.hold = Duration::from_millis(300);
    let inbox =
        Arc::new(Inbox::postgres(&database_of(db.pool()), "billing.invoice", handler).unwrap());
    let message = Message::new("order.placed", json!({ "order": 1 }));

    let tasks: Vec<_> = (1..=8)
        .map(|attempt| {
            let inbox = inbox.clone();
            let d = delivery(message.clone(), attempt);
            tokio::spawn(async move { inbox.handle(&d).await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().expect("every duplicate is acknowledged");
    }
    assert_eq!(inbox.handler().calls.load(Ordering::SeqCst), 1);
    assert_eq!(effects(db.pool()).await, (1, 1, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_duplicates_whose_first_attempt_fails_still_run_exactly_once() {
    let db = database().await;
    effects_table(db.pool()).await;
    let mut handler = Effect::new();
    handler.hold = Duration::from_millis(200);
    handler.fail_first.store(1, Ordering::SeqCst);
    let inbox =
        Arc::new(Inbox::postgres(&database_of(db.pool()), "billing.invoice", handler).unwrap());
    let message = Message::new("order.placed", json!({ "order": 1 }));

    let tasks: Vec<_> = (1..=6)
        .map(|attempt| {
            let inbox = inbox.clone();
            let d = delivery(message.clone(), attempt);
            tokio::spawn(async move { inbox.handle(&d).await })
        })
        .collect();
    let mut failed = 0;
    for t in tasks {
        if t.await.unwrap().is_err() {
            failed += 1;
        }
    }
    // The failing one rolled back; one waiting duplicate took over.
    assert_eq!(failed, 1);
    assert_eq!(inbox.handler().calls.load(Ordering::SeqCst), 2);
    assert_eq!(effects(db.pool()).await, (1, 1, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_messages_with_random_failures_and_duplicates_take_effect_once_each() {
    const EVENTS: usize = 600;
    let db = database().await;
    effects_table(db.pool()).await;
    let bus = InMemoryBus::new();
    let mut handler = Effect::new();
    handler.fail_rate = 0.3;
    let inbox =
        Arc::new(Inbox::postgres(&database_of(db.pool()), "billing.invoice", handler).unwrap());
    let _sub = subscribe(&bus, "orders", "billing", inbox.clone()).await;

    let messages: Vec<Message> = (0..EVENTS)
        .map(|i| {
            Message::new("order.placed", json!({ "order": i }))
                .with_ordering_key(format!("Order-{}", i % 40))
        })
        .collect();
    bus.publish("orders", &messages).await.unwrap();
    // A producer retry publishes a third of them again.
    let again: Vec<Message> = messages.iter().step_by(3).cloned().collect();
    bus.publish("orders", &again).await.unwrap();

    eventually("every event to take effect", WAIT, || async {
        effects(db.pool()).await.0 as usize == EVENTS
    })
    .await;
    eventually("the subscription to drain", WAIT, || async {
        bus.backlog("orders", "billing").unwrap() == 0
    })
    .await;
    let (events, total, repeated) = effects(db.pool()).await;
    assert_eq!(
        (events as usize, total as usize, repeated),
        (EVENTS, EVENTS, 0)
    );
    let calls = inbox.handler().calls.load(Ordering::SeqCst);
    assert!(
        calls > EVENTS,
        "failures made the bus redeliver ({calls} calls)"
    );
    let recorded: i64 =
        sqlx::query_scalar("SELECT count(*) FROM keel.inbox WHERE consumer = 'billing.invoice'")
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert_eq!(recorded as usize, EVENTS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_relay_failing_between_publish_and_mark_republishes_and_the_inbox_deduplicates() {
    let db = database().await;
    effects_table(db.pool()).await;
    let bus = InMemoryBus::new();
    let recorder = Recorder::default();
    let _raw = subscribe(&bus, "orders", "raw", Arc::new(recorder.clone())).await;
    let inbox = Arc::new(
        Inbox::postgres(&database_of(db.pool()), "billing.invoice", Effect::new()).unwrap(),
    );
    let _billing = subscribe(&bus, "orders", "billing", inbox.clone()).await;

    let written: Vec<_> = (1..=30)
        .map(|n| event("orders", &format!("agg-{}", n % 3), n))
        .collect();
    commit(db.pool(), &written).await;

    // The first two publishes reach the bus but report failure, like a relay
    // losing its connection right after publishing and before marking.
    let flaky = Arc::new(FailAfterPublish {
        inner: Arc::new(bus.clone()),
        failures: Mutex::new(2),
    });
    let config = RelayConfig::default()
        .with_batch_size(10)
        .with_poll_interval(Duration::from_millis(50))
        .with_retry_backoff(Duration::from_millis(20), Duration::from_millis(100));
    let relay = Relay::new(db.pool().clone(), flaky.clone(), config)
        .unwrap()
        .spawn();
    eventually("every row published", WAIT, || async {
        unpublished(db.pool()).await == 0
    })
    .await;
    relay.shutdown().await;

    eventually("the billing consumer to catch up", WAIT, || async {
        effects(db.pool()).await.0 == 30 && bus.backlog("orders", "billing").unwrap() == 0
    })
    .await;
    eventually("the raw consumer to catch up", WAIT, || async {
        recorder.counts().len() == 30
    })
    .await;

    let duplicates = recorder.counts().values().filter(|n| **n > 1).count();
    assert!(
        duplicates >= 10,
        "the failed batches were published again ({duplicates} duplicates)"
    );
    assert_eq!(
        effects(db.pool()).await,
        (30, 30, 0),
        "effects once per event"
    );
    for (aggregate, seqs) in recorder.sequences() {
        let mut last = 0;
        let mut firsts = Vec::new();
        for s in seqs {
            if s > last {
                firsts.push(s);
                last = s;
            }
        }
        let want: Vec<u64> = (1..=30)
            .filter(|n| format!("agg-{}", n % 3) == aggregate)
            .collect();
        assert_eq!(firsts, want, "first deliveries of {aggregate} in order");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_names_are_checked_and_old_records_pruned() {
    let db = database().await;
    effects_table(db.pool()).await;
    for bad in ["", &"x".repeat(201), "a\0b"] {
        match Inbox::postgres(&database_of(db.pool()), bad, Effect::new()) {
            Err(OutboxError::Invalid { field, .. }) => assert_eq!(field, "consumer"),
            other => panic!("expected an invalid consumer, got {other:?}"),
        }
    }

    let inbox = Inbox::postgres(&database_of(db.pool()), "billing.invoice", Effect::new()).unwrap();
    let old = Message::new("order.placed", json!({}));
    let new = Message::new("order.placed", json!({}));
    inbox.handle(&delivery(old.clone(), 1)).await.unwrap();
    inbox.handle(&delivery(new.clone(), 1)).await.unwrap();
    sqlx::query(
        "UPDATE keel.inbox SET handled_at = now() - interval '40 days' WHERE event_id = $1",
    )
    .bind(old.event_id.as_uuid())
    .execute(db.pool())
    .await
    .unwrap();
    assert_eq!(
        inbox
            .prune(Duration::from_secs(31 * 24 * 3600))
            .await
            .unwrap(),
        1
    );
    assert!(!inbox.has_handled(old.event_id).await.unwrap());
    assert!(inbox.has_handled(new.event_id).await.unwrap());
}
