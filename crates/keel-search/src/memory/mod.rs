//! The in-memory engine: the same observable behaviour as Meilisearch for
//! filters, sorts, facets and pagination, for tests and small tools.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;

use crate::engine::{
    DocumentReader, DocumentWriter, IndexAdmin, SearchEngine, Wait, WriteReceipt, check_batch,
    check_primary_key,
};
use crate::error::{Result, SearchError};
use crate::filter::simplify;
use crate::names::{DocumentId, IndexName, Limits};
use crate::query::{Document, Hit, Pagination, SearchRequest, SearchResults, TotalHits};
use crate::settings::IndexSettings;

mod eval;
mod text;

pub use eval::matches;
use eval::{compare_sorts, eval, number_text, values_at};
use text::Query;

#[derive(Clone, Debug)]
struct MemIndex {
    primary_key: String,
    settings: IndexSettings,
    /// id → (insertion sequence, document). The sequence survives
    /// replacement, like Meilisearch's internal ids, and orders ties.
    docs: HashMap<DocumentId, (u64, Document)>,
}

#[derive(Debug, Default)]
struct State {
    indexes: HashMap<IndexName, MemIndex>,
    next_seq: u64,
}

/// A [`SearchEngine`] in memory. Cheap to clone; clones share the indexes.
///
/// It refuses what Meilisearch refuses (bad names and ids, oversize
/// batches, filters, facets and sorts on undeclared attributes, missing
/// indexes) with the same errors and codes, and applies every write before
/// returning. Filters, sorts, facet counts and pagination give the same
/// results as Meilisearch on the same data. Its limits, by design:
///
/// * relevance is simpler: all query words must match a word of a
///   searchable attribute (the last one as a prefix), case-insensitively,
///   with single-word synonyms; there is no typo tolerance, no diacritic
///   folding and no proximity ranking. Matches rank by how many words match
///   exactly, then by the first searchable attribute that matches, then by
///   insertion order;
/// * a sort ranks before relevance (Meilisearch's default puts relevance
///   rules first), and sorts on arrays use their first element;
/// * custom ranking rules are stored but only `sort` is applied.
#[derive(Clone, Debug, Default)]
pub struct InMemoryEngine {
    state: Arc<Mutex<State>>,
    limits: Limits,
}

impl InMemoryEngine {
    /// An empty engine with the default [`Limits`].
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty engine with other limits.
    #[must_use]
    pub fn with_limits(limits: Limits) -> Self {
        Self {
            state: Arc::default(),
            limits,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn not_found(index: &IndexName) -> SearchError {
    SearchError::IndexNotFound {
        index: index.to_string(),
    }
}

#[async_trait]
impl IndexAdmin for InMemoryEngine {
    async fn create_index(
        &self,
        index: &IndexName,
        primary_key: &str,
        _wait: Wait,
    ) -> Result<WriteReceipt> {
        check_primary_key(primary_key)?;
        let mut state = self.lock();
        if state.indexes.contains_key(index) {
            return Err(SearchError::IndexAlreadyExists {
                index: index.to_string(),
            });
        }
        state.indexes.insert(
            index.clone(),
            MemIndex {
                primary_key: primary_key.to_owned(),
                settings: IndexSettings::default(),
                docs: HashMap::new(),
            },
        );
        Ok(WriteReceipt::applied())
    }

    async fn delete_index(&self, index: &IndexName, _wait: Wait) -> Result<WriteReceipt> {
        self.lock()
            .indexes
            .remove(index)
            .map(|_| WriteReceipt::applied())
            .ok_or_else(|| not_found(index))
    }

    async fn index_exists(&self, index: &IndexName) -> Result<bool> {
        Ok(self.lock().indexes.contains_key(index))
    }

    async fn primary_key(&self, index: &IndexName) -> Result<String> {
        self.lock()
            .indexes
            .get(index)
            .map(|i| i.primary_key.clone())
            .ok_or_else(|| not_found(index))
    }

    async fn apply_settings(
        &self,
        index: &IndexName,
        settings: &IndexSettings,
        _wait: Wait,
    ) -> Result<WriteReceipt> {
        settings.validate()?;
        let mut state = self.lock();
        let idx = state
            .indexes
            .get_mut(index)
            .ok_or_else(|| not_found(index))?;
        idx.settings = settings.clone();
        Ok(WriteReceipt::applied())
    }

    async fn settings(&self, index: &IndexName) -> Result<IndexSettings> {
        self.lock()
            .indexes
            .get(index)
            .map(|i| i.settings.clone().normalized())
            .ok_or_else(|| not_found(index))
    }

    async fn swap_indexes(
        &self,
        a: &IndexName,
        b: &IndexName,
        _wait: Wait,
    ) -> Result<WriteReceipt> {
        if a == b {
            return Err(SearchError::rejected(
                "invalid_swap_duplicate_index_found",
                format!("cannot swap index {a} with itself"),
            ));
        }
        let mut state = self.lock();
        let first = state.indexes.remove(a).ok_or_else(|| not_found(a))?;
        let Some(second) = state.indexes.remove(b) else {
            state.indexes.insert(a.clone(), first);
            return Err(not_found(b));
        };
        state.indexes.insert(a.clone(), second);
        state.indexes.insert(b.clone(), first);
        Ok(WriteReceipt::applied())
    }

    async fn document_count(&self, index: &IndexName) -> Result<u64> {
        self.lock()
            .indexes
            .get(index)
            .map(|i| i.docs.len() as u64)
            .ok_or_else(|| not_found(index))
    }

    async fn wait_for(&self, _receipt: WriteReceipt, _timeout: Duration) -> Result<()> {
        Ok(())
    }
}

#[async_trait]
impl DocumentWriter for InMemoryEngine {
    async fn upsert_documents(
        &self,
        index: &IndexName,
        documents: Vec<Document>,
        _wait: Wait,
    ) -> Result<WriteReceipt> {
        let mut state = self.lock();
        let primary_key = state
            .indexes
            .get(index)
            .ok_or_else(|| not_found(index))?
            .primary_key
            .clone();
        let ids = check_batch(&documents, &primary_key, &self.limits)?;
        let mut seq = state.next_seq;
        let idx = state
            .indexes
            .get_mut(index)
            .ok_or_else(|| not_found(index))?;
        for (id, doc) in ids.into_iter().zip(documents) {
            match idx.docs.get_mut(&id) {
                Some(entry) => entry.1 = doc,
                None => {
                    idx.docs.insert(id, (seq, doc));
                    seq += 1;
                }
            }
        }
        state.next_seq = seq;
        Ok(WriteReceipt::applied())
    }

    async fn delete_documents(
        &self,
        index: &IndexName,
        ids: &[DocumentId],
        _wait: Wait,
    ) -> Result<WriteReceipt> {
        if ids.len() > self.limits.max_batch_documents {
            return Err(SearchError::BatchTooLarge {
                unit: "documents",
                actual: ids.len(),
                max: self.limits.max_batch_documents,
            });
        }
        let mut state = self.lock();
        let idx = state
            .indexes
            .get_mut(index)
            .ok_or_else(|| not_found(index))?;
        for id in ids {
            idx.docs.remove(id);
        }
        Ok(WriteReceipt::applied())
    }

    async fn delete_all_documents(&self, index: &IndexName, _wait: Wait) -> Result<WriteReceipt> {
        let mut state = self.lock();
        let idx = state
            .indexes
            .get_mut(index)
            .ok_or_else(|| not_found(index))?;
        idx.docs.clear();
        Ok(WriteReceipt::applied())
    }
}

#[async_trait]
impl DocumentReader for InMemoryEngine {
    async fn get_document(&self, index: &IndexName, id: &DocumentId) -> Result<Option<Document>> {
        let state = self.lock();
        let idx = state.indexes.get(index).ok_or_else(|| not_found(index))?;
        Ok(idx.docs.get(id).map(|(_, d)| d.clone()))
    }

    async fn search(
        &self,
        index: &IndexName,
        request: &SearchRequest,
    ) -> Result<SearchResults<Document>> {
        request.validate()?;
        let state = self.lock();
        let idx = state.indexes.get(index).ok_or_else(|| not_found(index))?;
        run_search(idx, request)
    }
}

impl SearchEngine for InMemoryEngine {
    fn limits(&self) -> Limits {
        self.limits
    }
}

/// Whether `field` is covered by one of `declared` (itself or a parent).
fn declared(field: &str, declared: &[String]) -> bool {
    declared.iter().any(|d| {
        field == d
            || field
                .strip_prefix(d.as_str())
                .is_some_and(|rest| rest.starts_with('.'))
    })
}

fn check_declared(request: &SearchRequest, settings: &IndexSettings) -> Result<()> {
    if let Some(filter) = &request.filter {
        for f in filter.fields() {
            if !declared(f, &settings.filterable_attributes) {
                return Err(SearchError::rejected(
                    "invalid_search_filter",
                    format!("attribute `{f}` is not filterable"),
                ));
            }
        }
    }
    for f in &request.facets {
        if !declared(f, &settings.filterable_attributes) {
            return Err(SearchError::rejected(
                "invalid_search_facets",
                format!("attribute `{f}` is not filterable, so it cannot be a facet"),
            ));
        }
    }
    for s in &request.sort {
        if !declared(&s.field, &settings.sortable_attributes) {
            return Err(SearchError::rejected(
                "invalid_search_sort",
                format!("attribute `{}` is not sortable", s.field),
            ));
        }
    }
    Ok(())
}

struct Candidate<'a> {
    seq: u64,
    doc: &'a Document,
    exact: usize,
    attribute: usize,
}

fn run_search(idx: &MemIndex, request: &SearchRequest) -> Result<SearchResults<Document>> {
    check_declared(request, &idx.settings)?;
    let filter = request.filter.as_ref().and_then(|f| simplify(&f.0));
    let query = Query::parse(&request.query, &idx.settings);
    let mut matches: Vec<Candidate<'_>> = Vec::new();
    for (seq, doc) in idx.docs.values() {
        if let Some(node) = &filter
            && !eval(node, doc)
        {
            continue;
        }
        let Some((exact, attribute)) = query.score(doc, &idx.settings) else {
            continue;
        };
        matches.push(Candidate {
            seq: *seq,
            doc,
            exact,
            attribute,
        });
    }
    matches.sort_by(|a, b| {
        compare_sorts(&request.sort, a.doc, b.doc)
            .then(b.exact.cmp(&a.exact))
            .then(a.attribute.cmp(&b.attribute))
            .then(a.seq.cmp(&b.seq))
    });

    let mut facets = BTreeMap::new();
    for field in &request.facets {
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for m in &matches {
            let mut seen: Vec<String> = Vec::new();
            for v in values_at(m.doc, field) {
                let key = match v {
                    Value::String(s) => s.clone(),
                    Value::Number(n) => number_text(n),
                    Value::Bool(b) => b.to_string(),
                    _ => continue,
                };
                if !seen.contains(&key) {
                    seen.push(key);
                }
            }
            for key in seen {
                *counts.entry(key).or_default() += 1;
            }
        }
        facets.insert(field.clone(), counts);
    }

    let total_matches = matches.len();
    let (skip, take, total) = match request.pagination {
        Pagination::Offset { offset, limit } => {
            (offset, limit, TotalHits::Estimated(total_matches))
        }
        Pagination::Page {
            page,
            hits_per_page,
        } => (
            (page - 1).saturating_mul(hits_per_page),
            hits_per_page,
            TotalHits::Exact {
                hits: total_matches,
                pages: total_matches.div_ceil(hits_per_page),
            },
        ),
    };
    let hits = matches
        .into_iter()
        .skip(skip)
        .take(take)
        .map(|m| Hit {
            formatted: request
                .highlight
                .as_ref()
                .map(|h| query.highlight(m.doc, &h.fields, &h.pre_tag, &h.post_tag)),
            document: m.doc.clone(),
        })
        .collect();
    Ok(SearchResults {
        hits,
        total,
        facets,
    })
}
