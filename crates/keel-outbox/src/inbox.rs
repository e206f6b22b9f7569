//! The inbox: idempotent consumers on top of an at-least-once bus.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use keel_core::{Delivery, EventHandler, EventId, HandlerError, Message};
use sqlx::{PgConnection, PgPool};
use tracing::debug;

use crate::error::{OutboxError, Result};

const MAX_CONSUMER_LEN: usize = 200;

/// A handler whose work is done in a PostgreSQL transaction the [`Inbox`]
/// opens, and commits together with the record that the event was handled.
///
/// Everything the handler writes through `tx` commits or rolls back with
/// that record. Work done elsewhere (an HTTP call, another database) is not
/// covered: make it idempotent on the event id yourself.
#[async_trait]
pub trait InboxHandler: Send + Sync {
    /// Handles one delivery inside `tx`. Returning an error rolls `tx` back
    /// and hands the error to the bus (retry or dead-letter).
    async fn handle(
        &self,
        tx: &mut PgConnection,
        delivery: &Delivery,
    ) -> std::result::Result<(), HandlerError>;
}

/// Wraps an [`InboxHandler`] into a bus [`EventHandler`] that runs the work
/// at most once per event id for its consumer name, however often the bus
/// delivers the message.
///
/// For each delivery, in one transaction: insert `(consumer, event_id)` into
/// `keel.inbox`, run the handler on the same transaction, commit. A delivery
/// whose event this consumer already handled is acknowledged without calling
/// the handler. Two deliveries of one event racing each other: the second
/// insert waits on the first one's uncommitted row; if the first commits, the
/// second sees the conflict and skips; if it rolls back, the second does the
/// work. Either way the work happens exactly once.
///
/// The consumer name identifies the handler, not the process: every replica
/// of one handler uses the same name; two different handlers of one event use
/// different names (each does its own work once).
pub struct Inbox<H> {
    pool: PgPool,
    consumer: String,
    handler: H,
}

impl<H> fmt::Debug for Inbox<H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Inbox")
            .field("consumer", &self.consumer)
            .finish_non_exhaustive()
    }
}

impl<H: InboxHandler> Inbox<H> {
    /// Wraps `handler` under the name `consumer`.
    ///
    /// # Errors
    ///
    /// [`OutboxError::Invalid`] when `consumer` is empty, longer than 200
    /// bytes or contains a NUL character.
    pub fn new(pool: PgPool, consumer: impl Into<String>, handler: H) -> Result<Self> {
        let consumer = consumer.into();
        check_consumer(&consumer)?;
        Ok(Self {
            pool,
            consumer,
            handler,
        })
    }

    /// The consumer name.
    #[must_use]
    pub fn consumer(&self) -> &str {
        &self.consumer
    }

    /// The wrapped handler.
    #[must_use]
    pub fn handler(&self) -> &H {
        &self.handler
    }

    /// Whether this consumer has handled `event_id` (and the record has not
    /// been pruned).
    ///
    /// # Errors
    ///
    /// [`OutboxError::Database`] when PostgreSQL fails.
    pub async fn has_handled(&self, event_id: EventId) -> Result<bool> {
        let found: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM keel.inbox WHERE consumer = $1 AND event_id = $2)",
        )
        .bind(&self.consumer)
        .bind(event_id.as_uuid())
        .fetch_one(&self.pool)
        .await?;
        Ok(found)
    }

    /// Deletes this consumer's records older than `older_than`; returns how
    /// many. Keep records longer than the bus can redeliver a message
    /// (Pub/Sub retains unacknowledged messages for up to 7 days by default,
    /// 31 at most), or a late redelivery runs the work again.
    ///
    /// # Errors
    ///
    /// [`OutboxError::Database`] when PostgreSQL fails.
    pub async fn prune(&self, older_than: Duration) -> Result<u64> {
        let micros = i64::try_from(older_than.as_micros())
            .map_err(|_| OutboxError::invalid("older_than", "is too long"))?;
        let deleted = sqlx::query(
            "DELETE FROM keel.inbox \
             WHERE consumer = $1 AND handled_at < now() - $2 * interval '1 microsecond'",
        )
        .bind(&self.consumer)
        .bind(micros)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(deleted)
    }
}

#[async_trait]
impl<H: InboxHandler> EventHandler for Inbox<H> {
    async fn handle(&self, delivery: &Delivery) -> std::result::Result<(), HandlerError> {
        let mut tx = self.pool.begin().await.map_err(retry)?;
        if !record(&mut tx, &self.consumer, &delivery.message)
            .await
            .map_err(retry)?
        {
            debug!(consumer = %self.consumer, event_id = %delivery.message.event_id,
                   attempt = delivery.attempt, "already handled; acknowledging");
            tx.rollback().await.map_err(retry)?;
            return Ok(());
        }
        // On error (or a panic), dropping `tx` rolls the record back with the
        // work, so the redelivery runs it again.
        self.handler.handle(&mut tx, delivery).await?;
        tx.commit().await.map_err(retry)?;
        Ok(())
    }
}

/// Records that `consumer` handles `message`, on the caller's transaction.
/// Returns `true` the first time, `false` when the record already exists
/// (committed by an earlier transaction): skip the work then.
///
/// This is the building block of [`Inbox`], for flows that manage their own
/// transaction. Call it before the work, in the same transaction: a
/// concurrent duplicate then waits for this transaction to end instead of
/// doing the work alongside it.
///
/// # Errors
///
/// [`OutboxError::Invalid`] for a bad consumer name, [`OutboxError::Database`]
/// when PostgreSQL fails.
pub async fn record(conn: &mut PgConnection, consumer: &str, message: &Message) -> Result<bool> {
    check_consumer(consumer)?;
    // `ON CONFLICT ON CONSTRAINT` names the one conflict that means
    // "handled already"; any other failure is an error. On a race the insert
    // waits for the other transaction and only reports a conflict once that
    // transaction has committed its record, so `false` is never a guess.
    let inserted = sqlx::query(
        "INSERT INTO keel.inbox (consumer, event_id, event_type) VALUES ($1, $2, $3) \
         ON CONFLICT ON CONSTRAINT inbox_pkey DO NOTHING",
    )
    .bind(consumer)
    .bind(message.event_id.as_uuid())
    .bind(&message.event_type)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    Ok(inserted == 1)
}

fn check_consumer(consumer: &str) -> Result<()> {
    if consumer.is_empty() {
        return Err(OutboxError::invalid("consumer", "must not be empty"));
    }
    if consumer.len() > MAX_CONSUMER_LEN {
        return Err(OutboxError::invalid(
            "consumer",
            format!("is longer than {MAX_CONSUMER_LEN} bytes"),
        ));
    }
    if consumer.contains('\0') {
        return Err(OutboxError::invalid("consumer", "contains a NUL character"));
    }
    Ok(())
}

fn retry(e: impl Into<OutboxError>) -> HandlerError {
    HandlerError::retry(keel_core::Error::from(e.into()))
}
