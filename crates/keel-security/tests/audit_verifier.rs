//! The periodic audit verifier: incremental passes, what it reports on a
//! broken or unreadable log, and its health check. Passes are triggered
//! with `verify_now` (the interval is an hour), so nothing here depends on
//! timing.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use keel_core::{
    AuditEntry, AuditLog, AuditOutcome, AuditPage, AuditQuery, AuditRecord, ChainVerification,
    Error, HealthCheck, HealthStatus, Probe, Result,
};
use keel_security::Secret;
use keel_security::audit::{
    AuditHead, AuditKey, AuditKeys, AuditVerifier, ChainCheck, ChainHead, InMemoryAuditLog,
    PgAuditLog, VerifierOutcome, record_hash,
};
use keel_testkit::TestDatabase;

const HOUR: Duration = Duration::from_secs(3_600);

fn entry(i: u32) -> AuditEntry {
    AuditEntry::new("order.place", AuditOutcome::Accepted).with_principal(format!("user-{i}"))
}

async fn database() -> TestDatabase {
    TestDatabase::create(&keel_security::MIGRATIONS)
        .await
        .expect("test database")
}

/// Overwrites record `sequence` and rechains it and everything after it
/// (triggers off, as a superuser could), head included.
async fn forge_from(db: &TestDatabase, log: &PgAuditLog, sequence: u64) {
    let mut records = log
        .query(&AuditQuery::new().limit(1_000))
        .await
        .unwrap()
        .records;
    let mut conn = db.pool().acquire().await.unwrap();
    sqlx::query("SET session_replication_role = replica")
        .execute(&mut *conn)
        .await
        .unwrap();
    let start = (sequence - 1) as usize;
    let mut prev = if start == 0 {
        keel_security::audit::GENESIS_HASH.to_owned()
    } else {
        records[start - 1].hash.clone()
    };
    for record in &mut records[start..] {
        if record.sequence == sequence {
            record.entry.principal = Some("mallory".into());
        }
        record.prev_hash = prev;
        record.hash = record_hash(record);
        prev = record.hash.clone();
        sqlx::query(
            "UPDATE keel.audit_log SET principal = $1, prev_hash = $2, hash = $3 WHERE sequence = $4",
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
}

#[tokio::test]
async fn passes_resume_from_the_last_verified_head() {
    let log = Arc::new(InMemoryAuditLog::new());
    for i in 0..3 {
        log.append(entry(i)).await.unwrap();
    }
    let verifier = AuditVerifier::spawn(log.clone(), HOUR);
    assert_eq!(verifier.name(), "audit_chain");
    assert!(verifier.applies_to(Probe::Readiness));
    assert!(!verifier.applies_to(Probe::Liveness));

    let status = verifier.verify_now().await.unwrap();
    assert!(matches!(status.outcome, VerifierOutcome::Intact { .. }));
    assert_eq!(status.verified, log.head().await.unwrap());
    assert_eq!(verifier.status(), Some(status.clone()));
    let report = verifier.check().await;
    assert_eq!(report.status, HealthStatus::Healthy);
    assert_eq!(report.detail, "verified through record 3");

    for i in 3..5 {
        log.append(entry(i)).await.unwrap();
    }
    let next = verifier.verify_now().await.unwrap();
    assert_eq!(next.outcome, VerifierOutcome::Intact { checked: 2 });
    assert_eq!(next.verified.sequence, 5);
    assert_eq!(next.passes, status.passes + 1);
    let idle = verifier.verify_now().await.unwrap();
    assert_eq!(idle.outcome, VerifierOutcome::Intact { checked: 0 });

    verifier.abort().await;
    assert_eq!(verifier.verify_now().await, None);
    assert_eq!(
        verifier.status(),
        Some(idle),
        "the last status stays readable"
    );
}

#[tokio::test]
async fn a_tampered_keyed_log_is_reported_and_stays_reported() {
    let db = database().await;
    let keys = AuditKeys::single(AuditKey::new("k1", Secret::new(vec![4; 32])).unwrap());
    let log = PgAuditLog::new(db.pool().clone()).with_keys(keys);
    for i in 0..3 {
        log.append(entry(i)).await.unwrap();
    }
    let verifier = AuditVerifier::new(Arc::new(log.clone()))
        .interval(HOUR)
        .start();
    let before = verifier.verify_now().await.unwrap();
    assert_eq!(before.verified.sequence, 3);
    for i in 3..6 {
        log.append(entry(i)).await.unwrap();
    }
    forge_from(&db, &log, 4).await;

    let status = verifier.verify_now().await.unwrap();
    match &status.outcome {
        VerifierOutcome::Broken { sequence, reason } => {
            assert_eq!(*sequence, 4, "{reason}");
            assert!(reason.starts_with("MAC mismatch"), "{reason}");
        }
        other => panic!("a forged record passed: {other:?}"),
    }
    assert_eq!(status.verified, before.verified, "the anchor stays put");
    let report = verifier.check().await;
    assert_eq!(report.status, HealthStatus::Degraded);
    assert!(
        report.detail.contains("audit record 4"),
        "{}",
        report.detail
    );
    // The next pass starts from the same anchor and finds the same fault.
    let again = verifier.verify_now().await.unwrap();
    assert_eq!(again.outcome, status.outcome);

    let strict = AuditVerifier::new(Arc::new(log))
        .interval(HOUR)
        .starting_from(before.verified.clone())
        .broken_status(HealthStatus::Unhealthy)
        .start();
    strict.verify_now().await.unwrap();
    assert_eq!(strict.check().await.status, HealthStatus::Unhealthy);
}

#[tokio::test]
async fn a_cut_tail_with_a_rewound_head_is_found_by_the_next_pass() {
    let db = database().await;
    let log = PgAuditLog::new(db.pool().clone());
    for i in 0..5 {
        log.append(entry(i)).await.unwrap();
    }
    let verifier = AuditVerifier::spawn(Arc::new(log.clone()), HOUR);
    assert_eq!(verifier.verify_now().await.unwrap().verified.sequence, 5);

    let four = log
        .query(&AuditQuery::new().after(3))
        .await
        .unwrap()
        .records;
    let mut conn = db.pool().acquire().await.unwrap();
    for sql in [
        "SET session_replication_role = replica",
        "DELETE FROM keel.audit_log WHERE sequence = 5",
    ] {
        sqlx::query(sql).execute(&mut *conn).await.unwrap();
    }
    sqlx::query("UPDATE keel.audit_head SET sequence = 4, hash = $1")
        .bind(&four[0].hash)
        .execute(&mut *conn)
        .await
        .unwrap();
    // The store alone no longer shows the cut...
    assert!(log.verify().await.unwrap().is_intact());
    // ...the verifier, holding the old head, does.
    match verifier.verify_now().await.unwrap().outcome {
        VerifierOutcome::Broken { sequence, reason } => {
            assert_eq!(sequence, 5);
            assert!(reason.starts_with("missing record"), "{reason}");
        }
        other => panic!("a cut tail passed: {other:?}"),
    }
}

/// A log whose `verify_after` answers from a script; everything else fails.
struct Scripted {
    answers: Mutex<VecDeque<Result<ChainCheck>>>,
    asked_from: Mutex<Vec<ChainHead>>,
}

impl Scripted {
    fn new(answers: Vec<Result<ChainCheck>>) -> Self {
        Self {
            answers: Mutex::new(answers.into()),
            asked_from: Mutex::new(Vec::new()),
        }
    }
}

fn unsupported<T>() -> Result<T> {
    Err(Error::internal_msg("not scripted"))
}

#[async_trait]
impl AuditLog for Scripted {
    async fn append(&self, _: AuditEntry) -> Result<AuditRecord> {
        unsupported()
    }
    async fn query(&self, _: &AuditQuery) -> Result<AuditPage> {
        unsupported()
    }
    async fn verify(&self) -> Result<ChainVerification> {
        unsupported()
    }
    fn within<'t>(
        &'t self,
        _: &'t mut dyn keel_core::uow::Transaction,
    ) -> Box<dyn keel_core::AuditAppender + 't> {
        Box::new(Unsupported)
    }
}

struct Unsupported;

#[async_trait]
impl keel_core::AuditAppender for Unsupported {
    async fn append(&self, _: AuditEntry) -> Result<()> {
        unsupported()
    }
}

#[async_trait]
impl AuditHead for Scripted {
    async fn pending(&self) -> Result<u64> {
        unsupported()
    }
    async fn head(&self) -> Result<ChainHead> {
        unsupported()
    }
    async fn verify_from(&self, _: &ChainHead) -> Result<ChainVerification> {
        unsupported()
    }
    async fn verify_after(&self, from: &ChainHead) -> Result<ChainCheck> {
        self.asked_from.lock().unwrap().push(from.clone());
        self.answers
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or_else(unsupported)
    }
}

fn head(sequence: u64) -> ChainHead {
    ChainHead {
        sequence,
        hash: format!("{sequence:064x}"),
    }
}

#[tokio::test]
async fn an_unreadable_log_degrades_the_check_and_the_next_pass_retries() {
    let log = Arc::new(Scripted::new(vec![
        Ok(ChainCheck::new(
            ChainVerification::Intact { records: 7 },
            head(7),
        )),
        Err(Error::unavailable(
            "postgres",
            "connection refused",
            std::io::Error::other("refused"),
        )),
        Ok(ChainCheck::new(
            ChainVerification::Intact { records: 2 },
            head(9),
        )),
    ]));
    let verifier = AuditVerifier::new(log.clone())
        .interval(HOUR)
        .starting_from(head(0));
    let verifier = verifier.start();
    // The pass at start-up took the first answer.
    let failed = verifier.verify_now().await.unwrap();
    assert!(
        matches!(&failed.outcome, VerifierOutcome::Error { message } if message.contains("connection refused")),
        "{failed:?}"
    );
    assert_eq!(failed.verified, head(7));
    assert_eq!(failed.passes, 2);
    let report = verifier.check().await;
    assert_eq!(report.status, HealthStatus::Degraded);
    assert!(
        report.detail.contains("could not be verified"),
        "{}",
        report.detail
    );

    let recovered = verifier.verify_now().await.unwrap();
    assert_eq!(recovered.outcome, VerifierOutcome::Intact { checked: 2 });
    assert_eq!(verifier.check().await.status, HealthStatus::Healthy);
    assert_eq!(
        *log.asked_from.lock().unwrap(),
        vec![head(0), head(7), head(7)],
        "each pass starts at the last head found intact"
    );
}
