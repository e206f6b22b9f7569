//! Automatic reconnect: a throwaway PostgreSQL is stopped and started again
//! while concurrent tasks keep writing. Every operation ends within a bound
//! (none hangs), every failure is a retryable error, and the workload resumes
//! by itself once the server is back.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use keel_core::{HealthCheck, HealthStatus};
use keel_database::{Database, DatabaseConfig, DatabaseError};
use keel_testkit::ThrowawayPostgres;
use sqlx::Executor;
use tokio::sync::Mutex;

/// Far above the acquire and connect timeouts: an operation that takes this
/// long is hanging.
const OPERATION_BOUND: Duration = Duration::from_secs(15);
const TASKS: u64 = 8;

#[derive(Default)]
struct Tally {
    successes: AtomicU64,
    failures: AtomicU64,
    hangs: AtomicU64,
    /// Failures that were not retryable, with their description.
    non_retryable: Mutex<Vec<String>>,
}

async fn workload(db: Database, task: u64, stop: Arc<AtomicBool>, tally: Arc<Tally>) {
    let mut seq = 0_i64;
    while !stop.load(Ordering::SeqCst) {
        seq += 1;
        let id = &format!("{task}-{seq}");
        let op = db.transaction(|uow| {
            Box::pin(async move {
                sqlx::query("INSERT INTO writes (id) VALUES ($1)")
                    .bind(id)
                    .execute(uow.conn())
                    .await
                    .map_err(keel_database::to_keel)?;
                let n: i64 = sqlx::query_scalar("SELECT count(*) FROM writes")
                    .fetch_one(uow.conn())
                    .await
                    .map_err(keel_database::to_keel)?;
                Ok::<_, keel_core::Error>(n)
            })
        });
        match tokio::time::timeout(OPERATION_BOUND, op).await {
            Ok(Ok(_)) => {
                tally.successes.fetch_add(1, Ordering::SeqCst);
            }
            Ok(Err(e)) => {
                tally.failures.fetch_add(1, Ordering::SeqCst);
                if !e.is_retryable() {
                    tally.non_retryable.lock().await.push(format!("{e:?}"));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(_) => {
                tally.hangs.fetch_add(1, Ordering::SeqCst);
            }
        }
    }
}

async fn wait_for_successes(tally: &Tally, more_than: u64, limit: Duration) -> u64 {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let now = tally.successes.load(Ordering::SeqCst);
        if now > more_than || tokio::time::Instant::now() > deadline {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One throwaway cluster (creating one is the slow part) serves both
/// scenarios: a polite restart under load, then a crash.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pool_recovers_after_a_restart_and_a_crash() {
    let pg = ThrowawayPostgres::new().await.unwrap();
    let config = DatabaseConfig::builder()
        .connect_options(pg.connect_options())
        .min_connections(2)
        .max_connections(6)
        .acquire_timeout(Duration::from_secs(2))
        .connect_timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let db = Database::connect(config).await.unwrap();
    db.pool()
        .execute("CREATE TABLE writes (id text PRIMARY KEY)")
        .await
        .unwrap();
    let readiness = db.readiness_check();
    let liveness = db.liveness_check();
    assert_eq!(readiness.check().await.status, HealthStatus::Healthy);

    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let workers: Vec<_> = (0..TASKS)
        .map(|t| tokio::spawn(workload(db.clone(), t, stop.clone(), tally.clone())))
        .collect();

    let before = wait_for_successes(&tally, 20, Duration::from_secs(20)).await;
    assert!(before > 20, "the workload did not get going");

    let failures_before_down = tally.failures.load(Ordering::SeqCst);
    // Down: in-flight operations lose their connections, new ones cannot
    // connect.
    pg.stop().await.unwrap();
    let down = readiness.check().await;
    assert_eq!(down.status, HealthStatus::Unhealthy, "{down:?}");
    assert!(!down.detail.is_empty());
    assert_eq!(
        liveness.check().await.status,
        HealthStatus::Healthy,
        "a database outage must not fail liveness"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let while_down = tally.successes.load(Ordering::SeqCst);

    // Up again: nobody touches the pool; it must recover by itself.
    pg.start().await.unwrap();
    let after = wait_for_successes(&tally, while_down + 20, Duration::from_secs(30)).await;
    assert!(
        after > while_down + 20,
        "the workload did not resume after the restart ({while_down} -> {after})"
    );
    // Serving again (possibly degraded: the workload keeps the pool busy).
    let back = readiness.check().await;
    assert!(back.status.is_serving(), "{back:?}");

    stop.store(true, Ordering::SeqCst);
    for w in workers {
        tokio::time::timeout(OPERATION_BOUND * 2, w)
            .await
            .expect("a worker hung")
            .unwrap();
    }

    assert_eq!(tally.hangs.load(Ordering::SeqCst), 0, "operations hung");
    let non_retryable = tally.non_retryable.lock().await;
    assert!(
        non_retryable.is_empty(),
        "failures must be retryable: {non_retryable:?}"
    );
    // Transactions in flight when the server stopped were cut off.
    assert!(
        tally.failures.load(Ordering::SeqCst) > failures_before_down,
        "the outage must have been visible as failures"
    );

    // Nothing reported as committed was lost. (A commit cut off by the
    // restart may have landed without being reported, so the table can hold
    // more rows than the successes, never fewer.)
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM writes")
        .fetch_one(db.pool())
        .await
        .unwrap();
    let successes = tally.successes.load(Ordering::SeqCst);
    assert!(
        u64::try_from(rows).unwrap() >= successes,
        "{rows} rows for {successes} reported commits"
    );
    let stats = db.stats();
    assert!(stats.size <= 6, "{stats:?}");
    db.close().await;

    crash(&pg).await;
    password_rotation(&pg).await;
}

/// A rotated password reaches new connections without rebuilding the pool.
///
/// The test holds every connection it relies on instead of counting on the
/// pool to reuse one: sqlx returns a released connection to the idle set in
/// a spawned task (after a ping), so the next acquisition may not find it
/// there yet and open a new connection instead, with whatever password is
/// current at that moment.
async fn password_rotation(pg: &ThrowawayPostgres) {
    let admin = sqlx::PgPool::connect_with(pg.connect_options())
        .await
        .unwrap();
    admin
        .execute("CREATE ROLE rotating LOGIN PASSWORD 'first-secret'")
        .await
        .unwrap();
    let db = Database::connect(
        DatabaseConfig::builder()
            .connect_options(pg.connect_options().username("rotating"))
            .password("first-secret")
            .min_connections(0)
            .max_connections(2)
            .acquire_timeout(Duration::from_secs(2))
            .build()
            .unwrap(),
    )
    .await
    .unwrap();
    // The pool's only connection, opened with the first password and held
    // until the end: every acquisition below has to open a new one.
    let mut opened_before = db.acquire().await.unwrap();
    sqlx::query("SELECT 1")
        .execute(&mut *opened_before)
        .await
        .unwrap();
    assert_eq!(db.stats().size, 1);

    admin
        .execute("ALTER ROLE rotating PASSWORD 'second-secret'")
        .await
        .unwrap();
    // The server checks the password at login only: an open connection
    // keeps working.
    sqlx::query("SELECT 1")
        .execute(&mut *opened_before)
        .await
        .unwrap();
    // A new connection, still with the old password, is refused.
    let stale = db
        .begin()
        .await
        .expect_err("the old password was still accepted");
    assert!(
        matches!(stale, DatabaseError::AuthenticationFailed { .. }),
        "{stale:?}"
    );
    assert!(!format!("{stale:?}").contains("first-secret"));

    db.set_password("second-secret");
    let mut uow = db.begin().await.unwrap();
    let user: String = sqlx::query_scalar("SELECT current_user")
        .fetch_one(uow.conn())
        .await
        .unwrap();
    assert_eq!(user, "rotating");
    uow.commit().await.unwrap();
    drop(opened_before);
    db.close().await;
    admin.close().await;
}

/// The server dies as in a crash while a transaction is open: the open
/// transaction fails with a retryable connection error, work while it is
/// down fails within the acquire timeout, and the pool recovers after it
/// comes back.
async fn crash(pg: &ThrowawayPostgres) {
    let db = Database::connect(
        DatabaseConfig::builder()
            .connect_options(pg.connect_options())
            .min_connections(0)
            .max_connections(2)
            .acquire_timeout(Duration::from_secs(1))
            .build()
            .unwrap(),
    )
    .await
    .unwrap();

    // A transaction is open when the server dies as in a crash.
    let mut uow = db.begin().await.unwrap();
    sqlx::query("SELECT 1").execute(uow.conn()).await.unwrap();
    pg.kill().await.unwrap();
    let err = tokio::time::timeout(OPERATION_BOUND, sqlx::query("SELECT 1").execute(uow.conn()))
        .await
        .expect("a query on a dead connection hung")
        .unwrap_err();
    assert!(keel_database::is_connection_error(&err), "{err:?}");
    let err = keel_core::Error::from(DatabaseError::from(err));
    assert!(err.is_retryable());
    drop(uow);

    // While it is down, new work fails within the acquire timeout.
    let down = tokio::time::timeout(OPERATION_BOUND, db.begin())
        .await
        .expect("begin hung while the server was down")
        .unwrap_err();
    assert!(down.is_retryable(), "{down:?}");

    pg.start().await.unwrap();
    // The first operation after the restart may still meet a stale
    // connection only if the pool handed one out untested; it must not.
    let one: i32 = tokio::time::timeout(OPERATION_BOUND, async {
        let mut uow = db.begin().await?;
        let v = sqlx::query_scalar("SELECT 1").fetch_one(uow.conn()).await?;
        uow.commit().await?;
        Ok::<i32, DatabaseError>(v)
    })
    .await
    .expect("the first operation after the restart hung")
    .unwrap();
    assert_eq!(one, 1);
    db.close().await;
}
