//! Outbox benchmarks, against a real PostgreSQL and Keel's in-memory bus.
//!
//! * `relay_throughput`: events per second from committed outbox rows to the
//!   bus (claim, publish, mark), with one relay and with four relays sharing
//!   the outbox, over rows spread across 100 aggregates.
//! * `commit_to_publish`: the time from a writer's `COMMIT` returning to the
//!   relay handing the message to the bus, with the relay idle and woken by
//!   `LISTEN/NOTIFY` (polling is set to 10 s, so a wake-up by polling would
//!   show). Prints p50, p90, p99 and max over 1000 sequential commits.
//!
//! Run with `cargo bench -p keel-outbox`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use criterion::{Criterion, Throughput};
use keel_core::uow::TransactionSource;
use keel_core::{EventId, EventPublisher, Message};
use keel_eventbus::InMemoryBus;
use keel_outbox::{Outbox, OutboxMessage, PgOutbox, Relay, RelayConfig};
use keel_testkit::TestDatabase;
use serde_json::json;
use sqlx::PgPool;
use tokio::sync::mpsc;

const ROWS: usize = 2_000;
const AGGREGATES: usize = 100;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn event(aggregate: usize, seq: usize) -> OutboxMessage {
    OutboxMessage::new(
        "orders",
        "Order",
        format!("o-{aggregate}"),
        Message::new(
            "order.changed",
            json!({ "order": aggregate, "seq": seq, "note": "a small payload" }),
        ),
    )
}

/// A `keel_database::Database` on the same database as `pool`.
fn database_of(pool: &PgPool) -> keel_database::Database {
    keel_database::Database::connect_lazy(
        keel_database::DatabaseConfig::builder()
            .connect_options((*pool.connect_options()).clone())
            .min_connections(0)
            .max_connections(8)
            .build()
            .unwrap(),
    )
}

async fn fill(pool: &PgPool, rows: usize) {
    let writer = PgOutbox::new();
    let db = database_of(pool);
    let messages: Vec<_> = (0..rows).map(|i| event(i % AGGREGATES, i)).collect();
    for chunk in messages.chunks(500) {
        let mut tx = TransactionSource::begin(&db).await.unwrap();
        writer.within(&mut *tx).write_all(chunk).await.unwrap();
        tx.commit().await.unwrap();
    }
}

async fn drain(relays: &[Relay]) {
    let tasks: Vec<_> = relays
        .iter()
        .map(|relay| async move {
            let mut idle = 0;
            // Two empty claims in a row: the others hold what is left, or
            // nothing is left.
            while idle < 2 {
                if relay.relay_once().await.unwrap().claimed == 0 {
                    idle += 1;
                    tokio::task::yield_now().await;
                } else {
                    idle = 0;
                }
            }
        })
        .collect();
    futures::future::join_all(tasks).await;
}

fn relay_throughput(c: &mut Criterion) {
    let rt = runtime();
    let db = rt
        .block_on(TestDatabase::create(&keel_outbox::MIGRATIONS))
        .unwrap();
    let pool = db.pool().clone();
    let bus: Arc<dyn EventPublisher> = Arc::new(InMemoryBus::new());

    let mut group = c.benchmark_group("relay_throughput");
    group.throughput(Throughput::Elements(ROWS as u64));
    group.sample_size(10);
    for (name, relays, batch) in [
        ("1_relay_batch_100", 1, 100),
        ("4_relays_batch_100", 4, 100),
        ("1_relay_batch_500", 1, 500),
    ] {
        let relays: Vec<Relay> = (0..relays)
            .map(|_| {
                let config = RelayConfig::default()
                    .with_batch_size(batch)
                    .with_scan_window(batch * 10)
                    .with_retention(Duration::ZERO);
                Relay::new(pool.clone(), bus.clone(), config).unwrap()
            })
            .collect();
        group.bench_function(name, |b| {
            b.to_async(&rt).iter_custom(|iters| {
                let pool = pool.clone();
                let relays = &relays;
                async move {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        fill(&pool, ROWS).await;
                        let start = Instant::now();
                        drain(relays).await;
                        total += start.elapsed();
                        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM keel.outbox")
                            .fetch_one(&pool)
                            .await
                            .unwrap();
                        assert_eq!(left, 0, "the relays drained the outbox");
                    }
                    total
                }
            });
        });
    }
    group.finish();
}

/// Forwards to the bus and reports when each message was handed over.
struct Stamp {
    bus: InMemoryBus,
    sent: mpsc::UnboundedSender<(EventId, Instant)>,
}

#[async_trait]
impl EventPublisher for Stamp {
    async fn publish(&self, topic: &str, messages: &[Message]) -> keel_core::Result<()> {
        self.bus.publish(topic, messages).await?;
        let now = Instant::now();
        for m in messages {
            let _ = self.sent.send((m.event_id, now));
        }
        Ok(())
    }
}

fn commit_to_publish() {
    const SAMPLES: usize = 1_000;
    let rt = runtime();
    rt.block_on(async {
        let db = TestDatabase::create(&keel_outbox::MIGRATIONS).await.unwrap();
        let (sent, mut stamps) = mpsc::unbounded_channel();
        let publisher = Arc::new(Stamp { bus: InMemoryBus::new(), sent });
        let config = RelayConfig::default().with_poll_interval(Duration::from_secs(10));
        let relay = Relay::new(db.pool().clone(), publisher, config).unwrap().spawn();
        tokio::time::sleep(Duration::from_millis(500)).await; // listener connected

        let writer = PgOutbox::new();
        let units = database_of(db.pool());
        let mut latencies = Vec::with_capacity(SAMPLES);
        let mut early: HashMap<EventId, Instant> = HashMap::new();
        for i in 0..SAMPLES {
            let message = event(i % AGGREGATES, i);
            let id = message.message().event_id;
            let mut tx = TransactionSource::begin(&units).await.unwrap();
            writer.within(&mut *tx).write(&message).await.unwrap();
            tx.commit().await.unwrap();
            let committed = Instant::now();
            let published = loop {
                if let Some(at) = early.remove(&id) {
                    break at;
                }
                let (got, at) = stamps.recv().await.unwrap();
                if got == id {
                    break at;
                }
                early.insert(got, at);
            };
            // The relay can publish before `commit` returns to the writer.
            latencies.push(published.saturating_duration_since(committed));
        }
        relay.shutdown().await;

        latencies.sort();
        let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
        let line = format!(
            "commit_to_publish (LISTEN/NOTIFY, {SAMPLES} sequential commits): p50 {:?}  p90 {:?}  p99 {:?}  max {:?}",
            pct(0.50),
            pct(0.90),
            pct(0.99),
            latencies[latencies.len() - 1]
        );
        eprintln!("{line}");
    });
}

fn main() {
    let mut criterion = Criterion::default().configure_from_args();
    relay_throughput(&mut criterion);
    criterion.final_summary();
    commit_to_publish();
}
