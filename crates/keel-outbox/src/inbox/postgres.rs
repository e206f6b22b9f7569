//! Inbox marks in PostgreSQL's `keel.inbox`.

use std::time::Duration;

use async_trait::async_trait;
use keel_core::uow::Transaction;
use keel_core::{EventId, Message};
use keel_database::UnitOfWork;
use sqlx::PgPool;
use tokio::sync::Mutex;

use super::{InboxMarks, InboxStore, check_consumer};
use crate::error::OutboxError;

/// The [`InboxStore`] in PostgreSQL's `keel.inbox`; marks are written in
/// the caller's `keel_database::UnitOfWork`.
#[derive(Clone, Debug)]
pub struct PgInbox {
    pool: PgPool,
}

impl PgInbox {
    /// Marks in `pool`'s `keel.inbox` (`pool` is used for
    /// [`has_handled`](InboxStore::has_handled) and
    /// [`prune`](InboxStore::prune); marks go through the caller's
    /// transaction).
    #[must_use]
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }
}

#[async_trait]
impl InboxStore for PgInbox {
    fn within<'t>(&'t self, tx: &'t mut dyn Transaction) -> Box<dyn InboxMarks + 't> {
        Box::new(PgInboxIn { tx: Mutex::new(tx) })
    }

    async fn has_handled(&self, consumer: &str, event_id: EventId) -> keel_core::Result<bool> {
        let found = sqlx::query_scalar!(
            r#"SELECT EXISTS (SELECT 1 FROM keel.inbox WHERE consumer = $1 AND event_id = $2)
               AS "found!""#,
            consumer,
            event_id.as_uuid(),
        )
        .fetch_one(&self.pool)
        .await
        .map_err(keel_database::to_keel)?;
        Ok(found)
    }

    async fn prune(&self, consumer: &str, older_than: Duration) -> keel_core::Result<u64> {
        let micros = i64::try_from(older_than.as_micros())
            .map_err(|_| OutboxError::invalid("older_than", "is too long"))?;
        let deleted = sqlx::query!(
            "DELETE FROM keel.inbox \
             WHERE consumer = $1 AND handled_at < now() - $2::int8 * interval '1 microsecond'",
            consumer,
            micros,
        )
        .execute(&self.pool)
        .await
        .map_err(keel_database::to_keel)?
        .rows_affected();
        Ok(deleted)
    }
}

struct PgInboxIn<'t> {
    tx: Mutex<&'t mut dyn Transaction>,
}

#[async_trait]
impl InboxMarks for PgInboxIn<'_> {
    async fn record(&self, consumer: &str, message: &Message) -> keel_core::Result<bool> {
        check_consumer(consumer)?;
        let mut tx = self.tx.lock().await;
        let uow = UnitOfWork::join(&mut **tx)?;
        // `ON CONFLICT ON CONSTRAINT` names the one conflict that means
        // "handled already"; any other failure is an error. On a race the
        // insert waits for the other transaction and only reports a conflict
        // once that transaction has committed its mark, so `false` is never
        // a guess.
        let inserted = sqlx::query!(
            "INSERT INTO keel.inbox (consumer, event_id, event_type) VALUES ($1, $2, $3) \
             ON CONFLICT ON CONSTRAINT inbox_pkey DO NOTHING",
            consumer,
            message.event_id.as_uuid(),
            message.event_type,
        )
        .execute(uow.conn())
        .await
        .map_err(keel_database::to_keel)?
        .rows_affected();
        Ok(inserted == 1)
    }
}
