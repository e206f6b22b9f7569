//! The unit-of-work layer of the command pipeline, against PostgreSQL: the
//! handler's writes commit when it accepts the command and vanish when it
//! does not, and a failing commit is never reported as accepted.

mod common;

use common::{database_with_items, insert_item, item_ids};
use keel_core::command::{Command, CommandEnvelope, CommandHandler, Handled, HandlerService};
use keel_core::{CommandError, DomainError, Error, ErrorKind, PipelineError};
use keel_database::{CommandTransaction, UnitOfWorkLayer, to_keel};
use sqlx::Executor;
use tower::{Layer, ServiceExt};

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
}

impl Command for AddItems {
    fn command_type(&self) -> &'static str {
        "items.add"
    }
}

struct Adder;

#[async_trait::async_trait]
impl CommandHandler<AddItems> for Adder {
    type Output = usize;

    async fn handle(
        &self,
        envelope: CommandEnvelope<AddItems>,
    ) -> Result<Handled<usize>, PipelineError> {
        let tx = CommandTransaction::of(&envelope)?;
        {
            let mut uow = tx.lock().await?;
            for id in &envelope.command.ids {
                insert_item(uow.conn(), *id).await.map_err(to_keel)?;
            }
        }
        match envelope.command.answer {
            Answer::Accept => {
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
    let service = UnitOfWorkLayer::new(db.clone()).layer(HandlerService::new(Adder));

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
    let service = UnitOfWorkLayer::new(db.clone()).layer(HandlerService::new(Adder));

    let err = service
        .oneshot(add(&[1, 2], Answer::Accept))
        .await
        .unwrap_err();
    assert_eq!(err.as_infrastructure().unwrap().kind(), ErrorKind::Conflict);
    assert!(item_ids(&db).await.is_empty());
}

#[tokio::test]
async fn a_handler_without_the_layer_gets_a_typed_error() {
    let err = HandlerService::new(Adder)
        .oneshot(add(&[1], Answer::Accept))
        .await
        .unwrap_err();
    let err = err.as_infrastructure().unwrap();
    assert_eq!(err.kind(), ErrorKind::Internal);
    assert!(err.to_string().contains("UnitOfWorkLayer"), "{err}");
}
