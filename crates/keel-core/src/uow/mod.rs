//! Units of work: one transaction that several ports write through.
//!
//! A command usually changes more than one thing: it appends an aggregate's
//! events, updates a read-model row, queues an integration event in the
//! outbox and marks the incoming message as handled. Those writes must
//! commit together or not at all. A [`Transaction`] is that "together",
//! seen from the ports: application code receives `&mut dyn Transaction`
//! and hands it to every port it writes through, with one spelling across
//! Keel:
//!
//! ```text
//! orders.within(tx).save(&mut order, &metadata).await?;   // event-sourced aggregate
//! products.within(tx).update(product, version).await?;    // entity repository
//! outbox.within(tx).write(&message).await?;               // transactional outbox
//! inbox.within(tx).record(&delivery).await?;              // inbox mark
//! ```
//!
//! `within(tx)` returns the same port bound to the transaction: what it
//! writes becomes visible to others when the transaction commits, and
//! vanishes if it rolls back.
//!
//! Which transaction type a port accepts depends on its backend:
//! PostgreSQL adapters accept the unit of work a `keel_database::Database`
//! begins, in-memory variants accept a [`MemoryTransaction`]. A port given
//! the other kind fails with [`Error::Internal`] naming both, instead of
//! writing outside the transaction; [`join`] is how an adapter asks.
//!
//! The transaction itself comes from a [`TransactionSource`]
//! (`keel_database::Database`, or [`MemoryTransactions`] in tests), and the
//! command pipeline's [`TransactionalService`](crate::command::TransactionalService)
//! begins, commits and rolls back one per command, so handlers never do.
//!
//! ```
//! use keel_core::uow::{MemoryTransactions, TransactionSource};
//!
//! # async fn demo() -> keel_core::Result<()> {
//! let source = MemoryTransactions::new();
//! let tx = source.begin().await?;
//! // ... hand `&mut *tx` to ports ...
//! tx.commit().await?;
//! # Ok(()) }
//! ```

use std::any::Any;
use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;

use crate::error::{Error, Result};

mod memory;

pub use memory::{MemoryCell, MemoryTransaction, MemoryTransactions};

/// One open transaction, as ports see it.
///
/// Implemented by `keel_database::UnitOfWork` (PostgreSQL) and by
/// [`MemoryTransaction`]. Application code only passes it along (`&mut
/// *tx`) and lets the command pipeline commit; adapters reach their own
/// backend's transaction through [`join`].
#[async_trait]
pub trait Transaction: Send + fmt::Debug + 'static {
    /// A short name of the backend, e.g. `postgres` or `memory`, used in
    /// error messages when a port is handed a transaction it cannot join.
    fn backend(&self) -> &'static str;

    /// The concrete transaction, for [`join`].
    fn as_any_mut(&mut self) -> &mut dyn Any;

    /// Runs `hook` once the transaction has committed (never after a
    /// rollback): for waking a relay or a subscription, say.
    fn after_commit(&mut self, hook: Box<dyn FnOnce() + Send>);

    /// Makes every write done through this transaction durable and visible.
    ///
    /// # Errors
    ///
    /// The backend's failure to commit: a lost connection (the outcome is
    /// then unknown), a transaction conflict
    /// ([`Error::TransactionConflict`], safe to run the whole unit again),
    /// or a transaction that a failed statement already aborted.
    async fn commit(self: Box<Self>) -> Result<()>;

    /// Discards every write done through this transaction.
    ///
    /// # Errors
    ///
    /// The backend's failure to roll back; the writes are discarded anyway
    /// (PostgreSQL drops an unfinished transaction with its connection).
    async fn rollback(self: Box<Self>) -> Result<()>;
}

/// Reaches the backend's own transaction type inside `tx`: how every
/// adapter joins a unit of work.
///
/// # Errors
///
/// [`Error::Internal`] when `tx` belongs to another backend (an in-memory
/// transaction handed to a PostgreSQL adapter, say): a wiring mistake that
/// must not silently write outside the transaction.
///
/// ```
/// use keel_core::uow::{MemoryTransaction, Transaction, join};
///
/// let mut tx = MemoryTransaction::new();
/// let tx: &mut dyn Transaction = &mut tx;
/// assert!(join::<MemoryTransaction>(tx).is_ok());
/// ```
pub fn join<T: Transaction>(tx: &mut dyn Transaction) -> Result<&mut T> {
    let backend = tx.backend();
    tx.as_any_mut().downcast_mut::<T>().ok_or_else(|| {
        Error::internal_msg(format!(
            "this adapter cannot join a {backend} transaction (it expects {})",
            std::any::type_name::<T>()
        ))
    })
}

/// Begins transactions: `keel_database::Database` on PostgreSQL,
/// [`MemoryTransactions`] in memory.
#[async_trait]
pub trait TransactionSource: Send + Sync + fmt::Debug {
    /// Begins a transaction.
    ///
    /// # Errors
    ///
    /// The backend could not begin one (no connection within the pool's
    /// acquire timeout, the server is down, …).
    async fn begin(&self) -> Result<Box<dyn Transaction>>;
}

#[async_trait]
impl<T: TransactionSource + ?Sized> TransactionSource for Arc<T> {
    async fn begin(&self) -> Result<Box<dyn Transaction>> {
        (**self).begin().await
    }
}

/// What a [`BeforeCommit`] step learns about the command it joins.
#[derive(Debug)]
#[non_exhaustive]
pub struct Accepted<'a> {
    /// The command's id.
    pub command_id: crate::CommandId,
    /// The command's type, as [`Command::command_type`](crate::command::Command::command_type).
    pub command_type: &'static str,
    /// The types of the events the handler reported, in order.
    pub event_types: &'a [String],
    /// The aggregate the handler reported, if any.
    pub aggregate: Option<&'a crate::command::AggregateRef>,
}

/// Work a pipeline layer adds to a command's transaction after the handler
/// accepted the command and before it commits, so that it commits (or
/// not) together with the command's effects. The audit layer records
/// accepted commands this way.
///
/// Layers register steps in the envelope's extensions with
/// [`BeforeCommitSteps`]; [`TransactionalService`](crate::command::TransactionalService)
/// runs them. A step that fails rolls the command back and its error is
/// the command's.
#[async_trait]
pub trait BeforeCommit: Send + Sync + fmt::Debug {
    /// Writes through `tx`.
    ///
    /// # Errors
    ///
    /// Whatever stops the step; the command is then rolled back.
    async fn before_commit(&self, tx: &mut dyn Transaction, accepted: &Accepted<'_>) -> Result<()>;
}

/// The [`BeforeCommit`] steps registered for one command, kept in its
/// envelope's extensions. Clones share the list, so the layer that
/// registered a step can learn afterwards whether it was committed with
/// the command.
#[derive(Clone, Debug, Default)]
pub struct BeforeCommitSteps {
    inner: Arc<std::sync::Mutex<StepsState>>,
}

#[derive(Debug, Default)]
struct StepsState {
    steps: Vec<Arc<dyn BeforeCommit>>,
    committed: bool,
}

impl BeforeCommitSteps {
    /// An empty list.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a step; steps run in the order they were added.
    pub fn push(&self, step: Arc<dyn BeforeCommit>) {
        self.lock().steps.push(step);
    }

    /// The steps, in order: for the service about to run them.
    #[must_use]
    pub fn steps(&self) -> Vec<Arc<dyn BeforeCommit>> {
        self.lock().steps.clone()
    }

    /// Records that the steps ran in the command's transaction and that it
    /// committed.
    pub fn mark_committed(&self) {
        self.lock().committed = true;
    }

    /// Whether the steps ran in the command's transaction and it committed.
    /// `false` after a rollback, and when no transactional service ran the
    /// command at all: the registering layer then does its work itself.
    #[must_use]
    pub fn committed(&self) -> bool {
        self.lock().committed
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, StepsState> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
