//! Typed access to one index: documents as your own serde types.

use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::engine::{SearchEngine, Wait, WriteReceipt};
use crate::error::{Result, SearchError};
use crate::names::{DocumentId, IndexName};
use crate::query::{Document, SearchRequest, SearchResults};
use crate::settings::IndexSettings;

/// One index of a [`SearchEngine`], holding documents of type `T`.
///
/// Cheap to clone. `T` serializes to a JSON object whose primary-key
/// attribute holds the document id.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> keel_search::Result<()> {
/// use std::sync::Arc;
/// use keel_search::{InMemoryEngine, SearchIndex, SearchRequest, Wait};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Serialize, Deserialize, Debug, PartialEq)]
/// struct Product { id: String, title: String }
///
/// let products: SearchIndex<Product> = SearchIndex::new(Arc::new(InMemoryEngine::new()), "products")?;
/// products.create("id", Wait::applied_default()).await?;
/// products.upsert(&Product { id: "p1".into(), title: "Blue kettle".into() }, Wait::applied_default()).await?;
/// let found = products.search(&SearchRequest::new("kettle")).await?;
/// assert_eq!(found.hits[0].document.id, "p1");
/// # Ok(()) }
/// ```
pub struct SearchIndex<T> {
    engine: Arc<dyn SearchEngine>,
    name: IndexName,
    _documents: PhantomData<fn() -> T>,
}

impl<T> Clone for SearchIndex<T> {
    fn clone(&self) -> Self {
        Self {
            engine: Arc::clone(&self.engine),
            name: self.name.clone(),
            _documents: PhantomData,
        }
    }
}

impl<T> fmt::Debug for SearchIndex<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SearchIndex")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// Converts a serializable value into a [`Document`].
///
/// # Errors
///
/// [`SearchError::Serde`] when it does not serialize,
/// [`SearchError::InvalidArgument`] when it is not a JSON object.
pub fn to_document<T: Serialize + ?Sized>(value: &T) -> Result<Document> {
    match serde_json::to_value(value).map_err(SearchError::Serde)? {
        Value::Object(map) => Ok(map),
        other => Err(SearchError::invalid(
            "document",
            format!(
                "a document must be a JSON object, not {}",
                json_kind(&other)
            ),
        )),
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

impl<T: Serialize + DeserializeOwned + Send + Sync> SearchIndex<T> {
    /// The index `name` of `engine`.
    ///
    /// # Errors
    ///
    /// [`SearchError::InvalidIndexName`].
    pub fn new(engine: Arc<dyn SearchEngine>, name: &str) -> Result<Self> {
        Ok(Self::with_name(engine, IndexName::new(name)?))
    }

    /// The index `name` of `engine`, with a name already checked.
    #[must_use]
    pub fn with_name(engine: Arc<dyn SearchEngine>, name: IndexName) -> Self {
        Self {
            engine,
            name,
            _documents: PhantomData,
        }
    }

    /// The index's name.
    #[must_use]
    pub fn name(&self) -> &IndexName {
        &self.name
    }

    /// The engine behind it.
    #[must_use]
    pub fn engine(&self) -> &Arc<dyn SearchEngine> {
        &self.engine
    }

    /// Creates the index with `primary_key`.
    ///
    /// # Errors
    ///
    /// As [`IndexAdmin::create_index`](crate::IndexAdmin::create_index).
    pub async fn create(&self, primary_key: &str, wait: Wait) -> Result<WriteReceipt> {
        self.engine
            .create_index(&self.name, primary_key, wait)
            .await
    }

    /// Replaces the index's settings.
    ///
    /// # Errors
    ///
    /// As [`IndexAdmin::apply_settings`](crate::IndexAdmin::apply_settings).
    pub async fn apply_settings(
        &self,
        settings: &IndexSettings,
        wait: Wait,
    ) -> Result<WriteReceipt> {
        self.engine.apply_settings(&self.name, settings, wait).await
    }

    /// Adds or replaces one document.
    ///
    /// # Errors
    ///
    /// As [`DocumentWriter::upsert_documents`](crate::DocumentWriter::upsert_documents).
    pub async fn upsert(&self, document: &T, wait: Wait) -> Result<WriteReceipt> {
        let doc = to_document(document)?;
        self.engine
            .upsert_documents(&self.name, vec![doc], wait)
            .await
    }

    /// Adds or replaces many documents in one write: all of them or, when
    /// one is refused, none.
    ///
    /// # Errors
    ///
    /// As [`DocumentWriter::upsert_documents`](crate::DocumentWriter::upsert_documents).
    pub async fn upsert_many(&self, documents: &[T], wait: Wait) -> Result<WriteReceipt> {
        let docs = documents
            .iter()
            .map(to_document)
            .collect::<Result<Vec<_>>>()?;
        self.engine.upsert_documents(&self.name, docs, wait).await
    }

    /// Deletes one document (a missing one is not an error).
    ///
    /// # Errors
    ///
    /// [`SearchError::InvalidDocumentId`], or as
    /// [`DocumentWriter::delete_documents`](crate::DocumentWriter::delete_documents).
    pub async fn delete(&self, id: &str, wait: Wait) -> Result<WriteReceipt> {
        let id = DocumentId::new(id)?;
        self.engine
            .delete_documents(&self.name, std::slice::from_ref(&id), wait)
            .await
    }

    /// Deletes many documents in one write.
    ///
    /// # Errors
    ///
    /// As [`DocumentWriter::delete_documents`](crate::DocumentWriter::delete_documents).
    pub async fn delete_many(&self, ids: &[DocumentId], wait: Wait) -> Result<WriteReceipt> {
        self.engine.delete_documents(&self.name, ids, wait).await
    }

    /// The document with this id, if any.
    ///
    /// # Errors
    ///
    /// [`SearchError::InvalidDocumentId`], [`SearchError::Serde`], or as
    /// [`DocumentReader::get_document`](crate::DocumentReader::get_document).
    pub async fn get(&self, id: &str) -> Result<Option<T>> {
        let id = DocumentId::new(id)?;
        match self.engine.get_document(&self.name, &id).await? {
            None => Ok(None),
            Some(doc) => serde_json::from_value(Value::Object(doc))
                .map(Some)
                .map_err(SearchError::Serde),
        }
    }

    /// Runs a search and converts the hits into `T`.
    ///
    /// # Errors
    ///
    /// As [`DocumentReader::search`](crate::DocumentReader::search), and
    /// [`SearchError::Serde`] when a hit does not deserialize.
    pub async fn search(&self, request: &SearchRequest) -> Result<SearchResults<T>> {
        self.engine.search(&self.name, request).await?.into_typed()
    }
}
