//! Validating a caller's [`ListQuery`] against the mapping, once, for both
//! repositories: every name is looked up in the declared fields and every
//! value converted to its field's type before any SQL or scan happens.

use std::cmp::Ordering;

use chrono::{DateTime, Utc};
use keel_core::{Deleted, Direction, Filter, FilterValue, ListQuery, PageRequest};
use sha2::{Digest, Sha256};

use crate::cursor::CursorCodec;
use crate::error::{RepositoryError, Result, shown};
use crate::limits::{MAX_FILTERS, MAX_SORT_KEYS, MAX_TEXT_BYTES, check_text, check_value};
use crate::mapping::{Record, Schema};
use crate::value::{ColumnType, Value, compare, truncate_micros};

/// The default largest page size.
pub const DEFAULT_MAX_PAGE_SIZE: u32 = 1_000;

/// The largest in-list a filter may carry.
pub const MAX_IN_LIST: usize = 10_000;

/// A checked filter condition on field `.0` (an index into
/// [`Schema::fields`]).
#[derive(Clone, Debug)]
pub(crate) enum Cond {
    Eq(usize, Value),
    Range(usize, Option<Value>, Option<Value>),
    In(usize, Vec<Value>),
    Prefix(usize, String),
}

impl Cond {
    /// Whether a record satisfies this condition (the in-memory twin of the
    /// SQL a [`PgRepository`](crate::PgRepository) renders).
    pub(crate) fn matches(&self, r: &Record) -> bool {
        let eq = |a: &Value, b: &Value| !a.is_null() && compare(a, b) == Ordering::Equal;
        match self {
            Cond::Eq(f, v) => eq(&r.field(*f), v),
            Cond::Range(f, low, high) => {
                let x = r.field(*f);
                !x.is_null()
                    && low
                        .as_ref()
                        .is_none_or(|l| compare(&x, l) != Ordering::Less)
                    && high
                        .as_ref()
                        .is_none_or(|h| compare(&x, h) != Ordering::Greater)
            }
            Cond::In(f, vs) => {
                let x = r.field(*f);
                vs.iter().any(|v| eq(&x, v))
            }
            Cond::Prefix(f, p) => {
                matches!(&*r.field(*f), Value::Text(s) if s.starts_with(p.as_str()))
            }
        }
    }
}

/// Which page, checked.
#[derive(Clone, Debug)]
pub(crate) enum PagePlan {
    Offset {
        offset: u64,
        size: u32,
    },
    Keyset {
        after: Option<Vec<Value>>,
        size: u32,
    },
}

/// A validated list query.
#[derive(Clone, Debug)]
pub(crate) struct Plan {
    pub(crate) conds: Vec<Cond>,
    /// Sort fields with the id appended as the last tie-breaker.
    pub(crate) sort: Vec<(usize, Direction)>,
    pub(crate) deleted: Deleted,
    pub(crate) page: PagePlan,
    /// Binds cursors to this query's filters, sort order and scope.
    pub(crate) fingerprint: [u8; 16],
}

impl Plan {
    pub(crate) fn new(
        schema: &Schema,
        query: &ListQuery,
        max_page_size: u32,
        codec: &CursorCodec,
    ) -> Result<Self> {
        let conds = plan_filters(schema, &query.filters)?;
        if query.sort.len() > MAX_SORT_KEYS {
            return Err(RepositoryError::InvalidSort {
                reason: format!(
                    "at most {MAX_SORT_KEYS} sort keys, got {}",
                    query.sort.len()
                ),
            });
        }
        let mut sort = Vec::with_capacity(query.sort.len() + 1);
        for key in &query.sort {
            let f = lookup(schema, &key.field, "sort", |f| f.sortable)?;
            if sort.iter().any(|(g, _)| *g == f) {
                return Err(RepositoryError::InvalidSort {
                    reason: format!("field `{}` is named twice", key.field),
                });
            }
            sort.push((f, key.direction));
        }
        if !sort.iter().any(|(f, _)| *f == schema.id) {
            sort.push((schema.id, Direction::Asc));
        }
        let fingerprint = fingerprint(schema, query);
        let size = query.page.size();
        if size == 0 || size > max_page_size {
            return Err(RepositoryError::page(format!(
                "size must be between 1 and {max_page_size}, got {size}"
            )));
        }
        let page = match &query.page {
            PageRequest::Offset { page: 0, .. } => {
                return Err(RepositoryError::page("pages are numbered from 1"));
            }
            PageRequest::Offset { page, size } => {
                let offset = (page - 1)
                    .checked_mul(u64::from(*size))
                    .filter(|o| i64::try_from(*o).is_ok())
                    .ok_or_else(|| RepositoryError::page(format!("page {page} is too far")))?;
                PagePlan::Offset {
                    offset,
                    size: *size,
                }
            }
            PageRequest::Keyset { after, size } => {
                let after = match after {
                    None => None,
                    Some(c) => {
                        let types: Vec<ColumnType> =
                            sort.iter().map(|(f, _)| schema.fields[*f].ty).collect();
                        Some(codec.decode(c, &fingerprint, &types)?)
                    }
                };
                PagePlan::Keyset { after, size: *size }
            }
        };
        Ok(Plan {
            conds,
            sort,
            deleted: query.deleted,
            page,
            fingerprint,
        })
    }

    /// Whether a record is in scope and satisfies every condition.
    pub(crate) fn matches(&self, r: &Record) -> bool {
        scope_matches(self.deleted, r) && self.conds.iter().all(|c| c.matches(r))
    }

    /// Orders two records by the sort keys.
    pub(crate) fn order(&self, a: &Record, b: &Record) -> Ordering {
        self.order_with(|_, f| Some(compare(&a.field(f), &b.field(f))))
    }

    /// Orders a record against a cursor's key values (as many as there
    /// are).
    pub(crate) fn order_against(&self, r: &Record, key: &[Value]) -> Ordering {
        self.order_with(|i, f| key.get(i).map(|k| compare(&r.field(f), k)))
    }

    /// The first unequal comparison along the sort keys, reversed for
    /// descending keys; `cmp` gets the key's position and field and answers
    /// `None` when there is nothing left to compare.
    fn order_with(&self, cmp: impl Fn(usize, usize) -> Option<Ordering>) -> Ordering {
        for (i, (f, dir)) in self.sort.iter().enumerate() {
            let Some(o) = cmp(i, *f) else { break };
            let o = if *dir == Direction::Desc {
                o.reverse()
            } else {
                o
            };
            if o != Ordering::Equal {
                return o;
            }
        }
        Ordering::Equal
    }

    /// The sort-key values of a record, for the next page's cursor.
    pub(crate) fn key_of(&self, r: &Record) -> Vec<Value> {
        self.sort
            .iter()
            .map(|(f, _)| r.field(*f).into_owned())
            .collect()
    }
}

pub(crate) fn scope_matches(deleted: Deleted, r: &Record) -> bool {
    match deleted {
        Deleted::Exclude => r.deleted_at.is_none(),
        Deleted::Include => true,
        Deleted::Only => r.deleted_at.is_some(),
    }
}

fn lookup(
    schema: &Schema,
    name: &str,
    usage: &'static str,
    allowed: impl Fn(&crate::mapping::Field) -> bool,
) -> Result<usize> {
    schema
        .fields
        .iter()
        .position(|f| f.name == name && allowed(f))
        .ok_or_else(|| RepositoryError::UnknownField {
            usage,
            field: crate::error::shown(name),
            allowed: schema
                .fields
                .iter()
                .filter(|f| allowed(f))
                .map(|f| f.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        })
}

/// Checks filters against the mapping and converts their values.
pub(crate) fn plan_filters(schema: &Schema, filters: &[Filter]) -> Result<Vec<Cond>> {
    if filters.len() > MAX_FILTERS {
        return Err(RepositoryError::InvalidFilter {
            field: "*".to_owned(),
            reason: format!("at most {MAX_FILTERS} filters, got {}", filters.len()),
        });
    }
    filters
        .iter()
        .map(|filter| {
            let name = filter.field();
            let f = lookup(schema, name, "filter", |f| f.filterable)?;
            let ty = schema.fields[f].ty;
            Ok(match filter {
                Filter::Eq { value, .. } => Cond::Eq(f, convert(name, ty, value)?),
                Filter::Range { low, high, .. } => {
                    if ty == ColumnType::Bool {
                        return Err(RepositoryError::filter(
                            name,
                            "ranges need an ordered field",
                        ));
                    }
                    let low = low.as_ref().map(|v| convert(name, ty, v)).transpose()?;
                    let high = high.as_ref().map(|v| convert(name, ty, v)).transpose()?;
                    if low.is_none() && high.is_none() {
                        return Err(RepositoryError::filter(name, "a range needs a bound"));
                    }
                    Cond::Range(f, low, high)
                }
                Filter::In { values, .. } => {
                    if values.len() > MAX_IN_LIST {
                        return Err(RepositoryError::filter(
                            name,
                            format!("at most {MAX_IN_LIST} values, got {}", values.len()),
                        ));
                    }
                    let values = values
                        .iter()
                        .map(|v| convert(name, ty, v))
                        .collect::<Result<_>>()?;
                    Cond::In(f, values)
                }
                Filter::Prefix { prefix, .. } => {
                    if ty != ColumnType::Text {
                        return Err(RepositoryError::filter(
                            name,
                            format!("prefix filters need a text field, `{name}` is {ty:?}"),
                        ));
                    }
                    check_text(name, prefix, MAX_TEXT_BYTES)
                        .map_err(|e| RepositoryError::filter(name, reason_of(e)))?;
                    Cond::Prefix(f, prefix.clone())
                }
                other => {
                    return Err(RepositoryError::filter(
                        name,
                        format!("unsupported filter {other:?}"),
                    ));
                }
            })
        })
        .collect()
}

/// Converts a filter value into the field's type, refusing what does not
/// fit rather than guessing.
fn convert(field: &str, ty: ColumnType, v: &FilterValue) -> Result<Value> {
    let mismatch = || {
        RepositoryError::filter(
            field,
            format!("expected a {ty:?} value, got {}", shown(&format!("{v:?}"))),
        )
    };
    let value = match (ty, v) {
        (ColumnType::Bool, FilterValue::Bool(b)) => Value::Bool(*b),
        (ColumnType::I32, FilterValue::Int(i)) => Value::I32(
            i32::try_from(*i).map_err(|_| RepositoryError::filter(field, "out of range"))?,
        ),
        (ColumnType::I64, FilterValue::Int(i)) => Value::I64(*i),
        (ColumnType::F64, FilterValue::Float(x)) => Value::F64(*x),
        #[allow(
            clippy::cast_precision_loss,
            reason = "filters on floats accept integers"
        )]
        (ColumnType::F64, FilterValue::Int(i)) => Value::F64(*i as f64),
        (ColumnType::Text, FilterValue::Text(s)) => Value::Text(s.clone()),
        (ColumnType::Uuid, FilterValue::Text(s)) => Value::Uuid(s.parse().map_err(|_| {
            RepositoryError::filter(field, format!("not a UUID: \"{}\"", shown(s)))
        })?),
        (ColumnType::Timestamp, FilterValue::Text(s)) => Value::Timestamp(truncate_micros(
            DateTime::parse_from_rfc3339(s)
                .map_err(|_| {
                    RepositoryError::filter(
                        field,
                        format!("not an RFC 3339 timestamp: \"{}\"", shown(s)),
                    )
                })?
                .with_timezone(&Utc),
        )),
        _ => return Err(mismatch()),
    };
    // The same limits as stored values: a value no row can hold is refused,
    // not looked for.
    check_value(field, &value, MAX_TEXT_BYTES)
        .map_err(|e| RepositoryError::filter(field, reason_of(e)))?;
    Ok(value)
}

/// The reason of a limits error, to re-file it under the filter it came in.
fn reason_of(e: RepositoryError) -> String {
    match e {
        RepositoryError::InvalidValue { reason, .. } => reason,
        other => other.to_string(),
    }
}

/// A digest of everything that decides which rows a keyset walk visits and
/// in which order, so a cursor cannot be replayed against another query.
fn fingerprint(schema: &Schema, query: &ListQuery) -> [u8; 16] {
    let mut h = Sha256::new();
    h.update(schema.table.as_bytes());
    h.update([0]);
    // serde_json output for these types is deterministic.
    h.update(serde_json::to_vec(&query.filters).unwrap_or_default());
    h.update([0]);
    h.update(serde_json::to_vec(&query.sort).unwrap_or_default());
    h.update([0]);
    h.update(serde_json::to_vec(&query.deleted).unwrap_or_default());
    let digest = h.finalize();
    let mut out = [0; 16];
    out.copy_from_slice(&digest[..16]);
    out
}
