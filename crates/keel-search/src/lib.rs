//! Search read models for Keel: a search-index port, a Meilisearch
//! adapter on the official SDK, an in-memory twin, and helpers that keep an
//! index in sync with the event log or with repository writes.
//!
//! Services use it for the query side of CQRS: documents shaped for
//! searching (full text, filters, facets, sorts), fed from the events or
//! state changes the write side commits.
//!
//! * The port is [`SearchEngine`]: [`IndexAdmin`] (create, settings, atomic
//!   swap, task waits), [`DocumentWriter`] (upsert and delete, single and
//!   batched) and [`DocumentReader`] (get, search). It is object-safe: hold
//!   `Arc<dyn SearchEngine>`. [`SearchIndex<T>`] gives typed access to one
//!   index with your own serde types.
//! * [`SearchRequest`]: query words, a typed [`Filter`] (values are escaped
//!   by construction; user input can never add a condition), sorts,
//!   facets, highlighting, offset or page pagination.
//! * [`Wait`]: Meilisearch applies writes asynchronously. `Wait::Applied`
//!   gives read-your-writes with a timeout; a failed task is a typed
//!   [`SearchError::Rejected`] carrying Meilisearch's error code.
//! * Bad input is refused before anything is written, by every engine
//!   alike: [`IndexName`] and [`DocumentId`] allow `[A-Za-z0-9_-]` only,
//!   and [`Limits`] bound document and batch sizes; a batch with one bad
//!   document writes nothing.
//! * [`InMemoryEngine`] behaves like Meilisearch for filters, sorts, facets
//!   and pagination (its relevance ranking is simpler; see its docs);
//!   `testing` (feature `testing`) is the contract suite both pass.
//! * `meilisearch::MeilisearchEngine` (feature `meilisearch`): the API key
//!   comes from a `keel_security::SecretProvider`; `TenantTokenSigner`
//!   issues tenant tokens for multi-tenant search.
//! * `projection::SearchProjection` (feature `projection`): keeps an index
//!   in sync from a keel-eventstore catch-up subscription (checkpointed,
//!   idempotent), rebuilds it from position 0 into a new index swapped in
//!   atomically, and exposes lag as metrics and a readiness check.
//! * [`sync::SearchSyncHandler`]: documents that follow repository writes
//!   through the outbox and the bus.
//!
//! The guide is `docs/search.md`.
//!
//! # Example
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> keel_search::Result<()> {
//! use std::sync::Arc;
//!
//! use keel_search::{
//!     Filter, Highlight, InMemoryEngine, IndexSettings, SearchIndex, SearchRequest, SortBy, Wait,
//! };
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Serialize, Deserialize, Debug)]
//! struct Product {
//!     id: String,
//!     title: String,
//!     category: String,
//!     price: u32,
//! }
//!
//! // In tests; a service passes a MeilisearchEngine instead.
//! let engine = Arc::new(InMemoryEngine::new());
//! let products: SearchIndex<Product> = SearchIndex::new(engine, "products")?;
//! products.create("id", Wait::applied_default()).await?;
//! products
//!     .apply_settings(
//!         &IndexSettings::new()
//!             .searchable(["title"])
//!             .filterable(["category", "price"])
//!             .sortable(["price"]),
//!         Wait::applied_default(),
//!     )
//!     .await?;
//! let product = |id: &str, title: &str, category: &str, price| Product {
//!     id: id.into(),
//!     title: title.into(),
//!     category: category.into(),
//!     price,
//! };
//! products
//!     .upsert_many(
//!         &[
//!             product("p1", "Blue kettle", "kitchen", 25),
//!             product("p2", "Red kettle", "kitchen", 35),
//!             product("p3", "Garden hose", "garden", 40),
//!         ],
//!         Wait::applied_default(), // read your own writes
//!     )
//!     .await?;
//!
//! // The category comes from the user: it is a value, never syntax.
//! let category = "kitchen";
//! let found = products
//!     .search(
//!         &SearchRequest::new("kettle")
//!             .filter(Filter::eq("category", category).and(Filter::lt("price", 30)))
//!             .sort(SortBy::asc("price"))
//!             .facets(["category"])
//!             .highlight(Highlight::fields(["title"]))
//!             .page(1, 10),
//!     )
//!     .await?;
//! assert_eq!(found.hits.len(), 1);
//! assert_eq!(found.hits[0].document.id, "p1");
//! assert_eq!(found.hits[0].formatted.as_ref().unwrap()["title"], "Blue <em>kettle</em>");
//! assert_eq!(found.facets["category"]["kitchen"], 1);
//!
//! // Bad ids are refused before anything is written.
//! let bad = products.upsert(&product("p/4", "Lamp", "office", 9), Wait::applied_default()).await;
//! assert!(matches!(bad, Err(keel_search::SearchError::InvalidDocumentId { .. })));
//! # Ok(()) }
//! ```
//!
//! # Feature flags
//!
//! | feature | default | what it adds |
//! |---|---|---|
//! | `meilisearch` | yes | `meilisearch::MeilisearchEngine`, `TenantTokenSigner` (`meilisearch-sdk` on reqwest with rustls; no OpenSSL) |
//! | `projection` | yes | `projection::SearchProjection` on keel-eventstore subscriptions |
//! | `testing` | no | the contract suite `testing` and `contract_suite!` |
//!
//! The in-memory engine, the port, the filter builder and the sync handler
//! are always built.

pub mod engine;
pub mod error;
pub mod filter;
#[cfg(feature = "meilisearch")]
pub mod meilisearch;
pub mod memory;
pub mod names;
#[cfg(feature = "projection")]
pub mod projection;
pub mod query;
pub mod settings;
pub mod sync;
#[cfg(feature = "testing")]
pub mod testing;

pub mod typed;

pub use engine::{
    DocumentReader, DocumentWriter, IndexAdmin, SearchEngine, Wait, WriteReceipt, check_batch,
};
pub use error::{Result, SearchError};
pub use filter::{Filter, FilterValue, Number};
pub use memory::InMemoryEngine;
pub use names::{DocumentId, IndexName, Limits};
pub use query::{
    Direction, Document, Highlight, Hit, Pagination, SearchRequest, SearchResults, SortBy,
    TotalHits,
};
pub use settings::IndexSettings;
pub use typed::{SearchIndex, to_document};
