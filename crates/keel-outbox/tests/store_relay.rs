//! The event-store relay over both event stores (in memory and PostgreSQL),
//! into Keel's in-memory bus.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use keel_core::{ExpectedVersion, StreamId};
use keel_eventbus::InMemoryBus;
use keel_eventstore::{
    EventStore, InMemoryEventStore, NewEvent, PostgresEventStore, RecordedEvent,
    SubscriptionOptions, SubscriptionSupport,
};
use keel_outbox::{EventStoreRelay, EventStoreRelayHandle};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(30);

fn route(event: &RecordedEvent) -> Option<String> {
    (event.stream_id.category() == "Order").then(|| "orders".to_owned())
}

async fn append<S: EventStore + ?Sized>(
    store: &S,
    aggregate: &str,
    seqs: std::ops::RangeInclusive<u64>,
) {
    let stream = StreamId::for_aggregate("Order", aggregate).unwrap();
    let events = seqs
        .map(|seq| {
            NewEvent::from_json(
                "order.changed",
                &json!({ "aggregate": aggregate, "seq": seq }),
            )
        })
        .collect();
    store
        .append(&stream, ExpectedVersion::Any, events)
        .await
        .unwrap();
}

fn start<S>(store: &Arc<S>, publisher: Arc<Switchboard>) -> EventStoreRelayHandle
where
    S: EventStore + SubscriptionSupport + 'static,
{
    EventStoreRelay::new(publisher, route)
        .retry_backoff(Duration::from_millis(20), Duration::from_millis(100))
        .spawn(
            store.clone(),
            SubscriptionOptions::new("orders-to-bus")
                .poll_interval(Duration::from_millis(50))
                .checkpoint(10, Duration::from_millis(100)),
        )
        .unwrap()
}

/// One scenario, run against every store.
async fn forwards_the_global_log_in_order_from_a_durable_checkpoint<S>(store: Arc<S>)
where
    S: EventStore + SubscriptionSupport + 'static,
{
    let bus = InMemoryBus::new();
    let recorder = Recorder::default();
    let _sub = subscribe(&bus, "orders", "test", Arc::new(recorder.clone())).await;
    let switchboard = Arc::new(Switchboard {
        inner: Arc::new(bus.clone()),
        broken: Mutex::new(vec!["orders".to_owned()]),
    });

    for round in 0..5u64 {
        for aggregate in ["a", "b", "c"] {
            append(&*store, aggregate, round * 2 + 1..=round * 2 + 2).await;
        }
    }
    // Not routed to any topic: skipped, but the checkpoint passes it.
    let internal = StreamId::for_aggregate("Audit", "x").unwrap();
    store
        .append(
            &internal,
            ExpectedVersion::Any,
            vec![NewEvent::from_json("audit.noted", &json!({}))],
        )
        .await
        .unwrap();

    // The topic is down at first: the relay retries and loses nothing.
    let relay = start(&store, switchboard.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(recorder.len(), 0, "nothing gets through a broken topic");
    switchboard.broken.lock().unwrap().clear();

    eventually("30 events forwarded", WAIT, || async {
        recorder.len() >= 30
    })
    .await;
    relay.shutdown().await.unwrap();

    // A new relay under the same name resumes after the stored checkpoint.
    for aggregate in ["a", "b"] {
        append(&*store, aggregate, 11..=12).await;
    }
    let relay = start(&store, switchboard.clone());
    eventually("the 4 new events forwarded", WAIT, || async {
        recorder.len() >= 34
    })
    .await;
    relay.shutdown().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;

    let counts = recorder.counts();
    assert_eq!(counts.len(), 34);
    assert!(counts.values().all(|n| *n == 1), "no event published twice");
    let sequences = recorder.sequences();
    assert_eq!(sequences["a"], (1..=12).collect::<Vec<_>>());
    assert_eq!(sequences["b"], (1..=12).collect::<Vec<_>>());
    assert_eq!(sequences["c"], (1..=10).collect::<Vec<_>>());
    for d in recorder.deliveries() {
        let key = d.message.ordering_key.unwrap();
        assert_eq!(
            key,
            format!("Order-{}", d.message.payload["aggregate"].as_str().unwrap())
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_memory_store() {
    forwards_the_global_log_in_order_from_a_durable_checkpoint(Arc::new(InMemoryEventStore::new()))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_store() {
    // The store's schema beside the outbox's: the relay reads `keel.events`.
    let db = keel_testkit::TestDatabase::create(&[
        &keel_eventstore::MIGRATIONS,
        &keel_outbox::MIGRATIONS,
    ])
    .await
    .expect("a migrated test database (is PostgreSQL running on 127.0.0.1:5432?)");
    forwards_the_global_log_in_order_from_a_durable_checkpoint(Arc::new(PostgresEventStore::new(
        db.pool().clone(),
    )))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unnamed_relay_is_refused() {
    let bus = Arc::new(InMemoryBus::new());
    let err = EventStoreRelay::new(bus, route)
        .spawn(
            Arc::new(InMemoryEventStore::new()),
            SubscriptionOptions::new(""),
        )
        .unwrap_err();
    assert!(
        matches!(err, keel_outbox::OutboxError::Invalid { .. }),
        "{err}"
    );
}
