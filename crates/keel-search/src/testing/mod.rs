//! The contract suite: what every [`SearchEngine`] must do, on one shared
//! data set, so the in-memory engine and Meilisearch are proved alike.
//!
//! Each rule is a `pub async fn rule(subject: Subject)` that panics on a
//! violation. [`contract_suite!`](crate::contract_suite) turns the whole
//! list into one `#[tokio::test]` per rule, for a factory that returns
//! `Option<Subject>` (`None` skips the test, after the factory has said
//! why):
//!
//! ```ignore
//! keel_search::contract_suite!(|| async {
//!     Some(keel_search::testing::Subject::new(std::sync::Arc::new(keel_search::InMemoryEngine::new())))
//! });
//! ```
//!
//! Orders are compared only where they are deterministic for both engines
//! (explicit sorts, filters without a query); relevance orders are
//! compared as sets.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde_json::{Value, json};

use crate::engine::{SearchEngine, Wait};
use crate::filter::Filter;
use crate::names::IndexName;
use crate::query::{Document, SearchRequest};
use crate::settings::IndexSettings;

mod concurrency;
mod queries;
mod writes;

pub use concurrency::*;
pub use queries::*;
pub use writes::*;

/// How long contract rules wait for a write.
pub const WAIT: Wait = Wait::Applied {
    timeout: Duration::from_secs(60),
};

/// What a rule runs against: an engine, and a prefix of index names no
/// other test uses (servers are shared).
#[derive(Clone)]
pub struct Subject {
    /// The engine under test.
    pub engine: Arc<dyn SearchEngine>,
    prefix: String,
    created: Arc<Mutex<Vec<IndexName>>>,
}

impl std::fmt::Debug for Subject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subject")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl Subject {
    /// A subject on `engine`, with a fresh random index-name prefix.
    pub fn new(engine: Arc<dyn SearchEngine>) -> Self {
        let id = uuid::Uuid::new_v4().simple().to_string();
        Self {
            engine,
            prefix: format!("keel_contract_{}", &id[..12]),
            created: Arc::default(),
        }
    }

    /// The index called `name` for this subject (prefixed).
    ///
    /// # Panics
    ///
    /// When `name` makes an invalid index name.
    #[must_use]
    pub fn index(&self, name: &str) -> IndexName {
        IndexName::new(format!("{}_{name}", self.prefix)).expect("valid index name")
    }

    /// Creates the index `name` with primary key `id`, remembered for
    /// [`cleanup`](Self::cleanup).
    ///
    /// # Panics
    ///
    /// When the engine refuses.
    pub async fn create(&self, name: &str) -> IndexName {
        let index = self.index(name);
        self.engine
            .create_index(&index, "id", WAIT)
            .await
            .expect("create index");
        self.created
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(index.clone());
        index
    }

    /// Creates `name`, applies [`catalog_settings`] and loads
    /// [`catalog`].
    ///
    /// # Panics
    ///
    /// When the engine refuses.
    pub async fn catalog(&self, name: &str) -> IndexName {
        let index = self.create(name).await;
        self.engine
            .apply_settings(&index, &catalog_settings(), WAIT)
            .await
            .expect("apply settings");
        self.engine
            .upsert_documents(&index, catalog(), WAIT)
            .await
            .expect("load catalog");
        index
    }

    /// Deletes every index this subject created (best effort).
    pub async fn cleanup(&self) {
        let created =
            std::mem::take(&mut *self.created.lock().unwrap_or_else(PoisonError::into_inner));
        for index in created {
            let _ = self.engine.delete_index(&index, WAIT).await;
        }
    }

    async fn ids(&self, index: &IndexName, request: &SearchRequest) -> Vec<String> {
        let found = self
            .engine
            .search(index, request)
            .await
            .unwrap_or_else(|e| panic!("search {request:?} failed: {e}"));
        found.hits.into_iter().map(|h| id_of(&h.document)).collect()
    }

    async fn id_set(&self, index: &IndexName, request: &SearchRequest) -> BTreeSet<String> {
        self.ids(index, request).await.into_iter().collect()
    }

    async fn filtered(&self, index: &IndexName, filter: Filter) -> BTreeSet<String> {
        self.id_set(index, &SearchRequest::new("").filter(filter).offset(0, 100))
            .await
    }
}

fn id_of(doc: &Document) -> String {
    match doc.get("id") {
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
        None => panic!("hit without id: {doc:?}"),
    }
}

fn doc(v: Value) -> Document {
    match v {
        Value::Object(map) => map,
        other => panic!("not a JSON object: {other}"),
    }
}

fn set(ids: &[&str]) -> BTreeSet<String> {
    ids.iter().map(|s| (*s).to_owned()).collect()
}

/// The shared data set: twelve products with distinct prices and ratings.
#[must_use]
pub fn catalog() -> Vec<Document> {
    [
        json!({"id": "p01", "title": "Blue kettle", "description": "A steel kettle for tea",
               "category": "kitchen", "price": 25, "rating": 4.5, "tags": ["steel", "tea"],
               "in_stock": true, "maker": {"name": "Acme"}}),
        json!({"id": "p02", "title": "Red kettle", "description": "Enamel kettle",
               "category": "kitchen", "price": 35, "rating": 3.9, "tags": ["enamel", "tea"],
               "in_stock": false, "maker": {"name": "Brava"}}),
        json!({"id": "p03", "title": "Chef knife", "description": "Forged blade",
               "category": "kitchen", "price": 80, "rating": 4.8, "tags": ["steel"],
               "in_stock": true, "maker": {"name": "Acme"}}),
        json!({"id": "p04", "title": "Garden hose", "description": "Fifty feet of hose",
               "category": "garden", "price": 40, "rating": 4.1, "tags": [],
               "in_stock": true, "maker": {"name": "Verde"}}),
        json!({"id": "p05", "title": "Rose seeds", "description": "Plant in spring",
               "category": "garden", "price": 5, "rating": 3.2, "tags": ["flowers"],
               "in_stock": true, "maker": null}),
        json!({"id": "p06", "title": "Desk lamp", "description": "Warm light for reading",
               "category": "office", "price": 55, "rating": 4.3, "tags": ["light"],
               "in_stock": false}),
        json!({"id": "p07", "title": "Notebook", "description": "Dotted paper",
               "category": "office", "price": 9, "rating": 4.7, "tags": ["paper"],
               "in_stock": true, "maker": {"name": "Brava"}}),
        json!({"id": "p08", "title": "Stapler", "description": "Staples included",
               "category": "office", "price": 15, "rating": 2.9, "tags": ["metal"],
               "in_stock": true, "maker": {"name": "Acme"}}),
        json!({"id": "p09", "title": "Teapot", "description": "Porcelain pot",
               "category": "kitchen", "price": 30, "rating": 4.0, "tags": ["tea", "porcelain"],
               "in_stock": true, "maker": {"name": "Verde"}}),
        json!({"id": "p10", "title": "Watering can", "description": "Green plastic",
               "category": "garden", "price": 12, "rating": 3.5, "tags": ["plastic"],
               "in_stock": false, "maker": {"name": "Verde"}}),
        json!({"id": "p11", "title": "Quote \"special\" mug", "description": "Back\\slash edition",
               "category": "kitchen", "price": 11, "rating": 3.0, "tags": ["a\"b", "c\\d"],
               "in_stock": true}),
        json!({"id": "p12", "title": "Office chair", "description": "Mesh back",
               "category": "office", "price": 120, "rating": 4.6, "tags": ["mesh"],
               "in_stock": true, "maker": {"name": "Brava"}}),
    ]
    .into_iter()
    .map(doc)
    .collect()
}

/// The settings the catalog is searched with.
#[must_use]
pub fn catalog_settings() -> IndexSettings {
    IndexSettings::new()
        .searchable(["title", "description", "tags"])
        .filterable(["category", "price", "tags", "in_stock", "maker", "rating"])
        .sortable(["price", "rating", "category"])
        .synonym("teakettle", ["kettle"])
}

/// Expands to one `#[tokio::test]` per contract rule for `factory`, a
/// closure returning a future of `Option<Subject>`; `None` skips (the
/// factory says why on standard error).
#[macro_export]
macro_rules! contract_suite {
    ($factory:expr) => {
        $crate::contract_suite!(@each $factory, [
            create_and_delete_indexes,
            missing_index_is_refused,
            bad_documents_write_nothing,
            oversize_writes_are_refused,
            upsert_replaces_documents,
            deletes_single_batched_and_all,
            settings_round_trip,
            filters_select_the_same_documents,
            filter_values_cannot_inject,
            undeclared_attributes_are_refused,
            sorts_order_hits,
            pagination_slices_results,
            facets_count_matches,
            queries_match_words,
            highlighting_marks_matches,
            swap_is_atomic,
            concurrent_writers_all_land,
        ]);
    };
    (@each $factory:expr, [$($rule:ident),* $(,)?]) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $rule() {
                let Some(subject) = ($factory)().await else {
                    return;
                };
                $crate::testing::$rule(subject).await;
            }
        )*
    };
}
