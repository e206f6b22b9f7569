//! What exactly-once projection costs, against the at-least-once way in the
//! same run on the same database: a `Subscription` whose handler inserts one
//! row per event in autocommit (its checkpoint stored every 100 events, so a
//! crash may insert rows twice), versus a `ProjectionRunner` inserting the
//! same rows through its unit of work with the checkpoint.
//!
//! Run with `cargo bench -p keel-eventstore --bench projections`.
//! `KEEL_BENCH_SCALE` (default 1.0) scales the number of events. Results are
//! printed as Markdown; docs/projections.md records them.

#![allow(clippy::print_stdout, reason = "a benchmark reports on stdout")]
#![allow(missing_docs, reason = "a benchmark binary")]

use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_core::uow::{Transaction, TransactionSource};
use keel_core::{BoxError, ExpectedVersion, Position, StreamId};
use keel_database::{Database, DatabaseConfig, UnitOfWork};
use keel_eventstore::{
    Appender, NewEvent, PostgresEventStore, Projection, ProjectionId, ProjectionOptions,
    ProjectionRunner, RecordedEvent, Subscription, SubscriptionHandler, SubscriptionOptions,
};
use keel_testkit::TestDatabase;
use sqlx::PgPool;

fn events() -> usize {
    let scale: f64 = std::env::var("KEEL_BENCH_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0);
    ((20_000.0 * scale) as usize).max(100)
}

fn n_of(event: &RecordedEvent) -> i64 {
    event
        .payload_value()
        .ok()
        .and_then(|v| v["n"].as_i64())
        .unwrap_or(-1)
}

/// At least once: one autocommit INSERT per event.
struct Autocommit {
    pool: PgPool,
    table: String,
}

#[async_trait::async_trait]
impl SubscriptionHandler for Autocommit {
    async fn handle(&self, event: &RecordedEvent) -> Result<(), BoxError> {
        sqlx::query(&format!(
            "INSERT INTO {} (stream_id, n) VALUES ($1, $2)",
            self.table
        ))
        .bind(event.stream_id.as_str())
        .bind(n_of(event))
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}

/// Exactly once: the same INSERT through the runner's unit of work.
struct InUnitOfWork {
    table: String,
}

#[async_trait::async_trait]
impl Projection for InUnitOfWork {
    async fn apply(&self, event: &RecordedEvent, tx: &mut dyn Transaction) -> Result<(), BoxError> {
        let uow = UnitOfWork::join(tx)?;
        sqlx::query(&format!(
            "INSERT INTO {} (stream_id, n) VALUES ($1, $2)",
            self.table
        ))
        .bind(event.stream_id.as_str())
        .bind(n_of(event))
        .execute(uow.conn())
        .await?;
        Ok(())
    }
}

async fn table(pool: &PgPool, name: &str) {
    sqlx::query(&format!(
        "CREATE TABLE {name} (stream_id text NOT NULL, n bigint NOT NULL)"
    ))
    .execute(pool)
    .await
    .unwrap();
}

async fn rows(pool: &PgPool, name: &str) -> i64 {
    sqlx::query_scalar(&format!("SELECT count(*) FROM {name}"))
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn subscription(
    store: &Arc<PostgresEventStore>,
    pool: &PgPool,
    tag: &str,
    total: usize,
) -> Duration {
    let name = format!("rm_sub_{tag}");
    table(pool, &name).await;
    let start = Instant::now();
    let mut handle = Subscription::spawn(
        store.clone(),
        SubscriptionOptions::new(name.clone()).poll_interval(Duration::from_millis(20)),
        Autocommit {
            pool: pool.clone(),
            table: name.clone(),
        },
    );
    handle.wait_for(|s| s.handled >= total as u64).await;
    let took = start.elapsed();
    handle.shutdown().await.unwrap();
    assert_eq!(rows(pool, &name).await, total as i64);
    took
}

async fn projection(
    store: &Arc<PostgresEventStore>,
    units: &Arc<dyn TransactionSource>,
    pool: &PgPool,
    tag: &str,
    batch: u64,
    last: Position,
    total: usize,
) -> Duration {
    let name = format!("rm_proj_{tag}");
    table(pool, &name).await;
    let start = Instant::now();
    let mut handle = ProjectionRunner::spawn(
        store.clone(),
        units.clone(),
        ProjectionOptions::new(ProjectionId::new(name.clone(), 1).unwrap())
            .batch_size(batch)
            .poll_interval(Duration::from_millis(20)),
        InUnitOfWork {
            table: name.clone(),
        },
    );
    handle.wait_for(|s| s.position == Some(last)).await;
    let took = start.elapsed();
    handle.shutdown().await.unwrap();
    assert_eq!(rows(pool, &name).await, total as i64);
    took
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main]
async fn main() {
    let db = TestDatabase::create(&keel_eventstore::MIGRATIONS)
        .await
        .expect("test database");
    let pool = db.pool().clone();
    let store = Arc::new(PostgresEventStore::new(pool.clone()));
    let units: Arc<dyn TransactionSource> = Arc::new(Database::connect_lazy(
        DatabaseConfig::builder()
            .connect_options(db.connect_options())
            .min_connections(0)
            .max_connections(10)
            .build()
            .unwrap(),
    ));
    let total = events();
    let mut last = Position::START;
    for chunk in 0..total.div_ceil(100) {
        let stream = StreamId::new(format!("Bench-{}", chunk % 100)).unwrap();
        let batch: Vec<NewEvent> = (chunk * 100..((chunk + 1) * 100).min(total))
            .map(|i| NewEvent::from_json("bench.happened", &serde_json::json!({ "n": i })))
            .collect();
        let r = store
            .append(&stream, ExpectedVersion::Any, batch)
            .await
            .unwrap();
        last = *r.positions.last().unwrap();
    }

    let rounds = 3;
    let mut base = Vec::new();
    let mut batched = Vec::new();
    let mut single = Vec::new();
    for round in 0..rounds {
        let b = subscription(&store, &pool, &format!("r{round}"), total).await;
        let p = projection(
            &store,
            &units,
            &pool,
            &format!("b{round}"),
            100,
            last,
            total,
        )
        .await;
        let s = projection(&store, &units, &pool, &format!("s{round}"), 1, last, total).await;
        let rate = |d: Duration| total as f64 / d.as_secs_f64();
        base.push(rate(b));
        batched.push(rate(p));
        single.push(rate(s));
    }
    let b = median(base);
    println!(
        "Projecting {total} events into a table, one INSERT per event (median of {rounds} rounds):"
    );
    println!();
    println!("| way | events/s | vs. baseline |");
    println!("|---|---|---|");
    println!(
        "| baseline: `Subscription`, autocommit INSERT per event (at least once) | {b:.0} | 1.00x |"
    );
    let p = median(batched);
    println!(
        "| `ProjectionRunner`, 100 events per unit of work (exactly once) | {p:.0} | {:.2}x |",
        p / b
    );
    let s = median(single);
    println!(
        "| `ProjectionRunner`, 1 event per unit of work (exactly once) | {s:.0} | {:.2}x |",
        s / b
    );
}
