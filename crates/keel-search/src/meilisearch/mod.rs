//! The Meilisearch adapter, on the official `meilisearch-sdk`.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use keel_security::{Secret, SecretProvider};
use meilisearch_sdk::client::{Client, SwapIndexes};
use meilisearch_sdk::errors::{Error as SdkError, ErrorCode};
use meilisearch_sdk::reqwest::ReqwestClient;
use meilisearch_sdk::search::{MatchingStrategies, Selectors};
use meilisearch_sdk::task_info::TaskInfo;
use meilisearch_sdk::tasks::Task;
use serde_json::{Map, Value};

use crate::engine::{
    DocumentReader, DocumentWriter, IndexAdmin, SearchEngine, Wait, WriteReceipt,
    check_primary_key, encode_batch,
};
use crate::error::{Result, SearchError};
use crate::filter::Filter;
use crate::names::{DocumentId, IndexName, Limits};
use crate::query::{Document, Hit, Pagination, SearchRequest, SearchResults, TotalHits};
use crate::settings::IndexSettings;

/// The SDK this adapter is built on, for calls the port does not cover
/// (through [`MeilisearchEngine::client`]).
pub use meilisearch_sdk as sdk;

mod convert;
mod http;
mod tenant;

pub use http::{RequestTimedOut, TimedClient};

use convert::{from_meili, from_sdk_settings, futures_io_cursor, map_err, to_sdk_settings};

pub use tenant::{TenantRules, TenantTokenSigner};

/// A [`SearchEngine`] on a Meilisearch server (v1.x).
///
/// Cheap to clone; clones share the HTTP connection pool and the cache of
/// primary keys. Writes are Meilisearch tasks: with [`Wait::Applied`] the
/// engine polls the task until it succeeded, failed (a typed
/// [`SearchError::Rejected`] carrying Meilisearch's error code and the task
/// id) or the timeout passed ([`SearchError::Timeout`]).
///
/// Searches use the `all` matching strategy: every query word must match.
///
/// ```no_run
/// # async fn example(secrets: &dyn keel_security::SecretProvider) -> keel_search::Result<()> {
/// use std::sync::Arc;
/// use keel_search::meilisearch::MeilisearchEngine;
/// use keel_search::{SearchIndex, SearchRequest};
///
/// // The API key is read from the secret provider, never from code.
/// let engine = MeilisearchEngine::from_secret("http://127.0.0.1:7700", secrets, "meilisearch-api-key").await?;
/// let products: SearchIndex<serde_json::Value> = SearchIndex::new(Arc::new(engine), "products")?;
/// let found = products.search(&SearchRequest::new("kettle")).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct MeilisearchEngine {
    client: Client<TimedClient>,
    url: String,
    limits: Limits,
    poll: Duration,
    request_timeout: Duration,
    primary_keys: Arc<RwLock<HashMap<IndexName, String>>>,
}

/// The time limit of one HTTP request to Meilisearch unless
/// [`MeilisearchEngine::with_request_timeout`] says otherwise.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

impl std::fmt::Debug for MeilisearchEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeilisearchEngine")
            .field("url", &self.url)
            .field("limits", &self.limits)
            .field("request_timeout", &self.request_timeout)
            .finish_non_exhaustive()
    }
}

impl MeilisearchEngine {
    /// An engine for the server at `url` (e.g. `http://127.0.0.1:7700`),
    /// authenticating with `api_key` (a key, the master key in
    /// development, or a tenant token for searches only).
    ///
    /// # Errors
    ///
    /// [`SearchError::Config`] for a URL that is not `http(s)://…` or a key
    /// that cannot be sent in a header.
    pub fn new(url: &str, api_key: Option<Secret<String>>) -> Result<Self> {
        let url = url.trim_end_matches('/');
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(SearchError::Config(format!(
                "the Meilisearch URL must start with http:// or https://, not {url:?}"
            )));
        }
        let key = api_key.map(Secret::into_inner);
        let http = ReqwestClient::new(key.as_deref()).map_err(|e| {
            SearchError::Config(format!("cannot build the Meilisearch client: {e}"))
        })?;
        let client =
            Client::new_with_client(url, key, TimedClient::new(http, DEFAULT_REQUEST_TIMEOUT));
        Ok(Self {
            client,
            url: url.to_owned(),
            limits: Limits::default(),
            poll: Duration::from_millis(50),
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            primary_keys: Arc::default(),
        })
    }

    /// An engine whose API key is the secret `secret_name` of `secrets`.
    ///
    /// # Errors
    ///
    /// [`SearchError::Config`] when the secret cannot be read (its name,
    /// never its value, is in the message), or as [`new`](Self::new).
    pub async fn from_secret(
        url: &str,
        secrets: &dyn SecretProvider,
        secret_name: &str,
    ) -> Result<Self> {
        let key = secrets.get(secret_name).await.map_err(|e| {
            SearchError::Config(format!(
                "cannot read the Meilisearch API key from secret {secret_name:?}: {e}"
            ))
        })?;
        Self::new(url, Some(key))
    }

    /// Bounds every HTTP request to `timeout` (default
    /// [`DEFAULT_REQUEST_TIMEOUT`]); a request that runs out of time is
    /// [`SearchError::Timeout`]. Waiting for a task is bounded separately,
    /// by the [`Wait`] of the write.
    #[must_use]
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        let key = self.client.get_api_key().map(str::to_owned);
        if let Ok(http) = ReqwestClient::new(key.as_deref()) {
            self.client =
                Client::new_with_client(self.url.clone(), key, TimedClient::new(http, timeout));
            self.request_timeout = timeout;
        }
        self
    }

    /// Uses other write limits.
    #[must_use]
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// The longest pause between two polls of a task (default 50 ms; the
    /// first polls come sooner).
    #[must_use]
    pub fn with_poll_interval(mut self, interval: Duration) -> Self {
        self.poll = interval.max(Duration::from_millis(1));
        self
    }

    /// The server's URL.
    #[must_use]
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The SDK client, for what the port does not cover (keys, dumps,
    /// embedders).
    #[must_use]
    pub fn client(&self) -> &Client<TimedClient> {
        &self.client
    }

    /// Whether the server answers `/health` with `available`.
    pub async fn is_healthy(&self) -> bool {
        self.client.is_healthy().await
    }

    /// A readiness check for the service's health registry: healthy when
    /// the server answers `/health` within `timeout`.
    #[must_use]
    pub fn health_check(&self, timeout: Duration) -> Arc<dyn keel_core::HealthCheck> {
        Arc::new(MeilisearchHealth {
            engine: self.clone(),
            timeout,
        })
    }

    async fn finish(&self, task: TaskInfo, wait: Wait) -> Result<WriteReceipt> {
        let receipt = WriteReceipt {
            task: Some(u64::from(task.task_uid)),
        };
        if let Wait::Applied { timeout } = wait {
            self.wait_for(receipt, timeout).await?;
        }
        Ok(receipt)
    }

    async fn cached_primary_key(&self, index: &IndexName) -> Result<String> {
        if let Some(pk) = self
            .primary_keys
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(index)
        {
            return Ok(pk.clone());
        }
        let pk = self.primary_key(index).await?;
        self.primary_keys
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(index.clone(), pk.clone());
        Ok(pk)
    }

    fn forget(&self, indexes: &[&IndexName]) {
        let mut keys = self
            .primary_keys
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        for i in indexes {
            keys.remove(*i);
        }
    }
}

struct MeilisearchHealth {
    engine: MeilisearchEngine,
    timeout: Duration,
}

#[async_trait]
impl keel_core::HealthCheck for MeilisearchHealth {
    fn name(&self) -> &str {
        "meilisearch"
    }

    async fn check(&self) -> keel_core::HealthReport {
        let started = std::time::Instant::now();
        match tokio::time::timeout(self.timeout, self.engine.client.health()).await {
            Ok(Ok(h)) if h.status == "available" => {
                keel_core::HealthReport::healthy(started.elapsed())
            }
            Ok(Ok(h)) => keel_core::HealthReport::unhealthy(
                started.elapsed(),
                format!("Meilisearch reports {:?}", h.status),
            ),
            Ok(Err(e)) => keel_core::HealthReport::unhealthy(
                started.elapsed(),
                format!("Meilisearch does not answer: {}", map_err(e, None)),
            ),
            Err(_) => keel_core::HealthReport::unhealthy(
                started.elapsed(),
                format!("no answer from Meilisearch within {:?}", self.timeout),
            ),
        }
    }
}

#[async_trait]
impl IndexAdmin for MeilisearchEngine {
    async fn create_index(
        &self,
        index: &IndexName,
        primary_key: &str,
        wait: Wait,
    ) -> Result<WriteReceipt> {
        check_primary_key(primary_key)?;
        let task = self
            .client
            .create_index(index.as_str(), Some(primary_key))
            .await
            .map_err(|e| map_err(e, Some(index)))?;
        self.forget(&[index]);
        self.finish(task, wait).await
    }

    async fn delete_index(&self, index: &IndexName, wait: Wait) -> Result<WriteReceipt> {
        let task = self
            .client
            .delete_index(index.as_str())
            .await
            .map_err(|e| map_err(e, Some(index)))?;
        self.forget(&[index]);
        self.finish(task, wait).await
    }

    async fn index_exists(&self, index: &IndexName) -> Result<bool> {
        match self.client.get_raw_index(index.as_str()).await {
            Ok(_) => Ok(true),
            Err(SdkError::Meilisearch(m)) if m.error_code == ErrorCode::IndexNotFound => Ok(false),
            Err(e) => Err(map_err(e, Some(index))),
        }
    }

    async fn primary_key(&self, index: &IndexName) -> Result<String> {
        let raw = self
            .client
            .get_raw_index(index.as_str())
            .await
            .map_err(|e| map_err(e, Some(index)))?;
        raw.get("primaryKey")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| SearchError::Config(format!("index {index} has no primary key yet")))
    }

    async fn apply_settings(
        &self,
        index: &IndexName,
        settings: &IndexSettings,
        wait: Wait,
    ) -> Result<WriteReceipt> {
        settings.validate()?;
        // Meilisearch would create a missing index here; the port says it
        // must exist, as for every other write.
        if !self.index_exists(index).await? {
            return Err(SearchError::IndexNotFound {
                index: index.to_string(),
            });
        }
        let task = self
            .client
            .index(index.as_str())
            .set_settings(&to_sdk_settings(settings))
            .await
            .map_err(|e| map_err(e, Some(index)))?;
        self.finish(task, wait).await
    }

    async fn settings(&self, index: &IndexName) -> Result<IndexSettings> {
        let s = self
            .client
            .index(index.as_str())
            .get_settings()
            .await
            .map_err(|e| map_err(e, Some(index)))?;
        Ok(from_sdk_settings(s))
    }

    async fn swap_indexes(&self, a: &IndexName, b: &IndexName, wait: Wait) -> Result<WriteReceipt> {
        let swap = SwapIndexes {
            indexes: (a.to_string(), b.to_string()),
            rename: None,
        };
        let task = self
            .client
            .swap_indexes([&swap])
            .await
            .map_err(|e| map_err(e, Some(a)))?;
        self.forget(&[a, b]);
        let receipt = WriteReceipt {
            task: Some(u64::from(task.task_uid)),
        };
        if let Wait::Applied { timeout } = wait {
            match self.wait_for(receipt, timeout).await {
                // The task names only one missing index; say which.
                Err(SearchError::Rejected { code, message, .. }) if code == "index_not_found" => {
                    let missing = if message.contains(&format!("`{b}`")) {
                        b
                    } else {
                        a
                    };
                    return Err(SearchError::IndexNotFound {
                        index: missing.to_string(),
                    });
                }
                other => other?,
            }
        }
        Ok(receipt)
    }

    async fn document_count(&self, index: &IndexName) -> Result<u64> {
        let stats = self
            .client
            .index(index.as_str())
            .get_stats()
            .await
            .map_err(|e| map_err(e, Some(index)))?;
        Ok(stats.number_of_documents as u64)
    }

    async fn wait_for(&self, receipt: WriteReceipt, timeout: Duration) -> Result<()> {
        let Some(uid) = receipt.task else {
            return Ok(());
        };
        let task_uid = u32::try_from(uid).map_err(|_| {
            SearchError::invalid("task", format!("{uid} is not a Meilisearch task id"))
        })?;
        let deadline = tokio::time::Instant::now() + timeout;
        // Poll soon at first (most small tasks finish in a few
        // milliseconds), then back off to the configured interval.
        let mut pause = Duration::from_millis(2).min(self.poll);
        loop {
            let task = self
                .client
                .get_task(TaskUid(task_uid))
                .await
                .map_err(|e| map_err(e, None))?;
            match task {
                Task::Succeeded { .. } => return Ok(()),
                Task::Failed { content } => {
                    let index = content
                        .task
                        .index_uid
                        .as_deref()
                        .and_then(|i| IndexName::new(i).ok());
                    let err = from_meili(&content.error, None, Some(uid));
                    return Err(match (&content.error.error_code, index) {
                        (ErrorCode::IndexNotFound, Some(i)) => SearchError::IndexNotFound {
                            index: i.to_string(),
                        },
                        (ErrorCode::IndexAlreadyExists, Some(i)) => {
                            SearchError::IndexAlreadyExists {
                                index: i.to_string(),
                            }
                        }
                        _ => err,
                    });
                }
                Task::Enqueued { .. } | Task::Processing { .. } => {}
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Err(SearchError::Timeout {
                    operation: format!("Meilisearch task {uid}"),
                    after: timeout,
                });
            }
            tokio::time::sleep(pause.min(deadline - now)).await;
            pause = (pause * 2).min(self.poll);
        }
    }
}

/// A task id in the form the SDK's `get_task` takes.
struct TaskUid(u32);

impl AsRef<u32> for TaskUid {
    fn as_ref(&self) -> &u32 {
        &self.0
    }
}

#[async_trait]
impl DocumentWriter for MeilisearchEngine {
    async fn upsert_documents(
        &self,
        index: &IndexName,
        documents: Vec<Document>,
        wait: Wait,
    ) -> Result<WriteReceipt> {
        let primary_key = self.cached_primary_key(index).await?;
        let (_, ndjson) = encode_batch(&documents, &primary_key, &self.limits)?;
        drop(documents);
        let task = self
            .client
            .index(index.as_str())
            .add_or_replace_unchecked_payload(
                futures_io_cursor(ndjson),
                "application/x-ndjson",
                Some(&primary_key),
            )
            .await
            .map_err(|e| map_err(e, Some(index)))?;
        self.finish(task, wait).await
    }

    async fn delete_documents(
        &self,
        index: &IndexName,
        ids: &[DocumentId],
        wait: Wait,
    ) -> Result<WriteReceipt> {
        if ids.len() > self.limits.max_batch_documents {
            return Err(SearchError::BatchTooLarge {
                unit: "documents",
                actual: ids.len(),
                max: self.limits.max_batch_documents,
            });
        }
        let ids: Vec<&str> = ids.iter().map(DocumentId::as_str).collect();
        let task = self
            .client
            .index(index.as_str())
            .delete_documents(&ids)
            .await
            .map_err(|e| map_err(e, Some(index)))?;
        self.finish(task, wait).await
    }

    async fn delete_all_documents(&self, index: &IndexName, wait: Wait) -> Result<WriteReceipt> {
        let task = self
            .client
            .index(index.as_str())
            .delete_all_documents()
            .await
            .map_err(|e| map_err(e, Some(index)))?;
        self.finish(task, wait).await
    }
}

#[async_trait]
impl DocumentReader for MeilisearchEngine {
    async fn get_document(&self, index: &IndexName, id: &DocumentId) -> Result<Option<Document>> {
        match self
            .client
            .index(index.as_str())
            .get_document::<Document>(id.as_str())
            .await
        {
            Ok(doc) => Ok(Some(doc)),
            Err(SdkError::Meilisearch(m)) if m.error_code == ErrorCode::DocumentNotFound => {
                Ok(None)
            }
            Err(e) => Err(map_err(e, Some(index))),
        }
    }

    async fn search(
        &self,
        index: &IndexName,
        request: &SearchRequest,
    ) -> Result<SearchResults<Document>> {
        request.validate()?;
        let filter = request
            .filter
            .as_ref()
            .map(Filter::to_expression)
            .transpose()?
            .flatten();
        let sort: Vec<String> = request.sort.iter().map(|s| s.to_expression()).collect();
        let sort: Vec<&str> = sort.iter().map(String::as_str).collect();
        let facets: Vec<&str> = request.facets.iter().map(String::as_str).collect();
        let highlight: Vec<&str> = request
            .highlight
            .as_ref()
            .map(|h| h.fields.iter().map(String::as_str).collect())
            .unwrap_or_default();

        let meili_index = self.client.index(index.as_str());
        let mut query = meili_index.search();
        query
            .with_query(&request.query)
            .with_matching_strategy(MatchingStrategies::ALL);
        if let Some(f) = &filter {
            query.with_filter(f);
        }
        if !sort.is_empty() {
            query.with_sort(&sort);
        }
        if !facets.is_empty() {
            query.with_facets(Selectors::Some(&facets));
        }
        if let Some(h) = &request.highlight {
            query
                .with_attributes_to_highlight(Selectors::Some(&highlight))
                .with_highlight_pre_tag(&h.pre_tag)
                .with_highlight_post_tag(&h.post_tag);
        }
        match request.pagination {
            Pagination::Offset { offset, limit } => {
                query.with_offset(offset).with_limit(limit);
            }
            Pagination::Page {
                page,
                hits_per_page,
            } => {
                query.with_page(page).with_hits_per_page(hits_per_page);
            }
        }
        let found = query
            .execute::<Map<String, Value>>()
            .await
            .map_err(|e| map_err(e, Some(index)))?;

        let total = match request.pagination {
            Pagination::Offset { .. } => {
                TotalHits::Estimated(found.estimated_total_hits.unwrap_or(found.hits.len()))
            }
            Pagination::Page { .. } => TotalHits::Exact {
                hits: found.total_hits.unwrap_or(found.hits.len()),
                pages: found.total_pages.unwrap_or(0),
            },
        };
        let facets = found
            .facet_distribution
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.into_iter().collect()))
            .collect();
        let hits = found
            .hits
            .into_iter()
            .map(|h| Hit {
                document: h.result,
                formatted: h.formatted_result,
            })
            .collect();
        Ok(SearchResults {
            hits,
            total,
            facets,
        })
    }
}

impl SearchEngine for MeilisearchEngine {
    fn limits(&self) -> Limits {
        self.limits
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_keys_are_checked() {
        assert!(MeilisearchEngine::new("127.0.0.1:7700", None).is_err());
        assert!(MeilisearchEngine::new("http://127.0.0.1:7700/", None).is_ok());
    }
}
