//! Declaring how an entity maps to a table, once, for every repository.

use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt;
use std::marker::PhantomData;

use chrono::{DateTime, Utc};
use keel_core::{Entity, Stored, Version};

use crate::error::{RepositoryError, Result};
use crate::value::{ColumnType, FromValue, Value};

/// How an entity is stored: its table, its columns, and how to turn it into
/// a row and back.
///
/// Implement it once per entity; [`PgRepository`](crate::PgRepository) and
/// [`InMemoryRepository`](crate::InMemoryRepository) both work from it. The
/// table also has four columns Keel maintains: `version BIGINT NOT NULL`,
/// `created_at TIMESTAMPTZ NOT NULL`, `updated_at TIMESTAMPTZ NOT NULL` and
/// `deleted_at TIMESTAMPTZ NULL` (see [`Mapping::create_table_sql`]).
///
/// ```
/// use keel_core::Entity;
/// use keel_repository::{Column, ColumnType, Mapped, Mapping, Result, Row, RowWriter, Value};
///
/// #[derive(Clone, Debug, PartialEq)]
/// struct Customer { id: uuid::Uuid, email: String, tier: i32, note: Option<String> }
///
/// impl Entity for Customer {
///     type Id = uuid::Uuid;
///     const NAME: &'static str = "customer";
///     fn id(&self) -> &uuid::Uuid { &self.id }
/// }
///
/// impl Mapped for Customer {
///     fn mapping() -> Mapping {
///         Mapping::new("customers")
///             .id("id", ColumnType::Uuid)
///             .column(Column::new("email", ColumnType::Text).filterable().sortable())
///             .column(Column::new("tier", ColumnType::I32).filterable().sortable())
///             .column(Column::new("note", ColumnType::Text).nullable())
///     }
///
///     fn id_value(id: &uuid::Uuid) -> Value {
///         (*id).into()
///     }
///
///     fn write(&self, row: &mut RowWriter<'_>) {
///         row.set("id", self.id)
///             .set("email", &self.email)
///             .set("tier", self.tier)
///             .set("note", self.note.clone());
///     }
///
///     fn read(row: &mut Row<'_>) -> Result<Self> {
///         Ok(Customer {
///             id: row.get("id")?,
///             email: row.get("email")?,
///             tier: row.get("tier")?,
///             note: row.get("note")?,
///         })
///     }
/// }
/// # fn main() {
/// # let sql = Customer::mapping().create_table_sql();
/// # assert!(sql.starts_with(r#"CREATE TABLE "customers""#));
/// # }
/// ```
pub trait Mapped: Entity {
    /// The table and its columns. Called once when a repository is built;
    /// identifiers are validated then.
    fn mapping() -> Mapping;

    /// The id as a column value.
    fn id_value(id: &Self::Id) -> Value;

    /// Writes every declared column (the id included) into `row`.
    fn write(&self, row: &mut RowWriter<'_>);

    /// Reads the entity back from a row.
    fn read(row: &mut Row<'_>) -> Result<Self>;
}

/// One declared column.
#[derive(Clone, Debug)]
pub struct Column {
    pub(crate) name: String,
    pub(crate) ty: ColumnType,
    pub(crate) nullable: bool,
    pub(crate) filterable: bool,
    pub(crate) sortable: bool,
}

impl Column {
    /// A `NOT NULL` column that cannot be filtered or sorted on.
    pub fn new(name: impl Into<String>, ty: ColumnType) -> Self {
        Self {
            name: name.into(),
            ty,
            nullable: false,
            filterable: false,
            sortable: false,
        }
    }

    /// The column accepts `NULL` (an `Option` field). A nullable column can
    /// be filtered on but not sorted on: keyset pagination needs a total
    /// order.
    #[must_use]
    pub fn nullable(mut self) -> Self {
        self.nullable = true;
        self
    }

    /// Callers may filter on this column.
    #[must_use]
    pub fn filterable(mut self) -> Self {
        self.filterable = true;
        self
    }

    /// Callers may sort on this column. Give it an index (with the id last)
    /// if lists sort on it.
    #[must_use]
    pub fn sortable(mut self) -> Self {
        self.sortable = true;
        self
    }
}

/// An entity's table and columns, as declared by [`Mapped::mapping`].
#[derive(Clone, Debug)]
pub struct Mapping {
    table: String,
    id: Option<Column>,
    columns: Vec<Column>,
}

impl Mapping {
    /// A mapping onto `table` (`name` or `schema.name`; lower-case
    /// identifiers).
    pub fn new(table: impl Into<String>) -> Self {
        Self {
            table: table.into(),
            id: None,
            columns: Vec::new(),
        }
    }

    /// Declares the id column (its primary key); filterable and sortable.
    /// Ids are `Text`, `I32`, `I64` or `Uuid`.
    #[must_use]
    pub fn id(mut self, name: impl Into<String>, ty: ColumnType) -> Self {
        self.id = Some(Column::new(name, ty).filterable().sortable());
        self
    }

    /// Declares another column.
    #[must_use]
    pub fn column(mut self, column: Column) -> Self {
        self.columns.push(column);
        self
    }

    /// A `CREATE TABLE` statement matching this mapping, for tests and as a
    /// starting point for a migration. Identifiers are not validated here;
    /// building a repository does that.
    ///
    /// It fails if the table exists; see
    /// [`create_table_if_not_exists_sql`](Self::create_table_if_not_exists_sql)
    /// for a statement that may run again.
    #[must_use]
    pub fn create_table_sql(&self) -> String {
        self.create_table(false)
    }

    /// The same statement as [`create_table_sql`](Self::create_table_sql)
    /// as `CREATE TABLE IF NOT EXISTS`, so that running it again (a
    /// restarted demo, a second test in the same database) does nothing.
    ///
    /// PostgreSQL only looks at the table's name: a table of that name with
    /// other columns is left as it is, without a word. Follow the statement
    /// with [`PgRepository::verify_schema`](crate::PgRepository::verify_schema)
    /// to catch such a table before the first write. The schema of a
    /// `schema.name` table must already exist. The statement creates no
    /// index besides the primary key's.
    ///
    /// ```
    /// # use keel_repository::{ColumnType, Mapping};
    /// let mapping = Mapping::new("customers").id("id", ColumnType::Uuid);
    /// let sql = mapping.create_table_if_not_exists_sql();
    /// assert!(sql.starts_with(r#"CREATE TABLE IF NOT EXISTS "customers" ("#));
    /// ```
    #[must_use]
    pub fn create_table_if_not_exists_sql(&self) -> String {
        self.create_table(true)
    }

    fn create_table(&self, if_not_exists: bool) -> String {
        let mut sql = format!(
            "CREATE TABLE {}{} (\n",
            if if_not_exists { "IF NOT EXISTS " } else { "" },
            quote_path(&self.table)
        );
        for (i, c) in self.id.iter().chain(&self.columns).enumerate() {
            sql.push_str(&format!(
                "    {} {}{}{},\n",
                quote(&c.name),
                // Byte-wise collation, so that indexes on text columns serve
                // the repository's `COLLATE "C"` ordering.
                if c.ty == ColumnType::Text {
                    "TEXT COLLATE \"C\""
                } else {
                    c.ty.sql_type()
                },
                if c.nullable { "" } else { " NOT NULL" },
                if i == 0 && self.id.is_some() {
                    " PRIMARY KEY"
                } else {
                    ""
                }
            ));
        }
        sql.push_str(
            "    \"version\" BIGINT NOT NULL,\n    \"created_at\" TIMESTAMPTZ NOT NULL,\n    \
             \"updated_at\" TIMESTAMPTZ NOT NULL,\n    \"deleted_at\" TIMESTAMPTZ\n)",
        );
        sql
    }
}

/// The bookkeeping columns every mapped table has.
pub(crate) const SYSTEM_COLUMNS: [&str; 4] = ["version", "created_at", "updated_at", "deleted_at"];

/// A field callers may filter or sort on: a declared column or one of the
/// two timestamps.
#[derive(Clone, Debug)]
pub(crate) struct Field {
    pub(crate) name: String,
    pub(crate) ty: ColumnType,
    pub(crate) filterable: bool,
    pub(crate) sortable: bool,
}

/// A validated mapping, shared by a repository and its statements.
#[derive(Clone, Debug)]
pub(crate) struct Schema {
    pub(crate) entity: &'static str,
    pub(crate) table: String,
    pub(crate) columns: Vec<Column>,
    /// Declared columns, then `created_at`, then `updated_at`.
    pub(crate) fields: Vec<Field>,
    pub(crate) id: usize,
}

impl Schema {
    pub(crate) fn of<E: Mapped>() -> Result<Self> {
        let Mapping { table, id, columns } = E::mapping();
        let bad = |reason: String| Err(RepositoryError::mapping(E::NAME, reason));
        let parts: Vec<&str> = table.split('.').collect();
        if parts.len() > 2 || parts.iter().any(|p| !is_identifier(p)) {
            return bad(format!(
                "table `{table}` must be `name` or `schema.name` with lower-case identifiers \
                 ([a-z_][a-z0-9_]*, at most 63 bytes)"
            ));
        }
        let Some(id) = id else {
            return bad("no id column declared; call `Mapping::id`".into());
        };
        if !matches!(
            id.ty,
            ColumnType::Text | ColumnType::I32 | ColumnType::I64 | ColumnType::Uuid
        ) {
            return bad(format!(
                "id column `{}` must be Text, I32, I64 or Uuid, not {:?}",
                id.name, id.ty
            ));
        }
        let mut all = vec![id];
        all.extend(columns);
        let mut seen = HashSet::new();
        for c in &all {
            if !is_identifier(&c.name) {
                return bad(format!(
                    "column `{}` is not a lower-case identifier ([a-z_][a-z0-9_]*, at most 63 bytes)",
                    c.name
                ));
            }
            if SYSTEM_COLUMNS.contains(&c.name.as_str()) {
                return bad(format!(
                    "column `{}` is maintained by the repository; do not declare it",
                    c.name
                ));
            }
            if !seen.insert(c.name.clone()) {
                return bad(format!("column `{}` is declared twice", c.name));
            }
            if (c.sortable || c.filterable) && !c.ty.is_ordered() {
                return bad(format!(
                    "column `{}` is {:?}, which cannot be filtered or sorted on",
                    c.name, c.ty
                ));
            }
            if c.sortable && c.nullable {
                return bad(format!(
                    "column `{}` is nullable and cannot be sortable (keyset pagination needs \
                     NOT NULL sort keys)",
                    c.name
                ));
            }
        }
        let mut fields: Vec<Field> = all
            .iter()
            .map(|c| Field {
                name: c.name.clone(),
                ty: c.ty,
                filterable: c.filterable,
                sortable: c.sortable,
            })
            .collect();
        for name in ["created_at", "updated_at"] {
            fields.push(Field {
                name: name.to_owned(),
                ty: ColumnType::Timestamp,
                filterable: true,
                sortable: true,
            });
        }
        Ok(Schema {
            entity: E::NAME,
            table,
            columns: all,
            fields,
            id: 0,
        })
    }

    pub(crate) fn id_type(&self) -> ColumnType {
        self.columns[self.id].ty
    }

    /// Checks an id value against the id column's type.
    pub(crate) fn check_id(&self, id: Value) -> Result<Value> {
        if id.column_type() == Some(self.id_type()) {
            crate::limits::check_value("id", &id, crate::limits::MAX_ID_BYTES)?;
            Ok(id.normalized())
        } else {
            Err(RepositoryError::mapping(
                self.entity,
                format!(
                    "`id_value` returned {id:?} for a {:?} id column",
                    self.id_type()
                ),
            ))
        }
    }

    /// Writes an entity into a row of values, checking it against the
    /// declared columns.
    pub(crate) fn row_of<E: Mapped>(&self, entity: &E) -> Result<Vec<Value>> {
        let mut writer = RowWriter {
            schema: self,
            values: vec![None; self.columns.len()],
            error: None,
        };
        entity.write(&mut writer);
        if let Some(reason) = writer.error {
            return Err(RepositoryError::mapping(self.entity, reason));
        }
        let values = writer
            .values
            .into_iter()
            .zip(&self.columns)
            .map(|(v, c)| {
                v.ok_or_else(|| {
                    RepositoryError::mapping(
                        self.entity,
                        format!("`write` did not set column `{}`", c.name),
                    )
                })
            })
            .collect::<Result<Vec<_>>>()?;
        // What PostgreSQL would refuse is refused here, for both repositories.
        for (i, (v, c)) in values.iter().zip(&self.columns).enumerate() {
            let max = if i == self.id {
                crate::limits::MAX_ID_BYTES
            } else {
                crate::limits::MAX_TEXT_BYTES
            };
            crate::limits::check_value(&c.name, v, max)?;
        }
        Ok(values)
    }

    pub(crate) fn subject(&self, id: &impl fmt::Display) -> String {
        format!("{} {}", self.entity, crate::error::shown(&id.to_string()))
    }
}

/// Whether `s` is a lower-case SQL identifier Keel accepts.
pub(crate) fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some('a'..='z' | '_'))
        && chars.all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_'))
        && s.len() <= 63
}

/// Double-quotes a validated identifier.
pub(crate) fn quote(ident: &str) -> String {
    format!("\"{ident}\"")
}

/// Double-quotes each part of a validated `schema.table` path.
pub(crate) fn quote_path(path: &str) -> String {
    path.split('.').map(quote).collect::<Vec<_>>().join(".")
}

/// Collects the columns of one entity, in [`Mapped::write`].
#[derive(Debug)]
pub struct RowWriter<'a> {
    schema: &'a Schema,
    values: Vec<Option<Value>>,
    error: Option<String>,
}

impl RowWriter<'_> {
    /// Sets a declared column. Setting an undeclared column, a value of
    /// another type, or `NULL` in a `NOT NULL` column is a mapping error
    /// reported when the write is attempted.
    pub fn set(&mut self, column: &str, value: impl Into<Value>) -> &mut Self {
        let value = value.into().normalized();
        let Some(i) = self.schema.columns.iter().position(|c| c.name == column) else {
            self.error
                .get_or_insert_with(|| format!("`write` set undeclared column `{column}`"));
            return self;
        };
        let c = &self.schema.columns[i];
        let fits = match value.column_type() {
            None => c.nullable,
            Some(t) => t == c.ty,
        };
        if !fits {
            self.error.get_or_insert_with(|| {
                format!(
                    "`write` set column `{column}` ({:?}{}) to {value:?}",
                    c.ty,
                    if c.nullable { ", nullable" } else { "" }
                )
            });
        }
        self.values[i] = Some(value);
        self
    }
}

/// One stored row, handed to [`Mapped::read`].
#[derive(Debug)]
pub struct Row<'a> {
    schema: &'a Schema,
    values: Vec<Value>,
}

impl Row<'_> {
    /// Takes a column's value as `T` (an `Option<T>` for nullable columns).
    pub fn get<T: FromValue>(&mut self, column: &str) -> Result<T> {
        let decode = |reason: String| RepositoryError::Decode {
            entity: self.schema.entity,
            column: column.to_owned(),
            reason,
        };
        let i = self
            .schema
            .columns
            .iter()
            .position(|c| c.name == column)
            .ok_or_else(|| decode("the column is not declared".into()))?;
        let value = std::mem::replace(&mut self.values[i], Value::Null);
        let shown = format!("{value:?}");
        T::from_value(value).ok_or_else(|| {
            decode(format!(
                "cannot convert {shown} into {}",
                std::any::type_name::<T>()
            ))
        })
    }
}

/// A row with its bookkeeping, as both repositories hold it before turning
/// it into a [`Stored`] entity.
#[derive(Clone, Debug)]
pub(crate) struct Record {
    pub(crate) values: Vec<Value>,
    pub(crate) version: u64,
    pub(crate) created_at: DateTime<Utc>,
    pub(crate) updated_at: DateTime<Utc>,
    pub(crate) deleted_at: Option<DateTime<Utc>>,
}

impl Record {
    /// The value of field `i` (see [`Schema::fields`]).
    pub(crate) fn field(&self, i: usize) -> Cow<'_, Value> {
        match i.checked_sub(self.values.len()) {
            None => Cow::Borrowed(&self.values[i]),
            Some(0) => Cow::Owned(Value::Timestamp(self.created_at)),
            Some(_) => Cow::Owned(Value::Timestamp(self.updated_at)),
        }
    }

    pub(crate) fn into_stored<E: Mapped>(self, schema: &Schema) -> Result<Stored<E>> {
        let mut row = Row {
            schema,
            values: self.values,
        };
        let entity = E::read(&mut row)?;
        Ok(Stored::new(
            entity,
            Version::new(self.version),
            self.created_at,
            self.updated_at,
            self.deleted_at,
        ))
    }
}

/// Marker tying a schema to its entity type at compile time.
pub(crate) type EntityOf<E> = PhantomData<fn() -> E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers() {
        assert!(is_identifier("customers"));
        assert!(is_identifier("_x9"));
        assert!(!is_identifier("Customers"));
        assert!(!is_identifier("9x"));
        assert!(!is_identifier("a-b"));
        assert!(!is_identifier("x\"; DROP TABLE y; --"));
        assert!(!is_identifier(""));
        assert!(!is_identifier(&"a".repeat(64)));
    }
}
