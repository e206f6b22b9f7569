//! Appends inside a caller's transaction (run by each store's own tests,
//! outside the suite macro).

use std::collections::BTreeSet;
use std::sync::Arc;

use keel_core::uow::{Transaction, TransactionSource};
use keel_core::{ChainVerification, CommandId, Error, ErrorKind};

use super::{Subject, all, as_stored, command_entry, entry, sequences};

/// A transaction of no real backend: every store must refuse to join it.
#[derive(Debug)]
struct Foreign;

#[async_trait::async_trait]
impl Transaction for Foreign {
    fn backend(&self) -> &'static str {
        "foreign"
    }
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
    fn after_commit(&mut self, _: Box<dyn FnOnce() + Send>) {}
    async fn commit(self: Box<Self>) -> Result<(), Error> {
        Ok(())
    }
    async fn rollback(self: Box<Self>) -> Result<(), Error> {
        Ok(())
    }
}

/// `within(tx).append`: nothing is visible before the commit, nothing is
/// left by a rollback, the record is found (chained, verifiable) after the
/// commit; an entry repeated in the transaction, or repeating a committed
/// record, is stored once; invalid entries are refused with the field
/// named; a transaction of another backend is refused as `Internal` and
/// nothing is written.
pub async fn within_commits_with_the_transaction(log: Subject, source: Arc<dyn TransactionSource>) {
    let first = command_entry(1);
    let mut tx = source.begin().await.expect("begin");
    log.within(&mut *tx)
        .append(first.clone())
        .await
        .expect("append in tx");
    log.within(&mut *tx)
        .append(first.clone())
        .await
        .expect("repeat in tx");
    assert!(all(&*log).await.is_empty(), "visible before the commit");
    tx.rollback().await.expect("rollback");
    assert!(all(&*log).await.is_empty(), "left by a rollback");

    let mut tx = source.begin().await.expect("begin");
    log.within(&mut *tx)
        .append(first.clone())
        .await
        .expect("append in tx");
    log.within(&mut *tx)
        .append(first.clone())
        .await
        .expect("repeat in tx");
    log.within(&mut *tx)
        .append(command_entry(2))
        .await
        .expect("append in tx");
    tx.commit().await.expect("commit");
    let records = all(&*log).await;
    assert_eq!(sequences(&records), [1, 2]);
    assert_eq!(records[0].entry, as_stored(first.clone()));

    // A retry after the commit, in a transaction or on its own, finds it.
    let mut tx = source.begin().await.expect("begin");
    log.within(&mut *tx)
        .append(first.clone())
        .await
        .expect("retry in tx");
    tx.commit().await.expect("commit");
    assert_eq!(log.append(first).await.expect("retry"), records[0]);
    assert_eq!(all(&*log).await.len(), 2);
    assert_eq!(
        log.verify().await.expect("verify"),
        ChainVerification::Intact { records: 2 }
    );
    assert_eq!(log.pending().await.expect("pending"), 0);

    let mut tx = source.begin().await.expect("begin");
    let mut bad = entry("alice", 0);
    bad.command_type = String::new();
    match log.within(&mut *tx).append(bad).await {
        Err(Error::Invalid(invalid)) => assert_eq!(invalid.field, "command_type"),
        other => panic!("expected invalid input, got {other:?}"),
    }
    tx.rollback().await.expect("rollback");

    let mut foreign = Foreign;
    let err = log
        .within(&mut foreign)
        .append(command_entry(3))
        .await
        .expect_err("a foreign transaction");
    assert_eq!(err.kind(), ErrorKind::Internal, "{err}");
    assert!(err.to_string().contains("foreign"), "{err}");
    assert_eq!(all(&*log).await.len(), 2);
}

/// Sixteen transactions append at once, every third rolls back: the
/// committed records are all stored, chained once each in a gapless
/// chain that verifies; no record of a rolled-back one is.
pub async fn concurrent_transactions_chain_every_commit_once(
    log: Subject,
    source: Arc<dyn TransactionSource>,
) {
    let tasks: Vec<_> = (0..16u32)
        .map(|n| {
            let log = Arc::clone(&log);
            let source = Arc::clone(&source);
            tokio::spawn(async move {
                for round in 0..4u32 {
                    let i = n * 4 + round;
                    let mut tx = source.begin().await.expect("begin");
                    log.within(&mut *tx)
                        .append(command_entry(i))
                        .await
                        .expect("append in tx");
                    if i % 3 == 0 {
                        tx.rollback().await.expect("rollback");
                    } else {
                        tx.commit().await.expect("commit");
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("task");
    }
    let records = all(&*log).await;
    assert_eq!(sequences(&records), (1..=42).collect::<Vec<u64>>());
    let stored: BTreeSet<Option<CommandId>> = records.iter().map(|r| r.entry.command_id).collect();
    let expected: BTreeSet<Option<CommandId>> = (0..64u32)
        .filter(|i| i % 3 != 0)
        .map(|i| command_entry(i).command_id)
        .collect();
    assert_eq!(stored, expected);
    assert_eq!(
        log.verify().await.expect("verify"),
        ChainVerification::Intact { records: 42 }
    );
}
