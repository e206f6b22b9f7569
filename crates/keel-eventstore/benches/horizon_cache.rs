//! What sharing one read horizon among a store's readers saves: eight
//! readers poll one `PostgresEventStore` while a writer appends, each woken
//! after every append (as a notified subscription is) and reading what is
//! new with `read_all`. Two sides, interleaved round by round in the same
//! run on the same database:
//!
//! * **per batch** (`horizon_max_age(ZERO)`, the behaviour before the
//!   shared horizon): every batch computes `keel.commit_horizon()` in its
//!   own transaction;
//! * **shared** (the default, 5 ms): one computation serves every reader
//!   whose batch starts within that age.
//!
//! Reported per side: horizon computations per second
//! (`PostgresEventStore::horizon_scans`), the latency of one poll (one
//! `read_all` call, start to end of stream) and the delivery lag (start of
//! the append to a reader having the event), p50 and p99.
//!
//! Run with `cargo bench -p keel-eventstore --bench horizon_cache`.
//! `KEEL_HC_READERS` (default 8), `KEEL_HC_RATE` (appends a second, default
//! 200), `KEEL_HC_SECS` (seconds per side per round, default 4),
//! `KEEL_HC_ROUNDS` (default 5). The server is the test kit's
//! (`DATABASE_URL` chooses another). docs/benchmarks-eventstore.md records
//! the results.

#![allow(clippy::print_stdout, reason = "a benchmark reports on stdout")]
#![allow(missing_docs, reason = "a benchmark binary")]

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use keel_core::{ExpectedVersion, Position, StreamId};
use keel_eventstore::{Appender, GlobalLog, NewEvent, PostgresEventStore, ReadAll, StoreConfig};
use keel_testkit::TestDatabase;
use serde_json::json;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The figures of one side in one round.
#[derive(Clone, Copy, Debug)]
struct Side {
    scans_per_sec: f64,
    poll_p50: Duration,
    poll_p99: Duration,
    lag_p50: Duration,
    lag_p99: Duration,
    polls: usize,
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v.sort_unstable();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

async fn last_position(store: &PostgresEventStore) -> Position {
    let row: Option<(i64, i64)> = sqlx::query_as(
        "SELECT commit, position FROM keel.events ORDER BY commit DESC, position DESC LIMIT 1",
    )
    .fetch_optional(store.pool())
    .await
    .unwrap();
    row.map_or(Position::START, |(c, p)| Position::new(c as u64, p as u64))
}

async fn run_side(
    db: &TestDatabase,
    max_age: Duration,
    readers: usize,
    rate: u64,
    secs: u64,
    round: usize,
) -> Side {
    let store = PostgresEventStore::with_config(
        db.pool().clone(),
        StoreConfig::default().horizon_max_age(max_age),
    );
    let start_at = last_position(&store).await;
    let sent: Arc<Mutex<HashMap<u64, Instant>>> = Arc::default();
    let wake = Arc::new(tokio::sync::Notify::new());
    let stop = Arc::new(AtomicBool::new(false));
    let total = rate * secs;
    let tag = format!("r{round}-{}", max_age.as_micros());

    let mut tasks = Vec::new();
    for _ in 0..readers {
        let store = store.clone();
        let sent = sent.clone();
        let wake = wake.clone();
        let stop = stop.clone();
        let tag = tag.clone();
        tasks.push(tokio::spawn(async move {
            let mut checkpoint = start_at;
            let mut polls = Vec::new();
            let mut lags = Vec::new();
            let mut seen = 0u64;
            while seen < total && !stop.load(Ordering::Relaxed) {
                // A notified subscription's wake-up, or its polling interval.
                let _ = tokio::time::timeout(Duration::from_millis(50), wake.notified()).await;
                let began = Instant::now();
                let read: Vec<_> = store
                    .read_all(ReadAll::after(checkpoint).page_size(500))
                    .try_collect()
                    .await
                    .unwrap();
                polls.push(began.elapsed());
                let now = Instant::now();
                for e in &read {
                    checkpoint = e.position;
                    let v = e.payload_value().unwrap();
                    if v["tag"] == tag.as_str() {
                        seen += 1;
                        let n = v["n"].as_u64().unwrap();
                        if let Some(at) = sent.lock().unwrap().get(&n) {
                            lags.push(now.duration_since(*at));
                        }
                    }
                }
            }
            (polls, lags)
        }));
    }

    let scans_before = store.horizon_scans();
    let began = Instant::now();
    let pause = Duration::from_secs_f64(1.0 / rate as f64);
    let mut next = tokio::time::Instant::now();
    for n in 0..total {
        next += pause;
        tokio::time::sleep_until(next).await;
        sent.lock().unwrap().insert(n, Instant::now());
        let stream = StreamId::new(format!("Hc-{}", n % 10)).unwrap();
        store
            .append(
                &stream,
                ExpectedVersion::Any,
                vec![NewEvent::from_json(
                    "hc.appended",
                    &json!({ "n": n, "tag": tag }),
                )],
            )
            .await
            .unwrap();
        wake.notify_waiters();
    }
    // Let the readers take the last events, then stop anyone still short.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !tasks.iter().all(|t| t.is_finished()) && Instant::now() < deadline {
        wake.notify_waiters();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.store(true, Ordering::Relaxed);
    wake.notify_waiters();
    let elapsed = began.elapsed();
    let scans = store.horizon_scans() - scans_before;
    let mut polls = Vec::new();
    let mut lags = Vec::new();
    for t in tasks {
        let (p, l) = t.await.unwrap();
        polls.extend(p);
        lags.extend(l);
    }
    assert_eq!(
        lags.len() as u64,
        total * readers as u64,
        "every reader got every event"
    );
    Side {
        scans_per_sec: scans as f64 / elapsed.as_secs_f64(),
        poll_p50: pct(&mut polls, 0.5),
        poll_p99: pct(&mut polls, 0.99),
        lag_p50: pct(&mut lags, 0.5),
        lag_p99: pct(&mut lags, 0.99),
        polls: polls.len(),
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn summary(name: &str, sides: &[Side]) {
    let med = |f: &dyn Fn(&Side) -> f64| {
        let mut v: Vec<f64> = sides.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        (v[v.len() / 2], v[0], v[v.len() - 1])
    };
    let cell = |(m, lo, hi): (f64, f64, f64), digits: usize| {
        format!("{m:.digits$} ({lo:.digits$}–{hi:.digits$})")
    };
    println!(
        "| {name} | {} | {} | {} | {} | {} |",
        cell(med(&|s| s.scans_per_sec), 0),
        cell(med(&|s| ms(s.poll_p50)), 2),
        cell(med(&|s| ms(s.poll_p99)), 2),
        cell(med(&|s| ms(s.lag_p50)), 2),
        cell(med(&|s| ms(s.lag_p99)), 2),
    );
}

#[tokio::main]
async fn main() {
    let readers: usize = env_or("KEEL_HC_READERS", 8);
    let rate: u64 = env_or("KEEL_HC_RATE", 200);
    let secs: u64 = env_or("KEEL_HC_SECS", 4);
    let rounds: usize = env_or("KEEL_HC_ROUNDS", 5);
    let db = TestDatabase::create(&keel_eventstore::MIGRATIONS)
        .await
        .expect("test database");
    let per_batch = Duration::ZERO;
    let shared = keel_eventstore::DEFAULT_HORIZON_MAX_AGE;
    // A short warm-up of both, not recorded.
    run_side(&db, per_batch, readers, rate, 1, 0).await;
    run_side(&db, shared, readers, rate, 1, 0).await;

    println!(
        "{readers} readers, one store, {rate} appends/s, {secs} s per side, \
         {rounds} rounds, sides alternating first\n"
    );
    println!(
        "| round | side | scans/s | poll p50 ms | poll p99 ms | lag p50 ms | lag p99 ms | polls |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let mut base = Vec::new();
    let mut subject = Vec::new();
    for round in 1..=rounds {
        let order: [(&str, Duration); 2] = if round % 2 == 1 {
            [("per batch", per_batch), ("shared", shared)]
        } else {
            [("shared", shared), ("per batch", per_batch)]
        };
        for (name, age) in order {
            let side = run_side(&db, age, readers, rate, secs, round).await;
            println!(
                "| {round} | {name} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {} |",
                side.scans_per_sec,
                ms(side.poll_p50),
                ms(side.poll_p99),
                ms(side.lag_p50),
                ms(side.lag_p99),
                side.polls,
            );
            if age.is_zero() {
                base.push(side);
            } else {
                subject.push(side);
            }
        }
    }
    println!("\nMedian over rounds (min–max):\n");
    println!("| side | scans/s | poll p50 ms | poll p99 ms | lag p50 ms | lag p99 ms |");
    println!("|---|---|---|---|---|---|");
    summary("per batch (before)", &base);
    summary("shared, 5 ms", &subject);
    let ratios: Vec<f64> = base
        .iter()
        .zip(&subject)
        .map(|(b, s)| b.scans_per_sec / s.scans_per_sec.max(f64::MIN_POSITIVE))
        .collect();
    println!("\nscans per second, per batch / shared, each round: {ratios:.1?}");
}
