//! How far a live subscription lags behind appends, with no foreign
//! transaction open and with long foreign transactions open (one in another
//! database, running `BEGIN; SELECT txid_current(); SELECT pg_sleep(..)`,
//! and one in the store's own database that holds a transaction id and has
//! written a row but never appends). Then what the commit key costs an
//! append, old scheme against new, in the same run.
//!
//! Run with `cargo bench -p keel-eventstore --bench horizon_lag`.
//! `KEEL_LAG_SECS` (default 20; 0 skips the lag phases) is how long each
//! phase appends
//! (`KEEL_LAG_HELD_SECS` overrides it for the phase with the foreign
//! transactions open),
//! `KEEL_LAG_RATE` (default 50) how many single-event appends a second,
//! `KEEL_LAG_AB_APPENDS` (default 2000) how many appends each side of the
//! append comparison makes per round, `KEEL_LAG_AB_ROUNDS` (default 5) how
//! many rounds. The server is the test kit's
//! (`DATABASE_URL` chooses another). Results are printed as Markdown;
//! docs/benchmarks-eventstore.md records them.

#![allow(clippy::print_stdout, reason = "a benchmark reports on stdout")]
#![allow(missing_docs, reason = "a benchmark binary")]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use keel_core::{ExpectedVersion, StreamId};
use keel_eventstore::{
    Appender, NewEvent, PostgresEventStore, RecordedEvent, Subscription, SubscriptionHandler,
    SubscriptionOptions,
};
use keel_testkit::TestDatabase;
use serde_json::json;
use sqlx::{Connection, PgConnection};

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Records, for each event of its phase, the time from the start of its
/// append to its delivery.
#[derive(Clone)]
struct LagMeter {
    stream: String,
    sent: Arc<Mutex<HashMap<u64, Instant>>>,
    lags: Arc<Mutex<Vec<Duration>>>,
}

#[async_trait]
impl SubscriptionHandler for LagMeter {
    async fn handle(&self, event: &RecordedEvent) -> Result<(), keel_core::BoxError> {
        if event.stream_id.as_str() != self.stream {
            return Ok(());
        }
        let n = event.payload_value()?["n"].as_u64().unwrap_or(u64::MAX);
        if let Some(at) = self.sent.lock().unwrap().remove(&n) {
            self.lags.lock().unwrap().push(at.elapsed());
        }
        Ok(())
    }
}

struct Lag {
    events: usize,
    p50: Duration,
    p99: Duration,
    max: Duration,
}

fn quantile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Appends `secs * rate` single events to a stream of its own at `rate` a
/// second while a subscription (default options) tails the log, and returns
/// the delivery lags.
async fn measure(store: &Arc<PostgresEventStore>, phase: &str, secs: u64, rate: u64) -> Lag {
    let meter = LagMeter {
        stream: format!("Lag-{phase}"),
        sent: Arc::default(),
        lags: Arc::default(),
    };
    let mut handle = Subscription::spawn(
        store.clone(),
        SubscriptionOptions::new(format!("lag-{phase}")),
        meter.clone(),
    );
    tokio::time::timeout(Duration::from_secs(30), handle.wait_for(|s| s.leader))
        .await
        .expect("the subscription leads");
    let stream = StreamId::new(meter.stream.clone()).unwrap();
    let total = secs * rate;
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    for n in 0..total {
        tick.tick().await;
        meter.sent.lock().unwrap().insert(n, Instant::now());
        store
            .append(
                &stream,
                ExpectedVersion::Any,
                vec![NewEvent::from_json("lag.probe", &json!({ "n": n }))],
            )
            .await
            .unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while meter.lags.lock().unwrap().len() < total as usize && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    handle.shutdown().await.unwrap();
    let mut lags = meter.lags.lock().unwrap().clone();
    lags.sort_unstable();
    let undelivered = total as usize - lags.len();
    assert_eq!(
        undelivered, 0,
        "{undelivered} events were not delivered within 2 min"
    );
    Lag {
        events: lags.len(),
        p50: quantile(&lags, 0.5),
        p99: quantile(&lags, 0.99),
        max: lags.last().copied().unwrap_or_default(),
    }
}

/// Whether the backend `pid` still has a transaction id assigned.
async fn holds_xid(conn: &mut PgConnection, pid: i32) -> bool {
    sqlx::query_scalar::<_, bool>(
        "SELECT backend_xid IS NOT NULL FROM pg_stat_activity WHERE pid = $1",
    )
    .bind(pid)
    .fetch_optional(&mut *conn)
    .await
    .unwrap()
    .unwrap_or(false)
}

fn row(name: &str, lag: &Lag) {
    println!(
        "| {name} | {} | {:.1} | {:.1} | {:.1} |",
        lag.events,
        lag.p50.as_secs_f64() * 1e3,
        lag.p99.as_secs_f64() * 1e3,
        lag.max.as_secs_f64() * 1e3,
    );
}

#[tokio::main]
async fn main() {
    let secs: u64 = env_or("KEEL_LAG_SECS", 20);
    let held_secs: u64 = env_or("KEEL_LAG_HELD_SECS", secs);
    let rate: u64 = env_or("KEEL_LAG_RATE", 50);
    if secs > 0 {
        lag(secs, held_secs, rate).await;
    }
    append_cost().await;
}

/// The lag phases: without, then with, the foreign transactions open.
async fn lag(secs: u64, held_secs: u64, rate: u64) {
    let db = TestDatabase::create(&keel_eventstore::MIGRATIONS)
        .await
        .expect("a test database");
    let store = Arc::new(PostgresEventStore::new(db.pool().clone()));
    let version: String = sqlx::query_scalar("SHOW server_version")
        .fetch_one(db.pool())
        .await
        .unwrap();
    println!(
        "PostgreSQL {version}, {secs} s without and {held_secs} s with the foreign \
         transactions, {rate} appends/s"
    );
    println!();

    let quiet = measure(&store, "quiet", secs, rate).await;

    // The foreign transactions. One in database `postgres`, exactly as the
    // issue's reproducer; one in this database, holding an xid and a row.
    let mut admin_opts = db.connect_options();
    admin_opts = admin_opts.database("postgres");
    let mut sleeper = PgConnection::connect_with(&admin_opts).await.unwrap();
    let sleeper_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut sleeper)
        .await
        .unwrap();
    let sleep_for = held_secs + 120;
    let sleeping = tokio::spawn(async move {
        sqlx::query("BEGIN").execute(&mut sleeper).await.unwrap();
        sqlx::query("SELECT txid_current()")
            .execute(&mut sleeper)
            .await
            .unwrap();
        // Cancelled at the end of the phase; the error is expected.
        let _ = sqlx::query(&format!("SELECT pg_sleep({sleep_for})"))
            .execute(&mut sleeper)
            .await;
        let _ = sqlx::query("ROLLBACK").execute(&mut sleeper).await;
    });
    let mut local = PgConnection::connect_with(&db.connect_options())
        .await
        .unwrap();
    sqlx::query("CREATE TABLE lag_side (x int)")
        .execute(&mut local)
        .await
        .unwrap();
    sqlx::query("BEGIN").execute(&mut local).await.unwrap();
    sqlx::query("INSERT INTO lag_side VALUES (1)")
        .execute(&mut local)
        .await
        .unwrap();
    let local_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut local)
        .await
        .unwrap();
    let mut watch = PgConnection::connect_with(&db.connect_options())
        .await
        .unwrap();
    let opened = Instant::now();
    while !holds_xid(&mut watch, sleeper_pid).await {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(holds_xid(&mut watch, local_pid).await);
    let old_horizon_before: i64 =
        sqlx::query_scalar("SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint")
            .fetch_one(&mut watch)
            .await
            .unwrap();

    let held = measure(&store, "foreign", held_secs, rate).await;

    let still_open =
        holds_xid(&mut watch, sleeper_pid).await && holds_xid(&mut watch, local_pid).await;
    let old_horizon_after: i64 =
        sqlx::query_scalar("SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint")
            .fetch_one(&mut watch)
            .await
            .unwrap();
    let open_for = opened.elapsed();
    sqlx::query("SELECT pg_cancel_backend($1)")
        .bind(sleeper_pid)
        .execute(&mut watch)
        .await
        .unwrap();
    sqlx::query("ROLLBACK").execute(&mut local).await.unwrap();
    sleeping.await.unwrap();

    println!("## Subscription lag (append start to delivery), ms");
    println!();
    println!("| phase | events | p50 | p99 | max |");
    println!("|---|---|---|---|---|");
    row("no foreign transaction", &quiet);
    row("two foreign transactions open", &held);
    println!();
    println!(
        "Foreign transactions open for {:.0} s, still holding their xids at the end: \
         {still_open}; the old (cluster-wide) horizon stayed at {old_horizon_before} \
         -> {old_horizon_after}. p99 added: {:+.1} ms.",
        open_for.as_secs_f64(),
        (held.p99.as_secs_f64() - quiet.p99.as_secs_f64()) * 1e3,
    );
    println!();
}

/// Single-event append statements of the fast path's shape, the commit key
/// taken the old way (the transaction id, `keel.current_commit()`) and the
/// new way (`keel.next_commit()`), alternating in rounds on one connection
/// each; plus the cost of reading each horizon.
async fn append_cost() {
    let appends: usize = env_or("KEEL_LAG_AB_APPENDS", 2000);
    let rounds: usize = env_or("KEEL_LAG_AB_ROUNDS", 5);
    let db = TestDatabase::create(&keel_eventstore::MIGRATIONS)
        .await
        .expect("a test database");
    let statement = |key: &str| {
        format!(
            "WITH s AS (SELECT coalesce(max(version), 0) AS prev FROM keel.events \
                        WHERE stream_id = $1), \
             ins AS (INSERT INTO keel.events \
                       (commit, event_id, stream_id, version, event_type, schema_version, \
                        payload, metadata) \
                     SELECT {key}, $2, $1, s.prev + 1, 'order.line_added', 1, $3::json, \
                            $4::json FROM s RETURNING position, commit, version) \
             SELECT array_agg(position), array_agg(commit) FROM ins"
        )
    };
    let old = Arc::new(statement("keel.current_commit()"));
    let new = Arc::new(statement("(SELECT keel.next_commit())"));
    let payload = Arc::new(
        json!({ "order_id": "0190a6f2-7c1e-7d3a-9b1f-000000000001", "sku": "SKU-12345",
                "quantity": 3, "price_cents": 1999, "note": "leave at the door" })
        .to_string(),
    );
    let metadata = Arc::new(json!({ "actor": "bench" }).to_string());
    for writers in [1usize, 8] {
        let mut conns = Vec::new();
        for _ in 0..writers {
            conns.push(
                PgConnection::connect_with(&db.connect_options())
                    .await
                    .unwrap(),
            );
        }
        let mut rates: Vec<(f64, f64)> = Vec::new();
        for round in 0..=rounds {
            let mut pair = [0.0f64; 2];
            for (side, sql) in [(0usize, &old), (1, &new)] {
                let started = Instant::now();
                let mut tasks = Vec::new();
                for (w, mut conn) in conns.drain(..).enumerate() {
                    let (sql, payload, metadata) = (sql.clone(), payload.clone(), metadata.clone());
                    let stream = format!("Ab-{writers}-{round}-{side}-{w}");
                    let per_writer = appends / writers;
                    tasks.push(tokio::spawn(async move {
                        for _ in 0..per_writer {
                            sqlx::query(&sql)
                                .bind(&stream)
                                .bind(uuid::Uuid::now_v7())
                                .bind(payload.as_str())
                                .bind(metadata.as_str())
                                .execute(&mut conn)
                                .await
                                .unwrap();
                        }
                        conn
                    }));
                }
                for t in tasks {
                    conns.push(t.await.unwrap());
                }
                pair[side] = (appends / writers * writers) as f64 / started.elapsed().as_secs_f64();
            }
            // Round 0 warms up.
            if round > 0 {
                rates.push((pair[0], pair[1]));
            }
        }
        report_ab(writers, rounds, &rates);
    }
    let mut conn = conns_for_horizon(&db).await;
    let calls = 2000;
    let mut per_call = Vec::new();
    for sql in [
        "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint",
        "SELECT keel.commit_horizon()",
    ] {
        let started = Instant::now();
        for _ in 0..calls {
            sqlx::query(sql).execute(&mut conn).await.unwrap();
        }
        per_call.push(started.elapsed().as_secs_f64() * 1e6 / calls as f64);
    }
    println!(
        "Horizon read, one round trip each: old {:.0} µs, new {:.0} µs per call.",
        per_call[0], per_call[1]
    );
}

/// One table of an append comparison: median rates and ratio of the rounds.
fn report_ab(writers: usize, rounds: usize, rates: &[(f64, f64)]) {
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let ratios: Vec<f64> = rates.iter().map(|(o, n)| n / o).collect();
    println!("## Single-event append, commit key old way vs new way ({writers} connections)");
    println!();
    println!("| key | appends/s (median of {rounds} rounds) |");
    println!("|---|---|");
    println!(
        "| xid (`keel.current_commit()`, before) | {:.0} |",
        median(rates.iter().map(|r| r.0).collect())
    );
    println!(
        "| sequence + locks (`keel.next_commit()`, after) | {:.0} |",
        median(rates.iter().map(|r| r.1).collect())
    );
    println!(
        "| ratio after / before | {:.3}x (rounds {:.3}x-{:.3}x) |",
        median(ratios.clone()),
        ratios.iter().copied().fold(f64::MAX, f64::min),
        ratios.iter().copied().fold(f64::MIN, f64::max),
    );
    println!();
}

async fn conns_for_horizon(db: &TestDatabase) -> PgConnection {
    PgConnection::connect_with(&db.connect_options())
        .await
        .unwrap()
}
