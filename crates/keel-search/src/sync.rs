//! Documents that follow repository writes: an event handler that upserts
//! or deletes search documents when integration events pass, for
//! state-based entities whose writes publish through the outbox.
//!
//! The usual wiring: the command writes the entity row and an outbox
//! message (`order.saved` carrying the order's new state, `order.deleted`
//! carrying its id) in one transaction; keel-outbox's relay publishes it;
//! a bus subscription hands it to a [`SearchSyncHandler`], which writes the
//! search index. The index follows every committed write, and none that
//! rolled back.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use keel_core::{Delivery, EventHandler, HandlerError, Message};
use serde_json::Value;

use crate::engine::{SearchEngine, Wait};
use crate::error::SearchError;
use crate::names::{DocumentId, IndexName};
use crate::query::Document;

/// The attribute in which a versioned handler records the version of the
/// entity a document reflects.
pub const VERSION_FIELD: &str = "_keel_version";

/// One change a message asks for.
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    /// Add or replace this document.
    Upsert(Document),
    /// Delete the document with this id.
    Delete(DocumentId),
}

type ChangeFn = dyn Fn(&Message) -> Result<Vec<Change>, String> + Send + Sync;

struct Rule {
    event_type: String,
    changes: Arc<ChangeFn>,
}

/// An [`EventHandler`] that keeps one search index in step with the
/// messages of a topic.
///
/// Messages without a rule are acknowledged and ignored. A message whose
/// changes cannot be worked out (a missing payload field, a bad id) is
/// rejected ([`HandlerError::Reject`], so it goes to the dead letters); a
/// failing engine makes the delivery fail with [`HandlerError::Retry`].
///
/// Delivery is at least once and, across aggregates, unordered. With
/// [`versioned`](Self::versioned), each document records the version of
/// the entity it reflects ([`VERSION_FIELD`]) and an upsert carrying an
/// older or equal version is skipped, so a redelivered or late message never
/// rolls a document back. (Publish with the aggregate id as ordering key so
/// a deletion is never overtaken by an older upsert: a deleted document
/// keeps no version.)
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use std::sync::Arc;
/// use keel_core::{Delivery, EventHandler, Message};
/// use keel_search::sync::SearchSyncHandler;
/// use keel_search::{DocumentReader, DocumentId, IndexAdmin, IndexName, InMemoryEngine, Wait};
/// use serde_json::json;
///
/// let engine = Arc::new(InMemoryEngine::new());
/// let orders = IndexName::new("orders")?;
/// engine.create_index(&orders, "id", Wait::applied_default()).await?;
///
/// let handler = SearchSyncHandler::new(engine.clone(), orders.clone())
///     .upsert_on("order.saved", "/order")
///     .delete_on("order.deleted", "/order_id")
///     .versioned("/version");
///
/// let saved = Message::new("order.saved", json!({"order": {"id": "o-1", "status": "paid"}, "version": 2}));
/// handler.handle(&Delivery::new(saved, 1, "orders-search")).await?;
/// let stale = Message::new("order.saved", json!({"order": {"id": "o-1", "status": "new"}, "version": 1}));
/// handler.handle(&Delivery::new(stale, 1, "orders-search")).await?;
///
/// let doc = engine.get_document(&orders, &DocumentId::new("o-1")?).await?.unwrap();
/// assert_eq!(doc["status"], "paid");
/// # Ok(()) }
/// ```
pub struct SearchSyncHandler {
    engine: Arc<dyn SearchEngine>,
    index: IndexName,
    rules: Vec<Rule>,
    version: Option<String>,
    wait: Wait,
}

impl fmt::Debug for SearchSyncHandler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SearchSyncHandler")
            .field("index", &self.index)
            .field(
                "event_types",
                &self.rules.iter().map(|r| &r.event_type).collect::<Vec<_>>(),
            )
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

fn at<'a>(message: &'a Message, pointer: &str) -> Result<&'a Value, String> {
    message.payload.pointer(pointer).ok_or_else(|| {
        format!(
            "{} has nothing at {pointer:?} in its payload",
            message.event_type
        )
    })
}

impl SearchSyncHandler {
    /// A handler with no rules, writing `index` and waiting until each
    /// write is applied (up to [`Wait::DEFAULT_TIMEOUT`]) before
    /// acknowledging.
    pub fn new(engine: Arc<dyn SearchEngine>, index: IndexName) -> Self {
        Self {
            engine,
            index,
            rules: Vec::new(),
            version: None,
            wait: Wait::applied_default(),
        }
    }

    /// Waits for writes this way instead ([`Wait::Enqueued`] acknowledges
    /// as soon as the engine accepted the write; a task that fails later
    /// is then only logged by the engine).
    #[must_use]
    pub fn wait(mut self, wait: Wait) -> Self {
        self.wait = wait;
        self
    }

    /// On `event_type`, upserts the JSON object found at `pointer` in the
    /// payload (`""` for the whole payload).
    #[must_use]
    pub fn upsert_on(self, event_type: impl Into<String>, pointer: impl Into<String>) -> Self {
        let pointer = pointer.into();
        self.on(event_type, move |m| match at(m, &pointer)? {
            Value::Object(doc) => Ok(vec![Change::Upsert(doc.clone())]),
            _ => Err(format!(
                "{} has no JSON object at {pointer:?}",
                m.event_type
            )),
        })
    }

    /// On `event_type`, deletes the document whose id is found at
    /// `pointer` in the payload (a string or a non-negative integer).
    #[must_use]
    pub fn delete_on(self, event_type: impl Into<String>, pointer: impl Into<String>) -> Self {
        let pointer = pointer.into();
        self.on(event_type, move |m| {
            let id =
                DocumentId::from_value("id", Some(at(m, &pointer)?)).map_err(|e| e.to_string())?;
            Ok(vec![Change::Delete(id)])
        })
    }

    /// On `event_type`, applies the changes `changes` works out from the
    /// message (an error rejects the message).
    #[must_use]
    pub fn on<F>(mut self, event_type: impl Into<String>, changes: F) -> Self
    where
        F: Fn(&Message) -> Result<Vec<Change>, String> + Send + Sync + 'static,
    {
        self.rules.push(Rule {
            event_type: event_type.into(),
            changes: Arc::new(changes),
        });
        self
    }

    /// Takes the entity's version from `pointer` in the payload (a
    /// non-negative integer, required in every message that upserts) and
    /// skips upserts that are not newer than the stored document.
    #[must_use]
    pub fn versioned(mut self, pointer: impl Into<String>) -> Self {
        self.version = Some(pointer.into());
        self
    }

    async fn apply(&self, message: &Message, changes: Vec<Change>) -> Result<(), HandlerError> {
        let has_upserts = changes.iter().any(|c| matches!(c, Change::Upsert(_)));
        let version = match &self.version {
            Some(pointer) if has_upserts => Some(
                at(message, pointer)
                    .ok()
                    .and_then(Value::as_u64)
                    .ok_or_else(|| {
                        HandlerError::reject(format!(
                            "{} has no non-negative integer version at {pointer:?}",
                            message.event_type
                        ))
                    })?,
            ),
            _ => None,
        };
        let primary_key = self.engine.primary_key(&self.index).await.map_err(fail)?;
        let mut upserts = Vec::new();
        let mut deletes = Vec::new();
        for change in changes {
            match change {
                Change::Upsert(mut doc) => {
                    let id = DocumentId::from_value(&primary_key, doc.get(&primary_key))
                        .map_err(HandlerError::reject)?;
                    if let Some(v) = version {
                        let stored = self
                            .engine
                            .get_document(&self.index, &id)
                            .await
                            .map_err(fail)?
                            .and_then(|d| d.get(VERSION_FIELD).and_then(Value::as_u64));
                        if stored.is_some_and(|s| s >= v) {
                            tracing::debug!(index = %self.index, id = %id, version = v, "skipping a stale search document");
                            continue;
                        }
                        doc.insert(VERSION_FIELD.to_owned(), Value::from(v));
                    }
                    upserts.push(doc);
                }
                Change::Delete(id) => deletes.push(id),
            }
        }
        if !upserts.is_empty() {
            self.engine
                .upsert_documents(&self.index, upserts, self.wait)
                .await
                .map_err(fail)?;
        }
        if !deletes.is_empty() {
            self.engine
                .delete_documents(&self.index, &deletes, self.wait)
                .await
                .map_err(fail)?;
        }
        Ok(())
    }
}

/// Engine failures (and an index not created yet) retry; refused input
/// rejects.
fn fail(e: SearchError) -> HandlerError {
    if e.is_retryable() || matches!(e, SearchError::IndexNotFound { .. }) {
        HandlerError::retry(e)
    } else {
        HandlerError::reject(e)
    }
}

#[async_trait]
impl EventHandler for SearchSyncHandler {
    async fn handle(&self, delivery: &Delivery) -> Result<(), HandlerError> {
        let message = &delivery.message;
        for rule in self
            .rules
            .iter()
            .filter(|r| r.event_type == message.event_type)
        {
            let changes = (rule.changes)(message).map_err(HandlerError::reject)?;
            if let Err(e) = self.apply(message, changes).await {
                tracing::warn!(
                    event_type = %message.event_type,
                    event_id = %message.event_id,
                    index = %self.index,
                    error = %e,
                    "search sync failed"
                );
                return Err(e);
            }
        }
        Ok(())
    }
}
