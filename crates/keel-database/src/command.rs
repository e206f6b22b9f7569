//! The PostgreSQL unit of work as the backend-neutral
//! [`Transaction`](keel_core::uow::Transaction) port, and [`Database`] as
//! the [`TransactionSource`] a command pipeline's
//! [`TransactionalService`](keel_core::command::TransactionalService)
//! begins transactions on.

use std::any::Any;

use async_trait::async_trait;
use keel_core::uow::{Transaction, TransactionSource};

use crate::pool::Database;
use crate::uow::UnitOfWork;

#[async_trait]
impl Transaction for UnitOfWork<'static> {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }

    fn after_commit(&mut self, hook: Box<dyn FnOnce() + Send>) {
        UnitOfWork::after_commit(self, hook);
    }

    async fn commit(self: Box<Self>) -> keel_core::Result<()> {
        UnitOfWork::commit(*self).await.map_err(Into::into)
    }

    async fn rollback(self: Box<Self>) -> keel_core::Result<()> {
        UnitOfWork::rollback(*self).await.map_err(Into::into)
    }
}

#[async_trait]
impl TransactionSource for Database {
    async fn begin(&self) -> keel_core::Result<Box<dyn Transaction>> {
        let uow = Database::begin(self).await?;
        Ok(Box::new(uow))
    }
}

impl UnitOfWork<'static> {
    /// The PostgreSQL unit of work inside a port-level transaction: how
    /// every PostgreSQL adapter joins one (`within(tx)`).
    ///
    /// # Errors
    ///
    /// [`keel_core::Error::Internal`] when `tx` is not a PostgreSQL unit
    /// of work (an in-memory transaction handed to a PostgreSQL adapter).
    pub fn join(tx: &mut dyn Transaction) -> keel_core::Result<&mut UnitOfWork<'static>> {
        keel_core::uow::join::<UnitOfWork<'static>>(tx)
    }
}
