//! A [`PgRepository`](super::PgRepository) bound to a unit of work
//! (`within(tx)`): every call joins the transaction through
//! [`UnitOfWork::join`] and runs on its connection.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use keel_core::uow::Transaction;
use keel_core::{
    Deleted, EntityReader, EntityRepository, EntityWriter, Filter, ListQuery, Page, Stored, Version,
};
use keel_database::UnitOfWork;
use tokio::sync::Mutex;

use super::Inner;
use super::write::Transition;
use crate::mapping::Mapped;

/// The view `within(tx)` returns. The transaction sits behind an async
/// mutex because the port's methods take `&self` while a statement needs
/// the connection mutably; calls on one view run one after the other, as
/// statements on one connection must.
pub(super) struct Within<'t, E> {
    inner: Arc<Inner<E>>,
    tx: Mutex<&'t mut dyn Transaction>,
}

impl<'t, E> Within<'t, E> {
    pub(super) fn new(inner: Arc<Inner<E>>, tx: &'t mut dyn Transaction) -> Self {
        Self {
            inner,
            tx: Mutex::new(tx),
        }
    }
}

impl<E: Mapped> fmt::Debug for Within<'_, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgRepository::within")
            .field("entity", &E::NAME)
            .finish_non_exhaustive()
    }
}

/// Locks the view's transaction, joins it as a PostgreSQL unit of work
/// and runs `$op` on `inner` with its connection.
macro_rules! on_tx {
    ($self:ident, |$inner:ident, $conn:ident| $op:expr) => {{
        let mut tx = $self.tx.lock().await;
        let uow = UnitOfWork::join(&mut **tx)?;
        let $conn = uow.conn();
        let $inner = &*$self.inner;
        Ok($op.await?)
    }};
}

#[async_trait]
impl<E: Mapped> EntityReader<E> for Within<'_, E> {
    async fn get(&self, id: &E::Id) -> keel_core::Result<Option<Stored<E>>> {
        on_tx!(self, |inner, conn| inner.get(conn, id, false))
    }

    async fn get_including_deleted(&self, id: &E::Id) -> keel_core::Result<Option<Stored<E>>> {
        on_tx!(self, |inner, conn| inner.get(conn, id, true))
    }

    async fn get_many(&self, ids: &[E::Id]) -> keel_core::Result<Vec<Stored<E>>> {
        on_tx!(self, |inner, conn| inner.get_many(conn, ids))
    }

    async fn exists(&self, id: &E::Id) -> keel_core::Result<bool> {
        on_tx!(self, |inner, conn| inner.exists(conn, id))
    }

    async fn count(&self, filters: &[Filter], deleted: Deleted) -> keel_core::Result<u64> {
        on_tx!(self, |inner, conn| inner.count(conn, filters, deleted))
    }

    async fn list(&self, query: &ListQuery) -> keel_core::Result<Page<Stored<E>>> {
        on_tx!(self, |inner, conn| inner.list(conn, query))
    }
}

#[async_trait]
impl<E: Mapped> EntityWriter<E> for Within<'_, E> {
    async fn insert(&self, entity: E) -> keel_core::Result<Stored<E>> {
        on_tx!(self, |inner, conn| inner.insert(conn, &entity))
    }

    async fn insert_many(&self, entities: Vec<E>) -> keel_core::Result<Vec<Stored<E>>> {
        on_tx!(self, |inner, conn| inner.insert_many(conn, &entities))
    }

    async fn update(&self, entity: E, expected: Version) -> keel_core::Result<Stored<E>> {
        on_tx!(self, |inner, conn| inner.update(conn, &entity, expected))
    }

    async fn upsert(&self, entity: E) -> keel_core::Result<Stored<E>> {
        on_tx!(self, |inner, conn| inner.upsert(conn, &entity))
    }

    async fn soft_delete(&self, id: &E::Id, expected: Version) -> keel_core::Result<Stored<E>> {
        on_tx!(self, |inner, conn| inner.transition(
            conn,
            id,
            expected,
            Transition::SoftDelete
        ))
    }

    async fn restore(&self, id: &E::Id, expected: Version) -> keel_core::Result<Stored<E>> {
        on_tx!(self, |inner, conn| inner.transition(
            conn,
            id,
            expected,
            Transition::Restore
        ))
    }

    async fn hard_delete(&self, id: &E::Id, expected: Version) -> keel_core::Result<()> {
        on_tx!(self, |inner, conn| inner.hard_delete(conn, id, expected))
    }
}

impl<E: Mapped> EntityRepository<E> for Within<'_, E> {
    fn within<'s>(&'s self, tx: &'s mut dyn Transaction) -> Box<dyn EntityRepository<E> + 's> {
        Box::new(Within::new(Arc::clone(&self.inner), tx))
    }
}
