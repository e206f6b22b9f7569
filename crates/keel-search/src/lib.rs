//! Search read models for Keel: a search-index port, a Meilisearch
//! adapter, an in-memory twin, and helpers that keep an index in sync with
//! the event log or with repository writes.
//!
//! TODO crate docs

pub mod engine;
pub mod error;
pub mod filter;
pub mod memory;
#[cfg(feature = "meilisearch")]
pub mod meilisearch;
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
