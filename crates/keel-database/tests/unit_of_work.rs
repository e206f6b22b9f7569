//! Units of work against a real PostgreSQL: commit, rollback on error and on
//! drop, savepoints, after-commit hooks, isolation levels, and retries of
//! real serialization failures and deadlocks.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use common::{database_with_items, insert_item, item_ids};
use keel_database::{DatabaseError, IsolationLevel, RetryPolicy, TransactionOptions};
use sqlx::Executor;
use tokio::sync::Barrier;
use tokio::time::timeout;

const BOUND: Duration = Duration::from_secs(10);

#[tokio::test]
async fn commit_makes_work_visible() {
    let (_t, db) = database_with_items().await;
    let mut uow = db.begin().await.unwrap();
    insert_item(uow.conn(), 1).await.unwrap();
    insert_item(&mut uow, 2).await.unwrap();
    // Not visible to others before the commit.
    assert!(item_ids(&db).await.is_empty());
    uow.commit().await.unwrap();
    assert_eq!(item_ids(&db).await, vec![1, 2]);
}

#[tokio::test]
async fn explicit_rollback_discards_work() {
    let (_t, db) = database_with_items().await;
    let mut uow = db.begin().await.unwrap();
    insert_item(uow.conn(), 1).await.unwrap();
    uow.rollback().await.unwrap();
    assert!(item_ids(&db).await.is_empty());
}

#[tokio::test]
async fn closure_error_rolls_back_and_is_returned_without_retry() {
    let (_t, db) = database_with_items().await;
    let attempts = &AtomicU32::new(0);
    let result: Result<(), DatabaseError> = db
        .transaction(|uow| {
            Box::pin(async move {
                attempts.fetch_add(1, Ordering::SeqCst);
                insert_item(uow.conn(), 1).await?;
                // Fails with a unique violation: the whole unit of work goes.
                insert_item(uow.conn(), 1).await?;
                Ok(())
            })
        })
        .await;
    let err = result.unwrap_err();
    assert!(err.is_unique_violation(Some("items_pkey")), "{err:?}");
    assert_eq!(attempts.load(Ordering::SeqCst), 1);
    assert!(item_ids(&db).await.is_empty());

    // A domain-level error (not from the database) rolls back just the same.
    let result: Result<(), keel_core::Error> = db
        .transaction(|uow| {
            Box::pin(async move {
                insert_item(uow.conn(), 7)
                    .await
                    .map_err(keel_database::to_keel)?;
                Err(keel_core::Error::invalid_input("note", "too short"))
            })
        })
        .await;
    assert_eq!(
        result.unwrap_err().kind(),
        keel_core::ErrorKind::InvalidInput
    );
    assert!(item_ids(&db).await.is_empty());
}

#[tokio::test]
async fn drop_rolls_back_and_releases_locks() {
    let (_t, db) = database_with_items().await;
    {
        let mut uow = db.begin().await.unwrap();
        insert_item(uow.conn(), 1).await.unwrap();
        // Dropped here, as on an early `?` return.
    }
    // If the dropped transaction were still open, it would hold the key and
    // this insert would block; it must go through promptly instead.
    let mut other = db.begin().await.unwrap();
    timeout(BOUND, insert_item(other.conn(), 1))
        .await
        .expect("the dropped transaction still holds its row lock")
        .unwrap();
    other.commit().await.unwrap();
    assert_eq!(item_ids(&db).await, vec![1]);
}

#[tokio::test]
async fn panicking_closure_rolls_back() {
    let (_t, db) = database_with_items().await;
    let db2 = db.clone();
    let handle = tokio::spawn(async move {
        db2.transaction(|uow| {
            Box::pin(async move {
                insert_item(uow.conn(), 1).await?;
                if uow.depth() == 0 {
                    panic!("bug in the closure");
                }
                Ok::<_, DatabaseError>(())
            })
        })
        .await
    });
    assert!(handle.await.unwrap_err().is_panic());
    assert!(item_ids(&db).await.is_empty());
    // The pool is still usable afterwards.
    db.transaction(|uow| {
        Box::pin(async move {
            insert_item(uow.conn(), 2)
                .await
                .map_err(DatabaseError::from)
        })
    })
    .await
    .unwrap();
    assert_eq!(item_ids(&db).await, vec![2]);
}

#[tokio::test]
async fn savepoint_rollback_keeps_outer_work() {
    let (_t, db) = database_with_items().await;
    let mut uow = db.begin().await.unwrap();
    insert_item(uow.conn(), 1).await.unwrap();

    {
        let mut inner = uow.savepoint().await.unwrap();
        assert_eq!(inner.depth(), 1);
        insert_item(inner.conn(), 2).await.unwrap();
        // A failing statement inside the savepoint...
        let err = insert_item(inner.conn(), 2).await.unwrap_err();
        assert!(keel_database::is_unique_violation(&err, None));
        // ...is undone with it, and the transaction stays usable.
        inner.rollback().await.unwrap();
    }
    {
        let mut committed = uow.savepoint().await.unwrap();
        insert_item(committed.conn(), 3).await.unwrap();
        {
            let mut nested = committed.savepoint().await.unwrap();
            assert_eq!(nested.depth(), 2);
            insert_item(nested.conn(), 4).await.unwrap();
            // Dropped without commit: rolled back to its savepoint.
        }
        insert_item(committed.conn(), 5).await.unwrap();
        committed.commit().await.unwrap();
    }
    insert_item(uow.conn(), 6).await.unwrap();
    uow.commit().await.unwrap();
    assert_eq!(item_ids(&db).await, vec![1, 3, 5, 6]);
}

#[tokio::test]
async fn outer_rollback_discards_released_savepoints() {
    let (_t, db) = database_with_items().await;
    let mut uow = db.begin().await.unwrap();
    let mut sp = uow.savepoint().await.unwrap();
    insert_item(sp.conn(), 1).await.unwrap();
    sp.commit().await.unwrap();
    uow.rollback().await.unwrap();
    assert!(item_ids(&db).await.is_empty());
}

#[tokio::test]
async fn after_commit_hooks_run_only_after_a_commit() {
    let (_t, db) = database_with_items().await;
    let fired = Arc::new(std::sync::Mutex::new(Vec::<&str>::new()));
    let log = |name: &'static str| {
        let fired = fired.clone();
        move || fired.lock().unwrap().push(name)
    };

    let mut uow = db.begin().await.unwrap();
    uow.after_commit(log("outer"));
    {
        let mut kept = uow.savepoint().await.unwrap();
        kept.after_commit(log("released savepoint"));
        kept.commit().await.unwrap();
    }
    {
        let mut undone = uow.savepoint().await.unwrap();
        undone.after_commit(log("rolled-back savepoint"));
        undone.rollback().await.unwrap();
    }
    {
        let mut dropped = uow.savepoint().await.unwrap();
        dropped.after_commit(log("dropped savepoint"));
    }
    uow.after_commit(|| panic!("a broken hook must not stop the others"));
    uow.after_commit(log("last"));
    assert!(
        fired.lock().unwrap().is_empty(),
        "nothing runs before commit"
    );
    uow.commit().await.unwrap();
    assert_eq!(
        *fired.lock().unwrap(),
        vec!["outer", "released savepoint", "last"]
    );

    let mut rolled_back = db.begin().await.unwrap();
    rolled_back.after_commit(log("never"));
    rolled_back.rollback().await.unwrap();
    let mut dropped = db.begin().await.unwrap();
    dropped.after_commit(log("never"));
    drop(dropped);
    assert_eq!(fired.lock().unwrap().len(), 3);
}

#[tokio::test]
async fn isolation_level_and_read_only_are_applied() {
    let (_t, db) = database_with_items().await;
    let mut uow = db
        .begin_with(&TransactionOptions::serializable().read_only(true))
        .await
        .unwrap();
    assert_eq!(uow.isolation_level(), IsolationLevel::Serializable);
    let level: String = sqlx::query_scalar("SHOW transaction_isolation")
        .fetch_one(uow.conn())
        .await
        .unwrap();
    assert_eq!(level, "serializable");
    let err = insert_item(uow.conn(), 1).await.unwrap_err();
    assert_eq!(keel_database::sqlstate_of(&err), Some("25006"));
    uow.rollback().await.unwrap();

    let mut rr = db
        .begin_with(&TransactionOptions::new().isolation(IsolationLevel::RepeatableRead))
        .await
        .unwrap();
    let level: String = sqlx::query_scalar("SHOW transaction_isolation")
        .fetch_one(rr.conn())
        .await
        .unwrap();
    assert_eq!(level, "repeatable read");
    rr.commit().await.unwrap();

    // The configured statement timeout reaches every connection.
    let timeout_setting: String = sqlx::query_scalar("SHOW statement_timeout")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(timeout_setting, "30s");
}

/// Two on-call doctors; each transaction takes itself off call if the other
/// one is still on call. Run concurrently under SERIALIZABLE, this write
/// skew must abort one of them; the retry then sees the other's commit and
/// stays on call, so exactly one doctor remains on call.
#[tokio::test]
async fn serialization_failure_is_retried_until_commit() {
    let (_t, db) = database_with_items().await;
    db.pool()
        .execute(
            "CREATE TABLE doctors (name text PRIMARY KEY, on_call bool NOT NULL);
             INSERT INTO doctors VALUES ('alice', true), ('bob', true);",
        )
        .await
        .unwrap();

    let barrier = Arc::new(Barrier::new(2));
    let attempts = Arc::new(AtomicU32::new(0));
    let mut tasks = Vec::new();
    for me in ["alice", "bob"] {
        let db = db.clone();
        let barrier = barrier.clone();
        let attempts = attempts.clone();
        tasks.push(tokio::spawn(async move {
            let options = TransactionOptions::serializable().retry(
                RetryPolicy::default()
                    .max_attempts(5)
                    .initial_backoff(Duration::from_millis(5)),
            );
            let (barrier, attempts) = (&barrier, &attempts);
            db.transaction_with(&options, |uow| {
                Box::pin(async move {
                    attempts.fetch_add(1, Ordering::SeqCst);
                    let on_call: i64 =
                        sqlx::query_scalar("SELECT count(*) FROM doctors WHERE on_call")
                            .fetch_one(uow.conn())
                            .await?;
                    if uow.attempt() == 1 {
                        // Both have read before either writes.
                        barrier.wait().await;
                    }
                    let leave = on_call >= 2;
                    if leave {
                        sqlx::query("UPDATE doctors SET on_call = false WHERE name = $1")
                            .bind(me)
                            .execute(uow.conn())
                            .await?;
                    }
                    Ok::<_, DatabaseError>((leave, uow.attempt()))
                })
            })
            .await
        }));
    }
    let mut outcomes = Vec::new();
    for t in tasks {
        outcomes.push(timeout(BOUND, t).await.unwrap().unwrap().unwrap());
    }
    let left: Vec<bool> = outcomes.iter().map(|(leave, _)| *leave).collect();
    assert_eq!(
        left.iter().filter(|l| **l).count(),
        1,
        "exactly one doctor left: {outcomes:?}"
    );
    // The one that stayed needed at least a second attempt.
    let (_, stayer_attempt) = outcomes.iter().find(|(leave, _)| !leave).unwrap();
    assert!(*stayer_attempt >= 2, "{outcomes:?}");
    assert!(attempts.load(Ordering::SeqCst) >= 3);
    let still_on_call: i64 = sqlx::query_scalar("SELECT count(*) FROM doctors WHERE on_call")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(still_on_call, 1);
}

/// Two transactions lock the same two rows in opposite orders; PostgreSQL
/// breaks the deadlock by aborting one, which is retried and commits.
#[tokio::test]
async fn deadlock_is_retried_until_commit() {
    let (_t, db) = database_with_items().await;
    db.pool()
        .execute("INSERT INTO items (id) VALUES (1), (2)")
        .await
        .unwrap();
    let barrier = Arc::new(Barrier::new(2));
    let mut tasks = Vec::new();
    for (first, second) in [(1, 2), (2, 1)] {
        let db = db.clone();
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            let barrier = &barrier;
            db.transaction(|uow| {
                Box::pin(async move {
                    // Detect the deadlock quickly instead of after the default 1 s.
                    uow.execute("SET LOCAL deadlock_timeout = '50ms'").await?;
                    sqlx::query("UPDATE items SET note = note || 'x' WHERE id = $1")
                        .bind(first)
                        .execute(uow.conn())
                        .await?;
                    if uow.attempt() == 1 {
                        barrier.wait().await;
                    }
                    sqlx::query("UPDATE items SET note = note || 'x' WHERE id = $1")
                        .bind(second)
                        .execute(uow.conn())
                        .await?;
                    Ok::<_, DatabaseError>(uow.attempt())
                })
            })
            .await
        }));
    }
    let mut attempts = Vec::new();
    for t in tasks {
        attempts.push(timeout(BOUND, t).await.unwrap().unwrap().unwrap());
    }
    attempts.sort_unstable();
    assert_eq!(attempts[0], 1, "{attempts:?}");
    assert!(attempts[1] >= 2, "{attempts:?}");
    // Both transactions committed both updates exactly once.
    let notes: Vec<String> = sqlx::query_scalar("SELECT note FROM items ORDER BY id")
        .fetch_all(db.pool())
        .await
        .unwrap();
    assert_eq!(notes, vec!["xx", "xx"]);
}

#[tokio::test]
async fn retries_stop_after_the_configured_attempts() {
    let (_t, db) = database_with_items().await;
    let attempts = &AtomicU32::new(0);
    let options = TransactionOptions::new().retry(
        RetryPolicy::default()
            .max_attempts(3)
            .initial_backoff(Duration::from_millis(1)),
    );
    let result: Result<(), keel_core::Error> = db
        .transaction_with(&options, |uow| Box::pin(async move {
            attempts.fetch_add(1, Ordering::SeqCst);
            insert_item(uow.conn(), 1).await.map_err(keel_database::to_keel)?;
            // A real server error carrying SQLSTATE 40001, every time.
            uow.execute(
                "DO $$ BEGIN RAISE EXCEPTION 'forced' USING ERRCODE = 'serialization_failure'; END $$",
            )
            .await
            .map_err(keel_database::to_keel)?;
            Ok(())
        }))
        .await;
    let err = result.unwrap_err();
    assert_eq!(attempts.load(Ordering::SeqCst), 3);
    assert_eq!(err.kind(), keel_core::ErrorKind::Conflict);
    assert!(err.is_transaction_conflict());
    assert!(err.is_retryable());
    assert!(keel_database::chain_has_transaction_conflict(&err));
    assert!(item_ids(&db).await.is_empty());

    // RetryPolicy::never() runs once.
    let attempts = &AtomicU32::new(0);
    let once = TransactionOptions::new().retry(RetryPolicy::never());
    let _ = db
        .transaction_with(&once, |uow| {
            Box::pin(async move {
                attempts.fetch_add(1, Ordering::SeqCst);
                uow.execute(
                "DO $$ BEGIN RAISE EXCEPTION 'forced' USING ERRCODE = 'deadlock_detected'; END $$",
            )
            .await?;
                Ok::<_, DatabaseError>(())
            })
        })
        .await
        .unwrap_err();
    assert_eq!(attempts.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn many_concurrent_transactions_keep_an_invariant() {
    let (_t, db) = database_with_items().await;
    db.pool()
        .execute(
            "CREATE TABLE accounts (id int PRIMARY KEY, balance int NOT NULL);
             INSERT INTO accounts SELECT g, 100 FROM generate_series(1, 4) g;",
        )
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for i in 0..16 {
        let db = db.clone();
        tasks.push(tokio::spawn(async move {
            let from = i % 4 + 1;
            let to = (i + 1) % 4 + 1;
            let options = TransactionOptions::serializable().retry(
                RetryPolicy::default()
                    .max_attempts(50)
                    .initial_backoff(Duration::from_millis(2))
                    .max_backoff(Duration::from_millis(20)),
            );
            db.transaction_with(&options, |uow| {
                Box::pin(async move {
                    let total: i64 = sqlx::query_scalar("SELECT sum(balance) FROM accounts")
                        .fetch_one(uow.conn())
                        .await?;
                    assert_eq!(total, 400, "a transaction saw a torn transfer");
                    sqlx::query("UPDATE accounts SET balance = balance - 1 WHERE id = $1")
                        .bind(from)
                        .execute(uow.conn())
                        .await?;
                    sqlx::query("UPDATE accounts SET balance = balance + 1 WHERE id = $1")
                        .bind(to)
                        .execute(uow.conn())
                        .await?;
                    Ok::<_, DatabaseError>(())
                })
            })
            .await
        }));
    }
    for t in tasks {
        timeout(Duration::from_secs(30), t)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
    let balances: Vec<i32> = sqlx::query_scalar("SELECT balance FROM accounts ORDER BY id")
        .fetch_all(db.pool())
        .await
        .unwrap();
    // Each account sent 4 and received 4.
    assert_eq!(balances, vec![100, 100, 100, 100]);
    let stats = db.stats();
    assert!(stats.acquires >= 16, "{stats:?}");
    assert!(stats.size <= stats.max_connections);
}

/// An error swallowed inside a transaction aborts it; PostgreSQL would
/// answer COMMIT with a silent ROLLBACK. The unit of work reports it.
#[tokio::test]
async fn commit_after_a_swallowed_error_fails_loudly() {
    let (_t, db) = database_with_items().await;
    let mut uow = db.begin().await.unwrap();
    insert_item(uow.conn(), 1).await.unwrap();
    let _ignored = insert_item(uow.conn(), 1).await.unwrap_err();
    let err = uow.commit().await.unwrap_err();
    assert!(
        matches!(err, DatabaseError::TransactionAborted { .. }),
        "{err:?}"
    );
    assert_eq!(err.sqlstate(), Some("25P02"));
    assert!(!err.is_retryable());
    assert!(item_ids(&db).await.is_empty());

    // Through the closure API, the caller gets the error, not a success.
    let result = db
        .transaction(|uow| {
            Box::pin(async move {
                insert_item(uow.conn(), 2).await?;
                let _ignored = insert_item(uow.conn(), 2).await;
                Ok::<_, DatabaseError>("looks fine")
            })
        })
        .await;
    assert!(
        matches!(result, Err(DatabaseError::TransactionAborted { .. })),
        "{result:?}"
    );

    // A savepoint whose statement failed cannot be released either.
    let mut uow = db.begin().await.unwrap();
    insert_item(uow.conn(), 3).await.unwrap();
    let mut sp = uow.savepoint().await.unwrap();
    let _ignored = insert_item(sp.conn(), 3).await.unwrap_err();
    let err = sp.commit().await.unwrap_err();
    assert!(
        matches!(err, DatabaseError::TransactionAborted { .. }),
        "{err:?}"
    );
    drop(uow);
    assert!(item_ids(&db).await.is_empty());
}

/// A statement sent with the commit commits with the unit of work; one that
/// fails takes the whole unit of work with it, and `commit` reports its
/// error.
#[tokio::test]
async fn statements_sent_with_the_commit_share_its_fate() {
    let (_t, db) = database_with_items().await;
    let mut uow = db.begin().await.unwrap();
    insert_item(uow.conn(), 1).await.unwrap();
    uow.send_with_commit("INSERT INTO items (id) VALUES (2)");
    // Registered in a savepoint that is released: moves to the transaction.
    let mut sp = uow.savepoint().await.unwrap();
    sp.send_with_commit("INSERT INTO items (id) VALUES (3)");
    sp.commit().await.unwrap();
    // Registered in a savepoint that is rolled back: dropped with it.
    let mut sp = uow.savepoint().await.unwrap();
    sp.send_with_commit("INSERT INTO items (id) VALUES (4)");
    sp.rollback().await.unwrap();
    assert!(
        item_ids(&db).await.is_empty(),
        "nothing runs before the commit"
    );
    uow.commit().await.unwrap();
    assert_eq!(item_ids(&db).await, vec![1, 2, 3]);

    let mut uow = db.begin().await.unwrap();
    insert_item(uow.conn(), 10).await.unwrap();
    // A duplicate key: the batch stops there and nothing commits.
    uow.send_with_commit("INSERT INTO items (id) VALUES (1)");
    let e = uow.commit().await.unwrap_err();
    assert!(e.is_unique_violation(None), "{e:?}");
    assert_eq!(item_ids(&db).await, vec![1, 2, 3]);
}

/// The one-round-trip commit leaves its connection clean: on a pool of one
/// connection, autocommit statements and new units of work that follow a
/// commit are not caught in a transaction left open.
#[tokio::test]
async fn a_committed_connection_goes_back_to_the_pool_clean() {
    let (t, _) = database_with_items().await;
    let db = keel_database::Database::connect(
        keel_database::DatabaseConfig::builder()
            .connect_options(t.connect_options())
            .min_connections(0)
            .max_connections(1)
            .build()
            .unwrap(),
    )
    .await
    .unwrap();
    for id in 0..20 {
        let mut uow = db.begin().await.unwrap();
        insert_item(uow.conn(), id * 2).await.unwrap();
        uow.commit().await.unwrap();
        sqlx::query("INSERT INTO items (id) VALUES ($1)")
            .bind(id * 2 + 1)
            .execute(db.pool())
            .await
            .unwrap();
        // Seen from another connection: both are committed.
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM items")
            .fetch_one(t.pool())
            .await
            .unwrap();
        assert_eq!(n, i64::from(id * 2 + 2));
    }
    let open: bool = sqlx::query_scalar("SELECT txid_current_if_assigned() IS NOT NULL")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert!(!open);
}

/// Hostile text survives `sql_literal` unchanged and cannot end the
/// constant early.
#[tokio::test]
async fn sql_literals_round_trip_hostile_text() {
    let (_t, db) = database_with_items().await;
    let values = [
        "",
        "plain",
        "it's",
        "'); DROP TABLE items; --",
        "$$",
        "$q0$",
        "$q0",
        "x$q0$; DROP TABLE items; --",
        "$q0$$q1$$q2$",
        "back\\slash\\",
        "new\nline\ttab",
        "ünïcødé ✓ 🚀",
        "E'\\x41'",
    ];
    for value in values {
        let literal = keel_database::sql_literal(value).unwrap();
        let sql = format!("SELECT {literal}");
        let back: String = sqlx::query_scalar(&sql).fetch_one(db.pool()).await.unwrap();
        assert_eq!(back, value, "{literal}");
    }
    assert!(keel_database::sql_literal("a\0b").is_err());
    assert!(item_ids(&db).await.is_empty());
}
