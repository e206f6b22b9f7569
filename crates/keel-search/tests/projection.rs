//! Search projections from the event log: on the in-memory store, on
//! PostgreSQL, and on PostgreSQL into a real Meilisearch when one is
//! available (skipped, with a notice, otherwise).

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use keel_core::{BoxError, ExpectedVersion, HealthStatus, StreamId};
use keel_eventstore::{
    Appender, EventStore, InMemoryEventStore, NewEvent, PostgresEventStore, RecordedEvent,
    StoreConfig, SubscriptionOptions, SubscriptionSupport,
};
use keel_search::projection::{
    EventFilter, LAG_EVENTS, POSITION_FIELD, ProjectionOptions, SearchProjection, SearchProjector,
};
use keel_search::{
    Document, DocumentId, Filter, InMemoryEngine, IndexName, IndexSettings, SearchEngine,
    SearchRequest, Wait,
};
use keel_testkit::TestDatabase;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(120);

/// Orders: placed, items added (a running total: applying an event twice
/// would count it twice), shipped, cancelled (deleted).
#[derive(Clone, Default)]
struct Orders {
    /// Version 2 of the read model adds a `schema` attribute.
    v2: Arc<AtomicBool>,
    /// A pause per event, to make lag observable.
    pause: Option<Duration>,
    calls: Arc<AtomicU64>,
}

impl SearchProjector for Orders {
    fn document_id(&self, event: &RecordedEvent) -> Option<String> {
        event
            .stream_id
            .as_str()
            .strip_prefix("Order-")
            .map(str::to_owned)
    }

    fn apply(
        &self,
        current: Option<Document>,
        event: &RecordedEvent,
    ) -> Result<Option<Document>, BoxError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        if let Some(pause) = self.pause {
            std::thread::sleep(pause);
        }
        let payload = event.payload_value()?;
        let mut doc = current.unwrap_or_default();
        match event.event_type.as_str() {
            "order.placed" => {
                doc.insert("customer".into(), payload["customer"].clone());
                doc.insert("status".into(), "placed".into());
                doc.insert("items".into(), 0.into());
            }
            "order.item_added" => {
                let items = doc.get("items").and_then(Value::as_u64).unwrap_or(0);
                let qty = payload["qty"].as_u64().unwrap_or(0);
                doc.insert("items".into(), (items + qty).into());
            }
            "order.shipped" => {
                doc.insert("status".into(), "shipped".into());
            }
            "order.cancelled" => return Ok(None),
            other => return Err(format!("unexpected event {other}").into()),
        }
        let schema = if self.v2.load(Ordering::Relaxed) {
            2
        } else {
            1
        };
        doc.insert("schema".into(), schema.into());
        Ok(Some(doc))
    }
}

async fn append<S: Appender + ?Sized>(store: &S, stream: &str, events: &[(&str, Value)]) {
    let events = events
        .iter()
        .map(|(t, p)| NewEvent::from_json(*t, p))
        .collect();
    store
        .append(
            &StreamId::new(stream).unwrap(),
            ExpectedVersion::Any,
            events,
        )
        .await
        .unwrap();
}

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    )
}

async fn doc(engine: &dyn SearchEngine, index: &IndexName, id: &str) -> Option<Document> {
    engine
        .get_document(index, &DocumentId::new(id).unwrap())
        .await
        .unwrap()
}

fn without_position(mut d: Document) -> Document {
    d.remove(POSITION_FIELD);
    d
}

/// The whole story, against any store and engine.
async fn scenario<S>(store: Arc<S>, engine: Arc<dyn SearchEngine>)
where
    S: EventStore + SubscriptionSupport + 'static,
{
    let id = unique("p");
    // Streams of this run only: other tests may share the log.
    let order = |n: &str| format!("Order-{id}{n}");
    append(
        &*store,
        &order("o1"),
        &[
            ("order.placed", json!({"customer": "alice"})),
            ("order.item_added", json!({"qty": 2})),
            ("order.item_added", json!({"qty": 3})),
            ("order.shipped", json!({})),
        ],
    )
    .await;
    append(
        &*store,
        &order("o2"),
        &[
            ("order.placed", json!({"customer": "bob"})),
            ("order.item_added", json!({"qty": 1})),
            ("order.cancelled", json!({})),
        ],
    )
    .await;
    append(
        &*store,
        &order("o3"),
        &[
            ("order.placed", json!({"customer": "carol"})),
            ("order.item_added", json!({"qty": 5})),
        ],
    )
    .await;
    append(
        &*store,
        &format!("Invoice-{id}"),
        &[("invoice.sent", json!({}))],
    )
    .await;

    let index = IndexName::new(unique("keel_projection")).unwrap();
    let projector = Orders::default();
    let options = || {
        ProjectionOptions::new(format!("search-{id}"))
            .filter(EventFilter::all().stream_prefix(format!("Order-{id}")))
            .lag_interval(Duration::from_millis(100))
            .subscription(
                SubscriptionOptions::new("ignored")
                    .poll_interval(Duration::from_millis(50))
                    .checkpoint(5, Duration::from_millis(200)),
            )
    };
    let settings = IndexSettings::new()
        .filterable(["status", "customer"])
        .sortable(["items"]);
    let start = |projector: Orders, options: ProjectionOptions| {
        SearchProjection::new(
            Arc::clone(&store),
            Arc::clone(&engine),
            projector,
            index.clone(),
            "id",
        )
        .settings(settings.clone())
        .options(options)
        .start()
    };
    let handle = start(projector.clone(), options()).await.unwrap();
    handle.wait_caught_up(WAIT).await.unwrap();

    let o1 = format!("{id}o1");
    let o2 = format!("{id}o2");
    let o3 = format!("{id}o3");
    let d1 = doc(&*engine, &index, &o1).await.expect("o1");
    assert_eq!(d1["status"], "shipped");
    assert_eq!(d1["items"], 5);
    assert_eq!(d1["customer"], "alice");
    assert_eq!(d1["id"], o1.as_str());
    assert!(doc(&*engine, &index, &o2).await.is_none());
    assert_eq!(doc(&*engine, &index, &o3).await.expect("o3")["items"], 5);
    let shipped = engine
        .search(
            &index,
            &SearchRequest::new("").filter(Filter::eq("status", "shipped")),
        )
        .await
        .unwrap();
    assert_eq!(shipped.total.hits(), 1);

    // Live: new events keep flowing.
    append(
        &*store,
        &order("o3"),
        &[("order.item_added", json!({"qty": 1}))],
    )
    .await;
    handle.wait_caught_up(WAIT).await.unwrap();
    assert_eq!(doc(&*engine, &index, &o3).await.unwrap()["items"], 6);
    let before: Vec<Option<Document>> = vec![
        doc(&*engine, &index, &o1).await,
        doc(&*engine, &index, &o3).await,
    ];

    // Idempotent: a second subscription replays the whole log onto the
    // same documents; every event they already reflect is skipped.
    let mut replay_options = options();
    replay_options.name = format!("search-{id}-replay");
    let replay = start(projector.clone(), replay_options).await.unwrap();
    replay.wait_caught_up(WAIT).await.unwrap();
    let replayed = replay.status();
    assert!(replayed.skipped >= 7, "{replayed:?}");
    replay.shutdown().await.unwrap();
    assert_eq!(doc(&*engine, &index, &o1).await, before[0]);
    assert_eq!(doc(&*engine, &index, &o3).await, before[1]);
    assert!(doc(&*engine, &index, &o2).await.is_none());

    // A crash (no final checkpoint) and a restart: events since the last
    // checkpoint come again and change nothing.
    handle.abort().await;
    append(
        &*store,
        &order("o1"),
        &[("order.item_added", json!({"qty": 10}))],
    )
    .await;
    let mut handle = start(projector.clone(), options()).await.unwrap();
    handle.wait_caught_up(WAIT).await.unwrap();
    assert_eq!(doc(&*engine, &index, &o1).await.unwrap()["items"], 15);
    assert_eq!(doc(&*engine, &index, &o3).await.unwrap()["items"], 6);

    // Rebuild with version 2 of the read model while searches run: they
    // see the old documents or the new ones, never a partial index.
    projector.v2.store(true, Ordering::Relaxed);
    let stop = Arc::new(AtomicBool::new(false));
    let searcher = {
        let engine = Arc::clone(&engine);
        let index = index.clone();
        let stop = Arc::clone(&stop);
        tokio::spawn(async move {
            let mut schemas = BTreeSet::new();
            while !stop.load(Ordering::Relaxed) {
                let r = engine
                    .search(&index, &SearchRequest::new("").offset(0, 50))
                    .await
                    .expect("search during rebuild");
                assert_eq!(r.hits.len(), 2, "partial index seen: {:?}", r.hits);
                let seen: BTreeSet<u64> = r
                    .hits
                    .iter()
                    .map(|h| h.document["schema"].as_u64().unwrap())
                    .collect();
                assert_eq!(seen.len(), 1, "mixed read models {seen:?}");
                schemas.extend(seen);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            schemas
        })
    };
    let report = handle.rebuild(WAIT).await.unwrap();
    tokio::time::sleep(Duration::from_millis(30)).await;
    stop.store(true, Ordering::Relaxed);
    let schemas = searcher.await.unwrap();
    assert!(schemas.contains(&2), "{schemas:?}");
    assert_eq!(report.documents, 2);
    let d1 = doc(&*engine, &index, &o1).await.unwrap();
    assert_eq!(d1["schema"], 2);
    assert_eq!(d1["items"], 15);
    assert_eq!(
        without_position(doc(&*engine, &index, &o3).await.unwrap())["items"],
        6
    );

    // The live projection resumed after the rebuild, on the new index.
    append(
        &*store,
        &order("o4"),
        &[("order.placed", json!({"customer": "dan"}))],
    )
    .await;
    append(&*store, &order("o3"), &[("order.shipped", json!({}))]).await;
    handle.wait_caught_up(WAIT).await.unwrap();
    assert_eq!(
        doc(&*engine, &index, &format!("{id}o4")).await.unwrap()["schema"],
        2
    );
    let d3 = doc(&*engine, &index, &o3).await.unwrap();
    assert_eq!(d3["status"], "shipped");
    assert_eq!(d3["items"], 6);
    // Only the live index and nothing else of this run is left.
    assert_eq!(engine.document_count(&index).await.unwrap(), 3);
    handle.shutdown().await.unwrap();
    let _ = engine.delete_index(&index, Wait::applied(WAIT)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_store_into_memory_engine() {
    scenario(
        Arc::new(InMemoryEventStore::new()),
        Arc::new(InMemoryEngine::new()),
    )
    .await;
}

async fn postgres() -> (Arc<PostgresEventStore>, TestDatabase) {
    let db = TestDatabase::create(&keel_eventstore::MIGRATIONS)
        .await
        .expect("test database");
    let store = PostgresEventStore::with_config(
        db.pool().clone(),
        StoreConfig::default().settle_timeout(Duration::from_secs(30)),
    );
    (Arc::new(store), db)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_store_into_memory_engine() {
    let (store, _db) = postgres().await;
    scenario(store, Arc::new(InMemoryEngine::new())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_store_into_meilisearch() {
    let Some((engine, _)) = common::meilisearch("projection tests").await else {
        return;
    };
    let (store, _db) = postgres().await;
    scenario(store, Arc::new(engine)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lag_is_a_metric_and_a_readiness_check() {
    let probe = keel_telemetry::testing::MetricsProbe::new();
    probe.install_global();
    let store = Arc::new(InMemoryEventStore::new());
    for i in 0..100 {
        append(
            &*store,
            &format!("Order-lag{i}"),
            &[("order.placed", json!({"customer": "x"}))],
        )
        .await;
    }
    let engine: Arc<dyn SearchEngine> = Arc::new(InMemoryEngine::new());
    let index = IndexName::new("lagging").unwrap();
    let projector = Orders {
        pause: Some(Duration::from_millis(20)),
        ..Orders::default()
    };
    let handle = SearchProjection::new(
        Arc::clone(&store),
        Arc::clone(&engine),
        projector,
        index.clone(),
        "id",
    )
    .options(
        ProjectionOptions::new("lagging-search")
            .max_ready_lag(5)
            .lag_interval(Duration::from_millis(50)),
    )
    .start()
    .await
    .unwrap();

    let registry = keel_telemetry::health::HealthRegistry::new();
    registry.register_shared(handle.readiness(), Default::default());
    let report = registry.readiness().await;
    assert!(!report.is_serving(), "{report:?}");
    let (waiting, _) = handle.lag().await.unwrap();
    assert!(waiting > 5, "{waiting}");
    assert!(
        probe.value(LAG_EVENTS, &[("projection", "lagging-search")]) > 5.0,
        "{:?}",
        probe.points()
    );

    handle.wait_caught_up(WAIT).await.unwrap();
    assert_eq!(handle.lag().await.unwrap().0, 0);
    assert_eq!(
        probe.value(LAG_EVENTS, &[("projection", "lagging-search")]),
        0.0
    );
    let report = registry.readiness().await;
    assert!(report.is_serving(), "{report:?}");
    let check = handle.readiness();
    assert_eq!(check.check().await.status, HealthStatus::Healthy);
    assert_eq!(engine.document_count(&index).await.unwrap(), 100);
    handle.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_projector_stops_and_turns_unready() {
    struct Broken;
    impl SearchProjector for Broken {
        fn document_id(&self, event: &RecordedEvent) -> Option<String> {
            Some(event.stream_id.as_str().replace("Order-", ""))
        }
        fn apply(
            &self,
            _: Option<Document>,
            _: &RecordedEvent,
        ) -> Result<Option<Document>, BoxError> {
            Err("the read model cannot handle this event".into())
        }
    }
    let store = Arc::new(InMemoryEventStore::new());
    append(&*store, "Order-b1", &[("order.placed", json!({}))]).await;
    let engine: Arc<dyn SearchEngine> = Arc::new(InMemoryEngine::new());
    let handle = SearchProjection::new(
        store,
        engine,
        Broken,
        IndexName::new("broken").unwrap(),
        "id",
    )
    .start()
    .await
    .unwrap();
    let r = handle.wait_caught_up(Duration::from_secs(30)).await;
    assert!(r.is_err(), "{r:?}");
    let status = handle.status();
    assert!(
        status
            .failed
            .as_deref()
            .is_some_and(|f| f.contains("cannot handle")),
        "{status:?}"
    );
    assert_eq!(
        handle.readiness().check().await.status,
        HealthStatus::Unhealthy
    );
    assert!(handle.shutdown().await.is_err());
}

/// One run of events (all read in one batch): a document created,
/// changed, deleted and created again ends as the last event left it; a
/// projector failure in the middle of the run writes what the events
/// before it did and stops before it; the same events one at a time
/// (`max_batch(1)`) give the same index.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_run_is_applied_in_order_and_stops_at_a_failed_event() {
    let store = Arc::new(InMemoryEventStore::new());
    append(
        &*store,
        "Order-x",
        &[
            ("order.placed", json!({ "customer": "Ada" })),
            ("order.item_added", json!({ "qty": 2 })),
            ("order.cancelled", json!({})),
            ("order.placed", json!({ "customer": "Ada again" })),
            ("order.item_added", json!({ "qty": 3 })),
        ],
    )
    .await;
    append(
        &*store,
        "Order-y",
        &[
            ("order.placed", json!({ "customer": "Grace" })),
            ("order.item_added", json!({ "qty": 1 })),
            ("order.exploded", json!({})),
            ("order.item_added", json!({ "qty": 5 })),
        ],
    )
    .await;
    for max_batch in [100, 1] {
        let engine: Arc<dyn SearchEngine> = Arc::new(InMemoryEngine::new());
        let index = IndexName::new(format!("runs_{max_batch}")).unwrap();
        let handle = SearchProjection::new(
            store.clone(),
            engine.clone(),
            Orders::default(),
            index.clone(),
            "id",
        )
        .options(
            ProjectionOptions::new(format!("runs-{max_batch}"))
                .max_batch(max_batch)
                .subscription(
                    SubscriptionOptions::new("ignored").poll_interval(Duration::from_millis(20)),
                ),
        )
        .start()
        .await
        .unwrap();
        let r = handle.wait_caught_up(Duration::from_secs(30)).await;
        assert!(r.is_err(), "the unknown event stops it: {r:?}");
        let status = handle.status();
        assert!(
            status
                .failed
                .as_deref()
                .is_some_and(|f| f.contains("order.exploded")),
            "{status:?}"
        );
        // Events 1-7 of the log handled, the 8th failed.
        let positions: Vec<_> = {
            use futures::TryStreamExt;
            use keel_eventstore::GlobalLog;
            store
                .read_all(keel_eventstore::ReadAll::from_start())
                .map_ok(|e| e.position)
                .try_collect()
                .await
                .unwrap()
        };
        assert_eq!(status.position, Some(positions[6]), "max_batch {max_batch}");
        let x = without_position(doc(&*engine, &index, "x").await.expect("x recreated"));
        assert_eq!(x["customer"], "Ada again");
        assert_eq!(x["items"], 3, "the first life's items are gone");
        let y = without_position(doc(&*engine, &index, "y").await.expect("y written"));
        assert_eq!(y["items"], 1, "applied up to the failed event, not past it");
        assert_eq!(engine.document_count(&index).await.unwrap(), 2);
        assert!(handle.shutdown().await.is_err());
    }
}
