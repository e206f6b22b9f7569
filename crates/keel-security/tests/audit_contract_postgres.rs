//! The audit-log contract suite against PostgreSQL, one migrated database
//! per rule.

use std::sync::Arc;

use keel_core::uow::TransactionSource;
use keel_security::audit::{AuditHead, PgAuditLog};
use keel_testkit::TestDatabase;

keel_security::audit_contract_suite!(|| async {
    let db = TestDatabase::create(&keel_security::MIGRATIONS)
        .await
        .expect("test database");
    let log: Arc<dyn AuditHead> = Arc::new(PgAuditLog::new(db.pool().clone()));
    (log, db)
});

#[tokio::test]
async fn keyed_logs_rotate() {
    let db = TestDatabase::create(&keel_security::MIGRATIONS)
        .await
        .expect("test database");
    let log = PgAuditLog::new(db.pool().clone());
    let subject: Arc<dyn AuditHead> = Arc::new(log.clone());
    keel_security::audit::testing::keyed_logs_rotate(subject, |keys| log.set_keys(keys)).await;
}

async fn postgres() -> (Arc<dyn AuditHead>, Arc<dyn TransactionSource>, TestDatabase) {
    let db = TestDatabase::create(&keel_security::MIGRATIONS)
        .await
        .expect("test database");
    let database = keel_database::Database::connect(
        keel_database::DatabaseConfig::builder()
            .connect_options(db.connect_options())
            .min_connections(0)
            .max_connections(20)
            .build()
            .expect("config"),
    )
    .await
    .expect("connect");
    let log: Arc<dyn AuditHead> = Arc::new(PgAuditLog::new(database.pool().clone()));
    (log, Arc::new(database), db)
}

#[tokio::test]
async fn within_commits_with_the_transaction() {
    let (log, source, _db) = postgres().await;
    keel_security::audit::testing::within_commits_with_the_transaction(log, source).await;
}

#[tokio::test]
async fn concurrent_transactions_chain_every_commit_once() {
    let (log, source, _db) = postgres().await;
    keel_security::audit::testing::concurrent_transactions_chain_every_commit_once(log, source)
        .await;
}
