//! The inbox: idempotent consumers on top of an at-least-once bus.
//!
//! * [`InboxStore`]: where the marks "consumer C handled event E" live,
//!   joined through a unit of work: [`PgInbox`] (`keel.inbox`) and
//!   [`InMemoryInbox`];
//! * [`Inbox`]: a bus [`EventHandler`] that opens a transaction per
//!   delivery, marks the event and runs an [`InboxHandler`] in that same
//!   transaction.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use keel_core::uow::{Transaction, TransactionSource};
use keel_core::{Delivery, EventHandler, EventId, HandlerError, Message};
use tracing::debug;

use crate::error::{OutboxError, Result};

mod memory;
mod postgres;

pub use memory::InMemoryInbox;
pub use postgres::PgInbox;

/// Longest consumer name, in bytes.
pub const MAX_CONSUMER_BYTES: usize = 200;

/// Where an inbox keeps its marks. Object-safe: hold an
/// `Arc<dyn InboxStore>`.
#[async_trait]
pub trait InboxStore: Send + Sync + fmt::Debug {
    /// This store bound to `tx`: a mark recorded through it commits or
    /// rolls back with `tx`. A transaction of another backend makes every
    /// call fail with [`keel_core::Error::Internal`].
    fn within<'t>(&'t self, tx: &'t mut dyn Transaction) -> Box<dyn InboxMarks + 't>;

    /// Whether `consumer` has handled `event_id` (and the mark has not
    /// been pruned).
    ///
    /// # Errors
    ///
    /// The backend's failure.
    async fn has_handled(&self, consumer: &str, event_id: EventId) -> keel_core::Result<bool>;

    /// Deletes `consumer`'s marks older than `older_than`; returns how
    /// many.
    ///
    /// # Errors
    ///
    /// [`keel_core::Error::Invalid`] when `older_than` is too long to
    /// express; the backend's failure.
    async fn prune(&self, consumer: &str, older_than: Duration) -> keel_core::Result<u64>;
}

/// An [`InboxStore`] bound to one transaction, from [`InboxStore::within`].
#[async_trait]
pub trait InboxMarks: Send + Sync {
    /// Records that `consumer` handles `message`. Returns `true` the first
    /// time, `false` when a committed mark already exists: skip the work
    /// then.
    ///
    /// Call it before the work, in the same transaction. On PostgreSQL a
    /// concurrent duplicate waits for this transaction to end and then
    /// answers `false` (or `true`, after a rollback); in memory the later
    /// of two racing transactions fails to commit with
    /// [`keel_core::Error::AlreadyExists`], so its work is discarded
    /// either way.
    ///
    /// # Errors
    ///
    /// [`keel_core::Error::Invalid`] for a bad consumer name (empty, over
    /// [`MAX_CONSUMER_BYTES`], a NUL character); the backend's failure.
    async fn record(&self, consumer: &str, message: &Message) -> keel_core::Result<bool>;
}

/// A handler whose work is done in the transaction the [`Inbox`] opens,
/// and commits together with the mark that the event was handled.
///
/// Everything the handler writes through `tx` (with any port's
/// `within(tx)`: an entity repository, the outbox, …) commits or rolls back
/// with that mark. Work done elsewhere (an HTTP call, another database) is
/// not covered: make it idempotent on the event id yourself.
#[async_trait]
pub trait InboxHandler: Send + Sync {
    /// Handles one delivery inside `tx`. Returning an error rolls `tx` back
    /// and hands the error to the bus (retry or dead-letter).
    async fn handle(
        &self,
        tx: &mut dyn Transaction,
        delivery: &Delivery,
    ) -> std::result::Result<(), HandlerError>;
}

/// Wraps an [`InboxHandler`] into a bus [`EventHandler`] that runs the work
/// at most once per event id for its consumer name, however often the bus
/// delivers the message.
///
/// For each delivery, in one transaction begun from its
/// [`TransactionSource`]: mark `(consumer, event_id)`, run the handler on
/// the same transaction, commit. A delivery whose event this consumer
/// already handled is acknowledged without calling the handler. A handler
/// failure rolls back its work and the mark together, so the redelivery
/// runs it again. Two deliveries of one event racing each other: the work
/// commits once (see [`InboxMarks::record`]).
///
/// The consumer name identifies the handler, not the process: every replica
/// of one handler uses the same name; two different handlers of one event use
/// different names (each does its own work once).
pub struct Inbox<H> {
    store: Arc<dyn InboxStore>,
    transactions: Arc<dyn TransactionSource>,
    consumer: String,
    handler: H,
}

impl<H> fmt::Debug for Inbox<H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Inbox")
            .field("consumer", &self.consumer)
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

impl<H: InboxHandler> Inbox<H> {
    /// Wraps `handler` under the name `consumer`, keeping marks in `store`
    /// and beginning each delivery's transaction from `transactions` (the
    /// same backend as the store: a `keel_database::Database` with
    /// [`PgInbox`], [`MemoryTransactions`](keel_core::uow::MemoryTransactions)
    /// with [`InMemoryInbox`]).
    ///
    /// # Errors
    ///
    /// [`OutboxError::Invalid`] when `consumer` is empty, longer than
    /// [`MAX_CONSUMER_BYTES`] or contains a NUL character.
    pub fn new(
        store: Arc<dyn InboxStore>,
        transactions: Arc<dyn TransactionSource>,
        consumer: impl Into<String>,
        handler: H,
    ) -> Result<Self> {
        let consumer = consumer.into();
        check_consumer(&consumer)?;
        Ok(Self {
            store,
            transactions,
            consumer,
            handler,
        })
    }

    /// An inbox on PostgreSQL: marks in `db`'s `keel.inbox`, transactions
    /// begun from `db`.
    ///
    /// # Errors
    ///
    /// As [`new`](Self::new).
    pub fn postgres(
        db: &keel_database::Database,
        consumer: impl Into<String>,
        handler: H,
    ) -> Result<Self> {
        Self::new(
            Arc::new(PgInbox::new(db.pool().clone())),
            Arc::new(db.clone()),
            consumer,
            handler,
        )
    }

    /// An inbox in memory: marks in `store`, in-memory transactions.
    ///
    /// # Errors
    ///
    /// As [`new`](Self::new).
    pub fn in_memory(
        store: &InMemoryInbox,
        consumer: impl Into<String>,
        handler: H,
    ) -> Result<Self> {
        Self::new(
            Arc::new(store.clone()),
            Arc::new(keel_core::uow::MemoryTransactions::new()),
            consumer,
            handler,
        )
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

    /// This inbox's marks bound to `tx`, under its consumer name: for
    /// flows that run their own transaction.
    ///
    /// ```text
    /// if inbox.within(tx).record(&message).await? { /* first time: do the work */ }
    /// ```
    pub fn within<'t>(&'t self, tx: &'t mut dyn Transaction) -> InboxIn<'t> {
        InboxIn {
            marks: self.store.within(tx),
            consumer: &self.consumer,
        }
    }

    /// Whether this consumer has handled `event_id` (and the mark has not
    /// been pruned).
    ///
    /// # Errors
    ///
    /// The backend's failure.
    pub async fn has_handled(&self, event_id: EventId) -> keel_core::Result<bool> {
        self.store.has_handled(&self.consumer, event_id).await
    }

    /// Deletes this consumer's marks older than `older_than`; returns how
    /// many. Keep marks longer than the bus can redeliver a message
    /// (Pub/Sub retains unacknowledged messages for up to 7 days by default,
    /// 31 at most), or a late redelivery runs the work again.
    ///
    /// # Errors
    ///
    /// [`keel_core::Error::Invalid`] when `older_than` is too long; the
    /// backend's failure.
    pub async fn prune(&self, older_than: Duration) -> keel_core::Result<u64> {
        self.store.prune(&self.consumer, older_than).await
    }
}

/// An [`Inbox`]'s marks bound to a transaction, from [`Inbox::within`].
pub struct InboxIn<'t> {
    marks: Box<dyn InboxMarks + 't>,
    consumer: &'t str,
}

impl fmt::Debug for InboxIn<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InboxIn")
            .field("consumer", &self.consumer)
            .finish_non_exhaustive()
    }
}

impl InboxIn<'_> {
    /// Marks `message` as handled by this consumer; `true` the first time.
    /// See [`InboxMarks::record`].
    ///
    /// # Errors
    ///
    /// The backend's failure.
    pub async fn record(&self, message: &Message) -> keel_core::Result<bool> {
        self.marks.record(self.consumer, message).await
    }
}

#[async_trait]
impl<H: InboxHandler> EventHandler for Inbox<H> {
    async fn handle(&self, delivery: &Delivery) -> std::result::Result<(), HandlerError> {
        let mut tx = self
            .transactions
            .begin()
            .await
            .map_err(HandlerError::retry)?;
        let first = self.within(&mut *tx).record(&delivery.message).await;
        match first {
            Ok(true) => {}
            Ok(false) => {
                debug!(consumer = %self.consumer, event_id = %delivery.message.event_id,
                       attempt = delivery.attempt, "already handled; acknowledging");
                tx.rollback().await.map_err(HandlerError::retry)?;
                return Ok(());
            }
            Err(e) => {
                let _ = tx.rollback().await;
                return Err(HandlerError::retry(e));
            }
        }
        // On error (or a panic), dropping `tx` rolls the mark back with the
        // work, so the redelivery runs it again.
        if let Err(e) = self.handler.handle(&mut *tx, delivery).await {
            let _ = tx.rollback().await;
            return Err(e);
        }
        tx.commit().await.map_err(HandlerError::retry)?;
        Ok(())
    }
}

pub(crate) fn check_consumer(consumer: &str) -> Result<()> {
    if consumer.is_empty() {
        return Err(OutboxError::invalid("consumer", "must not be empty"));
    }
    if consumer.len() > MAX_CONSUMER_BYTES {
        return Err(OutboxError::invalid(
            "consumer",
            format!("is longer than {MAX_CONSUMER_BYTES} bytes"),
        ));
    }
    if consumer.contains('\0') {
        return Err(OutboxError::invalid("consumer", "contains a NUL character"));
    }
    Ok(())
}
