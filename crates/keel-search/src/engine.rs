//! The search-engine port: small traits (administration, writes, reads)
//! combined by [`SearchEngine`].

use std::time::Duration;

use async_trait::async_trait;

use crate::error::{Result, SearchError};
use crate::names::{DocumentId, IndexName, Limits};
use crate::query::{Document, SearchRequest, SearchResults};
use crate::settings::IndexSettings;

/// Whether a write returns once the engine accepted it or once it applied
/// it.
///
/// Meilisearch applies writes asynchronously, as tasks: a search right
/// after an [`Enqueued`](Self::Enqueued) write may not see it yet. Ask for
/// [`Applied`](Self::Applied) to read your own writes; a task that fails is
/// then reported as [`SearchError::Rejected`] with the engine's code, and
/// one still running after the timeout as [`SearchError::Timeout`] (it may
/// still complete later). The in-memory engine applies every write before
/// returning.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// Return once the engine accepted the write.
    Enqueued,
    /// Return once the write is applied and visible to searches, or fail
    /// after `timeout`.
    Applied {
        /// How long to wait at most.
        timeout: Duration,
    },
}

impl Wait {
    /// The timeout [`Wait::applied_default`] uses.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

    /// Waits up to `timeout`.
    #[must_use]
    pub const fn applied(timeout: Duration) -> Self {
        Wait::Applied { timeout }
    }

    /// Waits up to [`Wait::DEFAULT_TIMEOUT`].
    #[must_use]
    pub const fn applied_default() -> Self {
        Wait::Applied {
            timeout: Self::DEFAULT_TIMEOUT,
        }
    }
}

/// What a write returns: the engine's task, if it runs asynchronously.
///
/// Pass it to [`IndexAdmin::wait_for`] to wait for a write made with
/// [`Wait::Enqueued`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct WriteReceipt {
    /// The engine's task id (`None` when the write was applied at once).
    pub task: Option<u64>,
}

impl WriteReceipt {
    /// A receipt for a write that is already applied.
    #[must_use]
    pub const fn applied() -> Self {
        Self { task: None }
    }
}

/// Creating, configuring, swapping and deleting indexes.
#[async_trait]
pub trait IndexAdmin: Send + Sync {
    /// Creates an empty index whose documents are identified by their
    /// `primary_key` attribute.
    ///
    /// [`SearchError::IndexAlreadyExists`] when it exists (with
    /// [`Wait::Enqueued`], Meilisearch reports it only when waited for).
    async fn create_index(
        &self,
        index: &IndexName,
        primary_key: &str,
        wait: Wait,
    ) -> Result<WriteReceipt>;

    /// Deletes an index and its documents.
    ///
    /// [`SearchError::IndexNotFound`] when it does not exist.
    async fn delete_index(&self, index: &IndexName, wait: Wait) -> Result<WriteReceipt>;

    /// Whether the index exists.
    async fn index_exists(&self, index: &IndexName) -> Result<bool>;

    /// The attribute that identifies the index's documents.
    async fn primary_key(&self, index: &IndexName) -> Result<String>;

    /// Replaces the index's settings.
    async fn apply_settings(
        &self,
        index: &IndexName,
        settings: &IndexSettings,
        wait: Wait,
    ) -> Result<WriteReceipt>;

    /// The index's settings.
    async fn settings(&self, index: &IndexName) -> Result<IndexSettings>;

    /// Swaps the contents (documents and settings) of two indexes in one
    /// atomic step: searches see either the old or the new contents under
    /// each name, never a mixture. Both must exist.
    async fn swap_indexes(&self, a: &IndexName, b: &IndexName, wait: Wait) -> Result<WriteReceipt>;

    /// How many documents the index holds.
    async fn document_count(&self, index: &IndexName) -> Result<u64>;

    /// Waits until the write behind `receipt` is applied.
    ///
    /// [`SearchError::Rejected`] (with the engine's code) when it failed,
    /// [`SearchError::Timeout`] when it is still running after `timeout`.
    async fn wait_for(&self, receipt: WriteReceipt, timeout: Duration) -> Result<()>;
}

/// Writing documents.
#[async_trait]
pub trait DocumentWriter: Send + Sync {
    /// Adds documents, replacing any with the same id.
    ///
    /// Every document must be a JSON object with a valid id under the
    /// index's primary key and fit the engine's [`Limits`]; otherwise the
    /// whole batch is refused before anything is written. The index must
    /// exist ([`SearchError::IndexNotFound`]).
    async fn upsert_documents(
        &self,
        index: &IndexName,
        documents: Vec<Document>,
        wait: Wait,
    ) -> Result<WriteReceipt>;

    /// Deletes the documents with these ids (missing ones are ignored).
    async fn delete_documents(
        &self,
        index: &IndexName,
        ids: &[DocumentId],
        wait: Wait,
    ) -> Result<WriteReceipt>;

    /// Deletes every document of the index (its settings stay).
    async fn delete_all_documents(&self, index: &IndexName, wait: Wait) -> Result<WriteReceipt>;
}

/// Reading documents.
#[async_trait]
pub trait DocumentReader: Send + Sync {
    /// The document with this id, if any.
    async fn get_document(&self, index: &IndexName, id: &DocumentId) -> Result<Option<Document>>;

    /// Runs a search.
    ///
    /// Filters, facets and sorts may only use attributes the settings
    /// declare filterable or sortable; otherwise the engine refuses with
    /// [`SearchError::Rejected`] and code `invalid_search_filter`,
    /// `invalid_search_facets` or `invalid_search_sort`.
    async fn search(
        &self,
        index: &IndexName,
        request: &SearchRequest,
    ) -> Result<SearchResults<Document>>;
}

/// A whole search engine: administration, writes and reads. Hold it as
/// `Arc<dyn SearchEngine>`.
pub trait SearchEngine: IndexAdmin + DocumentWriter + DocumentReader {
    /// The write limits this engine enforces.
    fn limits(&self) -> Limits;
}

/// Checks a batch against `limits` and the primary key, before anything is
/// written. Returns each document's id.
///
/// # Errors
///
/// [`SearchError::BatchTooLarge`], [`SearchError::DocumentTooLarge`],
/// [`SearchError::InvalidDocumentId`].
pub fn check_batch(
    documents: &[Document],
    primary_key: &str,
    limits: &Limits,
) -> Result<Vec<DocumentId>> {
    encode_batch(documents, primary_key, limits).map(|(ids, _)| ids)
}

/// [`check_batch`], also returning the batch as NDJSON (one document per
/// line), as the Meilisearch adapter sends it.
pub(crate) fn encode_batch(
    documents: &[Document],
    primary_key: &str,
    limits: &Limits,
) -> Result<(Vec<DocumentId>, Vec<u8>)> {
    if documents.len() > limits.max_batch_documents {
        return Err(SearchError::BatchTooLarge {
            unit: "documents",
            actual: documents.len(),
            max: limits.max_batch_documents,
        });
    }
    let mut ids = Vec::with_capacity(documents.len());
    let mut out = Vec::with_capacity(documents.len() * 256);
    for (position, doc) in documents.iter().enumerate() {
        ids.push(DocumentId::from_value(primary_key, doc.get(primary_key))?);
        let start = out.len();
        serde_json::to_writer(&mut out, doc).map_err(SearchError::Serde)?;
        let bytes = out.len() - start;
        if bytes > limits.max_document_bytes {
            return Err(SearchError::DocumentTooLarge {
                position,
                bytes,
                max: limits.max_document_bytes,
            });
        }
        out.push(b'\n');
        if out.len() > limits.max_batch_bytes {
            return Err(SearchError::BatchTooLarge {
                unit: "bytes",
                actual: out.len(),
                max: limits.max_batch_bytes,
            });
        }
    }
    Ok((ids, out))
}

/// Checks a primary-key attribute name (a plain attribute, no nesting).
pub(crate) fn check_primary_key(primary_key: &str) -> Result<()> {
    crate::names::check_field(primary_key)?;
    if primary_key.contains('.') {
        return Err(SearchError::InvalidField {
            field: primary_key.to_owned(),
            reason: "a primary key cannot be a nested attribute",
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn doc(v: serde_json::Value) -> Document {
        match v {
            serde_json::Value::Object(map) => map,
            other => panic!("not an object: {other}"),
        }
    }

    #[test]
    fn batches_are_checked_before_writing() {
        let limits = Limits::default()
            .max_batch_documents(2)
            .max_document_bytes(40);
        let ok = [doc(json!({"id": "a"})), doc(json!({"id": 7}))];
        let (ids, ndjson) = encode_batch(&ok, "id", &limits).unwrap();
        assert_eq!(ids[1].as_str(), "7");
        assert_eq!(ndjson, b"{\"id\":\"a\"}\n{\"id\":7}\n");

        let three = [ok[0].clone(), ok[1].clone(), ok[0].clone()];
        assert!(matches!(
            check_batch(&three, "id", &limits),
            Err(SearchError::BatchTooLarge {
                unit: "documents",
                ..
            })
        ));
        let big = [doc(json!({"id": "a", "text": "x".repeat(50)}))];
        assert!(matches!(
            check_batch(&big, "id", &limits),
            Err(SearchError::DocumentTooLarge { position: 0, .. })
        ));
        let bad = [ok[0].clone(), doc(json!({"id": "a/b"}))];
        assert!(matches!(
            check_batch(&bad, "id", &limits),
            Err(SearchError::InvalidDocumentId { .. })
        ));
        let missing = [doc(json!({"sku": "a"}))];
        assert!(check_batch(&missing, "id", &limits).is_err());
        let bytes = Limits::default().max_batch_bytes(15);
        assert!(matches!(
            check_batch(&ok, "id", &bytes),
            Err(SearchError::BatchTooLarge { unit: "bytes", .. })
        ));
    }
}
