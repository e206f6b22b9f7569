//! The audit-log contract suite against the in-memory store.

use std::sync::Arc;

use keel_core::uow::{MemoryTransactions, TransactionSource};
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

fn memory() -> (Arc<dyn AuditHead>, Arc<dyn TransactionSource>) {
    (
        Arc::new(InMemoryAuditLog::new()),
        Arc::new(MemoryTransactions::new()),
    )
}

#[tokio::test]
async fn within_commits_with_the_transaction() {
    let (log, source) = memory();
    keel_security::audit::testing::within_commits_with_the_transaction(log, source).await;
}

#[tokio::test]
async fn concurrent_transactions_chain_every_commit_once() {
    let (log, source) = memory();
    keel_security::audit::testing::concurrent_transactions_chain_every_commit_once(log, source)
        .await;
}
