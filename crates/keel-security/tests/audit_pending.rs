//! The pending table (`keel.audit_pending`) on the real PostgreSQL: what
//! the database refuses, the upgrade from the layout where unsealed rows
//! lived in `keel.audit_log`, many clients through the command pipeline,
//! and repeats of one attempt stored once.

mod common;

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use common::connect;
use keel_core::command::{
    Command, CommandEnvelope, Handled, TransactionalHandler, TransactionalService,
};
use keel_core::uow::{Transaction, TransactionSource};
use keel_core::{
    AuditEntry, AuditLog, AuditOutcome, AuditQuery, AuditRecord, ChainVerification, CommandError,
    DomainError, PipelineError,
};
use keel_database::{Migrations, UnitOfWork};
use keel_security::audit::testing::command_entry;
use keel_security::audit::{AuditHead, GENESIS_HASH, PgAuditLog, record_hash};
use keel_security::pipeline::AuditLayer;
use keel_testkit::TestDatabase;
use sqlx::migrate::Migrator;
use tower::{Layer, ServiceExt};

/// The first migration of the pending layout.
const PENDING_MIGRATION: i64 = 20261207090000;

async fn database() -> TestDatabase {
    TestDatabase::create(&keel_security::MIGRATIONS)
        .await
        .expect("test database")
}

fn sqlstate(e: &sqlx::Error) -> Option<String> {
    e.as_database_error()
        .and_then(|db| db.code())
        .map(|c| c.into_owned())
}

/// Runs `statements` in one transaction, then rolls it back: `Ok` when
/// all of them ran, else the first failure.
async fn in_rolled_back_tx(db: &TestDatabase, statements: &[String]) -> Result<(), sqlx::Error> {
    let mut tx = db.pool().begin().await.expect("begin");
    for sql in statements {
        sqlx::query(sql).execute(&mut *tx).await?;
    }
    tx.rollback().await.expect("rollback");
    Ok(())
}

/// The hash that makes two entries the same attempt (what the log keeps
/// in `content_hash`): the entry's hash at no position.
fn content_hash(entry: &AuditEntry) -> String {
    record_hash(&AuditRecord::new(
        0,
        entry.clone(),
        DateTime::<Utc>::UNIX_EPOCH,
        GENESIS_HASH,
        "",
    ))
}

// A pending record cannot be changed, nor removed before it is in the
// chain; a sealed row can only be added right after the chain's last;
// sealing a row that is not pending fails.
#[tokio::test]
async fn the_database_guards_pending_and_sealed_rows() {
    let db = database().await;
    let database = connect(&db.url(), 4).await;
    let log = PgAuditLog::new(db.pool().clone());
    let mut last = None;
    for n in 1..=3 {
        last = Some(log.append(command_entry(n)).await.expect("append"));
    }
    let last = last.expect("three records");
    let mut tx = TransactionSource::begin(&database).await.expect("begin");
    log.within(&mut *tx)
        .append(command_entry(4))
        .await
        .expect("append");
    tx.commit().await.expect("commit");
    assert_eq!(log.pending().await.expect("pending"), 1);

    let insert_sealed = |sequence: u64, prev: &str| {
        format!(
            "INSERT INTO keel.audit_log (sequence, occurred_at, recorded_at, command_type, \
             event_types, outcome, details, prev_hash, hash) VALUES ({sequence}, now(), now(), \
             'x.y', '{{}}', 'accepted', '{{}}', '{prev}', repeat('a', 64))"
        )
    };
    let h3 = &last.hash;
    in_rolled_back_tx(&db, &[insert_sealed(4, h3)])
        .await
        .expect("right after the chain's last record");
    // Several rows in one statement: each links to the one before it in
    // the statement (found among the inserted rows), the first to the head.
    let insert_run = |rows: &[(u64, &str, &str)]| {
        let values: Vec<String> = rows
            .iter()
            .map(|(sequence, prev, hash)| {
                format!(
                    "({sequence}, now(), now(), 'x.y', '{{}}', 'accepted', '{{}}', '{prev}', '{hash}')"
                )
            })
            .collect();
        format!(
            "INSERT INTO keel.audit_log (sequence, occurred_at, recorded_at, command_type, \
             event_types, outcome, details, prev_hash, hash) VALUES {}",
            values.join(", ")
        )
    };
    let (a, b, c) = ("a".repeat(64), "b".repeat(64), "c".repeat(64));
    in_rolled_back_tx(&db, &[insert_run(&[(4, h3, &a), (5, &a, &b), (6, &b, &c)])])
        .await
        .expect("a linked run right after the chain's last record");
    // A row sealed past the head by an earlier statement of the same
    // transaction (the head has not moved): found by its sequence.
    in_rolled_back_tx(
        &db,
        &[insert_run(&[(4, h3, &a)]), insert_run(&[(5, &a, &b)])],
    )
    .await
    .expect("linked to a row sealed earlier in the transaction");
    let refused = [
        "UPDATE keel.audit_pending SET entry = entry || '{\"principal\": \"mallory\"}'".to_owned(),
        "DELETE FROM keel.audit_pending".to_owned(),
        "TRUNCATE keel.audit_pending".to_owned(),
        insert_sealed(5, h3),
        insert_sealed(4, &"b".repeat(64)),
        // A broken link inside one statement's run, and a gap in it.
        insert_run(&[(4, h3, &a), (5, &c, &b)]),
        insert_run(&[(4, h3, &a), (6, &a, &b)]),
    ];
    for sql in refused {
        let err = in_rolled_back_tx(&db, std::slice::from_ref(&sql))
            .await
            .expect_err(&sql);
        assert_eq!(sqlstate(&err).as_deref(), Some("KL003"), "{sql}: {err}");
    }
    // A position taken already: the unique sequence index refuses it
    // before the guard looks.
    let err = in_rolled_back_tx(&db, &[insert_sealed(3, h3)])
        .await
        .expect_err("a taken position");
    assert_eq!(sqlstate(&err).as_deref(), Some("23505"), "{err}");
    // Behind the head, at a free position (as if records were cut and the
    // head kept): refused by the guard.
    let behind = format!(
        "{}; {}",
        "ALTER TABLE keel.audit_log DISABLE TRIGGER audit_log_append_only",
        "DELETE FROM keel.audit_log WHERE sequence = 3"
    );
    let err = in_rolled_back_tx(
        &db,
        &[
            "ALTER TABLE keel.audit_log DISABLE TRIGGER audit_log_append_only".to_owned(),
            "DELETE FROM keel.audit_log WHERE sequence = 3".to_owned(),
            "ALTER TABLE keel.audit_log ENABLE TRIGGER audit_log_append_only".to_owned(),
            insert_sealed(3, h3),
        ],
    )
    .await
    .expect_err(&behind);
    assert_eq!(sqlstate(&err).as_deref(), Some("KL003"), "{err}");
    let not_pending = format!(
        "SELECT FROM keel.seal_pending_audit_records('[{{\"id\": -1, \"sequence\": 4, \
         \"recorded_at\": \"2026-01-01T00:00:00Z\", \"prev_hash\": \"{h3}\", \
         \"hash\": \"{}\"}}]', '{{-1}}')",
        "a".repeat(64)
    );
    let err = in_rolled_back_tx(&db, &[not_pending])
        .await
        .expect_err("a row that is not pending");
    assert!(err.to_string().contains("pending"), "{err}");

    assert_eq!(log.seal().await.expect("seal"), 1);
    assert_eq!(log.pending().await.expect("pending"), 0);
    assert_eq!(
        log.verify().await.expect("verify"),
        ChainVerification::Intact { records: 4 }
    );
}

/// keel-security's migrations before the pending table, as the previous
/// release shipped them.
fn previous_release() -> Migrations {
    let migrations: Vec<_> = keel_security::MIGRATIONS
        .iter()
        .filter(|m| m.version < PENDING_MIGRATION)
        .cloned()
        .collect();
    Migrations::new(
        "keel-security",
        Migrator {
            migrations: Cow::Owned(migrations),
            ..Migrator::DEFAULT
        },
    )
}

/// Writes `entry` the way the previous release did: an unsealed row of
/// `keel.audit_log`. Returns its id.
async fn insert_old_layout(pool: &sqlx::PgPool, entry: &AuditEntry) -> i64 {
    sqlx::query_scalar(
        "INSERT INTO keel.audit_log (occurred_at, principal, tenant, command_id, command_type, \
         event_types, aggregate_kind, aggregate_id, outcome, details, content_hash) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'accepted', $9, $10) RETURNING id",
    )
    .bind(entry.occurred_at)
    .bind(&entry.principal)
    .bind(&entry.tenant)
    .bind(entry.command_id.map(|id| *id.as_uuid()))
    .bind(&entry.command_type)
    .bind(&entry.event_types)
    .bind(entry.aggregate.as_ref().map(|a| a.kind.clone()))
    .bind(entry.aggregate.as_ref().map(|a| a.id.clone()))
    .bind(&entry.details)
    .bind(content_hash(entry))
    .fetch_one(pool)
    .await
    .expect("old-layout insert")
}

// A log of the previous release (two records sealed, two committed but
// unsealed, in keel.audit_log) upgraded: the unsealed rows move to the
// pending table under their ids, seal after the sealed ones into an
// intact chain, and a retry of a carried-over attempt is stored once.
#[tokio::test]
async fn an_old_log_with_unsealed_rows_is_carried_over() {
    let old = previous_release();
    let db = TestDatabase::create(&old).await.expect("old database");
    let pool = db.pool().clone();
    // As stored: whole microseconds.
    let entries: Vec<AuditEntry> = (1..=5)
        .map(|n| {
            let mut e = command_entry(n);
            e.occurred_at =
                DateTime::from_timestamp_micros(e.occurred_at.timestamp_micros()).expect("a time");
            e
        })
        .collect();
    let mut ids = Vec::new();
    for e in &entries[..4] {
        ids.push(insert_old_layout(&pool, e).await);
    }
    // Seal the first two as the previous release's chainer did.
    let recorded_at: DateTime<Utc> = "2026-12-01T10:00:00.000001Z".parse().expect("time");
    let mut prev = GENESIS_HASH.to_owned();
    let mut seals = Vec::new();
    for (i, e) in entries[..2].iter().enumerate() {
        let sequence = i as u64 + 1;
        let hash = record_hash(&AuditRecord::new(
            sequence,
            e.clone(),
            recorded_at,
            prev.clone(),
            "",
        ));
        seals.push(serde_json::json!({
            "id": ids[i], "sequence": sequence, "recorded_at": "2026-12-01T10:00:00.000001Z",
            "prev_hash": prev, "hash": hash,
        }));
        prev = hash;
    }
    let mut tx = pool.begin().await.expect("begin");
    sqlx::query("SELECT 1 FROM keel.audit_head FOR UPDATE")
        .execute(&mut *tx)
        .await
        .expect("head");
    sqlx::query("SELECT FROM keel.seal_audit_records($1)")
        .bind(serde_json::Value::Array(seals))
        .execute(&mut *tx)
        .await
        .expect("old sealing");
    tx.commit().await.expect("commit");

    keel_database::migrate(&pool, &[&keel_security::MIGRATIONS])
        .await
        .expect("upgrade");
    let unsealed: i64 =
        sqlx::query_scalar("SELECT count(*) FROM keel.audit_log WHERE sequence IS NULL")
            .fetch_one(&pool)
            .await
            .expect("count");
    assert_eq!(unsealed, 0, "no unsealed row left in keel.audit_log");
    let pending_ids: Vec<i64> = sqlx::query_scalar("SELECT id FROM keel.audit_pending ORDER BY id")
        .fetch_all(&pool)
        .await
        .expect("ids");
    assert_eq!(pending_ids, ids[2..]);

    let log = PgAuditLog::new(pool.clone());
    assert_eq!(log.pending().await.expect("pending"), 2);
    // A retry of the third command (its first attempt waits, carried
    // over): stored once, as record 3.
    let retried = log.append(entries[2].clone()).await.expect("retry");
    assert_eq!((retried.sequence, &retried.entry), (3, &entries[2]));
    assert_eq!(log.pending().await.expect("pending"), 0);
    let fifth = log.append(entries[4].clone()).await.expect("new record");
    assert_eq!(fifth.sequence, 5);
    let page = log.query(&AuditQuery::new()).await.expect("query");
    let stored: Vec<AuditEntry> = page.records.into_iter().map(|r| r.entry).collect();
    assert_eq!(stored, entries);
    let sealed_ids: Vec<i64> =
        sqlx::query_scalar("SELECT id FROM keel.audit_log ORDER BY sequence LIMIT 4")
            .fetch_all(&pool)
            .await
            .expect("ids");
    assert_eq!(sealed_ids, ids, "records keep their ids");
    assert_eq!(
        log.verify().await.expect("verify"),
        ChainVerification::Intact { records: 5 }
    );
}

struct Touch {
    n: u32,
}

impl Command for Touch {
    fn command_type(&self) -> &'static str {
        "thing.touch"
    }
    fn audit_details(&self) -> serde_json::Value {
        serde_json::json!({ "n": self.n })
    }
}

/// Writes one effect row; every fifth command is refused after writing it
/// (the row rolls back with the transaction).
struct Toucher;

#[async_trait]
impl TransactionalHandler<Touch> for Toucher {
    type Output = ();
    async fn handle(
        &self,
        tx: &mut dyn Transaction,
        envelope: &CommandEnvelope<Touch>,
    ) -> Result<Handled<()>, PipelineError> {
        sqlx::query("INSERT INTO effects (n) VALUES ($1)")
            .bind(i64::from(envelope.command.n))
            .execute(UnitOfWork::join(tx)?.conn())
            .await
            .map_err(keel_database::to_keel)?;
        if envelope.command.n % 5 == 4 {
            return Err(CommandError::Rejected(DomainError::new(
                "thing.refused",
                "every fifth is refused",
            )));
        }
        Ok(Handled::new(()).with_events(["thing.touched"]))
    }
}

// Sixteen clients through the pipeline with a chainer running: every
// command has exactly one record, accepted ones with their effect, refused
// ones without; the chain is intact. Meanwhile eight tasks append the same
// entry over and over (retries of one attempt): it is stored once.
#[tokio::test]
async fn many_clients_each_command_recorded_once() {
    let test_db = database().await;
    sqlx::query("CREATE TABLE effects (n bigint PRIMARY KEY)")
        .execute(test_db.pool())
        .await
        .expect("effects table");
    let db = connect(&test_db.url(), 24).await;
    let log = PgAuditLog::new(db.pool().clone());
    let chainer = log.chainer_every(Duration::from_millis(20));
    let service = AuditLayer::new(Arc::new(log.clone()))
        .layer(TransactionalService::new(db.clone(), Toucher));
    let clients = 16u32;
    let per_client = 25u32;
    let mut tasks = Vec::new();
    for c in 0..clients {
        let service = service.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..per_client {
                let n = c * per_client + i;
                let result = service
                    .clone()
                    .oneshot(CommandEnvelope::new(Touch { n }))
                    .await;
                assert_eq!(result.is_ok(), n % 5 != 4, "command {n}: {result:?}");
            }
        }));
    }
    let repeated = command_entry(10_000);
    let mut repeats = Vec::new();
    for _ in 0..8 {
        let log = log.clone();
        let entry = repeated.clone();
        repeats.push(tokio::spawn(async move {
            let mut sequences = Vec::new();
            for _ in 0..5 {
                sequences.push(log.append(entry.clone()).await.expect("append").sequence);
            }
            sequences
        }));
    }
    for t in tasks {
        t.await.expect("client");
    }
    let mut sequences = Vec::new();
    for t in repeats {
        sequences.extend(t.await.expect("repeater"));
    }
    chainer.shutdown().await;
    assert_eq!(log.pending().await.expect("pending"), 0);
    sequences.dedup();
    assert_eq!(
        sequences.len(),
        1,
        "one record for one attempt: {sequences:?}"
    );

    let total = clients * per_client;
    let mut outcomes: HashMap<u32, Vec<AuditOutcome>> = HashMap::new();
    let mut after = 0;
    loop {
        let page = log
            .query(&AuditQuery::new().after(after).limit(500))
            .await
            .expect("query");
        for r in &page.records {
            if r.entry.command_type == "thing.touch" {
                let n = r.entry.details["n"].as_u64().expect("n") as u32;
                outcomes.entry(n).or_default().push(r.entry.outcome.clone());
            }
        }
        match page.next_after {
            Some(next) => after = next,
            None => break,
        }
    }
    assert_eq!(outcomes.len(), total as usize, "every command recorded");
    for (n, recorded) in &outcomes {
        assert_eq!(recorded.len(), 1, "command {n}: {recorded:?}");
        assert_eq!(
            recorded[0] == AuditOutcome::Accepted,
            n % 5 != 4,
            "command {n}: {recorded:?}"
        );
    }
    let effects: Vec<i64> = sqlx::query_scalar("SELECT n FROM effects ORDER BY n")
        .fetch_all(db.pool())
        .await
        .expect("effects");
    let accepted: Vec<i64> = (0..i64::from(total)).filter(|n| n % 5 != 4).collect();
    assert_eq!(
        effects, accepted,
        "effects exactly of the accepted commands"
    );
    assert_eq!(
        log.verify().await.expect("verify"),
        ChainVerification::Intact {
            records: u64::from(total) + 1
        }
    );
}
