//! What the stores record and write on append without any decorator:
//! `keel.eventstore.append.*` (read back through the OpenTelemetry SDK's
//! in-memory exporter) and the current trace context in each event's
//! metadata. Against PostgreSQL and the in-memory store.

use std::time::Duration;

use futures::TryStreamExt;
use keel_core::{ExpectedVersion, Metadata, StreamId, TraceContext, Version};
use keel_eventstore::{
    Appender, InMemoryEventStore, NewEvent, PostgresEventStore, ReadStream, StoreConfig,
    StreamAppend, StreamReader,
};
use keel_telemetry::metrics::names::{
    ATTR_OUTCOME, ATTR_STREAM_CATEGORY, EVENTSTORE_APPEND_CONFLICTS, EVENTSTORE_APPEND_DURATION,
    EVENTSTORE_APPENDED_EVENTS,
};
use keel_telemetry::testing::MetricsProbe;
use keel_testkit::TestDatabase;
use opentelemetry::Context;
use opentelemetry::context::FutureExt as _;
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId};
use serde_json::json;

fn sid(s: &str) -> StreamId {
    StreamId::new(s).unwrap()
}

fn ev(n: u64) -> NewEvent {
    NewEvent::from_json("order.changed", &json!({ "n": n }))
}

/// Two appends to `Order-1` (3 events, then 2), one conflicting append, one
/// append to `Cart-9`, and a multi-stream append over both categories.
async fn appends_conflicts_and_latency<S: Appender>(store: S, probe: &MetricsProbe) {
    let order = sid("Order-1");
    store
        .append(&order, ExpectedVersion::NoStream, vec![ev(1), ev(2), ev(3)])
        .await
        .unwrap();
    store
        .append(
            &order,
            ExpectedVersion::Exact(Version::new(3)),
            vec![ev(4), ev(5)],
        )
        .await
        .unwrap();
    let conflict = store
        .append(&order, ExpectedVersion::Exact(Version::new(1)), vec![ev(6)])
        .await;
    assert!(conflict.is_err(), "{conflict:?}");
    store
        .append(&sid("Cart-9"), ExpectedVersion::Any, vec![ev(1)])
        .await
        .unwrap();
    store
        .append_multi(vec![
            StreamAppend::new(sid("Order-2"), ExpectedVersion::NoStream, vec![ev(1)]),
            StreamAppend::new(sid("Cart-9"), ExpectedVersion::Any, vec![ev(2), ev(3)]),
        ])
        .await
        .unwrap();

    let category = |c| (ATTR_STREAM_CATEGORY, c);
    assert_eq!(
        probe.value(EVENTSTORE_APPENDED_EVENTS, &[category("Order")]),
        6.0
    );
    assert_eq!(
        probe.value(EVENTSTORE_APPENDED_EVENTS, &[category("Cart")]),
        3.0
    );
    assert_eq!(
        probe.value(EVENTSTORE_APPEND_CONFLICTS, &[category("Order")]),
        1.0
    );
    assert_eq!(
        probe.value(EVENTSTORE_APPEND_CONFLICTS, &[category("Cart")]),
        0.0
    );
    let calls = |c, outcome| {
        probe.value(
            EVENTSTORE_APPEND_DURATION,
            &[category(c), (ATTR_OUTCOME, outcome)],
        )
    };
    assert_eq!(calls("Order", "ok"), 3.0);
    assert_eq!(calls("Order", "conflict"), 1.0);
    assert_eq!(calls("Cart", "ok"), 2.0);
    let latency = probe.matching(
        EVENTSTORE_APPEND_DURATION,
        &[category("Order"), (ATTR_OUTCOME, "ok")],
    );
    assert!(latency[0].sum > 0.0 && latency[0].sum < 60.0, "{latency:?}");
}

async fn postgres_store(probe: &MetricsProbe) -> (PostgresEventStore, TestDatabase) {
    let db = TestDatabase::create(&keel_eventstore::MIGRATIONS)
        .await
        .expect("test database");
    let store = PostgresEventStore::with_config(
        db.pool().clone(),
        StoreConfig::default().settle_timeout(Duration::from_secs(30)),
    )
    .with_metrics(probe.metrics());
    (store, db)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_appends_and_conflicts_are_counted() {
    let probe = MetricsProbe::new();
    let (store, _db) = postgres_store(&probe).await;
    appends_conflicts_and_latency(store, &probe).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_appends_in_a_callers_transaction_are_counted() {
    let probe = MetricsProbe::new();
    let (store, db) = postgres_store(&probe).await;
    let config = keel_database::DatabaseConfig::builder()
        .connect_options(db.connect_options())
        .min_connections(0)
        .build()
        .expect("database config");
    let mut tx = keel_database::Database::connect_lazy(config)
        .begin()
        .await
        .unwrap();
    store
        .within(&mut tx)
        .append(
            &sid("Order-7"),
            ExpectedVersion::NoStream,
            vec![ev(1), ev(2)],
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(
        probe.value(
            EVENTSTORE_APPENDED_EVENTS,
            &[(ATTR_STREAM_CATEGORY, "Order")]
        ),
        2.0
    );
}

#[tokio::test]
async fn in_memory_appends_and_conflicts_are_counted() {
    let probe = MetricsProbe::new();
    let store = InMemoryEventStore::new().with_metrics(probe.metrics());
    appends_conflicts_and_latency(store, &probe).await;
}

/// Events appended inside an active trace carry it; events with their own
/// keep it; outside any trace nothing is written.
async fn appends_write_the_current_trace<S: Appender + StreamReader>(store: S) {
    let cx = Context::new().with_remote_span_context(SpanContext::new(
        TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
        SpanId::from_hex("00f067aa0ba902b7").unwrap(),
        TraceFlags::SAMPLED,
        true,
        Default::default(),
    ));
    let own = TraceContext::new(
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        None,
    )
    .unwrap();
    let stream = sid("Order-42");
    store
        .append(
            &stream,
            ExpectedVersion::NoStream,
            vec![
                ev(1),
                ev(2).with_metadata(Metadata::new().with_trace_context(own.clone())),
            ],
        )
        .with_context(cx)
        .await
        .unwrap();
    store
        .append(&stream, ExpectedVersion::Any, vec![ev(3)])
        .await
        .unwrap();
    let events: Vec<_> = store
        .read_stream(&stream, ReadStream::forward())
        .try_collect()
        .await
        .unwrap();
    let traces: Vec<_> = events
        .iter()
        .map(|e| {
            e.metadata
                .trace_context
                .as_ref()
                .map(|tc| tc.traceparent().to_owned())
        })
        .collect();
    assert_eq!(
        traces,
        [
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned()),
            Some(own.traceparent().to_owned()),
            None,
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_appends_write_the_current_trace() {
    let probe = MetricsProbe::new();
    let (store, _db) = postgres_store(&probe).await;
    appends_write_the_current_trace(store).await;
}

#[tokio::test]
async fn in_memory_appends_write_the_current_trace() {
    appends_write_the_current_trace(InMemoryEventStore::new()).await;
}

/// A handler that holds the third event until released, and fails on the
/// event whose payload `n` is `fail_at`.
struct Gate {
    reached: tokio::sync::Notify,
    release: tokio::sync::Semaphore,
    fail_at: u64,
}

#[async_trait::async_trait]
impl keel_eventstore::SubscriptionHandler for Gate {
    async fn handle(
        &self,
        event: &keel_eventstore::RecordedEvent,
    ) -> Result<(), keel_core::BoxError> {
        let n = event.payload_value().unwrap()["n"].as_u64().unwrap();
        if n == 3 {
            self.reached.notify_one();
            self.release.acquire().await.unwrap().forget();
        }
        if n == self.fail_at {
            return Err("refused".into());
        }
        Ok(())
    }
}

/// `keel.eventstore.subscription.*`: events handled, lag while behind
/// (the age of the last handled event) and zero once caught up, and a
/// failure when the handler stops the subscription.
async fn subscription_metrics<S>(store: S)
where
    S: keel_eventstore::EventStore + keel_eventstore::SubscriptionSupport + 'static,
{
    use keel_telemetry::metrics::names::{
        ATTR_EVENTSTORE_SUBSCRIPTION, EVENTSTORE_SUBSCRIPTION_EVENTS,
        EVENTSTORE_SUBSCRIPTION_FAILURES, EVENTSTORE_SUBSCRIPTION_LAG,
    };
    let probe = MetricsProbe::new();
    let store = std::sync::Arc::new(store);
    store
        .append(
            &sid("Lag-1"),
            ExpectedVersion::NoStream,
            (1..=5).map(ev).collect(),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let gate = std::sync::Arc::new(Gate {
        reached: tokio::sync::Notify::new(),
        release: tokio::sync::Semaphore::new(0),
        fail_at: 7,
    });
    let name = format!("lag-{}", uuid::Uuid::new_v4().simple());
    let mut handle = keel_eventstore::Subscription::spawn(
        store.clone(),
        keel_eventstore::SubscriptionOptions::new(name.clone())
            .batch_size(2)
            .poll_interval(Duration::from_millis(20))
            .metrics(probe.metrics()),
        gate.clone(),
    );
    let of = [(ATTR_EVENTSTORE_SUBSCRIPTION, name.as_str())];
    // After the first (full) batch: two events, behind by their age.
    gate.reached.notified().await;
    assert_eq!(probe.value(EVENTSTORE_SUBSCRIPTION_EVENTS, &of), 2.0);
    let behind = probe.value(EVENTSTORE_SUBSCRIPTION_LAG, &of);
    assert!((0.2..60.0).contains(&behind), "lag while behind: {behind}");
    gate.release.add_permits(1);
    handle.wait_for(|s| s.handled == 5).await;
    // Caught up: the next (short) batch records zero.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while probe.value(EVENTSTORE_SUBSCRIPTION_LAG, &of) != 0.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "lag never went to zero"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(probe.value(EVENTSTORE_SUBSCRIPTION_EVENTS, &of), 5.0);
    assert_eq!(probe.value(EVENTSTORE_SUBSCRIPTION_FAILURES, &of), 0.0);

    // A failing handler stops the subscription and is counted.
    store
        .append(&sid("Lag-1"), ExpectedVersion::Any, vec![ev(6), ev(7)])
        .await
        .unwrap();
    let outcome = handle.join().await;
    assert!(outcome.is_err(), "{outcome:?}");
    assert_eq!(probe.value(EVENTSTORE_SUBSCRIPTION_FAILURES, &of), 1.0);
    assert_eq!(probe.value(EVENTSTORE_SUBSCRIPTION_EVENTS, &of), 6.0);
}

#[tokio::test]
async fn in_memory_subscription_metrics() {
    subscription_metrics(InMemoryEventStore::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_subscription_metrics() {
    let probe = MetricsProbe::new();
    let (store, _db) = postgres_store(&probe).await;
    subscription_metrics(store).await;
}

/// Applies nothing, fails on payload `n == 2`.
struct SkipTwo;

#[keel_eventstore::async_trait]
impl keel_eventstore::Projection for SkipTwo {
    async fn apply(
        &self,
        event: &keel_eventstore::RecordedEvent,
        _tx: &mut dyn keel_core::uow::Transaction,
    ) -> Result<(), keel_core::BoxError> {
        if event.payload_value()?["n"] == 2 {
            return Err("two is poison".into());
        }
        Ok(())
    }
}

/// A projection's progress check records its lag (events and seconds) and
/// its parked events as gauges, under `keel.projection`.
async fn projection_gauges<S>(store: std::sync::Arc<S>, probe: &MetricsProbe)
where
    S: keel_eventstore::EventStoreBackend + Units + 'static,
{
    use keel_core::HealthCheck;
    use keel_eventstore::{PoisonAction, ProjectionId, ProjectionOptions, ProjectionRunner};
    use keel_telemetry::metrics::names::{
        ATTR_PROJECTION, EVENTSTORE_PROJECTION_LAG, EVENTSTORE_PROJECTION_LAG_EVENTS,
        EVENTSTORE_PROJECTION_PARKED,
    };
    store
        .append(
            &sid("Order-1"),
            ExpectedVersion::NoStream,
            (1..=4).map(ev).collect(),
        )
        .await
        .unwrap();
    let options = ProjectionOptions::new(ProjectionId::new("gauges", 1).unwrap())
        .retry(2, Duration::from_millis(1), Duration::from_millis(1))
        .on_poison(PoisonAction::SkipAndContinue)
        .poll_interval(Duration::from_millis(20));
    let transactions: std::sync::Arc<dyn keel_core::uow::TransactionSource> = if store.pool_backed()
    {
        std::sync::Arc::new(store.units())
    } else {
        std::sync::Arc::new(keel_core::uow::MemoryTransactions::new())
    };
    let mut handle = ProjectionRunner::spawn(store.clone(), transactions, options, SkipTwo);
    tokio::time::timeout(Duration::from_secs(30), handle.wait_for(|s| s.caught_up))
        .await
        .unwrap();
    let check = handle.progress_check().with_metrics(probe.metrics());
    handle.shutdown().await.unwrap();
    store
        .append(
            &sid("Order-1"),
            ExpectedVersion::Any,
            vec![ev(5), ev(6), ev(7)],
        )
        .await
        .unwrap();
    let report = check.check().await;
    assert!(report.detail.contains("3 events behind"), "{report:?}");
    let attrs = [(ATTR_PROJECTION, "projection:gauges@v1")];
    assert_eq!(probe.value(EVENTSTORE_PROJECTION_LAG_EVENTS, &attrs), 3.0);
    assert_eq!(probe.value(EVENTSTORE_PROJECTION_PARKED, &attrs), 1.0);
    let lag = probe.value(EVENTSTORE_PROJECTION_LAG, &attrs);
    assert!((0.0..60.0).contains(&lag), "{lag}");
}

/// How the gauge test gets units of work for each store.
trait Units {
    fn pool_backed(&self) -> bool;
    fn units(&self) -> keel_database::Database;
}

impl Units for InMemoryEventStore {
    fn pool_backed(&self) -> bool {
        false
    }
    fn units(&self) -> keel_database::Database {
        unreachable!("the in-memory store uses memory transactions")
    }
}

impl Units for PostgresEventStore {
    fn pool_backed(&self) -> bool {
        true
    }
    fn units(&self) -> keel_database::Database {
        let config = keel_database::DatabaseConfig::builder()
            .connect_options((*self.pool().connect_options()).clone())
            .min_connections(0)
            .max_connections(5)
            .build()
            .unwrap();
        keel_database::Database::connect_lazy(config)
    }
}

#[tokio::test]
async fn in_memory_projection_lag_and_parked_are_recorded() {
    let probe = MetricsProbe::new();
    projection_gauges(std::sync::Arc::new(InMemoryEventStore::new()), &probe).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_projection_lag_and_parked_are_recorded() {
    let probe = MetricsProbe::new();
    let (store, _db) = postgres_store(&probe).await;
    projection_gauges(std::sync::Arc::new(store), &probe).await;
}
