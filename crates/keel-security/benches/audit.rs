//! Audit-log append throughput on PostgreSQL against a raw single-row
//! `INSERT` into a table of the same shape (same columns and indexes, no
//! chain, no head lock), in the same run on the same database; rounds
//! alternate between the two so load changes hit both alike. A third
//! contender appends entries that carry command ids (so every group looks
//! its command ids up: the idempotency check) to a keyed log (an HMAC per
//! record). Also: the chain walk (`verify`, plain and keyed) and the
//! in-memory store.
//!
//! Needs PostgreSQL (`DATABASE_URL`, or 127.0.0.1:5432). Run with
//! `cargo bench -p keel-security --bench audit`; `KEEL_BENCH_SCALE`
//! (default 1.0) shrinks or grows every workload. Prints Markdown;
//! `docs/benchmarks-security.md` records the figures.

#![allow(clippy::print_stdout, reason = "a benchmark reports on stdout")]
#![allow(missing_docs, reason = "a benchmark binary")]

use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_core::{AggregateRef, AuditEntry, AuditLog, AuditOutcome, CommandId, CorrelationId};
use keel_security::Secret;
use keel_security::audit::{AuditKey, AuditKeys, InMemoryAuditLog, PgAuditLog};
use keel_testkit::TestDatabase;
use serde_json::json;
use sqlx::PgPool;

fn scale() -> f64 {
    std::env::var("KEEL_BENCH_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0)
}

fn n(base: usize) -> usize {
    ((base as f64) * scale()).max(1.0) as usize
}

fn entry(i: usize) -> AuditEntry {
    let mut e = AuditEntry::new("order.place", AuditOutcome::Accepted)
        .with_principal(format!("user-{}", i % 50))
        .with_tenant("acme")
        .with_aggregate(AggregateRef::new("Order", format!("o-{i}")))
        .with_correlation_id(CorrelationId::new());
    e.event_types = vec!["order.placed".into()];
    e.details = json!({"lines": 3, "total_cents": 4_997, "channel": "web"});
    e
}

const RAW_TABLE: &str = "CREATE TABLE bench_raw_audit (
    sequence bigserial PRIMARY KEY, occurred_at timestamptz NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now(), principal text, tenant text,
    command_id uuid, command_type text NOT NULL, event_types text[] NOT NULL,
    aggregate_kind text, aggregate_id text, outcome text NOT NULL, outcome_code text,
    outcome_reason text, correlation_id uuid, details jsonb NOT NULL,
    prev_hash text NOT NULL, hash text NOT NULL);
CREATE INDEX ON bench_raw_audit (principal, sequence) WHERE principal IS NOT NULL;
CREATE INDEX ON bench_raw_audit (aggregate_kind, aggregate_id, sequence)
    WHERE aggregate_kind IS NOT NULL;
CREATE INDEX ON bench_raw_audit (occurred_at, sequence);";

async fn raw_insert(pool: &PgPool, e: &AuditEntry) {
    sqlx::query(
        "INSERT INTO bench_raw_audit (occurred_at, principal, tenant, command_id, command_type, \
         event_types, aggregate_kind, aggregate_id, outcome, correlation_id, details, prev_hash, hash) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
    )
    .bind(e.occurred_at)
    .bind(e.principal.as_deref())
    .bind(e.tenant.as_deref())
    .bind(e.command_id.map(|id| *id.as_uuid()))
    .bind(&e.command_type)
    .bind(&e.event_types)
    .bind(e.aggregate.as_ref().map(|a| a.kind.as_str()))
    .bind(e.aggregate.as_ref().map(|a| a.id.as_str()))
    .bind("accepted")
    .bind(e.correlation_id.map(|id| *id.as_uuid()))
    .bind(sqlx::types::Json(&e.details))
    .bind("0".repeat(64))
    .bind("f".repeat(64))
    .execute(pool)
    .await
    .expect("raw insert");
}

#[derive(Clone, Copy)]
enum Contender {
    Raw,
    Audit,
    /// Entries with command ids, on the keyed log.
    Keyed,
}

/// The two logs under test: plain entries, and command ids on a keyed log.
struct Logs {
    plain: Arc<PgAuditLog>,
    keyed: Arc<PgAuditLog>,
}

/// `writers` tasks append `per_writer` rows each; returns the elapsed time.
async fn round(
    pool: &PgPool,
    logs: &Logs,
    who: Contender,
    writers: usize,
    per_writer: usize,
) -> Duration {
    let start = Instant::now();
    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            let pool = pool.clone();
            let plain = logs.plain.clone();
            let keyed = logs.keyed.clone();
            tokio::spawn(async move {
                for i in 0..per_writer {
                    let e = entry(w * 1_000_000 + i);
                    match who {
                        Contender::Raw => raw_insert(&pool, &e).await,
                        Contender::Audit => {
                            plain.append(e).await.expect("append");
                        }
                        Contender::Keyed => {
                            let mut e = e;
                            e.command_id = Some(CommandId::new());
                            keyed.append(e).await.expect("append");
                        }
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("writer");
    }
    start.elapsed()
}

async fn compare(pool: &PgPool, logs: &Logs, writers: usize, total: usize) {
    const ROUNDS: usize = 6;
    let per_writer = (total / ROUNDS / writers).max(1);
    let rows = per_writer * writers;
    // Warm every path (connections, plans) before timing.
    for who in [Contender::Raw, Contender::Audit, Contender::Keyed] {
        round(pool, logs, who, writers, 5).await;
    }
    let (mut raw, mut audit, mut keyed) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    for r in 0..ROUNDS {
        // Rotate which goes first, so none always meets a fresher buffer
        // cache or a quieter neighbour.
        let mut order = [Contender::Raw, Contender::Audit, Contender::Keyed];
        order.rotate_left(r % 3);
        for who in order {
            let t = round(pool, logs, who, writers, per_writer).await;
            match who {
                Contender::Raw => raw += t,
                Contender::Audit => audit += t,
                Contender::Keyed => keyed += t,
            }
        }
    }
    let n = (rows * ROUNDS) as f64;
    let raw_rate = n / raw.as_secs_f64();
    let audit_rate = n / audit.as_secs_f64();
    let keyed_rate = n / keyed.as_secs_f64();
    println!(
        "| append, {writers} writer(s) | {:.0} rows/s | {:.0} rows/s | {:.0} rows/s | {:.2}x | {:.2}x | {} rows each |",
        audit_rate,
        keyed_rate,
        raw_rate,
        audit_rate / raw_rate,
        keyed_rate / audit_rate,
        rows * ROUNDS
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let db = TestDatabase::create(&keel_security::MIGRATIONS)
        .await
        .expect("test database");
    sqlx::raw_sql(RAW_TABLE)
        .execute(db.pool())
        .await
        .expect("raw table");
    let pool = db.pool().clone();
    let log = Arc::new(PgAuditLog::new(pool.clone()));
    // The keyed log writes to a database of its own, so each chain is
    // verified with the right keys.
    let keyed_db = TestDatabase::create(&keel_security::MIGRATIONS)
        .await
        .expect("test database");
    let key = AuditKey::new("bench", Secret::new(vec![7; 32])).expect("key");
    let keyed =
        Arc::new(PgAuditLog::new(keyed_db.pool().clone()).with_keys(AuditKeys::single(key)));
    let logs = Logs {
        plain: log.clone(),
        keyed: keyed.clone(),
    };

    println!(
        "| workload | audit log | command ids + keyed | raw INSERT | audit ÷ raw | keyed ÷ audit | rows |"
    );
    println!("|---|---|---|---|---|---|---|");
    compare(&pool, &logs, 1, n(3_000)).await;
    compare(&pool, &logs, 8, n(6_000)).await;

    let start = Instant::now();
    let verdict = keyed.verify().await.expect("verify");
    let elapsed = start.elapsed();
    let keyed_records = match verdict {
        keel_core::ChainVerification::Intact { records } => records,
        other => panic!("{other:?}"),
    };
    println!(
        "\nkeyed verify: {keyed_records} records in {:.2} s = {:.0} records/s",
        elapsed.as_secs_f64(),
        keyed_records as f64 / elapsed.as_secs_f64()
    );

    let records = sqlx::query_scalar::<_, i64>("SELECT count(*) FROM keel.audit_log")
        .fetch_one(&pool)
        .await
        .expect("count");
    let start = Instant::now();
    let verdict = log.verify().await.expect("verify");
    let elapsed = start.elapsed();
    assert!(verdict.is_intact(), "{verdict:?}");
    println!(
        "\nverify: {records} records in {:.2} s = {:.0} records/s",
        elapsed.as_secs_f64(),
        records as f64 / elapsed.as_secs_f64()
    );

    let memory = InMemoryAuditLog::new();
    let count = n(200_000);
    let start = Instant::now();
    for i in 0..count {
        memory.append(entry(i)).await.expect("append");
    }
    let elapsed = start.elapsed();
    println!(
        "in-memory append: {count} records in {:.2} s = {:.0} records/s",
        elapsed.as_secs_f64(),
        count as f64 / elapsed.as_secs_f64()
    );

    let key = AuditKey::new("bench", Secret::new(vec![7; 32])).expect("key");
    let memory = InMemoryAuditLog::new().with_keys(AuditKeys::single(key));
    let start = Instant::now();
    for i in 0..count {
        let mut e = entry(i);
        e.command_id = Some(CommandId::new());
        memory.append(e).await.expect("append");
    }
    let elapsed = start.elapsed();
    println!(
        "in-memory append, command ids + keyed: {count} records in {:.2} s = {:.0} records/s",
        elapsed.as_secs_f64(),
        count as f64 / elapsed.as_secs_f64()
    );
}
