//! The audit-log contract suite against the in-memory store.

use std::sync::Arc;

use keel_security::audit::{AuditHead, InMemoryAuditLog};

keel_security::audit_contract_suite!(|| async {
    let log: Arc<dyn AuditHead> = Arc::new(InMemoryAuditLog::new());
    (log, ())
});

#[tokio::test]
async fn keyed_logs_rotate() {
    let log = Arc::new(InMemoryAuditLog::new());
    let subject: Arc<dyn AuditHead> = log.clone();
    keel_security::audit::testing::keyed_logs_rotate(subject, |keys| log.set_keys(keys)).await;
}
