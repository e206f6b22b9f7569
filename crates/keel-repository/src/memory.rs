//! The in-memory repository: the same observable behaviour as
//! [`PgRepository`](crate::PgRepository), without a database.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;
use keel_core::{
    Clock, Deleted, EntityReader, EntityWriter, ExpectedVersion, Filter, ListQuery, Page, Stored,
    SystemClock, Version, VersionConflict,
};

use crate::cursor::CursorCodec;
use crate::error::{RepositoryError, Result};
use crate::mapping::{Mapped, Record, Schema};
use crate::query::{DEFAULT_MAX_PAGE_SIZE, PagePlan, Plan, plan_filters, scope_matches};
use crate::value::{Key, truncate_micros};

/// An entity repository held in memory, for tests and prototypes.
///
/// It follows the same mapping, validation, ordering (text byte-wise, as
/// PostgreSQL's `"C"` collation), timestamp precision (microseconds), cursor
/// format and error rules as [`PgRepository`](crate::PgRepository); the
/// contract suite in the `testing` module checks both. Clones share the
/// same data. It does not model unique constraints other than the id, nor
/// transactions.
pub struct InMemoryRepository<E: Mapped> {
    schema: Arc<Schema>,
    rows: Arc<Mutex<BTreeMap<Key, Record>>>,
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
            .field("rows", &self.lock().len())
            .finish_non_exhaustive()
    }
}

impl<E: Mapped> InMemoryRepository<E> {
    /// An empty repository; fails when `E`'s mapping is invalid.
    pub fn new() -> Result<Self> {
        Ok(Self {
            schema: Arc::new(Schema::of::<E>()?),
            rows: Arc::default(),
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
    /// default key, so that clients cannot forge them.
    #[must_use]
    pub fn with_cursor_secret(mut self, secret: impl AsRef<[u8]>) -> Self {
        self.codec = CursorCodec::with_secret(secret.as_ref());
        self
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<Key, Record>> {
        self.rows.lock().unwrap_or_else(PoisonError::into_inner)
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

    /// Finds a row for a versioned write, applying PostgreSQL's rules: a
    /// missing row (or, when `live`, a deleted one) is `NotFound`, another
    /// version is a conflict.
    fn checked<'m>(
        &self,
        rows: &'m mut BTreeMap<Key, Record>,
        id: &E::Id,
        key: &Key,
        expected: Version,
        live: bool,
    ) -> Result<&'m mut Record> {
        let subject = self.schema.subject(id);
        let row = rows
            .get_mut(key)
            .filter(|r| !live || r.deleted_at.is_none())
            .ok_or_else(|| RepositoryError::NotFound {
                subject: subject.clone(),
            })?;
        if row.version != expected.get() {
            return Err(VersionConflict {
                subject,
                expected: ExpectedVersion::Exact(expected),
                actual: Version::new(row.version),
            }
            .into());
        }
        Ok(row)
    }

    fn new_record(&self, values: Vec<crate::Value>) -> Record {
        let now = self.now();
        Record {
            values,
            version: 1,
            created_at: now,
            updated_at: now,
            deleted_at: None,
        }
    }

    fn list_now(&self, query: &ListQuery) -> Result<Page<Stored<E>>> {
        let plan = Plan::new(&self.schema, query, self.max_page_size, &self.codec)?;
        let mut rows: Vec<Record> = self
            .lock()
            .values()
            .filter(|r| plan.matches(r))
            .cloned()
            .collect();
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
}

#[async_trait]
impl<E: Mapped> EntityReader<E> for InMemoryRepository<E> {
    async fn get(&self, id: &E::Id) -> keel_core::Result<Option<Stored<E>>> {
        let key = self.key(id)?;
        let row = self
            .lock()
            .get(&key)
            .filter(|r| r.deleted_at.is_none())
            .cloned();
        Ok(row.map(|r| self.stored(r)).transpose()?)
    }

    async fn get_including_deleted(&self, id: &E::Id) -> keel_core::Result<Option<Stored<E>>> {
        let key = self.key(id)?;
        let row = self.lock().get(&key).cloned();
        Ok(row.map(|r| self.stored(r)).transpose()?)
    }

    async fn get_many(&self, ids: &[E::Id]) -> keel_core::Result<Vec<Stored<E>>> {
        let keys = ids
            .iter()
            .map(|id| self.key(id))
            .collect::<Result<Vec<_>>>()?;
        let mut seen = std::collections::BTreeSet::new();
        let found: Vec<Record> = {
            let rows = self.lock();
            keys.into_iter()
                .filter_map(|k| {
                    let r = rows.get(&k).filter(|r| r.deleted_at.is_none())?;
                    seen.insert(k).then(|| r.clone())
                })
                .collect()
        };
        Ok(found
            .into_iter()
            .map(|r| self.stored(r))
            .collect::<Result<_>>()?)
    }

    async fn exists(&self, id: &E::Id) -> keel_core::Result<bool> {
        let key = self.key(id)?;
        Ok(self
            .lock()
            .get(&key)
            .is_some_and(|r| r.deleted_at.is_none()))
    }

    async fn count(&self, filters: &[Filter], deleted: Deleted) -> keel_core::Result<u64> {
        let conds = plan_filters(&self.schema, filters)?;
        Ok(self
            .lock()
            .values()
            .filter(|r| scope_matches(deleted, r) && conds.iter().all(|c| c.matches(r)))
            .count() as u64)
    }

    async fn list(&self, query: &ListQuery) -> keel_core::Result<Page<Stored<E>>> {
        Ok(self.list_now(query)?)
    }
}

#[async_trait]
impl<E: Mapped> EntityWriter<E> for InMemoryRepository<E> {
    async fn insert(&self, entity: E) -> keel_core::Result<Stored<E>> {
        Ok(self.insert_many(vec![entity]).await?.remove(0))
    }

    async fn insert_many(&self, entities: Vec<E>) -> keel_core::Result<Vec<Stored<E>>> {
        let mut staged = Vec::with_capacity(entities.len());
        for e in &entities {
            let values = self.schema.row_of(e)?;
            let key = Key(values[self.schema.id].clone());
            staged.push((key, self.new_record(values)));
        }
        let mut rows = self.lock();
        let mut batch = std::collections::BTreeSet::new();
        for ((key, _), e) in staged.iter().zip(&entities) {
            if rows.contains_key(key) || !batch.insert(key.clone()) {
                return Err(RepositoryError::AlreadyExists {
                    subject: self.schema.subject(e.id()),
                    constraint: None,
                }
                .into());
            }
        }
        let mut out = Vec::with_capacity(staged.len());
        for (key, record) in staged {
            rows.insert(key, record.clone());
            out.push(record);
        }
        drop(rows);
        Ok(out
            .into_iter()
            .map(|r| self.stored(r))
            .collect::<Result<_>>()?)
    }

    async fn update(&self, entity: E, expected: Version) -> keel_core::Result<Stored<E>> {
        let values = self.schema.row_of(&entity)?;
        let key = Key(values[self.schema.id].clone());
        let now = self.now();
        let mut rows = self.lock();
        let row = self.checked(&mut rows, entity.id(), &key, expected, true)?;
        row.values = values;
        row.version += 1;
        row.updated_at = now;
        let row = row.clone();
        drop(rows);
        Ok(self.stored(row)?)
    }

    async fn upsert(&self, entity: E) -> keel_core::Result<Stored<E>> {
        let values = self.schema.row_of(&entity)?;
        let key = Key(values[self.schema.id].clone());
        let fresh = self.new_record(values.clone());
        let now = fresh.updated_at;
        let mut rows = self.lock();
        let row = rows
            .entry(key)
            .and_modify(|r| {
                r.values = values;
                r.version += 1;
                r.updated_at = now;
                r.deleted_at = None;
            })
            .or_insert(fresh)
            .clone();
        drop(rows);
        Ok(self.stored(row)?)
    }

    async fn soft_delete(&self, id: &E::Id, expected: Version) -> keel_core::Result<Stored<E>> {
        let key = self.key(id)?;
        let now = self.now();
        let mut rows = self.lock();
        let row = self.checked(&mut rows, id, &key, expected, true)?;
        row.deleted_at = Some(now);
        row.updated_at = now;
        row.version += 1;
        let row = row.clone();
        drop(rows);
        Ok(self.stored(row)?)
    }

    async fn restore(&self, id: &E::Id, expected: Version) -> keel_core::Result<Stored<E>> {
        let key = self.key(id)?;
        let now = self.now();
        let mut rows = self.lock();
        let row = self.checked(&mut rows, id, &key, expected, false)?;
        if row.deleted_at.is_none() {
            return Err(RepositoryError::NotDeleted {
                subject: self.schema.subject(id),
            }
            .into());
        }
        row.deleted_at = None;
        row.updated_at = now;
        row.version += 1;
        let row = row.clone();
        drop(rows);
        Ok(self.stored(row)?)
    }

    async fn hard_delete(&self, id: &E::Id, expected: Version) -> keel_core::Result<()> {
        let key = self.key(id)?;
        let mut rows = self.lock();
        self.checked(&mut rows, id, &key, expected, false)?;
        rows.remove(&key);
        Ok(())
    }
}
