//! Unit-of-work overhead against raw `sqlx` transactions, on the same
//! database in the same run, plus pool contention and the health check.
//!
//! Run with `cargo bench -p keel-database --bench database` (needs the
//! PostgreSQL the test kit finds). `KEEL_BENCH_SCALE` (default 1.0) shrinks
//! or grows every workload. Results are printed as a Markdown table.
//!
//! The last part prices the pool's release check (a connection given back
//! inside a transaction is closed): the same autocommit statements on a
//! plain sqlx pool and on a pool with the check, one caller and then many,
//! interleaved round by round.

#![allow(clippy::print_stdout, reason = "a benchmark reports on stdout")]
#![allow(missing_docs, reason = "a benchmark binary")]

use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_core::HealthCheck;
use keel_database::{Database, DatabaseConfig, DatabaseError, MIGRATIONS, TransactionOptions};
use keel_testkit::TestDatabase;
use sqlx::Executor;

fn iterations(base: usize) -> usize {
    let scale: f64 = std::env::var("KEEL_BENCH_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0);
    ((base as f64) * scale).max(1.0) as usize
}

/// A distinct key per workload and iteration (warm-up iterations count down
/// from `usize::MAX`, so they land below `base`).
fn id(base: i64, i: usize) -> i64 {
    base.wrapping_add(i as i64)
}

struct Report {
    name: &'static str,
    samples: Vec<Duration>,
}

impl Report {
    fn row(&mut self) -> String {
        self.samples.sort_unstable();
        let n = self.samples.len();
        let total: Duration = self.samples.iter().sum();
        let pct = |p: f64| self.samples[((n as f64 * p) as usize).min(n - 1)];
        format!(
            "| {} | {} | {:.1} | {:.1} | {:.1} |",
            self.name,
            n,
            total.as_secs_f64() * 1e6 / n as f64,
            pct(0.5).as_secs_f64() * 1e6,
            pct(0.99).as_secs_f64() * 1e6,
        )
    }
}

async fn measure<F, Fut>(name: &'static str, n: usize, mut op: F) -> Report
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    // Warm up connections and statement caches.
    for i in 0..n.min(50) {
        op(usize::MAX - i).await;
    }
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        let started = Instant::now();
        op(i).await;
        samples.push(started.elapsed());
    }
    Report { name, samples }
}

/// Measures a baseline and a candidate in alternation, so that load from
/// elsewhere on the machine hits both alike.
async fn compare<A, FutA, B, FutB>(
    baseline: &'static str,
    mut a: A,
    candidate: &'static str,
    mut b: B,
    n: usize,
) -> [Report; 2]
where
    A: FnMut(usize) -> FutA,
    FutA: std::future::Future<Output = ()>,
    B: FnMut(usize) -> FutB,
    FutB: std::future::Future<Output = ()>,
{
    for i in 0..n.min(50) {
        a(usize::MAX - i).await;
        b(usize::MAX - i).await;
    }
    let (mut sa, mut sb) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for i in 0..n {
        let started = Instant::now();
        a(i).await;
        sa.push(started.elapsed());
        let started = Instant::now();
        b(i).await;
        sb.push(started.elapsed());
    }
    [
        Report {
            name: baseline,
            samples: sa,
        },
        Report {
            name: candidate,
            samples: sb,
        },
    ]
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(run());
}

async fn run() {
    let test_db = TestDatabase::create(&MIGRATIONS)
        .await
        .expect("a PostgreSQL for the benchmark");
    let db = Database::connect(
        DatabaseConfig::builder()
            .connect_options(test_db.connect_options())
            .min_connections(4)
            .max_connections(8)
            .build()
            .expect("config"),
    )
    .await
    .expect("connect");
    db.pool()
        .execute("CREATE TABLE bench (id bigint PRIMARY KEY, note text NOT NULL)")
        .await
        .expect("table");
    let raw = db.pool().clone();
    let n = iterations(2_000);
    let mut reports = Vec::new();

    reports.extend(
        compare(
            "raw sqlx: BEGIN + COMMIT",
            |_| {
                let raw = raw.clone();
                async move {
                    let tx = raw.begin().await.unwrap();
                    tx.commit().await.unwrap();
                }
            },
            "UnitOfWork: begin + commit (with the aborted-transaction check)",
            |_| {
                let db = db.clone();
                async move {
                    let uow = db.begin().await.unwrap();
                    uow.commit().await.unwrap();
                }
            },
            n,
        )
        .await,
    );
    reports.extend(
        compare(
            "raw sqlx: INSERT in a transaction",
            |i| {
                let raw = raw.clone();
                async move {
                    let mut tx = raw.begin().await.unwrap();
                    sqlx::query("INSERT INTO bench VALUES ($1, 'raw')")
                        .bind(id(0, i))
                        .execute(&mut *tx)
                        .await
                        .unwrap();
                    tx.commit().await.unwrap();
                }
            },
            "Database::transaction: INSERT",
            |i| {
                let db = db.clone();
                async move {
                    db.transaction(|uow| {
                        Box::pin(async move {
                            sqlx::query("INSERT INTO bench VALUES ($1, 'uow')")
                                .bind(id(100_000_000, i))
                                .execute(uow.conn())
                                .await?;
                            Ok::<_, DatabaseError>(())
                        })
                    })
                    .await
                    .unwrap();
                }
            },
            n,
        )
        .await,
    );
    reports.push(
        measure("UnitOfWork: savepoint + release + commit", n, |_| {
            let db = db.clone();
            async move {
                let mut uow = db.begin().await.unwrap();
                let sp = uow.savepoint().await.unwrap();
                sp.commit().await.unwrap();
                uow.commit().await.unwrap();
            }
        })
        .await,
    );
    let serializable = TransactionOptions::serializable();
    reports.push(
        measure("Database::transaction SERIALIZABLE: read", n, |_| {
            let db = db.clone();
            let opts = serializable.clone();
            async move {
                db.transaction_with(&opts, |uow| {
                    Box::pin(async move {
                        let c: i64 = sqlx::query_scalar("SELECT count(*) FROM bench")
                            .fetch_one(uow.conn())
                            .await?;
                        Ok::<_, DatabaseError>(c)
                    })
                })
                .await
                .unwrap();
            }
        })
        .await,
    );
    let readiness = db.readiness_check();
    reports.push(
        measure("readiness check (SELECT 1)", n, |_| {
            let readiness = readiness.clone();
            async move {
                readiness.check().await;
            }
        })
        .await,
    );

    println!("| operation | iterations | mean µs | p50 µs | p99 µs |");
    println!("|---|---|---|---|---|");
    for mut r in reports {
        println!("{}", r.row());
    }

    // Contention: more tasks than connections; the pool statistics show how
    // long callers waited.
    let tasks = 32;
    let per_task = iterations(200);
    let before = db.stats();
    let started = Instant::now();
    let db = Arc::new(db);
    let handles: Vec<_> = (0..tasks)
        .map(|t| {
            let db = db.clone();
            tokio::spawn(async move {
                for i in 0..per_task {
                    let id = (1_000_000 + t * per_task + i) as i64;
                    db.transaction(|uow| {
                        Box::pin(async move {
                            sqlx::query("INSERT INTO bench VALUES ($1, 'contended')")
                                .bind(id)
                                .execute(uow.conn())
                                .await?;
                            Ok::<_, DatabaseError>(())
                        })
                    })
                    .await
                    .unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.await.unwrap();
    }
    let elapsed = started.elapsed();
    let after = db.stats();
    let acquires = after.acquires - before.acquires;
    let waited = after.acquire_wait_total - before.acquire_wait_total;
    println!();
    println!(
        "contention: {tasks} tasks x {per_task} transactions on {} connections: {:.0} tx/s, mean acquire wait {:.1} µs, longest {:.1} µs",
        after.max_connections,
        (tasks * per_task) as f64 / elapsed.as_secs_f64(),
        waited.as_secs_f64() * 1e6 / acquires.max(1) as f64,
        after.acquire_wait_max.as_secs_f64() * 1e6,
    );
    release_check_cost(&test_db).await;
}

/// Autocommit statements on a plain sqlx pool against the same on a pool
/// with the release check, both with 8 connections.
async fn release_check_cost(test_db: &TestDatabase) {
    let plain = sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .min_connections(8)
        .connect_with(test_db.connect_options())
        .await
        .expect("plain pool");
    let checked = keel_database::close_unclean_connections(
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(8)
            .min_connections(8),
    )
    .connect_with(test_db.connect_options())
    .await
    .expect("checked pool");
    let n = iterations(2_000);
    let mut reports = Vec::new();
    reports.extend(
        compare(
            "plain sqlx pool: autocommit SELECT, one caller",
            |_| {
                let pool = plain.clone();
                async move {
                    sqlx::query("SELECT 1").execute(&pool).await.unwrap();
                }
            },
            "pool with the release check: the same",
            |_| {
                let pool = checked.clone();
                async move {
                    sqlx::query("SELECT 1").execute(&pool).await.unwrap();
                }
            },
            n,
        )
        .await,
    );
    println!();
    println!("| operation | iterations | mean µs | p50 µs | p99 µs |");
    println!("|---|---|---|---|---|");
    for mut r in reports {
        println!("{}", r.row());
    }

    // Many callers on 8 connections: the check keeps each connection away
    // from the pool for one more round trip.
    let tasks = 32;
    let per_task = iterations(200);
    let throughput = |pool: sqlx::PgPool| async move {
        let started = Instant::now();
        let handles: Vec<_> = (0..tasks)
            .map(|_| {
                let pool = pool.clone();
                tokio::spawn(async move {
                    for _ in 0..per_task {
                        sqlx::query("SELECT 1").execute(&pool).await.unwrap();
                    }
                })
            })
            .collect();
        for h in handles {
            h.await.unwrap();
        }
        (tasks * per_task) as f64 / started.elapsed().as_secs_f64()
    };
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for round in 0..6 {
        if round % 2 == 0 {
            a.push(throughput(plain.clone()).await);
            b.push(throughput(checked.clone()).await);
        } else {
            b.push(throughput(checked.clone()).await);
            a.push(throughput(plain.clone()).await);
        }
    }
    let ratios: Vec<f64> = b.iter().zip(&a).map(|(b, a)| b / a).collect();
    println!();
    println!(
        "{tasks} callers x {per_task} autocommit SELECTs on 8 connections, 6 rounds alternating: \
         plain {a:.0?} statements/s, with the release check {b:.0?}; checked/plain per round {ratios:.2?}"
    );
}
