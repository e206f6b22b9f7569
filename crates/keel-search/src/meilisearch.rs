//! The Meilisearch adapter, on the official `meilisearch-sdk`.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use keel_security::{Secret, SecretProvider};
use meilisearch_sdk::client::{Client, SwapIndexes};
use meilisearch_sdk::errors::{Error as SdkError, ErrorCode, MeilisearchError};
use meilisearch_sdk::search::{MatchingStrategies, Selectors};
use meilisearch_sdk::settings::{FilterableAttribute, Settings};
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
    client: Client,
    url: String,
    limits: Limits,
    poll: Duration,
    primary_keys: Arc<RwLock<HashMap<IndexName, String>>>,
}

impl std::fmt::Debug for MeilisearchEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeilisearchEngine")
            .field("url", &self.url)
            .field("limits", &self.limits)
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
        let client = Client::new(url, key).map_err(|e| {
            SearchError::Config(format!("cannot build the Meilisearch client: {e}"))
        })?;
        Ok(Self {
            client,
            url: url.to_owned(),
            limits: Limits::default(),
            poll: Duration::from_millis(50),
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
    pub fn client(&self) -> &Client {
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

/// The code of a Meilisearch error as Meilisearch spells it.
fn code_text(code: &ErrorCode) -> String {
    code.to_string()
}

fn from_meili(e: &MeilisearchError, index: Option<&IndexName>, task: Option<u64>) -> SearchError {
    match (&e.error_code, index) {
        (ErrorCode::IndexNotFound, Some(i)) => SearchError::IndexNotFound {
            index: i.to_string(),
        },
        (ErrorCode::IndexAlreadyExists, Some(i)) => SearchError::IndexAlreadyExists {
            index: i.to_string(),
        },
        _ => SearchError::Rejected {
            code: code_text(&e.error_code),
            error_type: e.error_type.to_string(),
            message: e.error_message.clone(),
            task,
        },
    }
}

/// Turns an SDK error into a [`SearchError`]; `index` names the index the
/// call was about, for `index_not_found`.
fn map_err(e: SdkError, index: Option<&IndexName>) -> SearchError {
    match e {
        SdkError::Meilisearch(m) => from_meili(&m, index, None),
        SdkError::MeilisearchCommunication(c) if c.status_code == 413 => SearchError::Rejected {
            code: "payload_too_large".to_owned(),
            error_type: "invalid_request".to_owned(),
            message: "the request is larger than the server accepts".to_owned(),
            task: None,
        },
        SdkError::MeilisearchCommunication(c) => SearchError::Unavailable {
            message: format!("Meilisearch answered HTTP {}", c.status_code),
            source: None,
        },
        SdkError::Timeout => SearchError::Timeout {
            operation: "task".to_owned(),
            after: Duration::ZERO,
        },
        SdkError::ParseError(p) => SearchError::Unavailable {
            message: "Meilisearch answered something unexpected".to_owned(),
            source: Some(Box::new(p)),
        },
        other => SearchError::Unavailable {
            message: "the request to Meilisearch failed".to_owned(),
            source: Some(Box::new(other)),
        },
    }
}

fn to_sdk_settings(s: &IndexSettings) -> Settings {
    let searchable = s
        .searchable_attributes
        .clone()
        .unwrap_or_else(|| vec!["*".to_owned()]);
    let synonyms: HashMap<String, Vec<String>> = s
        .synonyms
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    Settings::new()
        .with_searchable_attributes(searchable)
        .with_filterable_attributes(&s.filterable_attributes)
        .with_sortable_attributes(&s.sortable_attributes)
        .with_ranking_rules(s.effective_ranking_rules())
        .with_synonyms(synonyms)
}

fn from_sdk_settings(s: Settings) -> IndexSettings {
    let filterable = s
        .filterable_attributes
        .unwrap_or_default()
        .into_iter()
        .flat_map(|f| match f {
            FilterableAttribute::Attribute(a) => vec![a],
            FilterableAttribute::Settings(s) => s.attribute_patterns,
        })
        .collect();
    let mut out = IndexSettings {
        searchable_attributes: s.searchable_attributes,
        filterable_attributes: filterable,
        sortable_attributes: s.sortable_attributes.unwrap_or_default(),
        ranking_rules: s.ranking_rules,
        synonyms: s
            .synonyms
            .unwrap_or_default()
            .into_iter()
            .collect::<BTreeMap<_, _>>(),
    };
    out.normalize();
    out
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

fn futures_io_cursor(bytes: Vec<u8>) -> futures_util_cursor::Cursor {
    futures_util_cursor::Cursor::new(bytes)
}

/// A minimal `futures_io::AsyncRead` over owned bytes, so the SDK streams
/// the NDJSON batch Keel has already encoded and checked.
mod futures_util_cursor {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    pub(super) struct Cursor {
        bytes: Vec<u8>,
        at: usize,
    }

    impl Cursor {
        pub(super) fn new(bytes: Vec<u8>) -> Self {
            Self { bytes, at: 0 }
        }
    }

    impl futures::io::AsyncRead for Cursor {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &mut [u8],
        ) -> Poll<std::io::Result<usize>> {
            let n = buf.len().min(self.bytes.len() - self.at);
            let at = self.at;
            buf[..n].copy_from_slice(&self.bytes[at..at + n]);
            self.at += n;
            Poll::Ready(Ok(n))
        }
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

/// What a tenant token lets its holder search: per index, an optional
/// filter every search of that index is forced through.
///
/// ```
/// use keel_search::Filter;
/// use keel_search::meilisearch::TenantRules;
///
/// let rules = TenantRules::new()
///     .index("orders", Some(Filter::eq("tenant_id", "acme")))
///     .unwrap();
/// assert_eq!(rules.to_json().unwrap()["orders"]["filter"], r#"tenant_id = "acme""#);
/// ```
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TenantRules {
    rules: BTreeMap<IndexName, Option<Filter>>,
}

impl TenantRules {
    /// No index at all.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Allows searching `index`, through `filter` when given.
    ///
    /// # Errors
    ///
    /// [`SearchError::InvalidIndexName`].
    pub fn index(mut self, index: &str, filter: Option<Filter>) -> Result<Self> {
        self.rules.insert(IndexName::new(index)?, filter);
        Ok(self)
    }

    /// The `searchRules` claim.
    ///
    /// # Errors
    ///
    /// As [`Filter::to_expression`], and [`SearchError::InvalidArgument`]
    /// when no index is allowed.
    pub fn to_json(&self) -> Result<Value> {
        if self.rules.is_empty() {
            return Err(SearchError::invalid(
                "search_rules",
                "a tenant token must allow at least one index",
            ));
        }
        let mut out = Map::new();
        for (index, filter) in &self.rules {
            let rule = match filter
                .as_ref()
                .map(Filter::to_expression)
                .transpose()?
                .flatten()
            {
                Some(expr) => serde_json::json!({ "filter": expr }),
                None => serde_json::json!({}),
            };
            out.insert(index.to_string(), rule);
        }
        Ok(Value::Object(out))
    }
}

/// Signs Meilisearch tenant tokens: short-lived JWTs (HS256) that let a
/// client search only what [`TenantRules`] allow, signed with a search API
/// key that never leaves the server.
///
/// Signing uses the workspace's one JWT crate (`jsonwebtoken`).
#[derive(Clone)]
pub struct TenantTokenSigner {
    api_key_uid: String,
    api_key: Secret<String>,
}

impl std::fmt::Debug for TenantTokenSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TenantTokenSigner")
            .field("api_key_uid", &self.api_key_uid)
            .finish_non_exhaustive()
    }
}

impl TenantTokenSigner {
    /// A signer for the API key `api_key` whose uid is `api_key_uid` (both
    /// as Meilisearch's `/keys` lists them; the key needs the `search`
    /// action on the indexes the tokens allow).
    ///
    /// # Errors
    ///
    /// [`SearchError::Config`] when the uid is not a UUID or the key is
    /// shorter than 8 characters.
    pub fn new(api_key_uid: &str, api_key: Secret<String>) -> Result<Self> {
        if uuid::Uuid::parse_str(api_key_uid).is_err() {
            return Err(SearchError::Config(format!(
                "the API key uid {api_key_uid:?} is not a UUID"
            )));
        }
        if api_key.expose_secret().len() < 8 {
            return Err(SearchError::Config(
                "the API key is too short to sign tenant tokens".to_owned(),
            ));
        }
        Ok(Self {
            api_key_uid: api_key_uid.to_owned(),
            api_key,
        })
    }

    /// A signer whose key is the secret `secret_name` of `secrets`.
    ///
    /// # Errors
    ///
    /// [`SearchError::Config`] when the secret cannot be read, or as
    /// [`new`](Self::new).
    pub async fn from_secret(
        api_key_uid: &str,
        secrets: &dyn SecretProvider,
        secret_name: &str,
    ) -> Result<Self> {
        let key = secrets.get(secret_name).await.map_err(|e| {
            SearchError::Config(format!(
                "cannot read the tenant-token signing key from secret {secret_name:?}: {e}"
            ))
        })?;
        Self::new(api_key_uid, key)
    }

    /// A token allowing `rules`, valid for `ttl`.
    ///
    /// # Errors
    ///
    /// As [`TenantRules::to_json`]; [`SearchError::InvalidArgument`] for a
    /// zero `ttl`.
    pub fn sign(&self, rules: &TenantRules, ttl: Duration) -> Result<Secret<String>> {
        if ttl.is_zero() {
            return Err(SearchError::invalid(
                "ttl",
                "a tenant token must live a while",
            ));
        }
        let exp = SystemTime::now()
            .checked_add(ttl)
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_secs())
            .ok_or_else(|| SearchError::invalid("ttl", "the expiry is out of range"))?;
        let claims = serde_json::json!({
            "searchRules": rules.to_json()?,
            "apiKeyUid": self.api_key_uid,
            "exp": exp,
        });
        let token = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(self.api_key.expose_secret().as_bytes()),
        )
        .map_err(|e| SearchError::Config(format!("cannot sign the tenant token: {e}")))?;
        Ok(Secret::from(token))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_keys_are_checked() {
        assert!(MeilisearchEngine::new("127.0.0.1:7700", None).is_err());
        assert!(MeilisearchEngine::new("http://127.0.0.1:7700/", None).is_ok());
        assert!(TenantTokenSigner::new("not-a-uuid", Secret::from("0123456789")).is_err());
        assert!(
            TenantTokenSigner::new(
                "2f2d1b9e-1f43-4b1e-9a3f-8d0f7f3f6a10",
                Secret::from("short")
            )
            .is_err()
        );
    }

    #[test]
    fn tokens_carry_the_rules() {
        let signer = TenantTokenSigner::new(
            "2f2d1b9e-1f43-4b1e-9a3f-8d0f7f3f6a10",
            Secret::from("a-long-enough-key"),
        )
        .unwrap();
        let rules = TenantRules::new()
            .index("orders", Some(Filter::eq("tenant", "a\"b")))
            .unwrap();
        let token = signer.sign(&rules, Duration::from_secs(60)).unwrap();
        let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
        validation.required_spec_claims.clear();
        let data = jsonwebtoken::decode::<Value>(
            token.expose_secret(),
            &jsonwebtoken::DecodingKey::from_secret(b"a-long-enough-key"),
            &validation,
        )
        .unwrap();
        assert_eq!(
            data.claims["searchRules"]["orders"]["filter"],
            r#"tenant = "a\"b""#
        );
        assert!(TenantRules::new().to_json().is_err());
    }
}
