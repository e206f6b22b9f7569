//! The writer and the relay against a real PostgreSQL and Keel's in-memory
//! bus.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use keel_core::uow::TransactionSource;
use keel_core::{EventPublisher, Message};
use keel_eventbus::InMemoryBus;
use keel_outbox::{Outbox, OutboxError, OutboxMessage, OutboxStats, PgOutbox, Relay, RelayConfig};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(30);

/// A retry backoff no test outlives: a failed row is retried only after
/// [`make_retries_due`].
const BACKOFF_NEVER_DUE: Duration = Duration::from_secs(3600);

/// Stands in for the passing of the retry backoff: every failed row's retry
/// falls due now.
async fn make_retries_due(pool: &sqlx::PgPool) {
    sqlx::query("UPDATE keel.outbox SET retry_at = now() WHERE retry_at > now()")
        .execute(pool)
        .await
        .unwrap();
}

fn quick() -> RelayConfig {
    RelayConfig::default()
        .with_poll_interval(Duration::from_millis(50))
        .with_retry_backoff(Duration::from_millis(20), Duration::from_millis(100))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_rows_are_published_and_rolled_back_rows_never_are() {
    let db = database().await;
    let bus = InMemoryBus::new();
    let recorder = Recorder::default();
    let _sub = subscribe(&bus, "orders", "test", Arc::new(recorder.clone())).await;

    let committed: Vec<_> = (1..=3).map(|n| event("orders", "a", n)).collect();
    commit(db.pool(), &committed).await;

    let mut tx = TransactionSource::begin(&database_of(db.pool()))
        .await
        .unwrap();
    let rolled_back: Vec<_> = (4..=5).map(|n| event("orders", "a", n)).collect();
    PgOutbox::new()
        .within(&mut *tx)
        .write_all(&rolled_back)
        .await
        .unwrap();
    tx.rollback().await.unwrap();

    let relay = Relay::new(db.pool().clone(), Arc::new(bus.clone()), quick()).unwrap();
    let report = relay.relay_once().await.unwrap();
    assert_eq!((report.claimed, report.published, report.failed), (3, 3, 0));
    assert_eq!(
        relay.relay_once().await.unwrap().claimed,
        0,
        "nothing left to claim"
    );
    assert_eq!(unpublished(db.pool()).await, 0);

    eventually("three deliveries", WAIT, || async { recorder.len() >= 3 }).await;
    // Let any stray delivery arrive before checking there is none.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let got: Vec<_> = recorder
        .deliveries()
        .into_iter()
        .map(|d| d.message)
        .collect();
    let want: Vec<_> = committed
        .iter()
        .map(|m| m.message().clone().with_ordering_key("Order-a"))
        .collect();
    assert_eq!(
        got, want,
        "exactly the committed messages, in order, as written"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_with_a_typed_error_and_nothing_is_written() {
    let db = database().await;
    let writer = PgOutbox::new().with_max_payload_bytes(100);
    let mut tx = TransactionSource::begin(&database_of(db.pool()))
        .await
        .unwrap();

    let too_big = OutboxMessage::new(
        "orders",
        "Order",
        "a",
        Message::new("e", json!("x".repeat(200))),
    );
    let batch = [
        event("orders", "a", 1),
        too_big.clone(),
        event("orders", "a", 3),
    ];
    match writer.within(&mut *tx).write_all(&batch).await {
        Err(keel_core::Error::Invalid(invalid)) => {
            assert_eq!(invalid.field, "payload");
            assert!(
                invalid.reason.contains("202 bytes, over the limit of 100"),
                "{invalid:?}"
            );
            assert!(
                invalid
                    .reason
                    .contains(&too_big.message().event_id.to_string())
            );
        }
        other => panic!("expected an invalid payload, got {other:?}"),
    }
    match writer.within(&mut *tx).write(&event("", "a", 1)).await {
        Err(keel_core::Error::Invalid(invalid)) => assert_eq!(invalid.field, "topic"),
        other => panic!("expected an invalid topic, got {other:?}"),
    }

    // The transaction is still usable, and the refused batch left no row.
    writer
        .within(&mut *tx)
        .write(&event("orders", "a", 9))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let seqs: Vec<i64> = sqlx::query_scalar("SELECT (payload->>'seq')::int8 FROM keel.outbox")
        .fetch_all(db.pool())
        .await
        .unwrap();
    assert_eq!(seqs, vec![9]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_id_already_in_the_outbox_is_a_duplicate_conflict() {
    let db = database().await;
    let first = event("orders", "a", 1);
    commit(db.pool(), std::slice::from_ref(&first)).await;

    for batch in [
        vec![first.clone()],
        vec![event("orders", "b", 1), first.clone()],
    ] {
        let mut tx = TransactionSource::begin(&database_of(db.pool()))
            .await
            .unwrap();
        match PgOutbox::new().within(&mut *tx).write_all(&batch).await {
            Err(keel_core::Error::AlreadyExists { subject }) => {
                assert!(
                    subject.contains(&first.message().event_id.to_string()),
                    "{subject}"
                );
            }
            other => panic!("expected DuplicateEvent, got {other:?}"),
        }
        tx.rollback().await.unwrap();
    }
    let e: keel_core::Error = OutboxError::DuplicateEvent {
        event_id: first.message().event_id,
    }
    .into();
    assert_eq!(e.kind(), keel_core::ErrorKind::Conflict);
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM keel.outbox")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(rows, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_topic_backs_off_and_holds_its_aggregate_but_not_the_others() {
    let db = database().await;
    let bus = InMemoryBus::new();
    let recorder = Recorder::default();
    let _a = subscribe(&bus, "broken", "test", Arc::new(recorder.clone())).await;
    let _b = subscribe(&bus, "fine", "test", Arc::new(recorder.clone())).await;
    let tape = Arc::new(Tape::new(Arc::new(bus.clone())));
    let switchboard = Arc::new(Switchboard {
        inner: tape.clone(),
        broken: Mutex::new(vec!["broken".to_owned()]),
    });

    // Aggregate a: its first event goes to the broken topic, its second to a
    // working one; aggregate b only uses the working topic.
    commit(
        db.pool(),
        &[
            event("broken", "a", 1),
            event("fine", "a", 2),
            event("fine", "b", 1),
            event("fine", "b", 2),
        ],
    )
    .await;

    // A backoff far longer than the test: a's retry falls due only when the
    // test says so (below), not when a slow machine lets time pass.
    let config = quick().with_retry_backoff(BACKOFF_NEVER_DUE, BACKOFF_NEVER_DUE);
    let relay = Relay::new(db.pool().clone(), switchboard.clone(), config).unwrap();
    let report = relay.relay_once().await.unwrap();
    assert_eq!((report.claimed, report.published, report.failed), (4, 2, 1));

    let (attempts, error, retry_in_future): (i32, String, bool) = sqlx::query_as(
        "SELECT attempts, last_error, retry_at > now() FROM keel.outbox WHERE payload->>'aggregate' = 'a' \
         AND payload->>'seq' = '1'",
    )
    .fetch_one(db.pool())
    .await
    .unwrap();
    assert_eq!(attempts, 1);
    assert!(error.contains("broken"), "{error}");
    assert!(retry_in_future);
    // a's second event waits behind its failed first one, though its topic works.
    assert_eq!(unpublished(db.pool()).await, 2);
    let stats = OutboxStats::load(db.pool()).await.unwrap();
    assert_eq!((stats.pending, stats.retrying), (2, 1));
    assert!(stats.oldest_pending_age.is_some());
    assert_eq!(
        relay.relay_once().await.unwrap().claimed,
        0,
        "a is backing off"
    );

    // New work for other aggregates still flows while a backs off.
    commit(db.pool(), &[event("fine", "c", 1)]).await;
    assert_eq!(relay.relay_once().await.unwrap().published, 1);

    switchboard.broken.lock().unwrap().clear();
    // The backoff has "elapsed": a's retry is due now.
    make_retries_due(db.pool()).await;
    let report = relay.relay_once().await.unwrap();
    assert_eq!((report.claimed, report.published, report.failed), (2, 2, 0));
    assert_eq!(unpublished(db.pool()).await, 0);
    eventually("all deliveries", WAIT, || async { recorder.len() >= 5 }).await;
    let stats = OutboxStats::load(db.pool()).await.unwrap();
    assert_eq!(
        (stats.pending, stats.retrying, stats.oldest_pending_age),
        (0, 0, None)
    );
    // a's events went to two topics, hence two subscriptions that deliver
    // independently: its order is the relay's publish order.
    assert_eq!(
        tape.sequences()["a"],
        vec![1, 2],
        "a's order kept across the failure"
    );
    let mut seqs = recorder.sequences();
    seqs.get_mut("a").unwrap().sort_unstable();
    assert_eq!(seqs["a"], vec![1, 2]);
    assert_eq!(seqs["b"], vec![1, 2]);
    assert_eq!(seqs["c"], vec![1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_rows_are_pruned_after_the_retention_period_only() {
    let db = database().await;
    let bus = InMemoryBus::new();
    commit(
        db.pool(),
        &(1..=5).map(|n| event("orders", "a", n)).collect::<Vec<_>>(),
    )
    .await;
    commit(db.pool(), &[event("orders", "b", 1)]).await;

    let relay = Relay::new(
        db.pool().clone(),
        Arc::new(bus.clone()),
        quick().with_retention(Duration::from_secs(3600)),
    )
    .unwrap();
    assert_eq!(relay.relay_once().await.unwrap().published, 6);
    commit(db.pool(), &[event("orders", "c", 1)]).await; // stays unpublished
    // Age three of the published rows past the retention period.
    sqlx::query(
        "UPDATE keel.outbox SET published_at = now() - interval '2 hours' \
         WHERE payload->>'aggregate' = 'a' AND (payload->>'seq')::int <= 3",
    )
    .execute(db.pool())
    .await
    .unwrap();

    assert_eq!(relay.prune().await.unwrap(), 3);
    assert_eq!(relay.prune().await.unwrap(), 0);
    let left: Vec<(String, Option<i64>)> = sqlx::query_as(
        "SELECT payload->>'aggregate', (payload->>'seq')::int8 FROM keel.outbox ORDER BY id",
    )
    .fetch_all(db.pool())
    .await
    .unwrap();
    let left: Vec<(&str, i64)> = left.iter().map(|(a, s)| (a.as_str(), s.unwrap())).collect();
    assert_eq!(left, vec![("a", 4), ("a", 5), ("b", 1), ("c", 1)]);

    // With no retention, rows go as soon as they are published.
    let eager = Relay::new(
        db.pool().clone(),
        Arc::new(bus),
        quick().with_retention(Duration::ZERO),
    )
    .unwrap();
    assert_eq!(eager.relay_once().await.unwrap().published, 1);
    let c_rows: i64 =
        sqlx::query_scalar("SELECT count(*) FROM keel.outbox WHERE payload->>'aggregate' = 'c'")
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert_eq!(c_rows, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notification_wakes_an_idle_relay_long_before_its_poll() {
    let db = database().await;
    let bus = InMemoryBus::new();
    let recorder = Recorder::default();
    let _sub = subscribe(&bus, "orders", "test", Arc::new(recorder.clone())).await;
    // Polling alone would take ten minutes.
    let config = quick().with_poll_interval(Duration::from_secs(600));
    let relay = Relay::new(db.pool().clone(), Arc::new(bus.clone()), config)
        .unwrap()
        .spawn();
    // Let it reach its idle wait, with the listener connected.
    tokio::time::sleep(Duration::from_millis(500)).await;

    commit(db.pool(), &[event("orders", "a", 1)]).await;
    eventually("the notified relay to publish", WAIT, || async {
        recorder.len() == 1
    })
    .await;

    relay.shutdown().await;
    // Once shut down, nothing more is published.
    commit(db.pool(), &[event("orders", "a", 2)]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(unpublished(db.pool()).await, 1);
    assert_eq!(recorder.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_relays_publish_every_row_once_in_per_aggregate_order() {
    const AGGREGATES: u64 = 60;
    const PER_AGGREGATE: u64 = 50; // 3000 rows
    let db = database().await;
    let bus = InMemoryBus::new();
    let recorder = Recorder::default();
    let _sub = subscribe(&bus, "orders", "test", Arc::new(recorder.clone())).await;

    // A backlog before the relays start, and writers racing them afterwards.
    let backlog: Vec<_> = (0..AGGREGATES)
        .flat_map(|a| (1..=PER_AGGREGATE / 2).map(move |n| event("orders", &format!("agg-{a}"), n)))
        .collect();
    for chunk in backlog.chunks(100) {
        commit(db.pool(), chunk).await;
    }

    let relays: Vec<_> = (0..4)
        .map(|i| {
            let config = quick()
                .with_name(format!("relay-{i}"))
                .with_batch_size(50)
                .with_scan_window(200);
            Relay::new(db.pool().clone(), Arc::new(bus.clone()), config)
                .unwrap()
                .spawn()
        })
        .collect();

    // Four writers, each owning a quarter of the aggregates, write the second
    // half one event per transaction, interleaving aggregates.
    let writers: Vec<_> = (0..4u64)
        .map(|w| {
            let pool = db.pool().clone();
            tokio::spawn(async move {
                for n in PER_AGGREGATE / 2 + 1..=PER_AGGREGATE {
                    for a in (0..AGGREGATES).filter(|a| a % 4 == w) {
                        commit(&pool, &[event("orders", &format!("agg-{a}"), n)]).await;
                    }
                }
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }

    let total = (AGGREGATES * PER_AGGREGATE) as usize;
    eventually("every row published", WAIT, || async {
        unpublished(db.pool()).await == 0
    })
    .await;
    eventually("every message delivered", WAIT, || async {
        recorder.len() >= total
    })
    .await;
    for relay in relays {
        relay.shutdown().await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;

    let counts = recorder.counts();
    assert_eq!(counts.len(), total, "every event arrived");
    let duplicated: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        duplicated.is_empty(),
        "no duplicates in normal operation: {duplicated:?}"
    );
    let expected: Vec<u64> = (1..=PER_AGGREGATE).collect();
    for (aggregate, seqs) in recorder.sequences() {
        assert_eq!(seqs, expected, "order of {aggregate}");
    }
    let published: i64 =
        sqlx::query_scalar("SELECT count(*) FROM keel.outbox WHERE published_at IS NOT NULL")
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert_eq!(published as usize, total);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_mid_batch_loses_nothing_and_another_republishes() {
    let db = database().await;
    let bus = InMemoryBus::new();
    let recorder = Recorder::default();
    let _sub = subscribe(&bus, "orders", "test", Arc::new(recorder.clone())).await;
    commit(
        db.pool(),
        &(1..=20)
            .map(|n| event("orders", &format!("agg-{}", n % 4), n))
            .collect::<Vec<_>>(),
    )
    .await;

    // The doomed relay publishes, then hangs before it can mark anything; it
    // has a pool of its own so that killing it ends its sessions, as a
    // crashed process would.
    let doomed_pool = sqlx::PgPool::connect_with(db.connect_options())
        .await
        .unwrap();
    let hang = Arc::new(Hang {
        inner: Arc::new(bus.clone()),
        published: Mutex::new(0),
    });
    let doomed = Relay::new(doomed_pool.clone(), hang.clone(), quick())
        .unwrap()
        .spawn();
    eventually("the doomed relay to publish", WAIT, || async {
        *hang.published.lock().unwrap() > 0
    })
    .await;
    doomed.abort().await;
    doomed_pool.close().await;

    // Nothing was marked; a healthy relay publishes everything (again).
    assert_eq!(unpublished(db.pool()).await, 20);
    let healthy = Relay::new(db.pool().clone(), Arc::new(bus.clone()), quick())
        .unwrap()
        .spawn();
    eventually("every row published", WAIT, || async {
        unpublished(db.pool()).await == 0
    })
    .await;
    healthy.shutdown().await;

    eventually("every event delivered", WAIT, || async {
        recorder.counts().len() == 20
    })
    .await;
    let first_batch = *hang.published.lock().unwrap();
    let redelivered = recorder.counts().values().filter(|n| **n == 2).count();
    assert_eq!(
        redelivered, first_batch,
        "what the dead relay published comes again: at-least-once"
    );
}

/// Publishes, then never returns, like a process frozen before its commit.
struct Hang {
    inner: Arc<dyn EventPublisher>,
    published: Mutex<usize>,
}

#[async_trait::async_trait]
impl EventPublisher for Hang {
    async fn publish(&self, topic: &str, messages: &[Message]) -> keel_core::Result<()> {
        self.inner.publish(topic, messages).await?;
        *self.published.lock().unwrap() += messages.len();
        std::future::pending().await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_config_out_of_range_is_refused() {
    let db = database().await;
    let bus: Arc<dyn EventPublisher> = Arc::new(InMemoryBus::new());
    let err = Relay::new(
        db.pool().clone(),
        bus,
        RelayConfig::default().with_batch_size(0),
    )
    .unwrap_err();
    assert!(
        matches!(err, OutboxError::Invalid { ref field, .. } if field == "batch_size"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outbox_joins_keel_database_units_of_work() {
    use keel_database::{Database, DatabaseConfig};
    let db = database().await;
    let config = DatabaseConfig::builder()
        .connect_options(db.connect_options())
        .max_connections(4)
        .min_connections(0)
        .build()
        .unwrap();
    let database = Database::connect(config).await.unwrap();
    let outbox = PgOutbox::new();

    let mut uow = TransactionSource::begin(&database).await.unwrap();
    outbox
        .within(&mut *uow)
        .write(&event("orders", "a", 1))
        .await
        .unwrap();
    // A wrong-backend transaction is refused, not written outside it.
    let mut memory = keel_core::uow::MemoryTransaction::new();
    let err = outbox
        .within(&mut memory)
        .write(&event("orders", "a", 2))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), keel_core::ErrorKind::Internal, "{err}");
    uow.commit().await.unwrap();

    let mut abandoned = TransactionSource::begin(&database).await.unwrap();
    outbox
        .within(&mut *abandoned)
        .write(&event("orders", "b", 1))
        .await
        .unwrap();
    drop(abandoned); // dropped without commit: rolled back

    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT payload->>'aggregate', (payload->>'seq')::int8 FROM keel.outbox ORDER BY id",
    )
    .fetch_all(db.pool())
    .await
    .unwrap();
    assert_eq!(rows, vec![("a".to_owned(), 1)]);
}

/// Relays given disjoint aggregate types split the outbox: each publishes
/// its own types' rows, in order, and leaves the others' alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_split_the_outbox_by_aggregate_type() {
    let db = database().await;
    let bus = InMemoryBus::new();
    let tape = Arc::new(Tape::new(Arc::new(bus.clone())));
    let invoice = |id: &str, seq: u64| {
        OutboxMessage::new(
            "invoices",
            "Invoice",
            id,
            Message::new("invoice.changed", json!({ "aggregate": id, "seq": seq })),
        )
    };
    commit(
        db.pool(),
        &[
            event("orders", "a", 1),
            invoice("i", 1),
            event("orders", "a", 2),
            invoice("i", 2),
            invoice("j", 1),
        ],
    )
    .await;

    let orders = Relay::new(
        db.pool().clone(),
        tape.clone(),
        quick().with_aggregate_types(["Order"]),
    )
    .unwrap();
    let report = orders.relay_once().await.unwrap();
    assert_eq!((report.claimed, report.published), (2, 2));
    assert_eq!(
        orders.relay_once().await.unwrap().claimed,
        0,
        "no Invoice rows"
    );
    assert_eq!(unpublished(db.pool()).await, 3);

    let invoices = Relay::new(
        db.pool().clone(),
        tape.clone(),
        quick().with_aggregate_types(["Invoice", "Customer"]),
    )
    .unwrap();
    assert_eq!(invoices.relay_once().await.unwrap().published, 3);
    assert_eq!(unpublished(db.pool()).await, 0);

    let seqs = tape.sequences();
    assert_eq!(seqs["a"], vec![1, 2]);
    assert_eq!(seqs["i"], vec![1, 2]);
    assert_eq!(seqs["j"], vec![1]);

    match Relay::new(
        db.pool().clone(),
        tape,
        quick().with_aggregate_types(Vec::<String>::new()),
    ) {
        Err(OutboxError::Invalid { field, .. }) => assert_eq!(field, "aggregate_types"),
        other => panic!("expected an invalid aggregate_types, got {other:?}"),
    }
}
