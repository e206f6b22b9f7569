//! The audit-log contract suite against PostgreSQL, one migrated database
//! per rule.

use std::sync::Arc;

use keel_security::audit::{AuditHead, PgAuditLog};
use keel_testkit::TestDatabase;

keel_security::audit_contract_suite!(|| async {
    let db = TestDatabase::create(&keel_database::MIGRATOR)
        .await
        .expect("test database");
    let log: Arc<dyn AuditHead> = Arc::new(PgAuditLog::new(db.pool().clone()));
    (log, db)
});

#[tokio::test]
async fn keyed_logs_rotate() {
    let db = TestDatabase::create(&keel_database::MIGRATOR)
        .await
        .expect("test database");
    let log = PgAuditLog::new(db.pool().clone());
    let subject: Arc<dyn AuditHead> = Arc::new(log.clone());
    keel_security::audit::testing::keyed_logs_rotate(subject, |keys| log.set_keys(keys)).await;
}
