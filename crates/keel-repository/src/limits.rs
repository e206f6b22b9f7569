//! Size and content limits on everything a caller hands a repository,
//! checked before any SQL is built or any row is scanned, so that the
//! in-memory and the PostgreSQL repository refuse the same inputs with the
//! same [`keel_core::Error::Invalid`].
//!
//! Without them PostgreSQL decides: a NUL byte in text is refused with one
//! SQLSTATE on a write and another on a read, an id larger than a B-tree
//! index entry (about 2.7 kB) fails with "index row size exceeds maximum"
//! (`54000`), and a timestamp beyond its calendar fails with `22008`; the
//! in-memory repository would accept all of them.

use chrono::{DateTime, Datelike, Utc};

use crate::error::{RepositoryError, Result};
use crate::value::Value;

/// The longest id, in bytes of its text form (text ids; other id types are
/// shorter by construction). Well below PostgreSQL's B-tree entry limit.
pub const MAX_ID_BYTES: usize = 1_024;

/// The largest text value of a column or a filter, in bytes (1 MiB).
pub const MAX_TEXT_BYTES: usize = 1 << 20;

/// The largest JSON value of a column, in bytes of its compact JSON text
/// (1 MiB).
pub const MAX_JSON_BYTES: usize = 1 << 20;

/// The most filters one query may carry.
pub const MAX_FILTERS: usize = 32;

/// The most sort keys one query may carry.
pub const MAX_SORT_KEYS: usize = 8;

/// The earliest and latest years a timestamp may carry: PostgreSQL's
/// `timestamptz` range (4713 BC to 294276 AD), rounded inwards.
const YEARS: std::ops::RangeInclusive<i32> = -4_712..=294_275;

/// Checks one value bound for column or field `field`; `max_text` is the
/// text limit that applies (ids are shorter than other text).
pub(crate) fn check_value(field: &str, value: &Value, max_text: usize) -> Result<()> {
    match value {
        Value::Text(s) => check_text(field, s, max_text),
        Value::Json(j) => {
            if json_has_nul(j) {
                return Err(invalid(field, "JSON text must not contain a NUL character"));
            }
            let size = serde_json::to_vec(j).map_or(usize::MAX, |v| v.len());
            if size > MAX_JSON_BYTES {
                return Err(invalid(
                    field,
                    format!("JSON of {size} bytes is larger than the limit of {MAX_JSON_BYTES}"),
                ));
            }
            Ok(())
        }
        Value::Timestamp(t) => check_timestamp(field, t),
        _ => Ok(()),
    }
}

/// Checks text bound for `field`: no NUL byte (PostgreSQL text cannot hold
/// one) and at most `max` bytes.
pub(crate) fn check_text(field: &str, s: &str, max: usize) -> Result<()> {
    if s.len() > max {
        return Err(invalid(
            field,
            format!("{} bytes is longer than the limit of {max}", s.len()),
        ));
    }
    if s.contains('\0') {
        return Err(invalid(field, "text must not contain a NUL character"));
    }
    Ok(())
}

fn check_timestamp(field: &str, t: &DateTime<Utc>) -> Result<()> {
    if YEARS.contains(&t.year()) {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!("year {} is outside PostgreSQL's timestamp range", t.year()),
        ))
    }
}

fn json_has_nul(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::String(s) => s.contains('\0'),
        serde_json::Value::Array(items) => items.iter().any(json_has_nul),
        serde_json::Value::Object(map) => {
            map.iter().any(|(k, v)| k.contains('\0') || json_has_nul(v))
        }
        _ => false,
    }
}

fn invalid(field: &str, reason: impl Into<String>) -> RepositoryError {
    RepositoryError::InvalidValue {
        field: crate::error::shown(field),
        reason: reason.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nul_bytes_and_sizes_are_refused() {
        assert!(check_value("name", &Value::Text("a\0b".into()), MAX_TEXT_BYTES).is_err());
        assert!(check_value("name", &Value::Text("ab".into()), MAX_TEXT_BYTES).is_ok());
        assert!(check_value("id", &Value::Text("x".repeat(2_000)), MAX_ID_BYTES).is_err());
        let json = serde_json::json!({ "a": [1, { "b\u{0}": 2 }] });
        assert!(check_value("specs", &Value::Json(json), MAX_TEXT_BYTES).is_err());
        let json = serde_json::json!({ "a": "\\u0000 is just text" });
        assert!(check_value("specs", &Value::Json(json), MAX_TEXT_BYTES).is_ok());
        let far = DateTime::<Utc>::MIN_UTC;
        assert!(check_value("released", &Value::Timestamp(far), MAX_TEXT_BYTES).is_err());
    }
}
