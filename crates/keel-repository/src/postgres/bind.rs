//! Binding [`Value`]s as parameters and reading them back from rows.

use chrono::{DateTime, Utc};
use sqlx::encode::IsNull;
use sqlx::error::BoxDynError;
use sqlx::postgres::{PgArgumentBuffer, PgHasArrayType, PgRow, PgTypeInfo};
use sqlx::{Encode, Postgres, Row as _, Type};
use uuid::Uuid;

use crate::error::{RepositoryError, Result};
use crate::mapping::{Record, Schema};
use crate::value::{ColumnType, Value};

/// A value bound with its column's type, so that `NULL`s are typed too.
#[derive(Debug)]
pub(crate) struct Param<'a>(pub(crate) &'a Value, pub(crate) ColumnType);

fn type_info(ty: ColumnType) -> PgTypeInfo {
    match ty {
        ColumnType::Bool => <bool as Type<Postgres>>::type_info(),
        ColumnType::I32 => <i32 as Type<Postgres>>::type_info(),
        ColumnType::I64 => <i64 as Type<Postgres>>::type_info(),
        ColumnType::F64 => <f64 as Type<Postgres>>::type_info(),
        ColumnType::Text => <String as Type<Postgres>>::type_info(),
        ColumnType::Uuid => <Uuid as Type<Postgres>>::type_info(),
        ColumnType::Timestamp => <DateTime<Utc> as Type<Postgres>>::type_info(),
        ColumnType::Json => <serde_json::Value as Type<Postgres>>::type_info(),
    }
}

impl Type<Postgres> for Param<'_> {
    fn type_info() -> PgTypeInfo {
        // Every `Param` reports its real type through `produces`.
        <String as Type<Postgres>>::type_info()
    }
}

impl Encode<'_, Postgres> for Param<'_> {
    fn encode_by_ref(&self, buf: &mut PgArgumentBuffer) -> Result<IsNull, BoxDynError> {
        match self.0 {
            Value::Null => Ok(IsNull::Yes),
            Value::Bool(v) => <bool as Encode<Postgres>>::encode_by_ref(v, buf),
            Value::I32(v) => <i32 as Encode<Postgres>>::encode_by_ref(v, buf),
            Value::I64(v) => <i64 as Encode<Postgres>>::encode_by_ref(v, buf),
            Value::F64(v) => <f64 as Encode<Postgres>>::encode_by_ref(v, buf),
            Value::Text(v) => <String as Encode<Postgres>>::encode_by_ref(v, buf),
            Value::Uuid(v) => <Uuid as Encode<Postgres>>::encode_by_ref(v, buf),
            Value::Timestamp(v) => <DateTime<Utc> as Encode<Postgres>>::encode_by_ref(v, buf),
            Value::Json(v) => <serde_json::Value as Encode<Postgres>>::encode_by_ref(v, buf),
        }
    }

    fn produces(&self) -> Option<PgTypeInfo> {
        Some(type_info(self.1))
    }
}

/// Same-typed values bound as one typed array parameter (for `= ANY($n)`),
/// so that the statement text is the same whatever the number of values.
/// Values of another type are left out: callers pass values already
/// checked against the column.
#[derive(Debug)]
pub(crate) struct ArrayParam<'a>(pub(crate) &'a [Value], pub(crate) ColumnType);

impl Type<Postgres> for ArrayParam<'_> {
    fn type_info() -> PgTypeInfo {
        // Every `ArrayParam` reports its real type through `produces`.
        <Vec<String> as Type<Postgres>>::type_info()
    }
}

impl Encode<'_, Postgres> for ArrayParam<'_> {
    fn encode_by_ref(&self, buf: &mut PgArgumentBuffer) -> Result<IsNull, BoxDynError> {
        macro_rules! array {
            ($variant:ident) => {
                self.0
                    .iter()
                    .filter_map(|v| match v {
                        Value::$variant(x) => Some(x),
                        _ => None,
                    })
                    .collect::<Vec<_>>()
                    .encode_by_ref(buf)
            };
        }
        match self.1 {
            ColumnType::Bool => array!(Bool),
            ColumnType::I32 => array!(I32),
            ColumnType::I64 => array!(I64),
            ColumnType::F64 => array!(F64),
            ColumnType::Text => array!(Text),
            ColumnType::Uuid => array!(Uuid),
            ColumnType::Timestamp => array!(Timestamp),
            ColumnType::Json => array!(Json),
        }
    }

    fn produces(&self) -> Option<PgTypeInfo> {
        Some(match self.1 {
            ColumnType::Bool => <bool as PgHasArrayType>::array_type_info(),
            ColumnType::I32 => <i32 as PgHasArrayType>::array_type_info(),
            ColumnType::I64 => <i64 as PgHasArrayType>::array_type_info(),
            ColumnType::F64 => <f64 as PgHasArrayType>::array_type_info(),
            ColumnType::Text => <String as PgHasArrayType>::array_type_info(),
            ColumnType::Uuid => <Uuid as PgHasArrayType>::array_type_info(),
            ColumnType::Timestamp => <DateTime<Utc> as PgHasArrayType>::array_type_info(),
            ColumnType::Json => <serde_json::Value as PgHasArrayType>::array_type_info(),
        })
    }
}

/// Reads a row selected with [`Statements::select`](super::sql::Statements):
/// the declared columns, then `version`, `created_at`, `updated_at`,
/// `deleted_at`.
pub(crate) fn decode(schema: &Schema, row: &PgRow) -> Result<Record> {
    let err = |column: &str, reason: String| RepositoryError::Decode {
        entity: schema.entity,
        column: column.to_owned(),
        reason,
    };
    let mut values = Vec::with_capacity(schema.columns.len());
    for (i, c) in schema.columns.iter().enumerate() {
        macro_rules! get {
            ($variant:ident, $t:ty) => {
                row.try_get::<Option<$t>, _>(i)
                    .map_err(|e| err(&c.name, e.to_string()))?
                    .map(Value::$variant)
            };
        }
        let v = match c.ty {
            ColumnType::Bool => get!(Bool, bool),
            ColumnType::I32 => get!(I32, i32),
            ColumnType::I64 => get!(I64, i64),
            ColumnType::F64 => get!(F64, f64),
            ColumnType::Text => get!(Text, String),
            ColumnType::Uuid => get!(Uuid, Uuid),
            ColumnType::Timestamp => get!(Timestamp, DateTime<Utc>),
            ColumnType::Json => get!(Json, serde_json::Value),
        };
        match v {
            Some(v) => values.push(v),
            None if c.nullable => values.push(Value::Null),
            None => return Err(err(&c.name, "NULL in a column declared NOT NULL".into())),
        }
    }
    let n = schema.columns.len();
    let version: i64 = row.try_get(n).map_err(|e| err("version", e.to_string()))?;
    Ok(Record {
        values,
        version: u64::try_from(version).map_err(|_| err("version", "negative".into()))?,
        created_at: row
            .try_get(n + 1)
            .map_err(|e| err("created_at", e.to_string()))?,
        updated_at: row
            .try_get(n + 2)
            .map_err(|e| err("updated_at", e.to_string()))?,
        deleted_at: row
            .try_get(n + 3)
            .map_err(|e| err("deleted_at", e.to_string()))?,
    })
}
