//! The outbox port: what handler code writes through, whichever backend
//! keeps the rows.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use keel_core::uow::Transaction;

use crate::message::OutboxMessage;

/// An outbox: a place where integration events wait, inside a unit of
/// work, until a [`Relay`](crate::Relay) publishes them.
///
/// Implemented by [`PgOutbox`](crate::PgOutbox) (table `keel.outbox`,
/// joins a `keel_database::UnitOfWork`) and by
/// [`InMemoryOutbox`](crate::InMemoryOutbox) (joins a
/// [`MemoryTransaction`](keel_core::uow::MemoryTransaction)). Handler code
/// holds an `Arc<dyn Outbox>` and never names the backend:
///
/// ```
/// use keel_core::Message;
/// use keel_core::uow::Transaction;
/// use keel_outbox::{Outbox, OutboxMessage};
/// use serde_json::json;
///
/// async fn place_order(outbox: &dyn Outbox, tx: &mut dyn Transaction) -> keel_core::Result<()> {
///     // ... the business change, written through `tx` too ...
///     let placed = Message::new("order.placed", json!({ "order_id": "o-42" }));
///     outbox
///         .within(tx)
///         .write(&OutboxMessage::new("orders", "Order", "o-42", placed))
///         .await
/// }
/// ```
pub trait Outbox: Send + Sync + fmt::Debug {
    /// This outbox bound to `tx`: what it writes commits or rolls back with
    /// `tx`, and no relay sees it before the commit.
    ///
    /// A transaction of another backend (an in-memory one handed to the
    /// PostgreSQL outbox, say) makes every write fail with
    /// [`keel_core::Error::Internal`]; nothing is written.
    fn within<'t>(&'t self, tx: &'t mut dyn Transaction) -> Box<dyn OutboxWrite + 't>;
}

impl<T: Outbox + ?Sized> Outbox for Arc<T> {
    fn within<'t>(&'t self, tx: &'t mut dyn Transaction) -> Box<dyn OutboxWrite + 't> {
        (**self).within(tx)
    }
}

/// An [`Outbox`] bound to one transaction, from [`Outbox::within`].
#[async_trait]
pub trait OutboxWrite: Send + Sync {
    /// Writes one message. See [`write_all`](Self::write_all).
    ///
    /// # Errors
    ///
    /// As [`write_all`](Self::write_all).
    async fn write(&self, message: &OutboxMessage) -> keel_core::Result<()> {
        self.write_all(std::slice::from_ref(message)).await
    }

    /// Writes `messages` in order. They are checked first, all of them:
    /// a batch with one bad message writes nothing.
    ///
    /// # Errors
    ///
    /// * [`keel_core::Error::Invalid`]: a name is empty, over
    ///   [`MAX_NAME_BYTES`](crate::MAX_NAME_BYTES) or holds a NUL
    ///   character; the payload is over the outbox's limit or holds
    ///   `\u0000`; the ordering key is over
    ///   [`MAX_ORDERING_KEY_BYTES`](crate::MAX_ORDERING_KEY_BYTES). Nothing
    ///   was written and the transaction is still usable.
    /// * [`keel_core::Error::AlreadyExists`]: an event id appears twice in
    ///   `messages` (nothing written, the transaction still usable), or is
    ///   already in the outbox (the transaction is aborted: roll it back).
    /// * [`keel_core::Error::Internal`]: `tx` belongs to another backend.
    /// * the backend's failure (PostgreSQL down, a transaction conflict, …),
    ///   typed by `keel_database`.
    async fn write_all(&self, messages: &[OutboxMessage]) -> keel_core::Result<()>;
}
