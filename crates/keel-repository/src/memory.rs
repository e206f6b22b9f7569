//! The in-memory repository: the same observable behaviour as
//! [`PgRepository`](crate::PgRepository), without a database.
//!
//! The rows live in a [`MemoryCell`], so the repository joins a
//! [`MemoryTransaction`] the way the PostgreSQL one joins a unit of work:
//! writes through `within(tx)` land on the transaction's own copy, are
//! seen by its reads only, and are published at commit (first committer
//! wins; a write that no longer holds fails the commit with its own
//! error).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use keel_core::uow::{MemoryCell, MemoryTransaction, Transaction};
use keel_core::{
    Clock, Deleted, EntityReader, EntityRepository, EntityWriter, ExpectedVersion, Filter,
    ListQuery, Page, Stored, SystemClock, Version, VersionConflict,
};

use crate::cursor::{CursorCodec, CursorKey};
use crate::error::{RepositoryError, Result};
use crate::mapping::{Mapped, Record, Schema};
use crate::query::{DEFAULT_MAX_PAGE_SIZE, PagePlan, Plan, plan_filters, scope_matches};
use crate::value::{Key, Value, truncate_micros};

type Rows = BTreeMap<Key, Record>;

/// An entity repository held in memory, for tests and prototypes.
///
/// It follows the same mapping, validation and limits, ordering (text
/// byte-wise, as PostgreSQL's `"C"` collation), timestamp precision
/// (microseconds), cursor format, error rules and unit-of-work behaviour
/// as [`PgRepository`](crate::PgRepository); the contract suite in the
/// `testing` module checks both. Clones share the same data. It does not
/// model unique constraints other than the id.
///
/// [`within(tx)`](EntityRepository::within) takes a
/// [`MemoryTransaction`] (from
/// [`MemoryTransactions`](keel_core::uow::MemoryTransactions)). As in
/// PostgreSQL, a write refused by the store (a taken id) aborts the
/// transaction, while version conflicts and not-found answers do not; a
/// conflict with a transaction that committed first shows at the latest at
/// commit.
pub struct InMemoryRepository<E: Mapped> {
    schema: Arc<Schema>,
    rows: Arc<MemoryCell<Rows>>,
    clock: Arc<dyn Clock>,
    codec: CursorCodec,
    max_page_size: u32,
    _entity: crate::mapping::EntityOf<E>,
}

impl<E: Mapped> Clone for InMemoryRepository<E> {
    fn clone(&self) -> Self {
        Self {
            schema: Arc::clone(&self.schema),
            rows: Arc::clone(&self.rows),
            clock: Arc::clone(&self.clock),
            codec: self.codec.clone(),
            max_page_size: self.max_page_size,
            _entity: std::marker::PhantomData,
        }
    }
}

impl<E: Mapped> fmt::Debug for InMemoryRepository<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InMemoryRepository")
            .field("entity", &E::NAME)
            .field("rows", &self.rows.read(BTreeMap::len))
            .finish_non_exhaustive()
    }
}

/// What a versioned write needs of the row it changes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Need {
    /// A live row (update, soft delete).
    Live,
    /// A soft-deleted row (restore).
    Deleted,
    /// Any row (hard delete).
    Any,
}

/// Says whether a versioned write may go ahead, with the precedence of the
/// PostgreSQL repository: missing (or deleted where a live row is needed),
/// then a version conflict, then a restore of a live row.
fn check(rows: &Rows, key: &Key, subject: &str, expected: Version, need: Need) -> Result<()> {
    let not_found = || RepositoryError::NotFound {
        subject: subject.to_owned(),
    };
    let row = rows.get(key).ok_or_else(not_found)?;
    if need == Need::Live && row.deleted_at.is_some() {
        return Err(not_found());
    }
    if row.version != expected.get() {
        return Err(VersionConflict {
            subject: subject.to_owned(),
            expected: ExpectedVersion::Exact(expected),
            actual: Version::new(row.version),
        }
        .into());
    }
    if need == Need::Deleted && row.deleted_at.is_none() {
        return Err(RepositoryError::NotDeleted {
            subject: subject.to_owned(),
        });
    }
    Ok(())
}

impl<E: Mapped> InMemoryRepository<E> {
    /// An empty repository; fails when `E`'s mapping is invalid.
    pub fn new() -> Result<Self> {
        Ok(Self {
            schema: Arc::new(Schema::of::<E>()?),
            rows: Arc::new(MemoryCell::new(Rows::new())),
            clock: Arc::new(SystemClock),
            codec: CursorCodec::default(),
            max_page_size: DEFAULT_MAX_PAGE_SIZE,
            _entity: std::marker::PhantomData,
        })
    }

    /// Takes timestamps from `clock` (the system clock by default).
    #[must_use]
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Sets the largest page size accepted (default 1,000).
    #[must_use]
    pub fn with_max_page_size(mut self, max: u32) -> Self {
        self.max_page_size = max;
        self
    }

    /// Signs cursors with `secret` (HMAC-SHA256) instead of the public
    /// default key, so that clients cannot forge them. Prefer
    /// [`with_cursor_key`](Self::with_cursor_key), which refuses short keys.
    #[must_use]
    pub fn with_cursor_secret(mut self, secret: impl AsRef<[u8]>) -> Self {
        self.codec = CursorCodec::with_secret(secret.as_ref());
        self
    }

    /// Signs cursors with `key`. Without a key, cursors are signed with the
    /// public development key and the first one signed logs a warning.
    #[must_use]
    pub fn with_cursor_key(mut self, key: &CursorKey) -> Self {
        self.codec = CursorCodec::with_key(key);
        self
    }

    /// Reads the rows as `tx` sees them (the committed rows without one).
    fn read<R>(&self, tx: Option<&mut MemoryTransaction>, f: impl FnOnce(&Rows) -> R) -> R {
        match tx {
            Some(tx) => self.rows.read_in(tx, f),
            None => self.rows.read(f),
        }
    }

    /// Writes through `tx` (replayed at commit), or at once without one.
    /// `op` must leave the rows unchanged when it fails.
    fn write<R>(
        &self,
        tx: Option<&mut MemoryTransaction>,
        op: impl Fn(&mut Rows) -> keel_core::Result<R> + Send + 'static,
    ) -> keel_core::Result<R> {
        match tx {
            Some(tx) => self.rows.write_in(tx, op),
            None => self.rows.write(op),
        }
    }

    fn key(&self, id: &E::Id) -> Result<Key> {
        Ok(Key(self.schema.check_id(E::id_value(id))?))
    }

    fn stored(&self, r: Record) -> Result<Stored<E>> {
        r.into_stored(&self.schema)
    }

    fn now(&self) -> chrono::DateTime<chrono::Utc> {
        truncate_micros(self.clock.now())
    }

    fn new_record(&self, values: Vec<Value>) -> Record {
        let now = self.now();
        Record {
            values,
            version: 1,
            created_at: now,
            updated_at: now,
            deleted_at: None,
        }
    }

    /// A versioned write: checked first without touching the transaction
    /// (a conflict is an answer, as in PostgreSQL, and leaves the
    /// transaction usable), then written with the check repeated, so a
    /// replay at commit on newer rows fails the same way.
    fn versioned(
        &self,
        mut tx: Option<&mut MemoryTransaction>,
        id: &E::Id,
        expected: Version,
        need: Need,
        change: impl Fn(&mut Rows, &Key) -> Option<Record> + Send + 'static,
    ) -> keel_core::Result<Option<Record>> {
        let key = self.key(id)?;
        let subject = self.schema.subject(id);
        self.read(tx.as_deref_mut(), |rows| {
            check(rows, &key, &subject, expected, need)
        })?;
        self.write(tx, move |rows| {
            check(rows, &key, &subject, expected, need)?;
            Ok(change(rows, &key))
        })
    }

    fn get_in(
        &self,
        tx: Option<&mut MemoryTransaction>,
        id: &E::Id,
        any: bool,
    ) -> Result<Option<Stored<E>>> {
        let key = self.key(id)?;
        let row = self.read(tx, |rows| {
            rows.get(&key)
                .filter(|r| any || r.deleted_at.is_none())
                .cloned()
        });
        row.map(|r| self.stored(r)).transpose()
    }

    fn get_many_in(
        &self,
        tx: Option<&mut MemoryTransaction>,
        ids: &[E::Id],
    ) -> Result<Vec<Stored<E>>> {
        let keys = ids
            .iter()
            .map(|id| self.key(id))
            .collect::<Result<Vec<_>>>()?;
        let mut seen = BTreeSet::new();
        let found: Vec<Record> = self.read(tx, |rows| {
            keys.into_iter()
                .filter_map(|k| {
                    let r = rows.get(&k).filter(|r| r.deleted_at.is_none())?;
                    seen.insert(k).then(|| r.clone())
                })
                .collect()
        });
        found.into_iter().map(|r| self.stored(r)).collect()
    }

    fn exists_in(&self, tx: Option<&mut MemoryTransaction>, id: &E::Id) -> Result<bool> {
        let key = self.key(id)?;
        Ok(self.read(tx, |rows| {
            rows.get(&key).is_some_and(|r| r.deleted_at.is_none())
        }))
    }

    fn count_in(
        &self,
        tx: Option<&mut MemoryTransaction>,
        filters: &[Filter],
        deleted: Deleted,
    ) -> Result<u64> {
        let conds = plan_filters(&self.schema, filters)?;
        Ok(self.read(tx, |rows| {
            rows.values()
                .filter(|r| scope_matches(deleted, r) && conds.iter().all(|c| c.matches(r)))
                .count() as u64
        }))
    }

    fn list_in(
        &self,
        tx: Option<&mut MemoryTransaction>,
        query: &ListQuery,
    ) -> Result<Page<Stored<E>>> {
        let plan = Plan::new(&self.schema, query, self.max_page_size, &self.codec)?;
        let mut rows: Vec<Record> = self.read(tx, |rows| {
            rows.values().filter(|r| plan.matches(r)).cloned().collect()
        });
        rows.sort_by(|a, b| plan.order(a, b));
        match &plan.page {
            PagePlan::Offset { offset, size } => {
                let total = rows.len() as u64;
                let items = rows
                    .into_iter()
                    .skip(usize::try_from(*offset).unwrap_or(usize::MAX))
                    .take(*size as usize)
                    .map(|r| self.stored(r))
                    .collect::<Result<_>>()?;
                Ok(Page::new(items, Some(total), None))
            }
            PagePlan::Keyset { after, size } => {
                let size = *size as usize;
                let mut page: Vec<Record> = rows
                    .into_iter()
                    .filter(|r| {
                        after
                            .as_ref()
                            .is_none_or(|k| plan.order_against(r, k).is_gt())
                    })
                    .take(size + 1)
                    .collect();
                let next = if page.len() > size {
                    page.truncate(size);
                    let last = page.last().map(|r| plan.key_of(r)).unwrap_or_default();
                    Some(self.codec.encode(&plan.fingerprint, &last)?)
                } else {
                    None
                };
                let items = page
                    .into_iter()
                    .map(|r| self.stored(r))
                    .collect::<Result<_>>()?;
                Ok(Page::new(items, None, next))
            }
        }
    }

    fn insert_many_in(
        &self,
        tx: Option<&mut MemoryTransaction>,
        entities: &[E],
    ) -> keel_core::Result<Vec<Stored<E>>> {
        let mut staged = Vec::with_capacity(entities.len());
        for e in entities {
            let values = self.schema.row_of(e)?;
            let key = Key(values[self.schema.id].clone());
            staged.push((key, self.new_record(values), self.schema.subject(e.id())));
        }
        // A taken id is a failed statement in PostgreSQL: it aborts the
        // transaction, so here it fails inside the write.
        let out = self.write(tx, move |rows| {
            let mut batch = BTreeSet::new();
            for (key, _, subject) in &staged {
                if rows.contains_key(key) || !batch.insert(key) {
                    return Err(RepositoryError::AlreadyExists {
                        subject: subject.clone(),
                        constraint: None,
                    }
                    .into());
                }
            }
            for (key, record, _) in &staged {
                rows.insert(key.clone(), record.clone());
            }
            Ok(staged.iter().map(|(_, r, _)| r.clone()).collect::<Vec<_>>())
        })?;
        Ok(out
            .into_iter()
            .map(|r| self.stored(r))
            .collect::<Result<_>>()?)
    }

    fn update_in(
        &self,
        tx: Option<&mut MemoryTransaction>,
        entity: &E,
        expected: Version,
    ) -> keel_core::Result<Stored<E>> {
        let values = self.schema.row_of(entity)?;
        let now = self.now();
        let row = self.versioned(tx, entity.id(), expected, Need::Live, move |rows, key| {
            let row = rows.get_mut(key)?;
            row.values.clone_from(&values);
            row.version += 1;
            row.updated_at = now;
            Some(row.clone())
        })?;
        self.found(row)
    }

    fn upsert_in(
        &self,
        tx: Option<&mut MemoryTransaction>,
        entity: &E,
    ) -> keel_core::Result<Stored<E>> {
        let values = self.schema.row_of(entity)?;
        let key = Key(values[self.schema.id].clone());
        let fresh = self.new_record(values.clone());
        let row = self.write(tx, move |rows| {
            Ok(rows
                .entry(key.clone())
                .and_modify(|r| {
                    r.values.clone_from(&values);
                    r.version += 1;
                    r.updated_at = fresh.updated_at;
                    r.deleted_at = None;
                })
                .or_insert_with(|| fresh.clone())
                .clone())
        })?;
        Ok(self.stored(row)?)
    }

    fn transition_in(
        &self,
        tx: Option<&mut MemoryTransaction>,
        id: &E::Id,
        expected: Version,
        delete: bool,
    ) -> keel_core::Result<Stored<E>> {
        let now = self.now();
        let need = if delete { Need::Live } else { Need::Deleted };
        let row = self.versioned(tx, id, expected, need, move |rows, key| {
            let row = rows.get_mut(key)?;
            row.deleted_at = delete.then_some(now);
            row.updated_at = now;
            row.version += 1;
            Some(row.clone())
        })?;
        self.found(row)
    }

    fn hard_delete_in(
        &self,
        tx: Option<&mut MemoryTransaction>,
        id: &E::Id,
        expected: Version,
    ) -> keel_core::Result<()> {
        self.versioned(tx, id, expected, Need::Any, |rows, key| rows.remove(key))?;
        Ok(())
    }

    fn found(&self, row: Option<Record>) -> keel_core::Result<Stored<E>> {
        let row = row.ok_or_else(|| keel_core::Error::internal_msg("checked row vanished"))?;
        Ok(self.stored(row)?)
    }
}

/// An [`InMemoryRepository`] bound to a [`MemoryTransaction`]: what
/// `within(tx)` returns.
struct Within<'t, E: Mapped> {
    repo: InMemoryRepository<E>,
    tx: Mutex<&'t mut dyn Transaction>,
}

impl<E: Mapped> fmt::Debug for Within<'_, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InMemoryRepository::within")
            .field("entity", &E::NAME)
            .finish_non_exhaustive()
    }
}

/// How the port's methods reach the rows: directly, or through the
/// transaction a view is bound to.
trait Access<E: Mapped> {
    fn repo(&self) -> &InMemoryRepository<E>;

    fn run<R, X: Into<keel_core::Error>>(
        &self,
        f: impl FnOnce(&InMemoryRepository<E>, Option<&mut MemoryTransaction>) -> Result<R, X>,
    ) -> keel_core::Result<R>;
}

impl<E: Mapped> Access<E> for InMemoryRepository<E> {
    fn repo(&self) -> &InMemoryRepository<E> {
        self
    }

    fn run<R, X: Into<keel_core::Error>>(
        &self,
        f: impl FnOnce(&InMemoryRepository<E>, Option<&mut MemoryTransaction>) -> Result<R, X>,
    ) -> keel_core::Result<R> {
        f(self, None).map_err(Into::into)
    }
}

impl<E: Mapped> Access<E> for Within<'_, E> {
    fn repo(&self) -> &InMemoryRepository<E> {
        &self.repo
    }

    fn run<R, X: Into<keel_core::Error>>(
        &self,
        f: impl FnOnce(&InMemoryRepository<E>, Option<&mut MemoryTransaction>) -> Result<R, X>,
    ) -> keel_core::Result<R> {
        let mut tx = self.tx.lock().unwrap_or_else(PoisonError::into_inner);
        let tx = keel_core::uow::join::<MemoryTransaction>(&mut **tx)?;
        f(&self.repo, Some(tx)).map_err(Into::into)
    }
}

/// The port on both the repository and its `within(tx)` view.
macro_rules! memory_port {
    ($ty:ty) => {
        #[async_trait]
        impl<E: Mapped> EntityReader<E> for $ty {
            async fn get(&self, id: &E::Id) -> keel_core::Result<Option<Stored<E>>> {
                self.run(|r, tx| r.get_in(tx, id, false))
            }

            async fn get_including_deleted(
                &self,
                id: &E::Id,
            ) -> keel_core::Result<Option<Stored<E>>> {
                self.run(|r, tx| r.get_in(tx, id, true))
            }

            async fn get_many(&self, ids: &[E::Id]) -> keel_core::Result<Vec<Stored<E>>> {
                self.run(|r, tx| r.get_many_in(tx, ids))
            }

            async fn exists(&self, id: &E::Id) -> keel_core::Result<bool> {
                self.run(|r, tx| r.exists_in(tx, id))
            }

            async fn count(&self, filters: &[Filter], deleted: Deleted) -> keel_core::Result<u64> {
                self.run(|r, tx| r.count_in(tx, filters, deleted))
            }

            async fn list(&self, query: &ListQuery) -> keel_core::Result<Page<Stored<E>>> {
                self.run(|r, tx| r.list_in(tx, query))
            }
        }

        #[async_trait]
        impl<E: Mapped> EntityWriter<E> for $ty {
            async fn insert(&self, entity: E) -> keel_core::Result<Stored<E>> {
                let mut one =
                    self.run(|r, tx| r.insert_many_in(tx, std::slice::from_ref(&entity)))?;
                one.pop()
                    .ok_or_else(|| keel_core::Error::internal_msg("inserted row not returned"))
            }

            async fn insert_many(&self, entities: Vec<E>) -> keel_core::Result<Vec<Stored<E>>> {
                self.run(|r, tx| r.insert_many_in(tx, &entities))
            }

            async fn update(&self, entity: E, expected: Version) -> keel_core::Result<Stored<E>> {
                self.run(|r, tx| r.update_in(tx, &entity, expected))
            }

            async fn upsert(&self, entity: E) -> keel_core::Result<Stored<E>> {
                self.run(|r, tx| r.upsert_in(tx, &entity))
            }

            async fn soft_delete(
                &self,
                id: &E::Id,
                expected: Version,
            ) -> keel_core::Result<Stored<E>> {
                self.run(|r, tx| r.transition_in(tx, id, expected, true))
            }

            async fn restore(&self, id: &E::Id, expected: Version) -> keel_core::Result<Stored<E>> {
                self.run(|r, tx| r.transition_in(tx, id, expected, false))
            }

            async fn hard_delete(&self, id: &E::Id, expected: Version) -> keel_core::Result<()> {
                self.run(|r, tx| r.hard_delete_in(tx, id, expected))
            }
        }

        impl<E: Mapped> EntityRepository<E> for $ty {
            fn within<'s>(
                &'s self,
                tx: &'s mut dyn Transaction,
            ) -> Box<dyn EntityRepository<E> + 's> {
                Box::new(Within {
                    repo: self.repo().clone(),
                    tx: Mutex::new(tx),
                })
            }
        }
    };
}

memory_port!(InMemoryRepository<E>);
memory_port!(Within<'_, E>);
