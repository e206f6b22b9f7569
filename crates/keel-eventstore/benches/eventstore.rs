//! Event store benchmarks against a raw-SQL baseline, in the same run on the
//! same database.
//!
//! Run with `cargo bench -p keel-eventstore --bench eventstore`. Set
//! `KEEL_BENCH_SCALE` (default 1.0) to shrink or grow every workload.
//! Results are printed as Markdown; docs/benchmarks-eventstore.md records
//! them.

#![allow(clippy::print_stdout, reason = "a benchmark reports on stdout")]
#![allow(missing_docs, reason = "a benchmark binary")]

use std::sync::Arc;
use std::time::Instant;

use futures::{StreamExt, TryStreamExt};
use keel_core::{ExpectedVersion, StreamId, Version};
use keel_eventstore::{
    Appender, GlobalLog, PostgresEventStore, ReadAll, ReadStream, StoreConfig, StreamReader,
};
use keel_testkit::TestDatabase;
use sqlx::PgPool;

mod common;
use common::{Stats, event, metadata, n, payload, report, run_writers, scale};

/// The raw row a baseline INSERT writes: same columns, same values.
struct RawRow {
    id: uuid::Uuid,
    stream: String,
    version: i64,
    payload: String,
    metadata: String,
}

fn raw_row(stream: &str, version: i64, i: usize) -> RawRow {
    RawRow {
        id: uuid::Uuid::now_v7(),
        stream: stream.to_owned(),
        version,
        payload: payload(i).to_string(),
        metadata: serde_json::to_string(&metadata()).unwrap(),
    }
}

/// One row for repeated rounds of `(keel, raw)` rates: the median rates and
/// the median of the per-round ratios, with their range.
fn report_median(name: &str, rates: &[(f64, f64)]) {
    if rates.is_empty() {
        return;
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let ratios: Vec<f64> = rates.iter().map(|(k, r)| k / r).collect();
    let (low, high) = ratios
        .iter()
        .fold((f64::MAX, f64::MIN), |(l, h), &x| (l.min(x), h.max(x)));
    println!(
        "| {name} (median of {} rounds) | {:.0} | – | {:.0} | – | {:.2}x ({low:.2}x–{high:.2}x) |",
        rates.len(),
        median(rates.iter().map(|(k, _)| *k).collect()),
        median(rates.iter().map(|(_, r)| *r).collect()),
        median(ratios),
    );
}

/// Which baseline table a raw INSERT writes.
#[derive(Clone, Copy)]
enum Baseline {
    /// `bench_events`: Keel's own row, columns and indexes.
    KeelTable,
    /// `bench_minimal`: a bigserial key, the stream, the version and the
    /// payload, with `UNIQUE (stream_id, version)`: the least an event
    /// store with exact versions can write.
    Minimal,
}

async fn raw_insert(pool: &PgPool, rows: &[RawRow], table: Baseline) {
    let ids: Vec<uuid::Uuid> = rows.iter().map(|r| r.id).collect();
    let streams: Vec<&str> = rows.iter().map(|r| r.stream.as_str()).collect();
    let versions: Vec<i64> = rows.iter().map(|r| r.version).collect();
    let payloads: Vec<&str> = rows.iter().map(|r| r.payload.as_str()).collect();
    let metas: Vec<&str> = rows.iter().map(|r| r.metadata.as_str()).collect();
    match (table, rows.len()) {
        (Baseline::KeelTable, 1) => sqlx::query(
            "INSERT INTO bench_events (event_id, stream_id, version, event_type, schema_version, payload, metadata) \
             VALUES ($1, $2, $3, 'order.line_added', 1, $4::json, $5::json)",
        )
        .bind(ids[0])
        .bind(streams[0])
        .bind(versions[0])
        .bind(payloads[0])
        .bind(metas[0])
        .execute(pool)
        .await
        .unwrap(),
        (Baseline::KeelTable, _) => sqlx::query(
            "INSERT INTO bench_events (event_id, stream_id, version, event_type, schema_version, payload, metadata) \
             SELECT i, s, v, 'order.line_added', 1, p::json, m::json \
             FROM unnest($1::uuid[], $2::text[], $3::bigint[], $4::text[], $5::text[]) AS t(i, s, v, p, m)",
        )
        .bind(&ids)
        .bind(&streams)
        .bind(&versions)
        .bind(&payloads)
        .bind(&metas)
        .execute(pool)
        .await
        .unwrap(),
        (Baseline::Minimal, 1) => sqlx::query(
            "INSERT INTO bench_minimal (stream_id, version, payload) VALUES ($1, $2, $3::json)",
        )
        .bind(streams[0])
        .bind(versions[0])
        .bind(payloads[0])
        .execute(pool)
        .await
        .unwrap(),
        (Baseline::Minimal, _) => sqlx::query(
            "INSERT INTO bench_minimal (stream_id, version, payload) \
             SELECT s, v, p::json FROM unnest($1::text[], $2::bigint[], $3::text[]) AS t(s, v, p)",
        )
        .bind(&streams)
        .bind(&versions)
        .bind(&payloads)
        .execute(pool)
        .await
        .unwrap(),
    };
}

/// How many alternating rounds each append workload is cut into.
const APPEND_ROUNDS: usize = 6;

/// Appends `per_writer` batches of `batch` events per writer, Keel and the
/// two raw INSERTs taking turns in [`APPEND_ROUNDS`] rounds (the order
/// rotating every round), so load that drifts during the run reaches all
/// three.
async fn append_bench(
    name: &str,
    store: &PostgresEventStore,
    pool: &PgPool,
    writers: usize,
    per_writer: usize,
    batch: usize,
) {
    let tag = uuid::Uuid::now_v7().simple().to_string();
    // Writer `w`'s `i`th batch: the same events and versions on every side.
    let keel_op = Arc::new({
        let (store, tag) = (store.clone(), tag.clone());
        move |w: usize, i: usize| {
            let store = store.clone();
            let stream = StreamId::new(format!("Bench{tag}-{w}")).unwrap();
            async move {
                let events = (0..batch).map(|k| event(i * batch + k)).collect();
                let expected = ExpectedVersion::Exact(Version::new((i * batch) as u64));
                store.append(&stream, expected, events).await.unwrap();
            }
        }
    });
    let raw_op = |table: Baseline| {
        let pool = pool.clone();
        let tag = tag.clone();
        Arc::new(move |w: usize, i: usize| {
            let pool = pool.clone();
            let stream = format!("Raw{tag}-{w}");
            async move {
                let rows: Vec<RawRow> = (0..batch)
                    .map(|k| raw_row(&stream, (i * batch + k + 1) as i64, i * batch + k))
                    .collect();
                raw_insert(&pool, &rows, table).await;
            }
        })
    };
    let (table_op, minimal_op) = (raw_op(Baseline::KeelTable), raw_op(Baseline::Minimal));
    let per_round = per_writer.div_ceil(APPEND_ROUNDS);
    let mut sides = [Stats::default(), Stats::default(), Stats::default()];
    for round in 0..APPEND_ROUNDS {
        let ops = (round * per_round).min(per_writer)..((round + 1) * per_round).min(per_writer);
        if ops.is_empty() {
            break;
        }
        for k in 0..3 {
            let side = (round + k) % 3;
            let stats = match side {
                0 => run_writers(writers, ops.clone(), batch, keel_op.clone()).await,
                1 => run_writers(writers, ops.clone(), batch, table_op.clone()).await,
                _ => run_writers(writers, ops.clone(), batch, minimal_op.clone()).await,
            };
            sides[side].merge(stats);
        }
    }
    let [mut keel, table, mut minimal] = sides;
    let ms = |d: std::time::Duration| format!("{:.2}", d.as_secs_f64() * 1000.0);
    println!(
        "| {name} | {:.0} | {} / {} | {:.0} | {:.2}x | {:.0} | {} / {} | **{:.2}x** |",
        keel.rate(),
        ms(keel.pct(0.5)),
        ms(keel.pct(0.99)),
        table.rate(),
        keel.rate() / table.rate(),
        minimal.rate(),
        ms(minimal.pct(0.5)),
        ms(minimal.pct(0.99)),
        keel.rate() / minimal.rate(),
    );
}

const RAW_COLUMNS: &str = "commit, position, event_id, stream_id, version, event_type, \
                           schema_version, payload::text, metadata::text, recorded_at";

type RawTuple = (
    i64,
    i64,
    uuid::Uuid,
    String,
    i64,
    String,
    i32,
    String,
    String,
    chrono::DateTime<chrono::Utc>,
);

async fn fill(store: &PostgresEventStore, prefix: &str, streams: usize, per_stream: usize) {
    let chunk = 1_000.min(per_stream);
    for s in 0..streams {
        let stream = StreamId::new(format!("{prefix}-{s}")).unwrap();
        let mut v = 0;
        while v < per_stream {
            let k = chunk.min(per_stream - v);
            let events = (v..v + k).map(event).collect();
            store
                .append(
                    &stream,
                    ExpectedVersion::Exact(Version::new(v as u64)),
                    events,
                )
                .await
                .unwrap();
            v += k;
        }
    }
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() {
    let db = TestDatabase::create(&keel_eventstore::MIGRATIONS)
        .await
        .unwrap();
    // Keel's own pool (keel_database's settings: no ping before a
    // connection is handed out), shared by Keel and the baselines.
    let units = keel_database::Database::connect(
        keel_database::DatabaseConfig::builder()
            .connect_options(db.connect_options())
            .min_connections(16)
            .max_connections(16)
            .build()
            .unwrap(),
    )
    .await
    .unwrap();
    let pool = units.pool().clone();
    sqlx::query(
        "CREATE TABLE bench_events (LIKE keel.events INCLUDING DEFAULTS INCLUDING IDENTITY \
         INCLUDING CONSTRAINTS INCLUDING INDEXES)",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(
        "CREATE TABLE bench_minimal (id bigserial PRIMARY KEY, stream_id text NOT NULL, \
         version bigint NOT NULL, payload json NOT NULL, UNIQUE (stream_id, version))",
    )
    .execute(&pool)
    .await
    .unwrap();
    let store = PostgresEventStore::new(pool.clone());
    let quiet = PostgresEventStore::with_config(
        pool.clone(),
        StoreConfig::default().notify_on_append(false),
    );
    let version: String = sqlx::query_scalar("SHOW server_version")
        .fetch_one(&pool)
        .await
        .unwrap();
    println!("PostgreSQL {version}, scale {}", scale());
    println!();
    println!(
        "| workload | keel events/s | keel p50 / p99 ms | INSERT into Keel's table events/s | ratio | minimal INSERT events/s | minimal p50 / p99 ms | ratio to minimal |"
    );
    println!("|---|---|---|---|---|---|---|---|");

    let only_reads = std::env::var("KEEL_BENCH_ONLY").is_ok_and(|v| v == "reads");
    if !only_reads {
        append_benches(&store, &quiet, &pool).await;
        println!();
        println!(
            "| workload | keel events/s | keel p50 / p99 ms | raw SQL events/s | raw p50 / p99 ms | ratio |"
        );
        println!("|---|---|---|---|---|---|");
    }
    if !std::env::var("KEEL_BENCH_ONLY").is_ok_and(|v| v == "appends") {
        read_benches(&store, &pool).await;
    }
    pool.close().await;
    units.close().await;
    drop(db);
}

async fn append_benches(store: &PostgresEventStore, quiet: &PostgresEventStore, pool: &PgPool) {
    // Warm up connections and caches.
    append_bench("warm-up (ignore)", store, pool, 4, n(100), 1).await;
    append_bench("append 1 event/tx, 1 writer", store, pool, 1, n(3_000), 1).await;
    append_bench("append 1 event/tx, 8 writers", store, pool, 8, n(1_000), 1).await;
    append_bench(
        "append 1 event/tx, 8 writers, NOTIFY off",
        quiet,
        pool,
        8,
        n(1_000),
        1,
    )
    .await;
    append_bench("append 50 events/tx, 1 writer", store, pool, 1, n(300), 50).await;
    append_bench("append 50 events/tx, 8 writers", store, pool, 8, n(60), 50).await;
}

async fn read_benches(store: &PostgresEventStore, pool: &PgPool) {
    let (store, pool) = (store.clone(), pool.clone());
    // Read one 1,000-event stream, many times.
    fill(&store, "ReadOne", 1, 1_000).await;
    let stream = StreamId::new("ReadOne-0").unwrap();
    let reps = n(60);
    let start = Instant::now();
    let mut lat = Vec::new();
    for _ in 0..reps {
        let t = Instant::now();
        let events: Vec<_> = store
            .read_stream(&stream, ReadStream::forward())
            .try_collect()
            .await
            .unwrap();
        assert_eq!(events.len(), 1_000);
        lat.push(t.elapsed());
    }
    let keel = Stats {
        events: reps * 1_000,
        elapsed: start.elapsed(),
        latencies: lat,
    };
    let sql =
        format!("SELECT {RAW_COLUMNS} FROM keel.events WHERE stream_id = $1 ORDER BY version");
    let start = Instant::now();
    let mut lat = Vec::new();
    for _ in 0..reps {
        let t = Instant::now();
        let rows: Vec<RawTuple> = sqlx::query_as(&sql)
            .bind("ReadOne-0")
            .fetch_all(&pool)
            .await
            .unwrap();
        assert_eq!(rows.len(), 1_000);
        lat.push(t.elapsed());
    }
    let raw = Stats {
        events: reps * 1_000,
        elapsed: start.elapsed(),
        latencies: lat,
    };
    report("read a 1,000-event stream", keel, raw);

    // Read 100,000 events of the global log.
    let global = n(100_000);
    fill(&store, "Global", 100, global.div_ceil(100)).await;
    // One warm-up round, then KEEL_BENCH_READ_ROUNDS (default 9) measured
    // ones. A single 100,000-event read takes a fraction of a second, and
    // on two cores shared by client and server one round's ratio swings by
    // ±0.15: the median of several is the figure to quote.
    let rounds: usize = std::env::var("KEEL_BENCH_READ_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(9);
    let mut rates: Vec<(f64, f64)> = Vec::with_capacity(rounds);
    for round in 0..=rounds {
        let start = Instant::now();
        let count = store
            .read_all(ReadAll::from_start().limit(global as u64))
            .try_fold(0usize, |c, _| async move { Ok(c + 1) })
            .await
            .unwrap();
        let keel = Stats {
            events: count,
            elapsed: start.elapsed(),
            latencies: Vec::new(),
        };
        let sql =
            format!("SELECT {RAW_COLUMNS} FROM keel.events ORDER BY commit, position LIMIT $1");
        let start = Instant::now();
        let rows: Vec<RawTuple> = sqlx::query_as(&sql)
            .bind(global as i64)
            .fetch_all(&pool)
            .await
            .unwrap();
        let events = rows.len();
        // Freeing the rows is part of reading them, as it is on Keel's side
        // (each event is dropped as the count moves on).
        drop(rows);
        let raw = Stats {
            events,
            elapsed: start.elapsed(),
            latencies: Vec::new(),
        };
        if round > 0 {
            rates.push((keel.rate(), raw.rate()));
        }
    }
    report_median(&format!("read {global} global events"), &rates);

    // Peak memory while reading 1,000,000 events of the global log.
    let million = n(1_000_000);
    let have: i64 = sqlx::query_scalar("SELECT count(*) FROM keel.events")
        .fetch_one(&pool)
        .await
        .unwrap();
    let missing = million.saturating_sub(have as usize);
    if missing > 0 {
        fill(
            &store,
            "Million",
            missing.div_ceil(10_000),
            10_000.min(missing),
        )
        .await;
    }
    let before = rss_kib();
    let mut peak = before;
    let start = Instant::now();
    let mut stream = store.read_all(ReadAll::from_start().limit(million as u64));
    let mut count = 0usize;
    while let Some(e) = stream.next().await {
        e.unwrap();
        count += 1;
        if count.is_multiple_of(10_000) {
            peak = peak.max(rss_kib());
        }
    }
    let elapsed = start.elapsed();
    println!();
    println!(
        "Read {count} global events in {:.1} s ({:.0} events/s); RSS before {} KiB, peak during the read {} KiB (+{} KiB).",
        elapsed.as_secs_f64(),
        count as f64 / elapsed.as_secs_f64(),
        before,
        peak,
        peak.saturating_sub(before)
    );
}
