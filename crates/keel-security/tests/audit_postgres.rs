//! What only the PostgreSQL audit log can show: the database refusing to
//! change or remove records, tampering done behind the store's back (as a
//! superuser who switches the triggers off) and found by `verify`, server
//! time, identical chains in both stores, and failures mapped onto Keel's
//! error taxonomy.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use keel_core::{
    AggregateRef, AuditEntry, AuditLog, AuditOutcome, AuditQuery, AuditRecord, ChainVerification,
    ManualClock,
};
use keel_security::Secret;
use keel_security::audit::testing::{command_attempt, command_entry};
use keel_security::audit::{
    AuditHead, AuditKey, AuditKeys, InMemoryAuditLog, PgAuditLog, record_hash,
};
use keel_testkit::TestDatabase;
use serde_json::json;
use sqlx::PgConnection;
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgPoolOptions, Postgres};

async fn database() -> TestDatabase {
    TestDatabase::create(&keel_security::MIGRATIONS)
        .await
        .expect("test database")
}

fn entry(i: u32) -> AuditEntry {
    let mut e = AuditEntry::new("order.place", AuditOutcome::Accepted)
        .with_principal(format!("user-{i}"))
        .with_tenant("acme")
        .with_aggregate(AggregateRef::new("Order", format!("o-{i}")));
    e.details = json!({"n": i, "lines": [{"sku": "A", "qty": 2}]});
    e
}

/// A log with five records.
async fn five(db: &TestDatabase) -> (PgAuditLog, Vec<AuditRecord>) {
    let log = PgAuditLog::new(db.pool().clone());
    let mut records = Vec::new();
    for i in 1..=5 {
        records.push(log.append(entry(i)).await.unwrap());
    }
    (log, records)
}

fn sqlstate(e: &sqlx::Error) -> Option<String> {
    e.as_database_error()
        .and_then(|db| db.code())
        .map(|c| c.into_owned())
}

fn broken(v: ChainVerification) -> (u64, String) {
    match v {
        ChainVerification::Broken { sequence, reason } => (sequence, reason),
        other => panic!("expected a broken chain, got {other:?}"),
    }
}

/// A connection on which triggers do not fire, as a superuser (or anyone
/// with the table's ownership) could arrange.
async fn tamperer(db: &TestDatabase) -> PoolConnection<Postgres> {
    let mut conn = db.pool().acquire().await.unwrap();
    sqlx::query("SET session_replication_role = replica")
        .execute(&mut *conn)
        .await
        .unwrap();
    conn
}

async fn run(conn: &mut PgConnection, sql: &str) -> u64 {
    sqlx::query(sql)
        .execute(conn)
        .await
        .unwrap()
        .rows_affected()
}

#[tokio::test]
async fn the_database_refuses_update_delete_and_truncate() {
    let db = database().await;
    let (log, before) = five(&db).await;
    for sql in [
        "UPDATE keel.audit_log SET principal = 'mallory' WHERE sequence = 3",
        "UPDATE keel.audit_log SET details = '{}'",
        "DELETE FROM keel.audit_log WHERE sequence = 5",
        "DELETE FROM keel.audit_log",
        "TRUNCATE keel.audit_log",
        "TRUNCATE keel.audit_log CASCADE",
        // The head cannot be rewound, removed, duplicated or moved to a
        // record that does not follow it.
        "UPDATE keel.audit_head SET sequence = 3",
        "UPDATE keel.audit_head SET sequence = 6, hash = repeat('a', 64)",
        "DELETE FROM keel.audit_head",
        "INSERT INTO keel.audit_head (singleton, sequence, hash) VALUES (false, 0, repeat('0', 64))",
        "TRUNCATE keel.audit_head",
    ] {
        let err = sqlx::query(sql).execute(db.pool()).await.unwrap_err();
        assert_eq!(sqlstate(&err).as_deref(), Some("KL003"), "{sql}: {err}");
        // Through keel-database's classification it stays a typed error
        // that names the SQLSTATE, not the statement.
        let typed = keel_database::DatabaseError::from(err);
        assert_eq!(typed.sqlstate(), Some("KL003"));
        let core = keel_core::Error::from(typed);
        assert!(!core.is_retryable());
        let text = core.to_string();
        assert!(text.contains("KL003") && !text.contains(sql), "{text}");
    }
    let after = log.query(&AuditQuery::new()).await.unwrap().records;
    assert_eq!(after, before);
    assert_eq!(
        log.verify().await.unwrap(),
        ChainVerification::Intact { records: 5 }
    );
}

#[tokio::test]
async fn a_changed_field_is_named_by_its_sequence() {
    // Every column counts: an identity, the details document, the time.
    let cases = [
        (
            "UPDATE keel.audit_log SET principal = 'mallory' WHERE sequence = 3",
            3,
        ),
        (
            r#"UPDATE keel.audit_log SET details = '{"n": 2, "lines": [{"sku": "A", "qty": 20}]}' WHERE sequence = 2"#,
            2,
        ),
        (
            "UPDATE keel.audit_log SET recorded_at = recorded_at + interval '1 microsecond' WHERE sequence = 4",
            4,
        ),
        (
            "UPDATE keel.audit_log SET outcome = 'failed', outcome_code = 'keel.internal' WHERE sequence = 1",
            1,
        ),
    ];
    for (sql, expected) in cases {
        let db = database().await;
        let (log, _) = five(&db).await;
        let mut conn = tamperer(&db).await;
        assert_eq!(
            run(&mut conn, sql).await,
            1,
            "the trigger is off for the tamperer"
        );
        let (sequence, reason) = broken(log.verify().await.unwrap());
        assert_eq!(sequence, expected, "{sql}");
        assert!(reason.starts_with("content altered"), "{reason}");
    }
}

#[tokio::test]
async fn a_deleted_record_is_named_as_the_gap() {
    let db = database().await;
    let (log, _) = five(&db).await;
    let mut conn = tamperer(&db).await;
    assert_eq!(
        run(&mut conn, "DELETE FROM keel.audit_log WHERE sequence = 3").await,
        1
    );
    let (sequence, reason) = broken(log.verify().await.unwrap());
    assert_eq!(sequence, 3);
    assert!(reason.starts_with("missing record"), "{reason}");
}

#[tokio::test]
async fn a_rehashed_record_breaks_the_next_link() {
    let db = database().await;
    let (log, records) = five(&db).await;
    // The forger changes record 3 and gives it a correct hash of its own,
    // but cannot rewrite what record 4 says about its predecessor without
    // rewriting every record after it.
    let mut forged = records[2].clone();
    forged.entry.principal = Some("mallory".into());
    let new_hash = record_hash(&forged);
    let mut conn = tamperer(&db).await;
    sqlx::query("UPDATE keel.audit_log SET principal = 'mallory', hash = $1 WHERE sequence = 3")
        .bind(&new_hash)
        .execute(&mut *conn)
        .await
        .unwrap();
    let (sequence, reason) = broken(log.verify().await.unwrap());
    assert_eq!(sequence, 4);
    assert!(reason.starts_with("link broken"), "{reason}");
}

#[tokio::test]
async fn a_cut_tail_is_found_through_the_head() {
    let db = database().await;
    let (log, _) = five(&db).await;
    let anchored = log.head().await.unwrap();
    assert_eq!(anchored.sequence, 5);

    let mut conn = tamperer(&db).await;
    run(&mut conn, "DELETE FROM keel.audit_log WHERE sequence = 5").await;
    let (sequence, reason) = broken(log.verify().await.unwrap());
    assert_eq!(sequence, 5);
    assert!(reason.starts_with("missing record"), "{reason}");

    // Rewinding the head as well hides the cut from the database alone...
    let four = log
        .query(&AuditQuery::new().after(3))
        .await
        .unwrap()
        .records;
    sqlx::query("UPDATE keel.audit_head SET sequence = 4, hash = $1")
        .bind(&four[0].hash)
        .execute(&mut *conn)
        .await
        .unwrap();
    assert_eq!(
        log.verify().await.unwrap(),
        ChainVerification::Intact { records: 4 }
    );
    // ...but not from a head kept outside it.
    let (sequence, reason) = broken(log.verify_from(&anchored).await.unwrap());
    assert_eq!(sequence, 5);
    assert!(reason.starts_with("missing record"), "{reason}");
}

#[tokio::test]
async fn recorded_at_is_server_time_and_never_goes_back() {
    let db = database().await;
    let log = PgAuditLog::new(db.pool().clone());
    let now = || async {
        sqlx::query_scalar::<_, DateTime<Utc>>("SELECT clock_timestamp()")
            .fetch_one(db.pool())
            .await
            .unwrap()
    };
    let before = now().await;
    let record = log.append(entry(1)).await.unwrap();
    let after = now().await;
    assert!(before <= record.recorded_at && record.recorded_at <= after);

    // Even if the server clock jumped back, the chain's times do not.
    let mut conn = tamperer(&db).await;
    run(
        &mut conn,
        "UPDATE keel.audit_head SET recorded_at = now() + interval '1 hour'",
    )
    .await;
    let later = log.append(entry(2)).await.unwrap();
    assert!(later.recorded_at > after + chrono::Duration::minutes(59));
    // (the head's time is not part of any hash; the chain stays intact)
    assert!(log.verify().await.unwrap().is_intact());
}

#[tokio::test]
async fn both_stores_build_the_same_chain() {
    let db = database().await;
    let (pg, records) = five(&db).await;
    let clock = Arc::new(ManualClock::at(records[0].recorded_at));
    let memory = InMemoryAuditLog::new().with_clock(clock.clone());
    for record in &records {
        clock.set(record.recorded_at);
        let twin = memory.append(record.entry.clone()).await.unwrap();
        assert_eq!(&twin, record);
    }
    assert_eq!(pg.head().await.unwrap(), memory.head().await.unwrap());
}

#[tokio::test]
async fn verify_reads_the_chain_in_pages() {
    let db = database().await;
    let log = PgAuditLog::new(db.pool().clone());
    // More than one verification page (500 records), written concurrently.
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let log = log.clone();
            tokio::spawn(async move {
                for i in 0..160 {
                    log.append(entry(w * 1_000 + i)).await.unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    assert_eq!(
        log.verify().await.unwrap(),
        ChainVerification::Intact { records: 640 }
    );
    let mut conn = tamperer(&db).await;
    run(
        &mut conn,
        "UPDATE keel.audit_log SET tenant = 'other' WHERE sequence = 601",
    )
    .await;
    assert_eq!(broken(log.verify().await.unwrap()).0, 601);
}

#[tokio::test]
async fn an_unreachable_database_is_a_retryable_error() {
    let pool = PgPoolOptions::new()
        .acquire_timeout(Duration::from_millis(500))
        .connect_lazy("postgres://keel:secret-password@127.0.0.1:1/keel")
        .unwrap();
    let log = PgAuditLog::new(pool);
    let err = log.append(entry(1)).await.unwrap_err();
    assert!(err.is_retryable(), "{err:?}");
    let text = err.to_string();
    assert!(!text.contains("secret-password"), "{text}");
    assert!(!text.contains("SELECT"), "{text}");
    let err = log.verify().await.unwrap_err();
    assert!(err.is_retryable(), "{err:?}");
}

#[tokio::test]
async fn a_database_without_the_migration_is_an_internal_error() {
    let db = database().await;
    sqlx::query("DROP SCHEMA keel CASCADE")
        .execute(db.pool())
        .await
        .unwrap();
    let log = PgAuditLog::new(db.pool().clone());
    let err = log.append(entry(1)).await.unwrap_err();
    assert_eq!(err.kind(), keel_core::ErrorKind::Internal, "{err:?}");
    assert!(!err.to_string().contains("SELECT"), "{err}");
}

/// Holds the head row's lock from another transaction until released.
async fn hold_head(db: &TestDatabase) -> sqlx::Transaction<'static, Postgres> {
    let mut tx = db.pool().begin().await.unwrap();
    sqlx::query("SELECT 1 FROM keel.audit_head FOR UPDATE")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx
}

/// Waits until some session of this test's database waits for a lock.
async fn wait_for_lock_waiter(db: &TestDatabase) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(db.pool())
        .await
        .unwrap();
        if waiting > 0 {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "no append waited");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn appends_queued_behind_a_transaction_share_the_next_one() {
    let db = database().await;
    let log = PgAuditLog::new(db.pool().clone());
    let blocker = hold_head(&db).await;
    let writers: Vec<_> = (0..20)
        .map(|i| {
            let log = log.clone();
            tokio::spawn(async move { log.append(entry(i)).await.unwrap() })
        })
        .collect();
    // The first writer's transaction waits for the lock; the others queue.
    wait_for_lock_waiter(&db).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    blocker.rollback().await.unwrap();
    let mut records = Vec::new();
    for w in writers {
        records.push(w.await.unwrap());
    }
    let mut sequences: Vec<u64> = records.iter().map(|r| r.sequence).collect();
    sequences.sort_unstable();
    assert_eq!(sequences, (1..=20).collect::<Vec<_>>());
    // One transaction for the first entry, one for the nineteen behind it
    // (each transaction stamps its records with one server time).
    let transactions: std::collections::BTreeSet<_> =
        records.iter().map(|r| r.recorded_at).collect();
    assert!(
        transactions.len() <= 3,
        "{} transactions",
        transactions.len()
    );
    assert_eq!(
        log.verify().await.unwrap(),
        ChainVerification::Intact { records: 20 }
    );
}

#[tokio::test]
async fn an_abandoned_append_is_still_written() {
    let db = database().await;
    let log = PgAuditLog::new(db.pool().clone());
    let blocker = hold_head(&db).await;
    let caller = {
        let log = log.clone();
        tokio::spawn(async move { log.append(entry(1)).await })
    };
    wait_for_lock_waiter(&db).await;
    caller.abort();
    assert!(caller.await.unwrap_err().is_cancelled());
    blocker.rollback().await.unwrap();
    // The transaction runs on its own task and commits without the caller.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let page = log.query(&AuditQuery::new()).await.unwrap();
        if page.records.len() == 1 {
            assert_eq!(page.records[0].entry.principal.as_deref(), Some("user-1"));
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the record never arrived"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(log.verify().await.unwrap().is_intact());
}

#[tokio::test]
async fn an_append_dropped_while_queued_is_still_written() {
    let db = database().await;
    let log = PgAuditLog::new(db.pool().clone());
    let blocker = hold_head(&db).await;
    // The first append becomes the writer and waits for the lock...
    let first = {
        let log = log.clone();
        tokio::spawn(async move { log.append(entry(1)).await })
    };
    wait_for_lock_waiter(&db).await;
    // ...the second queues behind it and is given up before its turn.
    let second = {
        let log = log.clone();
        tokio::spawn(async move { log.append(entry(2)).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    second.abort();
    assert!(second.await.unwrap_err().is_cancelled());
    blocker.rollback().await.unwrap();
    assert_eq!(first.await.unwrap().unwrap().sequence, 1);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let page = log.query(&AuditQuery::new()).await.unwrap();
        if page.records.len() == 2 {
            assert_eq!(page.records[1].entry.principal.as_deref(), Some("user-2"));
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the record never arrived"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(log.verify().await.unwrap().is_intact());
}

#[tokio::test]
async fn separate_stores_on_one_database_never_fork_the_chain() {
    // Sixteen PgAuditLog values, as sixteen processes would have: no shared
    // queue, so only the head row's lock in the database orders them.
    let db = database().await;
    let writers: Vec<_> = (0..16)
        .map(|t| {
            let log = PgAuditLog::new(db.pool().clone());
            tokio::spawn(async move {
                let mut got = Vec::new();
                for i in 0..25 {
                    got.push(log.append(entry(t * 100 + i)).await.unwrap().sequence);
                }
                got
            })
        })
        .collect();
    let mut all = Vec::new();
    for w in writers {
        all.extend(w.await.unwrap());
    }
    all.sort_unstable();
    assert_eq!(all, (1..=400).collect::<Vec<u64>>());
    let log = PgAuditLog::new(db.pool().clone());
    assert_eq!(
        log.verify().await.unwrap(),
        ChainVerification::Intact { records: 400 }
    );
    let stored: Vec<i64> = sqlx::query_scalar("SELECT sequence FROM keel.audit_log ORDER BY 1")
        .fetch_all(db.pool())
        .await
        .unwrap();
    assert_eq!(stored, (1..=400).collect::<Vec<i64>>());
}

#[tokio::test]
async fn separate_stores_retrying_the_same_commands_store_each_once() {
    // Twelve stores (as twelve processes, no shared queue) all append the
    // same 30 commands, each starting at another one: only the head's lock
    // orders them, and each command must still be stored once.
    let db = database().await;
    let writers: Vec<_> = (0..12u32)
        .map(|t| {
            let log = PgAuditLog::new(db.pool().clone());
            tokio::spawn(async move {
                let mut got = Vec::new();
                for i in 0..30 {
                    let n = (i + t * 5) % 30;
                    got.push((n, log.append(command_entry(n)).await.unwrap()));
                }
                got
            })
        })
        .collect();
    let mut first: std::collections::HashMap<u32, AuditRecord> = Default::default();
    for w in writers {
        for (n, record) in w.await.unwrap() {
            assert_eq!(*first.entry(n).or_insert_with(|| record.clone()), record);
        }
    }
    let counts: Vec<(i64, i64)> =
        sqlx::query_as("SELECT count(*), count(DISTINCT command_id) FROM keel.audit_log")
            .fetch_all(db.pool())
            .await
            .unwrap();
    assert_eq!(counts, vec![(30, 30)]);
    let log = PgAuditLog::new(db.pool().clone());
    assert_eq!(
        log.verify().await.unwrap(),
        ChainVerification::Intact { records: 30 }
    );
}

#[tokio::test]
async fn separate_stores_sending_other_attempts_store_each_attempt_once() {
    // Twelve stores (no shared queue) append attempts of the same 30
    // commands: store t sends attempt t % 3 (the original, a failure at the
    // same instant, a later receipt), so each attempt races three retries
    // of itself and the other attempts of its command.
    let db = database().await;
    let writers: Vec<_> = (0..12u32)
        .map(|t| {
            let log = PgAuditLog::new(db.pool().clone());
            tokio::spawn(async move {
                let mut got = Vec::new();
                for i in 0..30 {
                    let n = (i + t * 5) % 30;
                    let record = log.append(command_attempt(n, t % 3)).await.unwrap();
                    got.push(((n, t % 3), record));
                }
                got
            })
        })
        .collect();
    let mut first: std::collections::HashMap<(u32, u32), AuditRecord> = Default::default();
    for w in writers {
        for (attempt, record) in w.await.unwrap() {
            assert_eq!(
                *first.entry(attempt).or_insert_with(|| record.clone()),
                record
            );
        }
    }
    let sequences: std::collections::BTreeSet<u64> = first.values().map(|r| r.sequence).collect();
    assert_eq!(sequences, (1..=90).collect());
    let counts: Vec<(i64, i64)> =
        sqlx::query_as("SELECT count(*), count(DISTINCT command_id) FROM keel.audit_log")
            .fetch_all(db.pool())
            .await
            .unwrap();
    assert_eq!(counts, vec![(90, 30)]);
    let log = PgAuditLog::new(db.pool().clone());
    assert_eq!(
        log.verify().await.unwrap(),
        ChainVerification::Intact { records: 90 }
    );
}

#[tokio::test]
async fn a_retry_finds_its_attempt_among_many_of_one_command() {
    // A command id with many stored attempts (a client that resent it
    // again and again): a retry of any of them still finds its own record,
    // and a new attempt is still added.
    let db = database().await;
    let log = PgAuditLog::new(db.pool().clone());
    let mut attempts = Vec::new();
    for i in 0..40u32 {
        let mut e = command_attempt(7, i % 4);
        e.occurred_at += chrono::Duration::minutes(i64::from(i / 4));
        attempts.push((e.clone(), log.append(e).await.unwrap()));
    }
    for (e, record) in attempts.iter().rev() {
        assert_eq!(log.append(e.clone()).await.unwrap(), *record);
    }
    let mut newest = command_attempt(7, 0);
    newest.occurred_at += chrono::Duration::hours(1);
    assert_eq!(log.append(newest).await.unwrap().sequence, 41);
    assert_eq!(
        log.verify().await.unwrap(),
        ChainVerification::Intact { records: 41 }
    );
}

#[tokio::test]
async fn a_retry_after_a_lost_commit_answer_returns_the_stored_record() {
    // The first attempt committed but its caller never heard (here: the
    // append future was dropped after its transaction began); the retry
    // must find the record instead of adding a second one.
    let db = database().await;
    let log = PgAuditLog::new(db.pool().clone());
    let head = hold_head(&db).await;
    let abandoned = tokio::spawn({
        let log = log.clone();
        async move { log.append(command_entry(1)).await }
    });
    wait_for_lock_waiter(&db).await;
    abandoned.abort();
    head.commit().await.unwrap();
    let retried = log.append(command_entry(1)).await.unwrap();
    assert_eq!(retried.sequence, 1);
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM keel.audit_log")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(count, 1);
}

fn keys(id: &str, byte: u8) -> AuditKeys {
    AuditKeys::single(AuditKey::new(id, Secret::new(vec![byte; 32])).unwrap())
}

#[tokio::test]
async fn keyed_mode_finds_a_superuser_who_recomputes_the_chain() {
    let db = database().await;
    let log = PgAuditLog::new(db.pool().clone()).with_keys(keys("k1", 3));
    let mut records = Vec::new();
    for i in 1..=5 {
        records.push(log.append(entry(i)).await.unwrap());
    }
    let stored: (Option<String>, Option<String>) =
        sqlx::query_as("SELECT mac_key_id, mac FROM keel.audit_log WHERE sequence = 1")
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert_eq!(stored.0.as_deref(), Some("k1"));
    let mac = log.mac(1).await.unwrap().unwrap();
    assert_eq!(Some(mac.mac), stored.1);
    assert_eq!(log.mac(6).await.unwrap(), None);
    assert!(log.verify().await.unwrap().is_intact());

    // A superuser changes record 3 and recomputes the plain SHA-256 chain
    // from there on, head included.
    let mut conn = tamperer(&db).await;
    let mut prev = records[1].hash.clone();
    for record in &mut records[2..] {
        if record.sequence == 3 {
            record.entry.principal = Some("mallory".into());
        }
        record.prev_hash = prev;
        record.hash = record_hash(record);
        prev = record.hash.clone();
        sqlx::query(
            "UPDATE keel.audit_log SET principal = $1, prev_hash = $2, hash = $3 \
             WHERE sequence = $4",
        )
        .bind(&record.entry.principal)
        .bind(&record.prev_hash)
        .bind(&record.hash)
        .bind(record.sequence as i64)
        .execute(&mut *conn)
        .await
        .unwrap();
    }
    sqlx::query("UPDATE keel.audit_head SET hash = $1")
        .bind(&prev)
        .execute(&mut *conn)
        .await
        .unwrap();

    // Whoever checks without the key is fooled...
    let unkeyed = PgAuditLog::new(db.pool().clone());
    assert_eq!(
        unkeyed.verify().await.unwrap(),
        ChainVerification::Intact { records: 5 }
    );
    // ...the keyed log is not.
    let (sequence, reason) = broken(log.verify().await.unwrap());
    assert_eq!(sequence, 3);
    assert!(reason.starts_with("MAC mismatch"), "{reason}");
    let check = log
        .verify_after(&keel_security::audit::ChainHead::genesis())
        .await
        .unwrap();
    assert_eq!(check.head.sequence, 2);

    // Removing the MACs altogether does not help.
    run(
        &mut conn,
        "UPDATE keel.audit_log SET mac = NULL, mac_key_id = NULL",
    )
    .await;
    let (sequence, reason) = broken(log.verify().await.unwrap());
    assert_eq!(sequence, 1);
    assert!(reason.starts_with("MAC missing"), "{reason}");
}

#[tokio::test]
async fn the_database_checks_the_mac_columns() {
    let db = database().await;
    let log = PgAuditLog::new(db.pool().clone());
    log.append(entry(1)).await.unwrap();
    let mut conn = tamperer(&db).await;
    for sql in [
        "UPDATE keel.audit_log SET mac = 'nothex'",
        "UPDATE keel.audit_log SET mac_key_id = 'k1'",
        "UPDATE keel.audit_log SET mac_key_id = '', mac = repeat('0', 64)",
    ] {
        let err = sqlx::query(sql).execute(&mut *conn).await.unwrap_err();
        assert_eq!(sqlstate(&err).as_deref(), Some("23514"), "{sql}");
    }
}

/// Runs `statements` in one transaction, then rolls it back: `Ok` when
/// all of them ran, else the first failure.
async fn in_rolled_back_tx(db: &TestDatabase, statements: &[String]) -> Result<(), sqlx::Error> {
    let mut tx = db.pool().begin().await.unwrap();
    for sql in statements {
        sqlx::query(sql).execute(&mut *tx).await?;
    }
    tx.rollback().await.unwrap();
    Ok(())
}

// Sealing by hand the way releases before the pending table did (an
// unsealed row of keel.audit_log updated in place), as anyone allowed to
// UPDATE the table could try (the triggers on): only an unsealed row's
// chain columns, once, at the position right after the chain's last record
// and linked to it; within one transaction several rows in a row, then the
// head moved once onto the last of them.
#[tokio::test]
async fn the_database_seals_a_row_only_right_after_the_chain() {
    let db = database().await;
    let (log, records) = five(&db).await;
    let mut ids = Vec::new();
    for i in 6..=7 {
        let e = entry(i);
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO keel.audit_log (occurred_at, principal, command_type, event_types, \
             outcome, details) VALUES ($1, $2, $3, '{}', 'accepted', $4) RETURNING id",
        )
        .bind(e.occurred_at)
        .bind(&e.principal)
        .bind(&e.command_type)
        .bind(&e.details)
        .fetch_one(db.pool())
        .await
        .unwrap();
        ids.push(id);
    }
    let (h5, a, b) = (&records[4].hash, "a".repeat(64), "b".repeat(64));
    let seal = |id: i64, sequence: u64, prev: &str, hash: &str, extra: &str| {
        format!(
            "UPDATE keel.audit_log SET sequence = {sequence}, recorded_at = now(), \
             prev_hash = '{prev}', hash = '{hash}'{extra} WHERE id = {id}"
        )
    };
    let head = |sequence: u64, hash: &str| {
        format!("UPDATE keel.audit_head SET sequence = {sequence}, hash = '{hash}'")
    };
    let (six, seven) = (ids[0], ids[1]);

    for allowed in [
        vec![seal(six, 6, h5, &a, ""), head(6, &a)],
        vec![
            seal(six, 6, h5, &a, ""),
            seal(
                seven,
                7,
                &a,
                &b,
                ", mac_key_id = 'k1', mac = repeat('c', 64)",
            ),
            head(7, &b),
        ],
    ] {
        in_rolled_back_tx(&db, &allowed)
            .await
            .unwrap_or_else(|e| panic!("{allowed:?}: {e}"));
    }

    let refused = [
        // content changed while sealing
        vec![seal(six, 6, h5, &a, ", principal = 'mallory'")],
        vec![seal(six, 6, h5, &a, ", details = '{}'")],
        // a gap, a link to something else than the last record
        vec![seal(six, 7, h5, &a, "")],
        vec![seal(six, 6, &b, &a, "")],
        vec![seal(six, 6, h5, &a, ""), seal(seven, 7, h5, &b, "")],
        vec![seal(six, 6, h5, &a, ""), seal(seven, 8, &a, &b, "")],
        // a sealed row changed again, or unsealed
        vec![
            seal(six, 6, h5, &a, ""),
            format!("UPDATE keel.audit_log SET mac_key_id = 'k1', mac = '{b}' WHERE id = {six}"),
        ],
        vec![
            "UPDATE keel.audit_log SET sequence = NULL, recorded_at = NULL, prev_hash = NULL, \
             hash = NULL WHERE sequence = 5"
                .to_owned(),
        ],
        // the head past the last sealed record, or onto another hash
        vec![seal(six, 6, h5, &a, ""), head(7, &a)],
        vec![seal(six, 6, h5, &a, ""), head(6, &b)],
        vec![head(5, h5)],
    ];
    for statements in refused {
        let err = in_rolled_back_tx(&db, &statements)
            .await
            .expect_err(&format!("{statements:?} passed"));
        assert_eq!(
            sqlstate(&err).as_deref(),
            Some("KL003"),
            "{statements:?}: {err}"
        );
    }

    // Unsealed rows of the old layout are not this release's work list
    // (keel.audit_pending is; the upgrade moved the old rows there): the
    // release that writes them seals them, as above.
    assert_eq!(log.pending().await.unwrap(), 0);
    assert_eq!(log.seal().await.unwrap(), 0);
    assert_eq!(
        log.verify().await.unwrap(),
        ChainVerification::Intact { records: 5 }
    );
}
