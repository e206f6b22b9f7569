//! The event-store relay over both event stores (in memory and PostgreSQL),
//! into Keel's in-memory bus.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use common::*;
use futures::TryStreamExt;
use keel_core::{EventPublisher, Message};
use keel_core::{ExpectedVersion, StreamId};
use keel_eventbus::InMemoryBus;
use keel_eventstore::GlobalLog;
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

/// One publish call: its topic, and each message's ordering key and `seq`.
type Call = (String, Vec<(String, u64)>);

/// Records every publish call (topic and the messages' `seq` per call);
/// `tear` makes the call numbered `tear` (from 0) pass its first half on
/// and then fail, like a connection lost mid-request.
#[derive(Default)]
struct Calls {
    calls: Mutex<Vec<Call>>,
    tear: Option<usize>,
}

fn key_and_seq(m: &Message) -> (String, u64) {
    (
        m.ordering_key.clone().unwrap(),
        m.payload["seq"].as_u64().unwrap(),
    )
}

#[async_trait]
impl EventPublisher for Calls {
    async fn publish(&self, topic: &str, messages: &[Message]) -> keel_core::Result<()> {
        let mut calls = self.calls.lock().unwrap();
        let n = calls.len();
        if self.tear == Some(n) {
            let half = messages.len() / 2;
            calls.push((
                topic.to_owned(),
                messages[..half].iter().map(key_and_seq).collect(),
            ));
            return Err(keel_core::Error::unavailable(
                "bus",
                "connection lost",
                "the stream was reset",
            ));
        }
        calls.push((topic.to_owned(), messages.iter().map(key_and_seq).collect()));
        Ok(())
    }
}

impl Calls {
    fn published(&self) -> usize {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .map(|(_, m)| m.len())
            .sum()
    }
}

fn route_two(event: &RecordedEvent) -> Option<String> {
    match event.stream_id.category() {
        "Order" => Some("orders".to_owned()),
        "Payment" => Some("payments".to_owned()),
        _ => None,
    }
}

/// Appends events `seq` in `seqs` to `category`-`id`.
async fn append_in<S: EventStore + ?Sized>(
    store: &S,
    category: &str,
    id: &str,
    seqs: std::ops::RangeInclusive<u64>,
) {
    let stream = StreamId::for_aggregate(category, id).unwrap();
    let events = seqs
        .map(|seq| NewEvent::from_json("changed", &json!({ "seq": seq })))
        .collect();
    store
        .append(&stream, ExpectedVersion::Any, events)
        .await
        .unwrap();
}

/// Runs of events bound for one topic go out in one publish call each (at
/// most `max_batch` messages, never across a checkpoint boundary), in log
/// order, each event once; `max_batch(1)` publishes one event per call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_of_one_topic_go_out_in_one_call() {
    let store = Arc::new(InMemoryEventStore::new());
    // 45 routed events: 30 orders, 5 payments, 10 orders; one internal.
    for id in ["a", "b", "c"] {
        append_in(&*store, "Order", id, 1..=10).await;
    }
    append_in(&*store, "Payment", "p", 1..=5).await;
    append_in(&*store, "Audit", "x", 1..=1).await;
    append_in(&*store, "Order", "a", 11..=20).await;
    let all: Vec<RecordedEvent> = store
        .read_all(keel_eventstore::ReadAll::from_start())
        .try_collect()
        .await
        .unwrap();
    let log: Vec<(String, String, u64)> = all
        .iter()
        .filter_map(|e| {
            let topic = route_two(e)?;
            Some((
                topic,
                e.stream_id.as_str().to_owned(),
                e.payload_value().unwrap()["seq"].as_u64().unwrap(),
            ))
        })
        .collect();
    assert_eq!(log.len(), 45);

    for (name, max_batch) in [("batched", 8), ("single", 1)] {
        let calls = Arc::new(Calls::default());
        let relay = EventStoreRelay::new(calls.clone(), route_two)
            .max_batch(max_batch)
            .spawn(
                store.clone(),
                SubscriptionOptions::new(name)
                    .poll_interval(Duration::from_millis(50))
                    .checkpoint(20, Duration::from_secs(60)),
            )
            .unwrap();
        eventually("45 events published", WAIT, || async {
            calls.published() >= 45
        })
        .await;
        relay.shutdown().await.unwrap();
        let calls = calls.calls.lock().unwrap();
        let flat: Vec<(String, String, u64)> = calls
            .iter()
            .flat_map(|(topic, ms)| {
                ms.iter()
                    .map(move |(key, seq)| (topic.clone(), key.clone(), *seq))
            })
            .collect();
        assert_eq!(flat, log, "{name}: each routed event once, in log order");
        assert!(calls.iter().all(|(_, ms)| ms.len() <= max_batch), "{name}");
        if max_batch == 1 {
            assert_eq!(calls.len(), 45);
        } else {
            // The log: events 1-30 orders, 31-35 payments, 36 internal
            // (handled, not published), 37-46 orders. Batches of at most 8
            // deliveries, cut at the checkpoints after the 20th and 40th
            // handled event; calls cut where the topic changes:
            // 1-8, 9-16, 17-20 | 21-28, then the batch 29-36 as 2 orders
            // and 5 payments, 37-40 | 41-46.
            let sizes: Vec<usize> = calls.iter().map(|(_, ms)| ms.len()).collect();
            assert_eq!(sizes, vec![8, 8, 4, 8, 2, 5, 4, 6], "{name}");
        }
    }
}

/// A batch whose publish fails part-way is published again whole: every
/// event arrives, and within each ordering key the first arrivals keep log
/// order (the repeats are what an inbox absorbs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_batch_is_published_again_whole() {
    let store = Arc::new(InMemoryEventStore::new());
    for id in ["a", "b", "c"] {
        append_in(&*store, "Order", id, 1..=12).await;
    }
    let calls = Arc::new(Calls {
        tear: Some(1),
        ..Calls::default()
    });
    let relay = EventStoreRelay::new(calls.clone(), route_two)
        .max_batch(10)
        .retry_backoff(Duration::from_millis(20), Duration::from_millis(100))
        .spawn(
            store.clone(),
            SubscriptionOptions::new("torn").poll_interval(Duration::from_millis(50)),
        )
        .unwrap();
    eventually("36 events and the repeats published", WAIT, || async {
        calls.published() >= 36 + 5
    })
    .await;
    relay.shutdown().await.unwrap();
    let calls = calls.calls.lock().unwrap();
    assert_eq!(calls[1].1.len(), 5, "half of the torn call got through");
    assert_eq!(calls[2].1.len(), 10, "then the whole batch again");
    assert_eq!(calls[1].1[..], calls[2].1[..5]);
    let mut first_seen: std::collections::HashMap<String, Vec<u64>> = Default::default();
    let mut seen = std::collections::HashSet::new();
    for (key, seq) in calls.iter().flat_map(|(_, ms)| ms.iter()) {
        if seen.insert((key.clone(), *seq)) {
            first_seen.entry(key.clone()).or_default().push(*seq);
        }
    }
    for id in ["a", "b", "c"] {
        assert_eq!(
            first_seen[&format!("Order-{id}")],
            (1..=12).collect::<Vec<_>>()
        );
    }
    assert_eq!(seen.len(), 36, "nothing lost");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_size_out_of_range_is_refused() {
    for n in [0, keel_outbox::MAX_STORE_RELAY_BATCH + 1] {
        let err = EventStoreRelay::new(Arc::new(InMemoryBus::new()), route)
            .max_batch(n)
            .spawn(
                Arc::new(InMemoryEventStore::new()),
                SubscriptionOptions::new("sized"),
            )
            .unwrap_err();
        assert!(
            matches!(err, keel_outbox::OutboxError::Invalid { ref field, .. } if field == "max_batch"),
            "{n}: {err}"
        );
    }
}
