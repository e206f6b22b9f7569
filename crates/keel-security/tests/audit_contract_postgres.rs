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
