//! Crashes around the commit of a command whose audit record is written
//! in its transaction, on the real PostgreSQL: the test binary runs itself
//! as a child (`child_process`, selected by an environment variable), the
//! child signals on stdout where it stands, and the parent kills it with
//! SIGKILL there. Also: many writers in their own transactions with a
//! chainer running.

#![allow(
    clippy::print_stdout,
    reason = "the child process signals where it stands on stdout"
)]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command as Process, Stdio};
use std::sync::Arc;

use async_trait::async_trait;
use common::connect;
use keel_core::command::{
    Command, CommandEnvelope, Handled, TransactionalHandler, TransactionalService,
};
use keel_core::uow::{Transaction, TransactionSource};
use keel_core::{
    AuditAppender, AuditEntry, AuditLog, AuditOutcome, AuditPage, AuditQuery, AuditRecord,
    ChainVerification, PipelineError,
};
use keel_database::UnitOfWork;
use keel_security::audit::{AuditHead, PgAuditLog};
use keel_security::pipeline::AuditLayer;
use keel_testkit::TestDatabase;
use tower::{Layer, ServiceExt};

const MODE: &str = "KEEL_AUDIT_CRASH_MODE";
const URL: &str = "KEEL_AUDIT_CRASH_URL";

struct Touch;
impl Command for Touch {
    fn command_type(&self) -> &'static str {
        "thing.touch"
    }
}

/// Writes one effect row through the command's transaction.
struct Toucher;

#[async_trait]
impl TransactionalHandler<Touch> for Toucher {
    type Output = ();
    async fn handle(
        &self,
        tx: &mut dyn Transaction,
        _: &CommandEnvelope<Touch>,
    ) -> Result<Handled<()>, PipelineError> {
        sqlx::query("INSERT INTO crash_effects DEFAULT VALUES")
            .execute(UnitOfWork::join(tx)?.conn())
            .await
            .map_err(keel_database::to_keel)?;
        Ok(Handled::new(()).with_events(["thing.touched"]))
    }
}

/// The PostgreSQL log; in mode `before_commit` its in-transaction append
/// signals and then never returns, so the child dies with the command's
/// transaction open (the handler ran, the record is written, no commit).
struct Stalling {
    inner: PgAuditLog,
    stall: bool,
}

struct StallingAppender<'t> {
    inner: Box<dyn AuditAppender + 't>,
    stall: bool,
}

#[async_trait]
impl AuditAppender for StallingAppender<'_> {
    async fn append(&self, entry: AuditEntry) -> keel_core::Result<()> {
        self.inner.append(entry).await?;
        if self.stall {
            println!("READY");
            std::future::pending::<()>().await;
        }
        Ok(())
    }
}

#[async_trait]
impl AuditLog for Stalling {
    async fn append(&self, entry: AuditEntry) -> keel_core::Result<AuditRecord> {
        self.inner.append(entry).await
    }
    async fn query(&self, query: &AuditQuery) -> keel_core::Result<AuditPage> {
        self.inner.query(query).await
    }
    async fn verify(&self) -> keel_core::Result<ChainVerification> {
        self.inner.verify().await
    }
    fn within<'t>(&'t self, tx: &'t mut dyn Transaction) -> Box<dyn AuditAppender + 't> {
        Box::new(StallingAppender {
            inner: self.inner.within(tx),
            stall: self.stall,
        })
    }
}

/// The child's side; does nothing in a normal test run.
#[tokio::test]
async fn child_process() {
    let (Ok(mode), Ok(url)) = (std::env::var(MODE), std::env::var(URL)) else {
        return;
    };
    let db = connect(&url, 2).await;
    let log = Arc::new(Stalling {
        inner: PgAuditLog::new(db.pool().clone()),
        stall: mode == "before_commit",
    });
    let service = AuditLayer::new(log).layer(TransactionalService::new(db.clone(), Toucher));
    service
        .oneshot(CommandEnvelope::new(Touch))
        .await
        .expect("the command");
    // Committed; no chainer runs here, so the record is not sealed yet.
    println!("COMMITTED");
    std::future::pending::<()>().await;
}

/// Runs the child in `mode`, waits for `signal`, kills it with SIGKILL.
fn crash_child(db: &TestDatabase, mode: &str, signal: &str) {
    let mut child = Process::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "child_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(MODE, mode)
        .env(URL, db.url())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn the child");
    let stdout = child.stdout.take().expect("stdout");
    let mut seen = false;
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("a line");
        if line.contains(signal) {
            seen = true;
            break;
        }
    }
    child.kill().expect("SIGKILL");
    child.wait().expect("reaped");
    assert!(seen, "the child never printed {signal}");
}

async fn setup() -> TestDatabase {
    let db = TestDatabase::create(&keel_security::MIGRATIONS)
        .await
        .expect("test database");
    sqlx::query("CREATE TABLE crash_effects (id bigserial PRIMARY KEY)")
        .execute(db.pool())
        .await
        .expect("effects table");
    db
}

async fn effects(db: &TestDatabase) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM crash_effects")
        .fetch_one(db.pool())
        .await
        .expect("count")
}

/// Runs a chainer until nothing is pending, then stops it.
async fn chain_everything(log: &PgAuditLog) {
    let chainer = log.chainer_every(std::time::Duration::from_millis(10));
    while log.pending().await.expect("pending") > 0 {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    chainer.shutdown().await;
}

#[tokio::test]
async fn a_crash_between_the_handler_and_the_commit_leaves_no_accepted_record() {
    let db = setup().await;
    crash_child(&db, "before_commit", "READY");
    // PostgreSQL ends the dead client's transaction: nothing of it stays.
    let log = PgAuditLog::new(db.pool().clone());
    chain_everything(&log).await;
    assert_eq!(effects(&db).await, 0);
    let rows: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM keel.audit_log) + (SELECT count(*) FROM keel.audit_pending)",
    )
    .fetch_one(db.pool())
    .await
    .expect("count");
    assert_eq!(
        rows, 0,
        "no record, sealed or not, of the rolled-back command"
    );
    assert!(
        log.query(&AuditQuery::new())
            .await
            .expect("query")
            .records
            .is_empty()
    );
}

#[tokio::test]
async fn a_crash_after_the_commit_keeps_the_record_for_the_chainer() {
    let db = setup().await;
    crash_child(&db, "after_commit", "COMMITTED");
    let log = PgAuditLog::new(db.pool().clone());
    assert_eq!(effects(&db).await, 1);
    assert_eq!(
        log.pending().await.expect("pending"),
        1,
        "committed, not sealed"
    );
    chain_everything(&log).await;
    let page = log.query(&AuditQuery::new()).await.expect("query");
    assert_eq!(page.records.len(), 1);
    let entry = &page.records[0].entry;
    assert_eq!(entry.outcome, AuditOutcome::Accepted);
    assert_eq!(entry.command_type, "thing.touch");
    assert_eq!(entry.event_types, ["thing.touched"]);
    assert_eq!(
        log.verify().await.expect("verify"),
        ChainVerification::Intact { records: 1 }
    );
}

#[tokio::test]
async fn writers_in_their_own_transactions_with_a_chainer_running() {
    let test_db = TestDatabase::create(&keel_security::MIGRATIONS)
        .await
        .expect("test database");
    let db = connect(&test_db.url(), 20).await;
    let log = PgAuditLog::new(db.pool().clone());
    let chainer = log.chainer_every(std::time::Duration::from_millis(5));
    let writers: Vec<_> = (0..12u32)
        .map(|w| {
            let db = db.clone();
            let log = log.clone();
            tokio::spawn(async move {
                let mut committed = Vec::new();
                for i in 0..15u32 {
                    let n = w * 100 + i;
                    let mut tx = TransactionSource::begin(&db).await.expect("begin");
                    let mut entry = AuditEntry::new(format!("cmd.{n}"), AuditOutcome::Accepted);
                    entry.command_id = Some(keel_core::CommandId::new());
                    log.within(&mut *tx).append(entry).await.expect("append");
                    if i % 4 == 3 {
                        tx.rollback().await.expect("rollback");
                    } else {
                        tx.commit().await.expect("commit");
                        committed.push(format!("cmd.{n}"));
                    }
                }
                committed
            })
        })
        .collect();
    let mut expected = Vec::new();
    for w in writers {
        expected.extend(w.await.expect("writer"));
    }
    chainer.shutdown().await;
    assert_eq!(
        log.pending().await.expect("pending"),
        0,
        "shutdown seals the rest"
    );
    // Every committed record sealed exactly once, nothing rolled back.
    let sealed: Vec<(i64, String)> =
        sqlx::query_as("SELECT sequence, command_type FROM keel.audit_log ORDER BY sequence")
            .fetch_all(db.pool())
            .await
            .expect("rows");
    let sequences: Vec<i64> = sealed.iter().map(|r| r.0).collect();
    assert_eq!(sequences, (1..=expected.len() as i64).collect::<Vec<_>>());
    let mut types: Vec<String> = sealed.into_iter().map(|r| r.1).collect();
    types.sort();
    expected.sort();
    assert_eq!(types, expected);
    assert_eq!(
        log.verify().await.expect("verify"),
        ChainVerification::Intact {
            records: expected.len() as u64
        }
    );
}
