//! The command pipeline's transactional service on PostgreSQL: the
//! handler's writes commit when it accepts the command and vanish when it
//! does not, a failing commit is never reported as accepted, and a
//! serialization failure runs the whole command again.

mod common;

use common::{database_with_items, insert_item, item_ids};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use keel_core::command::{
    Command, CommandEnvelope, Handled, TransactionalHandler, TransactionalService,
};
use keel_core::uow::{MemoryTransactions, Transaction};
use keel_core::{CommandError, DomainError, Error, ErrorKind, PipelineError};
use keel_database::{UnitOfWork, to_keel};
use sqlx::Executor;
use tower::ServiceExt;

/// Inserts items, then answers as told.
struct AddItems {
    ids: Vec<i32>,
    answer: Answer,
}

#[derive(Clone, Copy)]
enum Answer {
    Accept,
    Reject,
    Fail,
    /// PostgreSQL aborts the first `n` attempts with a serialization
    /// failure (SQLSTATE 40001), then the command is accepted.
    SerializationFailures(u32),
}

impl Command for AddItems {
    fn command_type(&self) -> &'static str {
        "items.add"
    }
}

#[derive(Default)]
struct Adder {
    attempts: AtomicU32,
}

#[async_trait::async_trait]
impl TransactionalHandler<AddItems> for Adder {
    type Output = usize;

    async fn handle(
        &self,
        tx: &mut dyn Transaction,
        envelope: &CommandEnvelope<AddItems>,
    ) -> Result<Handled<usize>, PipelineError> {
        let attempt = self.attempts.fetch_add(1, Ordering::SeqCst) + 1;
        let uow = UnitOfWork::join(tx)?;
        for id in &envelope.command.ids {
            insert_item(uow.conn(), *id).await.map_err(to_keel)?;
        }
        match envelope.command.answer {
            Answer::Accept => {
                Ok(Handled::new(envelope.command.ids.len()).with_events(["items.added"]))
            }
            Answer::SerializationFailures(n) if attempt <= n => {
                // A real server error, classified like any other.
                sqlx::query(
                    "DO $$ BEGIN RAISE EXCEPTION 'simulated' USING ERRCODE = '40001'; END $$",
                )
                .execute(uow.conn())
                .await
                .map_err(to_keel)?;
                unreachable!("the statement above always fails")
            }
            Answer::SerializationFailures(_) => {
                Ok(Handled::new(envelope.command.ids.len()).with_events(["items.added"]))
            }
            Answer::Reject => Err(CommandError::Rejected(DomainError::new(
                "items.too_many",
                "too many items",
            ))),
            Answer::Fail => Err(Error::internal_msg("the handler broke").into()),
        }
    }
}

fn add(ids: &[i32], answer: Answer) -> CommandEnvelope<AddItems> {
    CommandEnvelope::new(AddItems {
        ids: ids.to_vec(),
        answer,
    })
}

#[tokio::test]
async fn accepted_commands_commit_and_refused_ones_roll_back() {
    let (_test_db, db) = database_with_items().await;
    let service = TransactionalService::new(db.clone(), Adder::default());

    let handled = service
        .clone()
        .oneshot(add(&[1, 2], Answer::Accept))
        .await
        .unwrap();
    assert_eq!(handled.output, 2);
    assert_eq!(item_ids(&db).await, [1, 2]);

    let rejected = service
        .clone()
        .oneshot(add(&[3], Answer::Reject))
        .await
        .unwrap_err();
    assert_eq!(rejected.as_rejection().unwrap().code(), "items.too_many");
    let failed = service
        .clone()
        .oneshot(add(&[4], Answer::Fail))
        .await
        .unwrap_err();
    assert_eq!(
        failed.as_infrastructure().unwrap().kind(),
        ErrorKind::Internal
    );
    assert_eq!(
        item_ids(&db).await,
        [1, 2],
        "refused commands wrote nothing"
    );

    // A statement error inside the handler rolls back its earlier writes.
    let duplicate = service
        .clone()
        .oneshot(add(&[5, 1], Answer::Accept))
        .await
        .unwrap_err();
    assert_eq!(
        duplicate.as_infrastructure().unwrap().kind(),
        ErrorKind::Conflict
    );
    assert_eq!(item_ids(&db).await, [1, 2]);

    // Every transaction was finished: nothing is left open on the pool.
    let open: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity \
         WHERE datname = current_database() AND state LIKE 'idle in transaction%'",
    )
    .fetch_one(db.pool())
    .await
    .unwrap();
    assert_eq!(open, 0);
}

#[tokio::test]
async fn a_failing_commit_is_not_reported_as_accepted() {
    let (_test_db, db) = database_with_items().await;
    // Checked only at COMMIT: two items may not share a note.
    db.pool()
        .execute(
            "ALTER TABLE items ADD CONSTRAINT one_note UNIQUE (note) DEFERRABLE INITIALLY DEFERRED",
        )
        .await
        .unwrap();
    let service = TransactionalService::new(db.clone(), Adder::default());

    let err = service
        .oneshot(add(&[1, 2], Answer::Accept))
        .await
        .unwrap_err();
    assert_eq!(err.as_infrastructure().unwrap().kind(), ErrorKind::Conflict);
    assert!(item_ids(&db).await.is_empty());
}

#[tokio::test]
async fn a_serialization_failure_runs_the_whole_command_again() {
    let (_test_db, db) = database_with_items().await;
    let adder = Arc::new(Adder::default());
    let service = TransactionalService::from_parts(Arc::new(db.clone()), Arc::clone(&adder));

    // Two failed attempts, each after inserting the items: the third
    // attempt starts from nothing and commits them once.
    let handled = service
        .clone()
        .oneshot(add(&[1, 2], Answer::SerializationFailures(2)))
        .await
        .unwrap();
    assert_eq!(handled.output, 2);
    assert_eq!(adder.attempts.load(Ordering::SeqCst), 3);
    assert_eq!(item_ids(&db).await, [1, 2]);

    // Past the limit, the conflict reaches the caller, typed and
    // retryable, and nothing is stored.
    adder.attempts.store(0, Ordering::SeqCst);
    let err = service
        .max_attempts(2)
        .oneshot(add(&[3], Answer::SerializationFailures(5)))
        .await
        .unwrap_err();
    let err = err.as_infrastructure().unwrap();
    assert!(err.is_transaction_conflict(), "{err}");
    assert!(err.is_retryable());
    assert_eq!(err.code(), "keel.conflict.transaction");
    assert_eq!(adder.attempts.load(Ordering::SeqCst), 2);
    assert_eq!(item_ids(&db).await, [1, 2]);
}

#[tokio::test]
async fn a_transaction_of_another_backend_is_refused_by_name() {
    // A PostgreSQL handler wired to in-memory transactions: a typed error,
    // never a write outside the transaction.
    let err = TransactionalService::new(MemoryTransactions::new(), Adder::default())
        .oneshot(add(&[1], Answer::Accept))
        .await
        .unwrap_err();
    let err = err.as_infrastructure().unwrap();
    assert_eq!(err.kind(), ErrorKind::Internal);
    assert!(err.to_string().contains("memory"), "{err}");
}
