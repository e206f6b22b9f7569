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
    /// `field IN (values)`
    In {
        /// The field name.
        field: String,
        /// The accepted values.
        values: Vec<FilterValue>,
    },
    /// `field` starts with `prefix` (text fields).
    Prefix {
        /// The field name.
        field: String,
        /// The prefix, matched literally.
        prefix: String,
    },
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

/// What to list: filters, sort order, page, and whether soft-deleted rows are
/// included.
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ListQuery {
    /// Conditions, all of which must hold.
    pub filters: Vec<Filter>,
    /// Sort keys; the id is always added last as a tie-breaker.
    pub sort: Vec<SortKey>,
    /// The page to return.
    pub page: PageRequest,
    /// Include soft-deleted rows.
    pub include_deleted: bool,
}

impl ListQuery {
    /// Everything, first keyset page of `size`, sorted by id.
    pub fn new(page: PageRequest) -> Self {
        Self {
            filters: Vec::new(),
            sort: Vec::new(),
            page,
            include_deleted: false,
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
        self.include_deleted = true;
        self
    }
}

/// State-based persistence for one entity type.
///
/// Every write but `insert` takes the version the caller read; a stale
/// version is a [`crate::VersionConflict`] and nothing is written.
/// Soft-deleted entities are invisible to `get`, `list`, `exists` and `count`
/// unless asked for.
#[async_trait]
pub trait EntityRepository<E: Entity>: Send + Sync {
    /// Inserts a new entity at version 1; a taken id is
    /// [`Error::AlreadyExists`].
    async fn insert(&self, entity: E) -> Result<Stored<E>>;

    /// Loads a live (not soft-deleted) entity.
    async fn get(&self, id: &E::Id) -> Result<Option<Stored<E>>>;

    /// Replaces an entity if it is still at `expected`.
    async fn update(&self, entity: E, expected: Version) -> Result<Stored<E>>;

    /// Marks an entity deleted if it is still at `expected`.
    async fn soft_delete(&self, id: &E::Id, expected: Version) -> Result<Stored<E>>;

    /// Brings a soft-deleted entity back if it is still at `expected`.
    async fn restore(&self, id: &E::Id, expected: Version) -> Result<Stored<E>>;

    /// Lists entities matching a query.
    async fn list(&self, query: &ListQuery) -> Result<Page<Stored<E>>>;
}
