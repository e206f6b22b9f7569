//! The entity repository port: state-based persistence with optimistic
//! locking, timestamps, soft delete, filtering and pagination.

use std::fmt::{Debug, Display};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::version::Version;

/// A state-based record with an identity.
pub trait Entity: Clone + Debug + Send + Sync + 'static {
    /// The entity's id type.
    type Id: Clone + Debug + Display + PartialEq + Send + Sync + 'static;

    /// A short name for messages, e.g. `customer`.
    const NAME: &'static str;

    /// The entity's id.
    fn id(&self) -> &Self::Id;
}

/// An entity as stored, with the bookkeeping Keel maintains for it.
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Stored<E> {
    /// The entity.
    pub entity: E,
    /// Its version: 1 after insert, +1 on every write.
    pub version: Version,
    /// When it was inserted.
    pub created_at: DateTime<Utc>,
    /// When it was last written.
    pub updated_at: DateTime<Utc>,
    /// When it was soft-deleted, if it was.
    pub deleted_at: Option<DateTime<Utc>>,
}

impl<E> Stored<E> {
    /// Builds a stored record; used by repositories.
    pub fn new(
        entity: E,
        version: Version,
        created_at: DateTime<Utc>,
        updated_at: DateTime<Utc>,
        deleted_at: Option<DateTime<Utc>>,
    ) -> Self {
        Self {
            entity,
            version,
            created_at,
            updated_at,
            deleted_at,
        }
    }

    /// Whether the record is soft-deleted.
    pub fn is_deleted(&self) -> bool {
        self.deleted_at.is_some()
    }
}

/// An opaque keyset-pagination cursor. Clients pass it back unchanged; a
/// tampered or malformed cursor is an [`Error::Invalid`].
#[derive(Clone, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Cursor(String);

impl Cursor {
    /// Wraps an encoded cursor.
    pub fn new(encoded: impl Into<String>) -> Self {
        Self(encoded.into())
    }

    /// The encoded cursor.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Display for Cursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Which page to return.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum PageRequest {
    /// Page `page` (from 1) of `size` items, with a total count. Simple, but
    /// deep pages get slower and concurrent inserts shift items between pages.
    Offset {
        /// The page number, starting at 1.
        page: u64,
        /// Items per page.
        size: u32,
    },
    /// `size` items after the cursor (from the start when `None`). Stable
    /// under concurrent inserts and equally fast at any depth.
    Keyset {
        /// Where the previous page ended.
        after: Option<Cursor>,
        /// Items per page.
        size: u32,
    },
}

impl PageRequest {
    /// The first keyset page of `size` items.
    pub fn first(size: u32) -> Self {
        PageRequest::Keyset { after: None, size }
    }

    /// The keyset page of `size` items after `cursor`.
    pub fn after(cursor: Cursor, size: u32) -> Self {
        PageRequest::Keyset {
            after: Some(cursor),
            size,
        }
    }

    /// Offset page `page` (from 1) of `size` items.
    pub fn offset(page: u64, size: u32) -> Self {
        PageRequest::Offset { page, size }
    }

    /// The requested page size.
    pub fn size(&self) -> u32 {
        match self {
            PageRequest::Offset { size, .. } | PageRequest::Keyset { size, .. } => *size,
        }
    }

    /// Checks the page size against `1..=max` and the page number.
    pub fn validate(&self, max: u32) -> Result<()> {
        let size = self.size();
        if size == 0 || size > max {
            return Err(Error::invalid_input(
                "page_size",
                format!("must be between 1 and {max}, got {size}"),
            ));
        }
        if let PageRequest::Offset { page: 0, .. } = self {
            return Err(Error::invalid_input("page", "pages are numbered from 1"));
        }
        Ok(())
    }
}

/// One page of results.
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Page<T> {
    /// The items on this page.
    pub items: Vec<T>,
    /// The total number of matching items (offset pagination only).
    pub total: Option<u64>,
    /// The cursor for the next page (keyset pagination, when there is one).
    pub next: Option<Cursor>,
}

impl<T> Page<T> {
    /// Builds a page.
    pub fn new(items: Vec<T>, total: Option<u64>, next: Option<Cursor>) -> Self {
        Self { items, total, next }
    }
}

/// A value to compare a field with.
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
#[serde(untagged)]
#[non_exhaustive]
pub enum FilterValue {
    /// A boolean.
    Bool(bool),
    /// An integer.
    Int(i64),
    /// A floating-point number.
    Float(f64),
    /// Text (also UUIDs and timestamps in their text form).
    Text(String),
}

impl From<bool> for FilterValue {
    fn from(v: bool) -> Self {
        FilterValue::Bool(v)
    }
}

impl From<i64> for FilterValue {
    fn from(v: i64) -> Self {
        FilterValue::Int(v)
    }
}

impl From<i32> for FilterValue {
    fn from(v: i32) -> Self {
        FilterValue::Int(i64::from(v))
    }
}

impl From<f64> for FilterValue {
    fn from(v: f64) -> Self {
        FilterValue::Float(v)
    }
}

impl From<&str> for FilterValue {
    fn from(v: &str) -> Self {
        FilterValue::Text(v.to_owned())
    }
}

impl From<String> for FilterValue {
    fn from(v: String) -> Self {
        FilterValue::Text(v)
    }
}

impl From<uuid::Uuid> for FilterValue {
    fn from(v: uuid::Uuid) -> Self {
        FilterValue::Text(v.to_string())
    }
}

impl From<DateTime<Utc>> for FilterValue {
    /// RFC 3339 with microseconds, the precision repositories store.
    fn from(v: DateTime<Utc>) -> Self {
        FilterValue::Text(v.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
    }
}

/// A condition on one declared field.
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "op")]
#[non_exhaustive]
pub enum Filter {
    /// `field = value`
    Eq {
        /// The field name, as declared by the entity mapping.
        field: String,
        /// The value.
        value: FilterValue,
    },
    /// `low <= field <= high`, either bound optional.
    Range {
        /// The field name.
        field: String,
        /// The inclusive lower bound.
        low: Option<FilterValue>,
        /// The inclusive upper bound.
        high: Option<FilterValue>,
    },
    /// `field IN (values)`; an empty list matches nothing.
    In {
        /// The field name.
        field: String,
        /// The accepted values.
        values: Vec<FilterValue>,
    },
    /// `field` starts with `prefix` (text fields), compared case-sensitively
    /// and literally: `%`, `_` and `\` are ordinary characters.
    Prefix {
        /// The field name.
        field: String,
        /// The prefix, matched literally.
        prefix: String,
    },
}

impl Filter {
    /// `field = value`.
    pub fn eq(field: impl Into<String>, value: impl Into<FilterValue>) -> Self {
        Filter::Eq {
            field: field.into(),
            value: value.into(),
        }
    }

    /// `low <= field <= high`.
    pub fn between(
        field: impl Into<String>,
        low: impl Into<FilterValue>,
        high: impl Into<FilterValue>,
    ) -> Self {
        Filter::Range {
            field: field.into(),
            low: Some(low.into()),
            high: Some(high.into()),
        }
    }

    /// `field >= low`.
    pub fn at_least(field: impl Into<String>, low: impl Into<FilterValue>) -> Self {
        Filter::Range {
            field: field.into(),
            low: Some(low.into()),
            high: None,
        }
    }

    /// `field <= high`.
    pub fn at_most(field: impl Into<String>, high: impl Into<FilterValue>) -> Self {
        Filter::Range {
            field: field.into(),
            low: None,
            high: Some(high.into()),
        }
    }

    /// `field IN (values)`.
    pub fn one_of<V: Into<FilterValue>>(
        field: impl Into<String>,
        values: impl IntoIterator<Item = V>,
    ) -> Self {
        Filter::In {
            field: field.into(),
            values: values.into_iter().map(Into::into).collect(),
        }
    }

    /// `field` starts with `prefix`, literally.
    pub fn prefix(field: impl Into<String>, prefix: impl Into<String>) -> Self {
        Filter::Prefix {
            field: field.into(),
            prefix: prefix.into(),
        }
    }

    /// The field this condition is on.
    pub fn field(&self) -> &str {
        match self {
            Filter::Eq { field, .. }
            | Filter::Range { field, .. }
            | Filter::In { field, .. }
            | Filter::Prefix { field, .. } => field,
        }
    }
}

/// Sort direction.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// Smallest first.
    #[default]
    Asc,
    /// Largest first.
    Desc,
}

/// A sort key on one declared field.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct SortKey {
    /// The field name, as declared by the entity mapping.
    pub field: String,
    /// The direction.
    pub direction: Direction,
}

/// Which rows a read sees with respect to soft deletion.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Deleted {
    /// Live rows only (the default everywhere).
    #[default]
    Exclude,
    /// Live and soft-deleted rows.
    Include,
    /// Soft-deleted rows only (a "trash" view).
    Only,
}

/// What to list: filters, sort order, page, and which rows with respect to
/// soft deletion.
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ListQuery {
    /// Conditions, all of which must hold.
    pub filters: Vec<Filter>,
    /// Sort keys; the id is always added last as a tie-breaker.
    pub sort: Vec<SortKey>,
    /// The page to return.
    pub page: PageRequest,
    /// Live rows only (default), or soft-deleted ones too, or only those.
    pub deleted: Deleted,
}

impl ListQuery {
    /// Every live entity, sorted by id, one page at a time.
    pub fn new(page: PageRequest) -> Self {
        Self {
            filters: Vec::new(),
            sort: Vec::new(),
            page,
            deleted: Deleted::Exclude,
        }
    }

    /// Adds a filter.
    #[must_use]
    pub fn filter(mut self, filter: Filter) -> Self {
        self.filters.push(filter);
        self
    }

    /// Adds a sort key.
    #[must_use]
    pub fn sort_by(mut self, field: impl Into<String>, direction: Direction) -> Self {
        self.sort.push(SortKey {
            field: field.into(),
            direction,
        });
        self
    }

    /// Includes soft-deleted rows.
    #[must_use]
    pub fn with_deleted(mut self) -> Self {
        self.deleted = Deleted::Include;
        self
    }

    /// Lists soft-deleted rows only.
    #[must_use]
    pub fn only_deleted(mut self) -> Self {
        self.deleted = Deleted::Only;
        self
    }

    /// The same query for another page (for example the next keyset page).
    #[must_use]
    pub fn with_page(mut self, page: PageRequest) -> Self {
        self.page = page;
        self
    }
}

/// The read side of an entity repository.
///
/// Soft-deleted entities are invisible to every read unless the caller asks
/// for them ([`get_including_deleted`](EntityReader::get_including_deleted),
/// [`Deleted::Include`]).
#[async_trait]
pub trait EntityReader<E: Entity>: Send + Sync {
    /// Loads a live (not soft-deleted) entity.
    async fn get(&self, id: &E::Id) -> Result<Option<Stored<E>>>;

    /// Loads an entity whether or not it is soft-deleted.
    async fn get_including_deleted(&self, id: &E::Id) -> Result<Option<Stored<E>>>;

    /// Loads the live entities among `ids`, in the order of their first
    /// mention; missing and soft-deleted ids are skipped.
    async fn get_many(&self, ids: &[E::Id]) -> Result<Vec<Stored<E>>>;

    /// Whether a live entity with this id exists.
    async fn exists(&self, id: &E::Id) -> Result<bool>;

    /// Counts the entities matching every filter.
    async fn count(&self, filters: &[Filter], deleted: Deleted) -> Result<u64>;

    /// Lists entities matching a query, one page at a time.
    async fn list(&self, query: &ListQuery) -> Result<Page<Stored<E>>>;
}

/// The write side of an entity repository.
///
/// Writes that change an existing entity take the version the caller read; a
/// stale version is a [`crate::VersionConflict`] and nothing is written.
#[async_trait]
pub trait EntityWriter<E: Entity>: Send + Sync {
    /// Inserts a new entity at version 1; a taken id (live or soft-deleted)
    /// is [`Error::AlreadyExists`].
    async fn insert(&self, entity: E) -> Result<Stored<E>>;

    /// Inserts entities at version 1, all or none: one taken id fails the
    /// whole batch with [`Error::AlreadyExists`] and writes nothing.
    async fn insert_many(&self, entities: Vec<E>) -> Result<Vec<Stored<E>>>;

    /// Replaces a live entity if it is still at `expected`.
    async fn update(&self, entity: E, expected: Version) -> Result<Stored<E>>;

    /// Writes an entity whatever its state: inserts it at version 1, or
    /// replaces it (live or soft-deleted) and bumps its version; the result
    /// is live. For "last writer wins" data such as projections.
    async fn upsert(&self, entity: E) -> Result<Stored<E>>;

    /// Marks a live entity deleted if it is still at `expected`.
    async fn soft_delete(&self, id: &E::Id, expected: Version) -> Result<Stored<E>>;

    /// Brings a soft-deleted entity back if it is still at `expected`.
    async fn restore(&self, id: &E::Id, expected: Version) -> Result<Stored<E>>;

    /// Removes an entity (live or soft-deleted) for good if it is still at
    /// `expected`. Separate from [`soft_delete`](EntityWriter::soft_delete)
    /// on purpose: nothing can bring it back.
    async fn hard_delete(&self, id: &E::Id, expected: Version) -> Result<()>;
}

/// State-based persistence for one entity type: [`EntityReader`] and
/// [`EntityWriter`] together, and the way to use both inside a unit of
/// work.
pub trait EntityRepository<E: Entity>: EntityReader<E> + EntityWriter<E> {
    /// This repository bound to `tx`: its writes commit or roll back with
    /// the transaction, and its reads see the transaction's own writes.
    ///
    /// A PostgreSQL repository joins a `keel_database::UnitOfWork`, an
    /// in-memory one a [`MemoryTransaction`](crate::uow::MemoryTransaction);
    /// given the other kind, every call fails with
    /// [`Error::Internal`] and writes nothing.
    ///
    /// ```text
    /// products.within(tx).update(product, version).await?;
    /// ```
    fn within<'t>(
        &'t self,
        tx: &'t mut dyn crate::uow::Transaction,
    ) -> Box<dyn EntityRepository<E> + 't>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_requests_are_validated() {
        assert!(PageRequest::first(10).validate(100).is_ok());
        assert!(PageRequest::first(0).validate(100).is_err());
        assert!(PageRequest::first(101).validate(100).is_err());
        assert!(
            PageRequest::Offset { page: 0, size: 5 }
                .validate(100)
                .is_err()
        );
    }

    #[test]
    fn filters_serialize_in_a_stable_shape() {
        let f = Filter::between("price", 1, 2.5);
        let json = serde_json::to_string(&f).unwrap();
        assert_eq!(json, r#"{"op":"range","field":"price","low":1,"high":2.5}"#);
        assert_eq!(serde_json::from_str::<Filter>(&json).unwrap(), f);
        assert_eq!(f.field(), "price");
        let t: DateTime<Utc> = "2026-01-02T03:04:05.123456789Z".parse().unwrap();
        assert_eq!(
            FilterValue::from(t),
            FilterValue::Text("2026-01-02T03:04:05.123456Z".to_owned())
        );
    }

    #[test]
    fn list_query_builder() {
        let q = ListQuery::new(PageRequest::offset(2, 10))
            .filter(Filter::prefix("name", "a"))
            .sort_by("name", Direction::Desc)
            .only_deleted();
        assert_eq!(q.deleted, Deleted::Only);
        assert_eq!(q.sort[0].direction, Direction::Desc);
        assert_eq!(q.page.size(), 10);
    }

    /// Compiles only while the ports stay object-safe.
    fn _object_safe<E: Entity>(_: &dyn EntityRepository<E>) {}
}
