//! Keel's event store against an anchor, postgres-es (the PostgreSQL store of
//! cqrs-es), in the same run on the same database.
//!
//! Run with `cargo bench -p keel-eventstore --bench anchors`. Set
//! `KEEL_BENCH_SCALE` (default 1.0) to shrink or grow every workload.
//!
//! Both sides are measured store against store: Keel through
//! `PostgresEventStore::append` (with `ExpectedVersion::Exact`) and
//! `read_stream`; postgres-es through its `PostgresEventRepository`, the
//! `PersistedEventRepository::persist` and `get_events` calls that cqrs-es's
//! framework makes underneath, without the framework itself. Each workload is
//! cut into rounds and the two sides take turns (the side that goes first
//! alternates), so drifting load on a shared machine hits both alike.
//! Results are printed as Markdown; docs/benchmarks-eventstore.md records
//! them.

#![allow(clippy::print_stdout, reason = "a benchmark reports on stdout")]
#![allow(missing_docs, reason = "a benchmark binary")]

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use cqrs_es::event_sink::EventSink;
use cqrs_es::persist::{PersistedEventRepository, SerializedEvent};
use cqrs_es::{Aggregate, DomainEvent};
use futures::TryStreamExt;
use keel_core::{ExpectedVersion, StreamId, Version};
use keel_eventstore::{Appender, PostgresEventStore, ReadStream, StreamReader};
use keel_testkit::TestDatabase;
use postgres_es::PostgresEventRepository;
use serde::{Deserialize, Serialize};

mod common;
use common::{Stats, event, metadata, n, payload, report, run_writers, scale};

/// Rounds each workload is cut into; the two sides alternate between them.
const ROUNDS: usize = 6;

/// The aggregate postgres-es is typed over. Its repository only reads
/// `TYPE`; nothing here is ever handled or applied.
#[derive(Debug, Default, Serialize, Deserialize)]
struct BenchOrder;

/// The event type of [`BenchOrder`]; present only to satisfy cqrs-es's
/// bounds, since the benchmark hands the repository serialized events.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct LineAdded;

impl DomainEvent for LineAdded {
    fn event_type(&self) -> String {
        "order.line_added".to_owned()
    }

    fn event_version(&self) -> String {
        "1".to_owned()
    }
}

impl Aggregate for BenchOrder {
    const TYPE: &'static str = "BenchOrder";
    type Command = ();
    type Event = LineAdded;
    type Error = std::io::Error;
    type Services = ();

    fn handle(
        &mut self,
        _command: Self::Command,
        _service: &Self::Services,
        _sink: &EventSink<Self>,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send {
        std::future::ready(Ok(()))
    }

    fn apply(&mut self, _event: Self::Event) {}
}

/// The `i`-th event of aggregate `id`, as postgres-es stores it. cqrs-es
/// numbers an aggregate's events from 1.
fn pges_event(id: &str, i: usize) -> SerializedEvent {
    SerializedEvent::new(
        id.to_owned(),
        i + 1,
        BenchOrder::TYPE.to_owned(),
        "order.line_added".to_owned(),
        "1".to_owned(),
        payload(i),
        serde_json::to_value(metadata()).unwrap(),
    )
}

/// One append workload: `writers` writers, each appending `per_writer`
/// transactions of `batch` events to its own stream (Keel) or aggregate
/// (postgres-es).
async fn append_bench(
    name: &str,
    store: &PostgresEventStore,
    repo: &Arc<PostgresEventRepository>,
    writers: usize,
    per_writer: usize,
    batch: usize,
) {
    let tag = uuid::Uuid::now_v7().simple().to_string();
    let keel_op = {
        let store = store.clone();
        let tag = tag.clone();
        Arc::new(move |w: usize, i: usize| {
            let store = store.clone();
            let stream = StreamId::new(format!("Bench{tag}-{w}")).unwrap();
            async move {
                let events = (0..batch).map(|k| event(i * batch + k)).collect();
                let expected = ExpectedVersion::Exact(Version::new((i * batch) as u64));
                store.append(&stream, expected, events).await.unwrap();
            }
        })
    };
    let pges_op = {
        let repo = repo.clone();
        Arc::new(move |w: usize, i: usize| {
            let repo = repo.clone();
            let id = format!("Pges{tag}-{w}");
            async move {
                let events: Vec<SerializedEvent> =
                    (0..batch).map(|k| pges_event(&id, i * batch + k)).collect();
                repo.persist::<BenchOrder>(&events, None).await.unwrap();
            }
        })
    };
    let rounds = ROUNDS.min(per_writer);
    let (mut keel, mut pges) = (Stats::default(), Stats::default());
    for round in 0..rounds {
        let ops = per_writer * round / rounds..per_writer * (round + 1) / rounds;
        if round % 2 == 0 {
            keel.merge(run_writers(writers, ops.clone(), batch, keel_op.clone()).await);
            pges.merge(run_writers(writers, ops, batch, pges_op.clone()).await);
        } else {
            pges.merge(run_writers(writers, ops.clone(), batch, pges_op.clone()).await);
            keel.merge(run_writers(writers, ops, batch, keel_op.clone()).await);
        }
    }
    report(name, keel, pges);
}

/// Reads one 1,000-event stream (Keel) and one 1,000-event aggregate
/// (postgres-es) in full, `reps` times each, alternating.
async fn read_bench(store: &PostgresEventStore, repo: &PostgresEventRepository, reps: usize) {
    const LEN: usize = 1_000;
    let stream = StreamId::new("ReadOne-0").unwrap();
    let events = (0..LEN).map(event).collect();
    store
        .append(&stream, ExpectedVersion::Exact(Version::new(0)), events)
        .await
        .unwrap();
    let id = "PgesReadOne-0";
    let events: Vec<SerializedEvent> = (0..LEN).map(|i| pges_event(id, i)).collect();
    repo.persist::<BenchOrder>(&events, None).await.unwrap();

    let (mut keel, mut pges) = (Stats::default(), Stats::default());
    for rep in 0..reps {
        for side in 0..2 {
            let t = Instant::now();
            if (rep + side) % 2 == 0 {
                let events: Vec<_> = store
                    .read_stream(&stream, ReadStream::forward())
                    .try_collect()
                    .await
                    .unwrap();
                let elapsed = t.elapsed();
                assert_eq!(events.len(), LEN);
                keel.merge(Stats {
                    events: LEN,
                    elapsed,
                    latencies: vec![elapsed],
                });
            } else {
                let events = repo.get_events::<BenchOrder>(id).await.unwrap();
                let elapsed = t.elapsed();
                assert_eq!(events.len(), LEN);
                pges.merge(Stats {
                    events: LEN,
                    elapsed,
                    latencies: vec![elapsed],
                });
            }
        }
    }
    report("read a 1,000-event stream / aggregate", keel, pges);
}

/// postgres-es's documented `events` table (its db/init.sql); the snapshot
/// table is left out because no snapshot is taken here.
const PGES_SCHEMA: &str = "CREATE TABLE public.events (
    aggregate_type text                         NOT NULL,
    aggregate_id   text                         NOT NULL,
    sequence       bigint CHECK (sequence >= 0) NOT NULL,
    event_type     text                         NOT NULL,
    event_version  text                         NOT NULL,
    payload        json                         NOT NULL,
    metadata       json                         NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id, sequence)
)";

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() {
    let db = TestDatabase::create(&keel_eventstore::MIGRATIONS)
        .await
        .unwrap();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(16)
        .connect_with(db.connect_options())
        .await
        .unwrap();
    sqlx::query(PGES_SCHEMA).execute(&pool).await.unwrap();
    let store = PostgresEventStore::new(pool.clone());
    let repo = Arc::new(PostgresEventRepository::new(pool.clone()));

    let version: String = sqlx::query_scalar("SHOW server_version")
        .fetch_one(&pool)
        .await
        .unwrap();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    println!(
        "PostgreSQL {version}, scale {}, {ROUNDS} alternating rounds per workload, load average at start {}",
        scale(),
        load.join(" ")
    );
    println!();
    println!(
        "| workload | keel events/s | keel p50 / p99 ms | postgres-es events/s | postgres-es p50 / p99 ms | keel ÷ postgres-es |"
    );
    println!("|---|---|---|---|---|---|");

    // Warm up connections and caches on both sides.
    append_bench("warm-up (ignore)", &store, &repo, 4, n(100).max(2), 1).await;
    append_bench("append 1 event/tx, 1 writer", &store, &repo, 1, n(3_000), 1).await;
    append_bench(
        "append 1 event/tx, 8 writers",
        &store,
        &repo,
        8,
        n(1_000),
        1,
    )
    .await;
    append_bench(
        "append 50 events/tx, 1 writer",
        &store,
        &repo,
        1,
        n(300),
        50,
    )
    .await;
    append_bench(
        "append 50 events/tx, 8 writers",
        &store,
        &repo,
        8,
        n(60),
        50,
    )
    .await;
    read_bench(&store, &repo, n(100)).await;

    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    println!();
    println!("Load average at the end: {}", load.join(" "));
    pool.close().await;
    drop(db);
}
