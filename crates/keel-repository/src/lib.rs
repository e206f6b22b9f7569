//! Repository base for state-based entities: CRUD, optimistic locking,
//! automatic timestamps, soft delete, filtering and two kinds of pagination,
//! on PostgreSQL and in memory.
//!
//! Services use it for state-based aggregates and read models instead of
//! writing the same SQL in every service. Declare how an entity maps to a
//! table once ([`Mapped`]); then [`PgRepository`] and [`InMemoryRepository`]
//! both implement keel-core's
//! [`EntityRepository`](keel_core::EntityRepository) port
//! ([`EntityReader`](keel_core::EntityReader) +
//! [`EntityWriter`](keel_core::EntityWriter)) with the same observable
//! behaviour, proved by one contract suite (module `testing`, feature `testing`).
//!
//! * **Writes**: `insert`, `insert_many` (all or nothing), `update`,
//!   `upsert`, `soft_delete`, `restore`, `hard_delete` (explicit and
//!   separate).
//! * **Reads**: `get`, `get_including_deleted`, `get_many`, `exists`,
//!   `count`, `list`.
//! * **Optimistic locking**: every row has a version (1 after insert, +1 per
//!   write); `update`, `soft_delete`, `restore` and `hard_delete` take the
//!   version the caller read, and a stale one is a
//!   [`VersionConflict`](keel_core::VersionConflict) with `expected` and
//!   `actual`, with nothing written.
//! * **Timestamps**: `created_at` / `updated_at` / `deleted_at` kept by the
//!   repository, from the database server's `now()` or from a
//!   [`Clock`](keel_core::Clock) (`with_clock`), at microsecond precision.
//! * **Soft delete**: soft-deleted rows are invisible to every read unless
//!   the caller asks ([`Deleted`](keel_core::Deleted)).
//! * **Listing**: equality, range, in-list and literal prefix filters, and
//!   sorting, on declared fields only; offset pages with a total, or keyset
//!   pages with an opaque, HMAC-signed cursor bound to the query.
//! * **Units of work**: `repo.within(tx)` runs every operation in a
//!   transaction shared with other ports (events, an outbox row, another
//!   repository): its writes commit or roll back together, its reads see
//!   the transaction's own writes. `PgRepository` joins a
//!   `keel_database::UnitOfWork`, `InMemoryRepository` a
//!   [`MemoryTransaction`](keel_core::uow::MemoryTransaction).
//! * **Limits**: ids up to [`MAX_ID_BYTES`], text and JSON up to
//!   [`MAX_TEXT_BYTES`] / [`MAX_JSON_BYTES`], no NUL characters, timestamps
//!   in PostgreSQL's range, at most [`MAX_FILTERS`] filters,
//!   [`MAX_SORT_KEYS`] sort keys and [`MAX_IN_LIST`] values per in-list:
//!   checked before the database sees anything, so both repositories refuse
//!   the same input with the same `Invalid` error.
//!
//! Guide: `docs/repository.md`.
//!
//! # Example
//!
//! ```
//! use keel_core::{
//!     Direction, Entity, EntityReader, EntityWriter, Error, Filter, ListQuery, PageRequest,
//!     Version,
//! };
//! use keel_repository::{
//!     Column, ColumnType, InMemoryRepository, Mapped, Mapping, Result, Row, RowWriter, Value,
//! };
//!
//! #[derive(Clone, Debug, PartialEq)]
//! struct Customer { id: i64, email: String, tier: i32 }
//!
//! impl Entity for Customer {
//!     type Id = i64;
//!     const NAME: &'static str = "customer";
//!     fn id(&self) -> &i64 { &self.id }
//! }
//!
//! impl Mapped for Customer {
//!     fn mapping() -> Mapping {
//!         Mapping::new("customers")
//!             .id("id", ColumnType::I64)
//!             .column(Column::new("email", ColumnType::Text).filterable().sortable())
//!             .column(Column::new("tier", ColumnType::I32).filterable().sortable())
//!     }
//!     fn id_value(id: &i64) -> Value { (*id).into() }
//!     fn write(&self, row: &mut RowWriter<'_>) {
//!         row.set("id", self.id).set("email", &self.email).set("tier", self.tier);
//!     }
//!     fn read(row: &mut Row<'_>) -> Result<Self> {
//!         Ok(Customer { id: row.get("id")?, email: row.get("email")?, tier: row.get("tier")? })
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Error> {
//! // `PgRepository::new(pool)?` is a drop-in replacement.
//! let customers = InMemoryRepository::<Customer>::new()?;
//!
//! let ada = customers.insert(Customer { id: 1, email: "ada@example.com".into(), tier: 2 }).await?;
//! assert_eq!(ada.version, Version::new(1));
//!
//! // Optimistic locking: the second writer with the same version loses.
//! let mut gold = ada.entity.clone();
//! gold.tier = 3;
//! customers.update(gold.clone(), ada.version).await?;
//! let stale = customers.update(gold, ada.version).await.unwrap_err();
//! assert_eq!(stale.as_conflict().unwrap().actual, Version::new(2));
//!
//! // Filter, sort, and page with a cursor.
//! let query = ListQuery::new(PageRequest::first(20))
//!     .filter(Filter::at_least("tier", 2))
//!     .sort_by("email", Direction::Asc);
//! let page = customers.list(&query).await?;
//! assert_eq!(page.items.len(), 1);
//! assert!(page.next.is_none());
//!
//! // Soft-deleted entities disappear from reads until restored.
//! let gone = customers.soft_delete(&1, Version::new(2)).await?;
//! assert!(customers.get(&1).await?.is_none());
//! customers.restore(&1, gone.version).await?;
//! assert!(customers.exists(&1).await?);
//! # Ok(())
//! # }
//! ```
//!
//! # Units of work
//!
//! ```no_run
//! use keel_core::uow::TransactionSource;
//! use keel_core::{EntityReader, EntityRepository, EntityWriter, Version};
//! use keel_repository::{Mapped, PgRepository};
//!
//! /// Bumps an entity and writes an outbox row in one transaction.
//! async fn touch<E: Mapped>(
//!     database: &keel_database::Database,
//!     repo: &PgRepository<E>,
//!     id: &E::Id,
//! ) -> keel_core::Result<()> {
//!     let mut tx = database.begin().await?; // or TransactionSource::begin(database)
//!     let found = repo.within(&mut tx).get(id).await?;
//!     if let Some(stored) = found {
//!         repo.within(&mut tx).update(stored.entity, stored.version).await?;
//!         sqlx::query("INSERT INTO outbox (topic) VALUES ('touched')")
//!             .execute(tx.conn())
//!             .await
//!             .map_err(keel_database::to_keel)?;
//!     }
//!     tx.commit().await?; // both, or neither
//!     Ok(())
//! }
//! ```
//!
//! In a command handler the transaction arrives as `&mut dyn Transaction`
//! and the pipeline commits it: `products.within(tx).update(p, v).await?`.
//! As in PostgreSQL, a write the store refuses (a duplicate id, a CHECK)
//! aborts the transaction in both variants, while a version conflict or a
//! not-found is an answer and leaves it usable.
//!
//! # Feature flags
//!
//! | feature | default | what it adds |
//! |---|---|---|
//! | `postgres` | yes | [`PgRepository`], on sqlx and keel-database |
//! | `derive` | yes | `#[derive(Mapped)]`, which writes the `Entity` and `Mapped` impls from attributes |
//! | `testing` | no | the contract suite (module `testing`, macro `contract_suite!`) for implementations of the port |
//!
//! Without `postgres` the crate has no database dependency:
//! [`InMemoryRepository`] needs neither a server nor sqlx.

mod cursor;
mod error;
mod limits;
mod mapping;
mod memory;
#[cfg(feature = "postgres")]
mod postgres;
mod query;
#[cfg(feature = "testing")]
pub mod testing;
mod value;

pub use cursor::{CursorKey, CursorKeyTooShort};
pub use error::{RepositoryError, Result};
/// Derives [`keel_core::Entity`] and [`Mapped`] from attributes (feature
/// `derive`).
///
/// ```
/// use keel_repository::Mapped;
///
/// #[derive(Clone, Debug, Mapped)]
/// #[keel(table = "customers")]          // `name = "…"` defaults to `customer`
/// struct Customer {
///     #[keel(id)]
///     id: uuid::Uuid,
///     #[keel(filterable, sortable)]
///     email: String,
///     #[keel(column = "tier_level", filterable)]
///     tier: i32,
///     note: Option<String>,             // nullable
///     profile: serde_json::Value,       // JSONB
/// }
///
/// assert_eq!(<Customer as keel_core::Entity>::NAME, "customer");
/// assert!(Customer::mapping().create_table_sql().contains(r#""tier_level" INTEGER NOT NULL"#));
/// ```
///
/// Struct attributes: `table` (required), `name`. Field attributes: `id`
/// (exactly one), `filterable`, `sortable`, `column = "…"`. Column types
/// follow the field types: `bool`, `i32`, `i64`, `f64`, `String`, `Uuid`,
/// `DateTime<Utc>`, `serde_json::Value`, and `Option` of those for nullable
/// columns. The mapping is validated like a hand-written one when a
/// repository is built.
#[cfg(feature = "derive")]
pub use keel_repository_macros::Mapped;
pub use limits::{MAX_FILTERS, MAX_ID_BYTES, MAX_JSON_BYTES, MAX_SORT_KEYS, MAX_TEXT_BYTES};
pub use mapping::{Column, Mapped, Mapping, Row, RowWriter};
pub use memory::InMemoryRepository;
#[cfg(feature = "postgres")]
pub use postgres::PgRepository;
pub use query::{DEFAULT_MAX_PAGE_SIZE, MAX_IN_LIST};
pub use value::{ColumnType, FromValue, Value};

#[doc(hidden)]
pub mod __private {
    //! Re-exports for `#[derive(Mapped)]`; not a public API.
    pub use keel_core;
}
