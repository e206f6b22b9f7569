//! The audit-log contract suite against the in-memory store.

use std::sync::Arc;

use keel_security::audit::{AuditHead, InMemoryAuditLog};

keel_security::audit_contract_suite!(|| async {
    let log: Arc<dyn AuditHead> = Arc::new(InMemoryAuditLog::new());
    (log, ())
});
