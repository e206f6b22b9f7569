//! A connection given back to the pool inside a transaction is closed, not
//! reused: whoever takes a connection next never runs inside somebody
//! else's transaction, never reads through its stale snapshot, and never has
//! its writes rolled back with it.

use std::sync::Arc;
use std::time::Duration;

use keel_database::{
    Database, DatabaseConfig, IsolationLevel, TransactionOptions, close_unclean_connections,
};
use keel_testkit::TestDatabase;
use rand::Rng;
use sqlx::{Connection, Executor, PgConnection};

async fn database(max: u32) -> (TestDatabase, Database) {
    let test_db = TestDatabase::create(&keel_database::MIGRATIONS)
        .await
        .unwrap();
    test_db
        .pool()
        .execute(
            "CREATE TABLE marks (id bigint PRIMARY KEY); \
             CREATE TABLE counter (n bigint NOT NULL); INSERT INTO counter VALUES (0)",
        )
        .await
        .unwrap();
    let config = DatabaseConfig::builder()
        .connect_options(test_db.connect_options())
        .min_connections(0)
        .max_connections(max)
        .build()
        .unwrap();
    (test_db, Database::connect_lazy(config))
}

/// What the next user of the pool must find, checked without the release
/// check's own question: the default isolation level (no leftover
/// REPEATABLE READ transaction), a fresh view of `counter` (no stale
/// snapshot), and an autocommit write that another session sees at once
/// (so it did not land in a transaction nobody commits).
async fn assert_clean_next_use(db: &Database, observer: &mut PgConnection, mark: i64) {
    let before: i64 = sqlx::query_scalar("SELECT n FROM counter")
        .fetch_one(&mut *observer)
        .await
        .unwrap();
    let mut conn = db.acquire().await.unwrap();
    let isolation: String = sqlx::query_scalar("SHOW transaction_isolation")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert_eq!(isolation, "read committed", "mark {mark}");
    let seen: i64 = sqlx::query_scalar("SELECT n FROM counter")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert!(
        seen >= before,
        "stale read on mark {mark}: {seen} < {before}"
    );
    sqlx::query("INSERT INTO marks (id) VALUES ($1)")
        .bind(mark)
        .execute(&mut *conn)
        .await
        .unwrap();
    drop(conn);
    let visible: i64 = sqlx::query_scalar("SELECT count(*) FROM marks WHERE id = $1")
        .bind(mark)
        .fetch_one(&mut *observer)
        .await
        .unwrap();
    assert_eq!(
        visible, 1,
        "mark {mark} was written inside a leftover transaction"
    );
}

async fn bump(observer: &mut PgConnection) {
    sqlx::query("UPDATE counter SET n = n + 1")
        .execute(observer)
        .await
        .unwrap();
}

/// Takes a connection from `pool`, opens a transaction on it with plain
/// text (so sqlx does not know) and gives it back unfinished; returns its
/// backend pid.
async fn leak_open_transaction(pool: &sqlx::PgPool) -> i32 {
    let mut conn = pool.acquire().await.unwrap();
    let leaked: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        .await
        .unwrap();
    drop(conn);
    leaked
}

#[tokio::test]
async fn a_connection_left_inside_a_transaction_is_closed_on_release() {
    let (test_db, db) = database(1).await;
    let mut observer = PgConnection::connect_with(&test_db.connect_options())
        .await
        .unwrap();
    // Plain-text BEGIN, owner gone before COMMIT: sqlx itself cannot know.
    let mut conn = db.acquire().await.unwrap();
    conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT n FROM counter")
        .await
        .unwrap();
    drop(conn);
    bump(&mut observer).await;
    assert_clean_next_use(&db, &mut observer, 1).await;
    assert_eq!(db.stats().closed_on_release, 1, "{:?}", db.stats());

    // A transaction in the failed state.
    let mut conn = db.acquire().await.unwrap();
    conn.execute("BEGIN").await.unwrap();
    assert!(conn.execute("SELECT 1 / 0").await.is_err());
    drop(conn);
    assert_clean_next_use(&db, &mut observer, 2).await;
    assert_eq!(db.stats().closed_on_release, 2, "{:?}", db.stats());

    // Clean uses keep their connection.
    for mark in 3..10 {
        assert_clean_next_use(&db, &mut observer, mark).await;
    }
    let mut uow = db.begin().await.unwrap();
    uow.conn().execute("SELECT 1").await.unwrap();
    uow.commit().await.unwrap();
    let uow = db.begin().await.unwrap();
    drop(uow); // rolled back by sqlx's own guard
    assert_clean_next_use(&db, &mut observer, 10).await;
    assert_eq!(db.stats().closed_on_release, 2, "{:?}", db.stats());
}

/// A pool built by hand gets the same check through
/// `close_unclean_connections`.
#[tokio::test]
async fn a_hand_built_pool_gets_the_same_check() {
    let (test_db, _db) = database(1).await;
    let pool = close_unclean_connections(sqlx::postgres::PgPoolOptions::new().max_connections(1))
        .connect_with(test_db.connect_options())
        .await
        .unwrap();
    let leaked = leak_open_transaction(&pool).await;
    let mut conn = pool.acquire().await.unwrap();
    let (pid, isolation): (i32, String) =
        sqlx::query_as("SELECT pg_backend_pid(), current_setting('transaction_isolation')")
            .fetch_one(&mut *conn)
            .await
            .unwrap();
    assert_ne!(
        pid, leaked,
        "the connection left in a transaction was reused"
    );
    assert_eq!(isolation, "read committed");
    // A clean connection is kept.
    drop(conn);
    let again: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(again, pid);
}

/// Many tasks cancel units of work and plain-text transactions at random
/// points (during `BEGIN`, mid-statement, during `COMMIT`) against a small
/// pool, while a writer keeps changing the data. After every cancellation
/// the task takes a connection again and checks it found a clean one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancelled_transactions_never_reach_the_next_user() {
    const TASKS: i64 = 12;
    const ROUNDS: i64 = 60;
    let (test_db, db) = database(4).await;
    let repeatable = TransactionOptions::new().isolation(IsolationLevel::RepeatableRead);
    let writer = {
        let options = test_db.connect_options();
        tokio::spawn(async move {
            let mut conn = PgConnection::connect_with(&options).await.unwrap();
            loop {
                bump(&mut conn).await;
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
        })
    };
    let options = Arc::new(test_db.connect_options());
    let mut tasks = Vec::new();
    for task in 0..TASKS {
        let db = db.clone();
        let repeatable = repeatable.clone();
        let options = options.clone();
        tasks.push(tokio::spawn(async move {
            let mut observer = PgConnection::connect_with(&options).await.unwrap();
            for round in 0..ROUNDS {
                let cut = Duration::from_micros(rand::rng().random_range(0..2_000));
                if round % 2 == 0 {
                    let _ = tokio::time::timeout(cut, async {
                        let mut uow = db.begin_with(&repeatable).await?;
                        sqlx::query("SELECT n, pg_sleep(0.0003) FROM counter")
                            .execute(uow.conn())
                            .await?;
                        uow.commit().await
                    })
                    .await;
                } else {
                    let _ = tokio::time::timeout(cut, async {
                        let mut conn = db.acquire().await.unwrap();
                        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
                            .await?;
                        conn.execute("SELECT n, pg_sleep(0.0003) FROM counter")
                            .await?;
                        // Every third one forgets its COMMIT altogether.
                        if round % 3 != 0 {
                            conn.execute("COMMIT").await?;
                        }
                        Ok::<_, sqlx::Error>(())
                    })
                    .await;
                }
                assert_clean_next_use(&db, &mut observer, task * 1_000 + round).await;
            }
            observer.close().await.unwrap();
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    writer.abort();
    let stats = db.stats();
    // Every one of those transactions ended: committed, rolled back or
    // closed with its connection; none is left open on the server.
    // (Closing happens in the pool's release tasks: give them a moment.)
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let open: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND state LIKE 'idle in transaction%'",
        )
        .fetch_one(db.pool())
        .await
        .unwrap();
        if open == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{open} transactions left open; {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let marks: i64 = sqlx::query_scalar("SELECT count(*) FROM marks")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(marks, TASKS * ROUNDS);
    assert!(stats.closed_on_release > 0, "{stats:?}");
}

/// The test kit's per-test pools carry the same check (repeated there,
/// since `keel-database` depends on the kit), so adapters under test meet
/// the pool behaviour they get in production.
#[tokio::test]
async fn the_test_kit_pool_closes_the_same_connections() {
    let (test_db, _db) = database(1).await;
    let pool = test_db.pool();
    let leaked = leak_open_transaction(pool).await;
    // The pool holds up to 20 connections: ask until the released one has
    // been checked (closed or kept) and look at every connection it hands out.
    for _ in 0..40 {
        let mut conn = pool.acquire().await.unwrap();
        let (pid, isolation): (i32, String) =
            sqlx::query_as("SELECT pg_backend_pid(), current_setting('transaction_isolation')")
                .fetch_one(&mut *conn)
                .await
                .unwrap();
        assert_ne!(
            pid, leaked,
            "the test kit reused a connection left in a transaction"
        );
        assert_eq!(isolation, "read committed");
    }
}
