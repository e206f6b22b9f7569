//! The PostgreSQL repository.

mod bind;
mod read;
mod schema;
mod sql;
mod within;
mod write;

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use keel_core::uow::Transaction;
use keel_core::{
    Clock, Deleted, EntityReader, EntityRepository, EntityWriter, Filter, ListQuery, Page, Stored,
    Version,
};
use sqlx::{PgPool, Postgres};

use self::sql::Statements;
use self::write::Transition;
use crate::cursor::{CursorCodec, CursorKey};
use crate::error::Result;
use crate::mapping::{EntityOf, Mapped, Schema};
use crate::query::DEFAULT_MAX_PAGE_SIZE;

/// The entity repository on PostgreSQL.
///
/// Implements [`EntityRepository`] on a pool: each call outside a unit of
/// work runs on a pooled connection of its own. Inside one,
/// [`within(tx)`](EntityRepository::within) runs the same operations in
/// the unit's transaction (a `keel_database::UnitOfWork`), so they commit
/// or roll back with its other writes (events, an outbox row, another
/// repository) and reads see its own writes.
///
/// As always in PostgreSQL, a statement that fails with a database error
/// (a duplicate id, say) aborts the surrounding transaction; version
/// conflicts and not-found results do not. Cloning is cheap.
pub struct PgRepository<E: Mapped> {
    pool: PgPool,
    inner: Arc<Inner<E>>,
}

struct Inner<E> {
    schema: Schema,
    sql: Statements,
    clock: Option<Arc<dyn Clock>>,
    codec: CursorCodec,
    max_page_size: u32,
    _entity: EntityOf<E>,
}

impl<E> Clone for Inner<E> {
    fn clone(&self) -> Self {
        Self {
            schema: self.schema.clone(),
            sql: self.sql.clone(),
            clock: self.clock.clone(),
            codec: self.codec.clone(),
            max_page_size: self.max_page_size,
            _entity: std::marker::PhantomData,
        }
    }
}

impl<E: Mapped> Clone for PgRepository<E> {
    fn clone(&self) -> Self {
        Self {
            pool: self.pool.clone(),
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<E: Mapped> fmt::Debug for PgRepository<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgRepository")
            .field("entity", &E::NAME)
            .field("table", &self.inner.schema.table)
            .finish_non_exhaustive()
    }
}

impl<E: Mapped> PgRepository<E> {
    /// A repository on `pool`; fails when `E`'s mapping is invalid.
    /// Timestamps come from the database server (`now()`).
    pub fn new(pool: PgPool) -> Result<Self> {
        let schema = Schema::of::<E>()?;
        let sql = Statements::new(&schema, true);
        Ok(Self {
            pool,
            inner: Arc::new(Inner {
                schema,
                sql,
                clock: None,
                codec: CursorCodec::default(),
                max_page_size: DEFAULT_MAX_PAGE_SIZE,
                _entity: std::marker::PhantomData,
            }),
        })
    }

    fn configure(mut self, f: impl FnOnce(&mut Inner<E>)) -> Self {
        // Clones made before configuring keep their own settings.
        f(Arc::make_mut(&mut self.inner));
        self
    }

    /// Takes `created_at` / `updated_at` / `deleted_at` from `clock` instead
    /// of the server's `now()`; for tests that control time.
    #[must_use]
    pub fn with_clock(self, clock: Arc<dyn Clock>) -> Self {
        self.configure(|i| {
            i.sql = Statements::new(&i.schema, false);
            i.clock = Some(clock);
        })
    }

    /// Sets the largest page size accepted (default 1,000).
    #[must_use]
    pub fn with_max_page_size(self, max: u32) -> Self {
        self.configure(|i| i.max_page_size = max)
    }

    /// Signs cursors with `secret` (HMAC-SHA256) instead of the public
    /// default key, so that clients cannot forge them. Give every instance
    /// of a service the same secret. Prefer
    /// [`with_cursor_key`](Self::with_cursor_key), which refuses short keys.
    #[must_use]
    pub fn with_cursor_secret(self, secret: impl AsRef<[u8]>) -> Self {
        self.configure(|i| i.codec = CursorCodec::with_secret(secret.as_ref()))
    }

    /// Signs cursors with `key`. Without a key, cursors are signed with the
    /// public development key and the first one signed logs a warning.
    #[must_use]
    pub fn with_cursor_key(self, key: &CursorKey) -> Self {
        self.configure(|i| i.codec = CursorCodec::with_key(key))
    }

    /// The pool this repository uses.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    async fn conn(&self) -> Result<sqlx::pool::PoolConnection<Postgres>> {
        Ok(self.pool.acquire().await?)
    }
}

#[async_trait]
impl<E: Mapped> EntityReader<E> for PgRepository<E> {
    async fn get(&self, id: &E::Id) -> keel_core::Result<Option<Stored<E>>> {
        Ok(self.inner.get(&mut *self.conn().await?, id, false).await?)
    }

    async fn get_including_deleted(&self, id: &E::Id) -> keel_core::Result<Option<Stored<E>>> {
        Ok(self.inner.get(&mut *self.conn().await?, id, true).await?)
    }

    async fn get_many(&self, ids: &[E::Id]) -> keel_core::Result<Vec<Stored<E>>> {
        Ok(self.inner.get_many(&mut *self.conn().await?, ids).await?)
    }

    async fn exists(&self, id: &E::Id) -> keel_core::Result<bool> {
        Ok(self.inner.exists(&mut *self.conn().await?, id).await?)
    }

    async fn count(&self, filters: &[Filter], deleted: Deleted) -> keel_core::Result<u64> {
        Ok(self
            .inner
            .count(&mut *self.conn().await?, filters, deleted)
            .await?)
    }

    async fn list(&self, query: &ListQuery) -> keel_core::Result<Page<Stored<E>>> {
        Ok(self.inner.list(&mut *self.conn().await?, query).await?)
    }
}

#[async_trait]
impl<E: Mapped> EntityWriter<E> for PgRepository<E> {
    async fn insert(&self, entity: E) -> keel_core::Result<Stored<E>> {
        Ok(self.inner.insert(&mut *self.conn().await?, &entity).await?)
    }

    async fn insert_many(&self, entities: Vec<E>) -> keel_core::Result<Vec<Stored<E>>> {
        Ok(self
            .inner
            .insert_many(&mut *self.conn().await?, &entities)
            .await?)
    }

    async fn update(&self, entity: E, expected: Version) -> keel_core::Result<Stored<E>> {
        Ok(self
            .inner
            .update(&mut *self.conn().await?, &entity, expected)
            .await?)
    }

    async fn upsert(&self, entity: E) -> keel_core::Result<Stored<E>> {
        Ok(self.inner.upsert(&mut *self.conn().await?, &entity).await?)
    }

    async fn soft_delete(&self, id: &E::Id, expected: Version) -> keel_core::Result<Stored<E>> {
        Ok(self
            .inner
            .transition(
                &mut *self.conn().await?,
                id,
                expected,
                Transition::SoftDelete,
            )
            .await?)
    }

    async fn restore(&self, id: &E::Id, expected: Version) -> keel_core::Result<Stored<E>> {
        Ok(self
            .inner
            .transition(&mut *self.conn().await?, id, expected, Transition::Restore)
            .await?)
    }

    async fn hard_delete(&self, id: &E::Id, expected: Version) -> keel_core::Result<()> {
        Ok(self
            .inner
            .hard_delete(&mut *self.conn().await?, id, expected)
            .await?)
    }
}

impl<E: Mapped> EntityRepository<E> for PgRepository<E> {
    fn within<'t>(&'t self, tx: &'t mut dyn Transaction) -> Box<dyn EntityRepository<E> + 't> {
        Box::new(within::Within::new(Arc::clone(&self.inner), tx))
    }
}
