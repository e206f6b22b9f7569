//! Column values: what an entity mapping writes and reads, independent of
//! any database driver.

use std::cmp::Ordering;

use chrono::{DateTime, SubsecRound, Utc};
use uuid::Uuid;

/// The type of a mapped column, and so of the values it holds.
///
/// | `ColumnType` | PostgreSQL | Rust |
/// |---|---|---|
/// | `Bool` | `BOOLEAN` | `bool` |
/// | `I32` | `INTEGER` | `i32` |
/// | `I64` | `BIGINT` | `i64` |
/// | `F64` | `DOUBLE PRECISION` | `f64` |
/// | `Text` | `TEXT` (or `VARCHAR`) | `String` |
/// | `Uuid` | `UUID` | `uuid::Uuid` |
/// | `Timestamp` | `TIMESTAMPTZ` | `chrono::DateTime<Utc>` (microseconds) |
/// | `Json` | `JSONB` | `serde_json::Value` |
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
#[non_exhaustive]
pub enum ColumnType {
    /// A boolean.
    Bool,
    /// A 32-bit integer.
    I32,
    /// A 64-bit integer.
    I64,
    /// A double-precision float.
    F64,
    /// UTF-8 text, compared byte-wise (PostgreSQL's `"C"` collation).
    Text,
    /// A UUID.
    Uuid,
    /// A UTC timestamp with microsecond precision.
    Timestamp,
    /// A JSON document; stored, never filtered or sorted on.
    Json,
}

impl ColumnType {
    /// The PostgreSQL type a column of this type should have.
    #[must_use]
    pub const fn sql_type(self) -> &'static str {
        match self {
            ColumnType::Bool => "BOOLEAN",
            ColumnType::I32 => "INTEGER",
            ColumnType::I64 => "BIGINT",
            ColumnType::F64 => "DOUBLE PRECISION",
            ColumnType::Text => "TEXT",
            ColumnType::Uuid => "UUID",
            ColumnType::Timestamp => "TIMESTAMPTZ",
            ColumnType::Json => "JSONB",
        }
    }

    /// Whether values of this type can be ordered (sorted, ranged, used in
    /// a keyset cursor).
    #[must_use]
    pub const fn is_ordered(self) -> bool {
        !matches!(self, ColumnType::Json)
    }
}

/// One column value.
///
/// Mappings build values with `From` (`Value::from(self.price)`, or just
/// `row.set("price", self.price)`) and read them back with
/// [`Row::get`](crate::Row::get). Timestamps are truncated to microseconds,
/// the precision PostgreSQL stores, so every implementation returns exactly
/// what the other would.
#[derive(Clone, PartialEq, Debug)]
#[non_exhaustive]
pub enum Value {
    /// SQL `NULL` (an `Option::None`).
    Null,
    /// A boolean.
    Bool(bool),
    /// A 32-bit integer.
    I32(i32),
    /// A 64-bit integer.
    I64(i64),
    /// A double-precision float.
    F64(f64),
    /// Text.
    Text(String),
    /// A UUID.
    Uuid(Uuid),
    /// A UTC timestamp.
    Timestamp(DateTime<Utc>),
    /// A JSON document.
    Json(serde_json::Value),
}

impl Value {
    /// The column type this value belongs to; `None` for [`Value::Null`].
    #[must_use]
    pub fn column_type(&self) -> Option<ColumnType> {
        Some(match self {
            Value::Null => return None,
            Value::Bool(_) => ColumnType::Bool,
            Value::I32(_) => ColumnType::I32,
            Value::I64(_) => ColumnType::I64,
            Value::F64(_) => ColumnType::F64,
            Value::Text(_) => ColumnType::Text,
            Value::Uuid(_) => ColumnType::Uuid,
            Value::Timestamp(_) => ColumnType::Timestamp,
            Value::Json(_) => ColumnType::Json,
        })
    }

    /// Whether this is [`Value::Null`].
    #[must_use]
    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }

    /// The value as stored: timestamps truncated to microseconds.
    pub(crate) fn normalized(self) -> Self {
        match self {
            Value::Timestamp(t) => Value::Timestamp(truncate_micros(t)),
            other => other,
        }
    }
}

/// Truncates a timestamp to the microsecond precision PostgreSQL keeps.
pub(crate) fn truncate_micros(t: DateTime<Utc>) -> DateTime<Utc> {
    t.trunc_subsecs(6)
}

/// Compares two values the way PostgreSQL does for the same column type:
/// text byte-wise (`COLLATE "C"`), UUIDs byte-wise, floats with NaN above
/// everything and `-0.0 == 0.0`. `NULL` sorts after everything (it never
/// reaches a comparison in practice: sortable columns are `NOT NULL`, and
/// filters never match `NULL`). Values of different types compare by type.
pub(crate) fn compare(a: &Value, b: &Value) -> Ordering {
    match (a, b) {
        (Value::Bool(x), Value::Bool(y)) => x.cmp(y),
        (Value::I32(x), Value::I32(y)) => x.cmp(y),
        (Value::I64(x), Value::I64(y)) => x.cmp(y),
        (Value::F64(x), Value::F64(y)) => match (x.is_nan(), y.is_nan()) {
            (true, true) => Ordering::Equal,
            (true, false) => Ordering::Greater,
            (false, true) => Ordering::Less,
            (false, false) => x.partial_cmp(y).unwrap_or(Ordering::Equal),
        },
        (Value::Text(x), Value::Text(y)) => x.as_bytes().cmp(y.as_bytes()),
        (Value::Uuid(x), Value::Uuid(y)) => x.as_bytes().cmp(y.as_bytes()),
        (Value::Timestamp(x), Value::Timestamp(y)) => x.cmp(y),
        (Value::Json(x), Value::Json(y)) => x.to_string().cmp(&y.to_string()),
        _ => rank(a).cmp(&rank(b)),
    }
}

fn rank(v: &Value) -> u8 {
    match v {
        Value::Bool(_) => 0,
        Value::I32(_) => 1,
        Value::I64(_) => 2,
        Value::F64(_) => 3,
        Value::Text(_) => 4,
        Value::Uuid(_) => 5,
        Value::Timestamp(_) => 6,
        Value::Json(_) => 7,
        Value::Null => 8,
    }
}

/// A value used as a map key (entity ids), ordered like the database orders
/// it.
#[derive(Clone, Debug)]
pub(crate) struct Key(pub(crate) Value);

impl PartialEq for Key {
    fn eq(&self, other: &Self) -> bool {
        compare(&self.0, &other.0) == Ordering::Equal
    }
}

impl Eq for Key {}

impl PartialOrd for Key {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Key {
    fn cmp(&self, other: &Self) -> Ordering {
        compare(&self.0, &other.0)
    }
}

macro_rules! value_from {
    ($($t:ty => $variant:ident),* $(,)?) => {$(
        impl From<$t> for Value {
            fn from(v: $t) -> Self {
                Value::$variant(v)
            }
        }
    )*};
}

value_from! {
    bool => Bool,
    i32 => I32,
    i64 => I64,
    f64 => F64,
    String => Text,
    Uuid => Uuid,
    serde_json::Value => Json,
}

impl From<DateTime<Utc>> for Value {
    fn from(v: DateTime<Utc>) -> Self {
        Value::Timestamp(truncate_micros(v))
    }
}

impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::Text(v.to_owned())
    }
}

impl From<&String> for Value {
    fn from(v: &String) -> Self {
        Value::Text(v.clone())
    }
}

impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Self {
        v.map_or(Value::Null, Into::into)
    }
}

/// Types a column value can be read back as, with
/// [`Row::get`](crate::Row::get).
pub trait FromValue: Sized {
    /// Converts the value, or returns `None` when it has another type (or is
    /// `NULL` for a non-`Option` target).
    fn from_value(value: Value) -> Option<Self>;
}

macro_rules! from_value {
    ($($t:ty => $variant:ident),* $(,)?) => {$(
        impl FromValue for $t {
            fn from_value(value: Value) -> Option<Self> {
                match value {
                    Value::$variant(v) => Some(v),
                    _ => None,
                }
            }
        }
    )*};
}

from_value! {
    bool => Bool,
    i32 => I32,
    i64 => I64,
    f64 => F64,
    String => Text,
    Uuid => Uuid,
    DateTime<Utc> => Timestamp,
    serde_json::Value => Json,
}

impl<T: FromValue> FromValue for Option<T> {
    fn from_value(value: Value) -> Option<Self> {
        match value {
            Value::Null => Some(None),
            other => T::from_value(other).map(Some),
        }
    }
}

impl FromValue for Value {
    fn from_value(value: Value) -> Option<Self> {
        Some(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comparisons_follow_postgres() {
        assert_eq!(
            compare(&Value::F64(f64::NAN), &Value::F64(f64::INFINITY)),
            Ordering::Greater
        );
        assert_eq!(
            compare(&Value::F64(-0.0), &Value::F64(0.0)),
            Ordering::Equal
        );
        // Byte order, not a locale: upper case before lower case.
        assert_eq!(
            compare(&Value::from("Zebra"), &Value::from("apple")),
            Ordering::Less
        );
        assert_eq!(
            compare(&Value::from("é"), &Value::from("z")),
            Ordering::Greater
        );
    }

    #[test]
    fn timestamps_are_truncated_to_microseconds() {
        let t: DateTime<Utc> = "2026-01-02T03:04:05.123456789Z".parse().unwrap();
        let Value::Timestamp(stored) = Value::from(t) else {
            panic!("not a timestamp")
        };
        assert_eq!(stored.timestamp_subsec_nanos(), 123_456_000);
        assert_eq!(Option::<i64>::from_value(Value::Null), Some(None));
        assert_eq!(i64::from_value(Value::Null), None);
        assert_eq!(i64::from_value(Value::I32(1)), None);
    }
}
