//! Filters, facet values and sorts over JSON documents, as Meilisearch
//! evaluates them.

use std::cmp::Ordering;

use serde_json::Value;

use crate::filter::{Filter, FilterValue, Node, Op, simplify};
use crate::query::{Direction, Document, SortBy};

/// Numbers as Meilisearch prints facet values: integers without a
/// fraction.
pub(super) fn number_text(n: &serde_json::Number) -> String {
    match n.as_f64() {
        Some(f) if f.fract() == 0.0 && f.abs() < 1e15 => format!("{}", f as i64),
        Some(f) => f.to_string(),
        None => n.to_string(),
    }
}

/// Every scalar value at a dotted path, looking through arrays.
pub(super) fn values_at<'a>(doc: &'a Document, path: &str) -> Vec<&'a Value> {
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
pub(super) fn raw_at<'a>(doc: &'a Document, path: &str) -> Option<&'a Value> {
    let mut parts = path.split('.');
    let mut current = doc.get(parts.next()?)?;
    for p in parts {
        current = current.as_object()?.get(p)?;
    }
    Some(current)
}

pub(super) fn value_equals(v: &Value, wanted: &FilterValue) -> bool {
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

pub(super) fn number_of(v: &FilterValue) -> Option<f64> {
    match v {
        FilterValue::Int(i) => Some(*i as f64),
        FilterValue::Float(f) => Some(*f),
        FilterValue::String(s) => s.parse().ok(),
        FilterValue::Bool(_) => None,
    }
}

pub(super) fn eval(node: &Node, doc: &Document) -> bool {
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

pub(super) fn compare_sorts(sorts: &[SortBy], a: &Document, b: &Document) -> Ordering {
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
}
