//! Comparing the live table with the mapping (`verify_schema`).

use super::PgRepository;
use crate::error::{RepositoryError, Result};
use crate::mapping::Mapped;
use crate::value::ColumnType;

impl<E: Mapped> PgRepository<E> {
    /// Compares the live table with the mapping: every declared and
    /// maintained column present with a matching type, `NOT NULL` where the
    /// mapping needs it, and a unique index on the id alone (which `upsert`
    /// relies on). Reports every difference in one
    /// [`RepositoryError::Mapping`]; call it at start-up or in a test.
    pub async fn verify_schema(&self) -> Result<()> {
        let schema = &self.inner.schema;
        let (namespace, table) = match schema.table.split_once('.') {
            Some((ns, t)) => (Some(ns), t),
            None => (None, schema.table.as_str()),
        };
        let found: Vec<(String, String, bool)> = sqlx::query_as(
            "SELECT column_name::text, udt_name::text, is_nullable = 'YES' \
             FROM information_schema.columns \
             WHERE table_schema = COALESCE($1, current_schema()) AND table_name = $2",
        )
        .bind(namespace)
        .bind(table)
        .fetch_all(&self.pool)
        .await?;
        if found.is_empty() {
            return Err(RepositoryError::mapping(
                schema.entity,
                format!("table `{}` does not exist", schema.table),
            ));
        }
        let mut expected: Vec<(&str, ColumnType, bool)> = schema
            .columns
            .iter()
            .map(|c| (c.name.as_str(), c.ty, c.nullable))
            .collect();
        expected.extend([
            ("version", ColumnType::I64, false),
            ("created_at", ColumnType::Timestamp, false),
            ("updated_at", ColumnType::Timestamp, false),
            ("deleted_at", ColumnType::Timestamp, true),
        ]);
        let mut problems = Vec::new();
        for (name, ty, nullable) in expected {
            let udt: &[&str] = match ty {
                ColumnType::Bool => &["bool"],
                ColumnType::I32 => &["int4"],
                ColumnType::I64 => &["int8"],
                ColumnType::F64 => &["float8"],
                ColumnType::Text => &["text", "varchar"],
                ColumnType::Uuid => &["uuid"],
                ColumnType::Timestamp => &["timestamptz"],
                ColumnType::Json => &["jsonb"],
            };
            match found.iter().find(|(n, _, _)| n == name) {
                None => problems.push(format!("column `{name}` is missing")),
                Some((_, actual, db_nullable)) => {
                    if !udt.contains(&actual.as_str()) {
                        problems.push(format!(
                            "column `{name}` is {actual}, the mapping needs {}",
                            ty.sql_type()
                        ));
                    }
                    if *db_nullable && !nullable {
                        problems.push(format!(
                            "column `{name}` accepts NULL, the mapping needs NOT NULL"
                        ));
                    }
                }
            }
        }
        let unique_id: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_index i \
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0] \
             WHERE i.indrelid = to_regclass($1) AND i.indisunique AND i.indnkeyatts = 1 \
             AND i.indpred IS NULL AND a.attname = $2)",
        )
        .bind(&self.inner.sql.table)
        .bind(&schema.columns[schema.id].name)
        .fetch_one(&self.pool)
        .await?;
        if !unique_id {
            problems.push(format!(
                "no unique index on `{}` alone (make it the primary key)",
                schema.columns[schema.id].name
            ));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(RepositoryError::mapping(
                schema.entity,
                format!(
                    "table `{}` does not match: {}",
                    schema.table,
                    problems.join("; ")
                ),
            ))
        }
    }
}
