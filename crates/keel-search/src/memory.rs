//! The in-memory engine: the same observable behaviour as Meilisearch for
//! filters, sorts, facets and pagination, for tests and small tools.

use std::cmp::Ordering;
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
use crate::filter::{Filter, FilterValue, Node, Op, simplify};
use crate::names::{DocumentId, IndexName, Limits};
use crate::query::{
    Direction, Document, Hit, Pagination, SearchRequest, SearchResults, SortBy, TotalHits,
};
use crate::settings::IndexSettings;

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

/// Numbers as Meilisearch prints facet values: integers without a
/// fraction.
fn number_text(n: &serde_json::Number) -> String {
    match n.as_f64() {
        Some(f) if f.fract() == 0.0 && f.abs() < 1e15 => format!("{}", f as i64),
        Some(f) => f.to_string(),
        None => n.to_string(),
    }
}

/// Every scalar value at a dotted path, looking through arrays.
fn values_at<'a>(doc: &'a Document, path: &str) -> Vec<&'a Value> {
    fn walk<'a>(v: &'a Value, parts: &[&str], out: &mut Vec<&'a Value>) {
        match v {
            Value::Array(items) => items.iter().for_each(|i| walk(i, parts, out)),
            Value::Object(map) if !parts.is_empty() => {
                if let Some(next) = map.get(parts[0]) {
                    walk(next, &parts[1..], out);
                }
            }
            other if parts.is_empty() => out.push(other),
            _ => {}
        }
    }
    let parts: Vec<&str> = path.split('.').collect();
    let mut out = Vec::new();
    if let Some(first) = doc.get(parts[0]) {
        walk(first, &parts[1..], &mut out);
    }
    out
}

/// The raw value at a dotted path (for `EXISTS`, `IS NULL`, `IS EMPTY`).
fn raw_at<'a>(doc: &'a Document, path: &str) -> Option<&'a Value> {
    let mut parts = path.split('.');
    let mut current = doc.get(parts.next()?)?;
    for p in parts {
        current = current.as_object()?.get(p)?;
    }
    Some(current)
}

fn value_equals(v: &Value, wanted: &FilterValue) -> bool {
    let text = wanted.text();
    match v {
        Value::String(s) => s.to_lowercase() == text.to_lowercase(),
        Value::Number(n) => match (n.as_f64(), text.parse::<f64>()) {
            (Some(a), Ok(b)) => a == b,
            _ => false,
        },
        Value::Bool(b) => text.eq_ignore_ascii_case(if *b { "true" } else { "false" }),
        _ => false,
    }
}

fn number_of(v: &FilterValue) -> Option<f64> {
    match v {
        FilterValue::Int(i) => Some(*i as f64),
        FilterValue::Float(f) => Some(*f),
        FilterValue::String(s) => s.parse().ok(),
        FilterValue::Bool(_) => None,
    }
}

fn eval(node: &Node, doc: &Document) -> bool {
    match node {
        Node::True => true,
        Node::Cmp(field, Op::Eq, v) => values_at(doc, field).iter().any(|x| value_equals(x, v)),
        Node::Cmp(field, Op::Ne, v) => !values_at(doc, field).iter().any(|x| value_equals(x, v)),
        Node::Cmp(field, op, v) => {
            let Some(bound) = number_of(v) else {
                return false;
            };
            values_at(doc, field)
                .iter()
                .filter_map(|x| x.as_f64())
                .any(|x| match op {
                    Op::Gt => x > bound,
                    Op::Gte => x >= bound,
                    Op::Lt => x < bound,
                    Op::Lte => x <= bound,
                    Op::Eq | Op::Ne => false,
                })
        }
        Node::Between(field, low, high) => {
            let (Some(low), Some(high)) = (number_of(low), number_of(high)) else {
                return false;
            };
            values_at(doc, field)
                .iter()
                .filter_map(|x| x.as_f64())
                .any(|x| low <= x && x <= high)
        }
        Node::In(field, values) => values_at(doc, field)
            .iter()
            .any(|x| values.iter().any(|v| value_equals(x, v))),
        Node::Exists(field) => raw_at(doc, field).is_some(),
        Node::IsNull(field) => raw_at(doc, field).is_some_and(Value::is_null),
        Node::IsEmpty(field) => raw_at(doc, field).is_some_and(|v| match v {
            Value::String(s) => s.is_empty(),
            Value::Array(a) => a.is_empty(),
            Value::Object(o) => o.is_empty(),
            _ => false,
        }),
        Node::And(v) => v.iter().all(|n| eval(n, doc)),
        Node::Or(v) => v.iter().any(|n| eval(n, doc)),
        Node::Not(inner) => !eval(inner, doc),
    }
}

/// A sortable key: numbers before strings, missing values last.
#[derive(PartialEq, PartialOrd)]
enum SortKey {
    Number(f64),
    Text(String),
}

fn sort_key(doc: &Document, field: &str) -> Option<SortKey> {
    values_at(doc, field).into_iter().find_map(|v| match v {
        Value::Number(n) => n.as_f64().map(SortKey::Number),
        Value::String(s) => Some(SortKey::Text(s.to_lowercase())),
        Value::Bool(b) => Some(SortKey::Text(b.to_string())),
        _ => None,
    })
}

fn compare_sorts(sorts: &[SortBy], a: &Document, b: &Document) -> Ordering {
    for s in sorts {
        let ord = match (sort_key(a, &s.field), sort_key(b, &s.field)) {
            (None, None) => Ordering::Equal,
            (None, Some(_)) => Ordering::Greater,
            (Some(_), None) => Ordering::Less,
            (Some(x), Some(y)) => {
                let o = x.partial_cmp(&y).unwrap_or(Ordering::Equal);
                match s.direction {
                    Direction::Asc => o,
                    Direction::Desc => o.reverse(),
                }
            }
        };
        if ord != Ordering::Equal {
            return ord;
        }
    }
    Ordering::Equal
}

/// Splits text into lower-case words.
fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

struct Query {
    /// Per query word, the words that match it (itself and its synonyms).
    terms: Vec<Vec<String>>,
    /// Whether the last word matches as a prefix.
    prefix_last: bool,
}

impl Query {
    fn parse(text: &str, settings: &IndexSettings) -> Self {
        let synonyms: HashMap<String, Vec<String>> = settings
            .synonyms
            .iter()
            .map(|(k, v)| (k.to_lowercase(), v.iter().flat_map(|s| words(s)).collect()))
            .collect();
        let terms = words(text)
            .into_iter()
            .map(|w| {
                let mut alternatives = vec![w.clone()];
                if let Some(more) = synonyms.get(&w) {
                    alternatives.extend(more.iter().cloned());
                }
                alternatives
            })
            .collect();
        Self {
            terms,
            prefix_last: !text.ends_with(char::is_whitespace),
        }
    }

    /// How a word of a document matches query term `i`: `Some(true)`
    /// exactly, `Some(false)` as a prefix.
    fn matches(&self, i: usize, word: &str) -> Option<bool> {
        let alternatives = &self.terms[i];
        if alternatives.iter().any(|t| t == word) {
            return Some(true);
        }
        let prefix = self.prefix_last && i + 1 == self.terms.len();
        (prefix && alternatives.iter().any(|t| word.starts_with(t.as_str()))).then_some(false)
    }

    /// `None` when the document does not match; otherwise how many terms
    /// match exactly and the first searchable attribute that matches.
    fn score(&self, doc: &Document, settings: &IndexSettings) -> Option<(usize, usize)> {
        if self.terms.is_empty() {
            return Some((0, 0));
        }
        let attributes = searchable(doc, settings);
        let mut best: Vec<Option<bool>> = vec![None; self.terms.len()];
        let mut first_attribute = usize::MAX;
        for (rank, texts) in attributes.iter().enumerate() {
            for word in texts.iter().flat_map(|t| words(t)) {
                for (i, slot) in best.iter_mut().enumerate() {
                    if let Some(exact) = self.matches(i, &word) {
                        *slot = Some(slot.unwrap_or(false) || exact);
                        first_attribute = first_attribute.min(rank);
                    }
                }
            }
        }
        if best.iter().any(Option::is_none) {
            return None;
        }
        Some((
            best.iter().filter(|b| **b == Some(true)).count(),
            first_attribute,
        ))
    }

    fn highlight(&self, doc: &Document, fields: &[String], pre: &str, post: &str) -> Document {
        let mut out = doc.clone();
        let all = fields.iter().any(|f| f == "*");
        for (key, value) in &mut out {
            if all || fields.iter().any(|f| f == key) {
                self.highlight_value(value, pre, post);
            }
        }
        out
    }

    fn highlight_value(&self, value: &mut Value, pre: &str, post: &str) {
        match value {
            Value::String(s) => *s = self.highlight_text(s, pre, post),
            Value::Array(items) => items
                .iter_mut()
                .for_each(|v| self.highlight_value(v, pre, post)),
            Value::Object(map) => map
                .values_mut()
                .for_each(|v| self.highlight_value(v, pre, post)),
            _ => {}
        }
    }

    fn highlight_text(&self, text: &str, pre: &str, post: &str) -> String {
        let mut out = String::with_capacity(text.len() + 16);
        let mut rest = text;
        while !rest.is_empty() {
            let start = rest.find(char::is_alphanumeric).unwrap_or(rest.len());
            out.push_str(&rest[..start]);
            rest = &rest[start..];
            let end = rest
                .find(|c: char| !c.is_alphanumeric())
                .unwrap_or(rest.len());
            let word = &rest[..end];
            let lower = word.to_lowercase();
            let matched = (0..self.terms.len()).find_map(|i| {
                let exact = self.matches(i, &lower)?;
                if exact {
                    return Some(word.len());
                }
                // A prefix match highlights the matched part only.
                let len = self.terms[i]
                    .iter()
                    .filter(|t| lower.starts_with(t.as_str()))
                    .map(|t| t.chars().count())
                    .max()?;
                word.char_indices()
                    .nth(len)
                    .map(|(b, _)| b)
                    .or(Some(word.len()))
            });
            match matched {
                Some(len) if len > 0 => {
                    out.push_str(pre);
                    out.push_str(&word[..len]);
                    out.push_str(post);
                    out.push_str(&word[len..]);
                }
                _ => out.push_str(word),
            }
            rest = &rest[end..];
        }
        out
    }
}

/// The searchable texts of a document, one list per attribute, in order
/// of importance.
fn searchable(doc: &Document, settings: &IndexSettings) -> Vec<Vec<String>> {
    fn texts(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::String(s) => out.push(s.clone()),
            Value::Number(n) => out.push(n.to_string()),
            Value::Array(items) => items.iter().for_each(|i| texts(i, out)),
            Value::Object(map) => map.values().for_each(|i| texts(i, out)),
            _ => {}
        }
    }
    let fields: Vec<String> = match &settings.searchable_attributes {
        Some(f) if !f.iter().any(|x| x == "*") => f.clone(),
        _ => doc.keys().cloned().collect(),
    };
    fields
        .iter()
        .map(|f| {
            let mut out = Vec::new();
            if let Some(v) = raw_at(doc, f) {
                texts(v, &mut out);
            }
            out
        })
        .collect()
}

/// Evaluates a [`Filter`] against one document, as the in-memory engine
/// does (handy to test a filter without an engine).
///
/// ```
/// use keel_search::{Filter, memory::matches};
/// use serde_json::json;
///
/// let doc = json!({"category": "Books", "price": 12}).as_object().cloned().unwrap();
/// assert!(matches(&Filter::eq("category", "books").and(Filter::lt("price", 20)), &doc));
/// assert!(!matches(&Filter::exists("author"), &doc));
/// ```
#[must_use]
pub fn matches(filter: &Filter, doc: &Document) -> bool {
    simplify(&filter.0).is_none_or(|n| eval(&n, doc))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn doc(v: Value) -> Document {
        match v {
            Value::Object(map) => map,
            other => panic!("not an object: {other}"),
        }
    }

    #[test]
    fn filter_semantics() {
        let d = doc(json!({
            "tags": ["Red", "blue"], "price": 10, "stock": true, "empty": [], "nil": null,
            "author": {"name": "Ann"}
        }));
        assert!(matches(&Filter::eq("tags", "red"), &d));
        assert!(matches(&Filter::ne("missing", "x"), &d));
        assert!(!matches(&Filter::ne("tags", "blue"), &d));
        assert!(matches(&Filter::eq("price", "10"), &d));
        assert!(matches(&Filter::eq("stock", true), &d));
        assert!(matches(&Filter::between("price", 10, 10), &d));
        assert!(!matches(&Filter::gt("price", 10), &d));
        assert!(matches(&Filter::any_of("tags", ["green", "BLUE"]), &d));
        assert!(matches(&Filter::is_empty("empty"), &d));
        assert!(matches(&Filter::is_null("nil"), &d));
        assert!(matches(&Filter::exists("nil"), &d));
        assert!(matches(&Filter::eq("author.name", "ann"), &d));
        assert!(!matches(&Filter::exists("author.age"), &d));
    }

    #[test]
    fn highlighting_wraps_whole_words_and_prefixes() {
        let q = Query::parse("blue kett", &IndexSettings::default());
        assert_eq!(
            q.highlight_text("A Blue kettle, bluebird", "[", "]"),
            "A [Blue] [kett]le, bluebird"
        );
    }
}
