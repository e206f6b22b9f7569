//! The write statements: inserts, updates, upserts, soft and hard
//! deletes, and explaining a versioned write that matched no row.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use keel_core::{ExpectedVersion, Stored, Version, VersionConflict};
use sqlx::postgres::{PgArguments, PgRow};
use sqlx::{Arguments, Connection, PgConnection, Postgres, QueryBuilder};

use keel_database::DatabaseError;

use super::Inner;
use super::bind::{Param, decode};
use crate::error::{RepositoryError, Result};
use crate::mapping::{Mapped, Record};
use crate::value::{ColumnType, Key, Value, truncate_micros};

/// PostgreSQL's limit on bound parameters in one statement.
const MAX_PARAMS: usize = 65_535;
/// Rows per `INSERT` in [`insert_many`](keel_core::EntityWriter::insert_many).
const MAX_ROWS_PER_INSERT: usize = 1_000;

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Transition {
    SoftDelete,
    Restore,
}

pub(super) fn add(args: &mut PgArguments, value: &Value, ty: ColumnType) -> Result<()> {
    args.add(Param(value, ty))
        .map_err(|e| RepositoryError::from(sqlx::Error::Encode(e)))
}

impl<E: Mapped> Inner<E> {
    pub(super) fn now(&self) -> Option<DateTime<Utc>> {
        self.clock.as_ref().map(|c| truncate_micros(c.now()))
    }

    pub(super) fn id_value(&self, id: &E::Id) -> Result<Value> {
        self.schema.check_id(E::id_value(id))
    }

    pub(super) fn record(&self, row: &PgRow) -> Result<Record> {
        decode(&self.schema, row)
    }

    pub(super) fn stored(&self, row: &PgRow) -> Result<Stored<E>> {
        self.record(row)?.into_stored(&self.schema)
    }

    /// Classifies a failed write with keel-database's classifier:
    /// duplicates (with the constraint's name) become `AlreadyExists`,
    /// other constraint violations and refused values `Rejected`.
    pub(super) fn write_error(
        &self,
        e: sqlx::Error,
        subject: impl FnOnce() -> String,
    ) -> RepositoryError {
        match DatabaseError::from(e) {
            DatabaseError::UniqueViolation { constraint, .. } => RepositoryError::AlreadyExists {
                subject: subject(),
                constraint,
            },
            e @ (DatabaseError::ConstraintViolation { .. } | DatabaseError::InvalidData { .. }) => {
                RepositoryError::Rejected {
                    entity: self.schema.entity,
                    sqlstate: e.sqlstate().unwrap_or_default().to_owned(),
                    message: shown_message(&e),
                    constraint: e.constraint().map(str::to_owned),
                }
            }
            other => RepositoryError::Database(other),
        }
    }

    pub(super) fn row_args(&self, values: &[Value]) -> Result<PgArguments> {
        let mut args = PgArguments::default();
        for (v, c) in values.iter().zip(&self.schema.columns) {
            add(&mut args, v, c.ty)?;
        }
        Ok(args)
    }

    pub(super) fn add_now(&self, args: &mut PgArguments) -> Result<()> {
        if let Some(now) = self.now() {
            add(args, &Value::Timestamp(now), ColumnType::Timestamp)?;
        }
        Ok(())
    }

    pub(super) async fn insert(&self, conn: &mut PgConnection, entity: &E) -> Result<Stored<E>> {
        self.write_row(conn, &self.sql.insert, entity).await
    }

    /// Runs `statement` (the insert or the upsert) with the entity's row
    /// and the clock's time, and returns the stored row.
    pub(super) async fn write_row(
        &self,
        conn: &mut PgConnection,
        statement: &str,
        entity: &E,
    ) -> Result<Stored<E>> {
        let values = self.schema.row_of(entity)?;
        let mut args = self.row_args(&values)?;
        self.add_now(&mut args)?;
        let row = sqlx::query_with(statement, args)
            .fetch_one(conn)
            .await
            .map_err(|e| self.write_error(e, || self.schema.subject(entity.id())))?;
        self.stored(&row)
    }

    pub(super) async fn insert_many(
        &self,
        conn: &mut PgConnection,
        entities: &[E],
    ) -> Result<Vec<Stored<E>>> {
        if entities.is_empty() {
            return Ok(Vec::new());
        }
        let rows = entities
            .iter()
            .map(|e| self.schema.row_of(e))
            .collect::<Result<Vec<_>>>()?;
        let per_row = self.schema.columns.len() + 2;
        let chunk = (MAX_PARAMS / per_row).clamp(1, MAX_ROWS_PER_INSERT);
        let subject = || {
            format!(
                "{} (one of {} in the batch)",
                self.schema.entity,
                rows.len()
            )
        };
        let mut found = BTreeMap::new();
        if rows.len() <= chunk {
            // One statement is atomic by itself.
            self.insert_chunk(conn, &rows, &mut found)
                .await
                .map_err(|e| self.write_error(e, subject))?;
        } else {
            // A transaction (or a savepoint inside the caller's) keeps the
            // batch all-or-nothing.
            let mut tx = conn.begin().await?;
            for part in rows.chunks(chunk) {
                self.insert_chunk(&mut tx, part, &mut found)
                    .await
                    .map_err(|e| self.write_error(e, subject))?;
            }
            tx.commit().await?;
        }
        rows.iter()
            .map(|values| {
                let record = found
                    .remove(&Key(values[self.schema.id].clone()))
                    .ok_or_else(|| {
                        RepositoryError::mapping(self.schema.entity, "inserted row not returned")
                    })?;
                record.into_stored(&self.schema)
            })
            .collect()
    }

    pub(super) async fn insert_chunk(
        &self,
        conn: &mut PgConnection,
        rows: &[Vec<Value>],
        found: &mut BTreeMap<Key, Record>,
    ) -> Result<(), sqlx::Error> {
        let now = self.now().map(Value::Timestamp);
        let cols: Vec<String> = self
            .schema
            .columns
            .iter()
            .map(|c| crate::mapping::quote(&c.name))
            .collect();
        let mut qb = QueryBuilder::<Postgres>::new(format!(
            "INSERT INTO {} ({}, \"version\", \"created_at\", \"updated_at\", \"deleted_at\") ",
            self.sql.table,
            cols.join(", ")
        ));
        qb.push_values(rows, |mut b, values| {
            for (v, c) in values.iter().zip(&self.schema.columns) {
                b.push_bind(Param(v, c.ty));
            }
            b.push("1");
            for _ in 0..2 {
                match &now {
                    Some(t) => {
                        b.push_bind(Param(t, ColumnType::Timestamp));
                    }
                    None => {
                        b.push("now()");
                    }
                }
            }
            b.push("NULL");
        });
        qb.push(" RETURNING ").push(&self.sql.select);
        for row in qb.build().fetch_all(&mut *conn).await? {
            let record = decode(&self.schema, &row).map_err(|e| sqlx::Error::Decode(e.into()))?;
            found.insert(Key(record.values[self.schema.id].clone()), record);
        }
        Ok(())
    }

    pub(super) async fn update(
        &self,
        conn: &mut PgConnection,
        entity: &E,
        expected: Version,
    ) -> Result<Stored<E>> {
        let values = self.schema.row_of(entity)?;
        let mut args = self.row_args(&values)?;
        add_expected(&mut args, expected)?;
        self.add_now(&mut args)?;
        let row = sqlx::query_with(&self.sql.update, args)
            .fetch_optional(&mut *conn)
            .await
            .map_err(|e| self.write_error(e, || self.schema.subject(entity.id())))?;
        match row {
            Some(row) => self.stored(&row),
            None => {
                let id = values[self.schema.id].clone();
                Err(self
                    .explain_miss(
                        conn,
                        entity.id(),
                        id,
                        expected,
                        Some(Transition::SoftDelete),
                    )
                    .await)
            }
        }
    }

    pub(super) async fn upsert(&self, conn: &mut PgConnection, entity: &E) -> Result<Stored<E>> {
        self.write_row(conn, &self.sql.upsert, entity).await
    }

    pub(super) async fn transition(
        &self,
        conn: &mut PgConnection,
        id: &E::Id,
        expected: Version,
        t: Transition,
    ) -> Result<Stored<E>> {
        let id_value = self.id_value(id)?;
        let mut args = PgArguments::default();
        add(&mut args, &id_value, self.schema.id_type())?;
        add_expected(&mut args, expected)?;
        self.add_now(&mut args)?;
        let sql = match t {
            Transition::SoftDelete => &self.sql.soft_delete,
            Transition::Restore => &self.sql.restore,
        };
        let row = sqlx::query_with(sql, args)
            .fetch_optional(&mut *conn)
            .await
            .map_err(|e| self.write_error(e, || self.schema.subject(id)))?;
        match row {
            Some(row) => self.stored(&row),
            None => Err(self
                .explain_miss(conn, id, id_value, expected, Some(t))
                .await),
        }
    }

    pub(super) async fn hard_delete(
        &self,
        conn: &mut PgConnection,
        id: &E::Id,
        expected: Version,
    ) -> Result<()> {
        let id_value = self.id_value(id)?;
        let mut args = PgArguments::default();
        add(&mut args, &id_value, self.schema.id_type())?;
        add_expected(&mut args, expected)?;
        let done = sqlx::query_with(&self.sql.hard_delete, args)
            .execute(&mut *conn)
            .await
            .map_err(|e| self.write_error(e, || self.schema.subject(id)))?;
        if done.rows_affected() == 1 {
            Ok(())
        } else {
            Err(self.explain_miss(conn, id, id_value, expected, None).await)
        }
    }

    /// Says why a versioned write matched no row, with the same precedence
    /// as the in-memory repository: missing (or deleted where a live row is
    /// needed), then a version conflict, then a restore of a live row.
    /// `need` is the transition attempted (`SoftDelete` also stands for
    /// updates: both need a live row), `None` for hard deletes.
    pub(super) async fn explain_miss(
        &self,
        conn: &mut PgConnection,
        id: &E::Id,
        id_value: Value,
        expected: Version,
        need: Option<Transition>,
    ) -> RepositoryError {
        let subject = self.schema.subject(id);
        let mut args = PgArguments::default();
        if let Err(e) = add(&mut args, &id_value, self.schema.id_type()) {
            return e;
        }
        let found: Option<(i64, bool)> = match sqlx::query_as_with(&self.sql.diagnose, args)
            .fetch_optional(conn)
            .await
        {
            Ok(found) => found,
            Err(e) => return e.into(),
        };
        let Some((version, deleted)) = found else {
            return RepositoryError::NotFound { subject };
        };
        if deleted && need == Some(Transition::SoftDelete) {
            return RepositoryError::NotFound { subject };
        }
        let actual = Version::new(u64::try_from(version).unwrap_or_default());
        if actual == expected && !deleted && need == Some(Transition::Restore) {
            return RepositoryError::NotDeleted { subject };
        }
        // Either the version differs, or the row changed between the write
        // and this look: a conflict either way.
        RepositoryError::Conflict(VersionConflict {
            subject,
            expected: ExpectedVersion::Exact(expected),
            actual,
        })
    }
}

/// Adds the expected version as a parameter. Stored versions fit in
/// `BIGINT`; an expectation beyond it matches no row (`-1`), so the write
/// reports the actual version as a conflict, as the in-memory repository
/// does.
pub(super) fn add_expected(args: &mut PgArguments, expected: Version) -> Result<()> {
    let v = i64::try_from(expected.get()).unwrap_or(-1);
    add(args, &Value::I64(v), ColumnType::I64)
}

/// The server's primary message, bounded like caller input: it may quote
/// a value.
fn shown_message(e: &DatabaseError) -> String {
    let message = match e {
        DatabaseError::InvalidData { message, .. } => message.clone(),
        other => other.to_string(),
    };
    crate::error::shown(&message)
}
