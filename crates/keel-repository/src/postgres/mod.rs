//! The PostgreSQL repository.

mod bind;
mod sql;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use keel_core::{
    Clock, Deleted, EntityReader, EntityWriter, ExpectedVersion, Filter, ListQuery, Page, Stored,
    Version, VersionConflict,
};
use sqlx::postgres::{PgArguments, PgRow};
use sqlx::{Arguments, Connection, PgConnection, PgPool, Postgres, QueryBuilder};

use self::bind::{ArrayParam, Param, decode};
use self::sql::{Statements, push_after, push_order, push_where};
use crate::cursor::CursorCodec;
use crate::error::{RepositoryError, Result};
use crate::mapping::{EntityOf, Mapped, Record, Schema};
use crate::query::{DEFAULT_MAX_PAGE_SIZE, PagePlan, Plan, plan_filters};
use crate::value::{ColumnType, Key, Value, truncate_micros};

/// PostgreSQL's limit on bound parameters in one statement.
const MAX_PARAMS: usize = 65_535;
/// Rows per `INSERT` in [`insert_many`](EntityWriter::insert_many).
const MAX_ROWS_PER_INSERT: usize = 1_000;

/// The entity repository on PostgreSQL.
///
/// Implements [`EntityReader`] and [`EntityWriter`] on a pool; use
/// [`on`](PgRepository::on) to run the same operations on a connection you
/// hold, typically inside a transaction shared with other writes (an outbox
/// row, another repository). Cloning is cheap.
pub struct PgRepository<E: Mapped> {
    pool: PgPool,
    inner: Arc<Inner<E>>,
}

struct Inner<E> {
    schema: Schema,
    sql: Statements,
    clock: Option<Arc<dyn Clock>>,
    codec: CursorCodec,
    max_page_size: u32,
    _entity: EntityOf<E>,
}

impl<E> Clone for Inner<E> {
    fn clone(&self) -> Self {
        Self {
            schema: self.schema.clone(),
            sql: self.sql.clone(),
            clock: self.clock.clone(),
            codec: self.codec.clone(),
            max_page_size: self.max_page_size,
            _entity: std::marker::PhantomData,
        }
    }
}

impl<E: Mapped> Clone for PgRepository<E> {
    fn clone(&self) -> Self {
        Self {
            pool: self.pool.clone(),
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<E: Mapped> fmt::Debug for PgRepository<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgRepository")
            .field("entity", &E::NAME)
            .field("table", &self.inner.schema.table)
            .finish_non_exhaustive()
    }
}

impl<E: Mapped> PgRepository<E> {
    /// A repository on `pool`; fails when `E`'s mapping is invalid.
    /// Timestamps come from the database server (`now()`).
    pub fn new(pool: PgPool) -> Result<Self> {
        let schema = Schema::of::<E>()?;
        let sql = Statements::new(&schema, true);
        Ok(Self {
            pool,
            inner: Arc::new(Inner {
                schema,
                sql,
                clock: None,
                codec: CursorCodec::default(),
                max_page_size: DEFAULT_MAX_PAGE_SIZE,
                _entity: std::marker::PhantomData,
            }),
        })
    }

    fn configure(mut self, f: impl FnOnce(&mut Inner<E>)) -> Self {
        // Clones made before configuring keep their own settings.
        f(Arc::make_mut(&mut self.inner));
        self
    }

    /// Takes `created_at` / `updated_at` / `deleted_at` from `clock` instead
    /// of the server's `now()`; for tests that control time.
    #[must_use]
    pub fn with_clock(self, clock: Arc<dyn Clock>) -> Self {
        self.configure(|i| {
            i.sql = Statements::new(&i.schema, false);
            i.clock = Some(clock);
        })
    }

    /// Sets the largest page size accepted (default 1,000).
    #[must_use]
    pub fn with_max_page_size(self, max: u32) -> Self {
        self.configure(|i| i.max_page_size = max)
    }

    /// Signs cursors with `secret` (HMAC-SHA256) instead of the public
    /// default key, so that clients cannot forge them. Give every instance
    /// of a service the same secret.
    #[must_use]
    pub fn with_cursor_secret(self, secret: impl AsRef<[u8]>) -> Self {
        self.configure(|i| i.codec = CursorCodec::with_secret(secret.as_ref()))
    }

    /// The pool this repository uses.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The same operations on `conn`, for example a transaction's connection
    /// (`repo.on(&mut tx)`), so that they commit or roll back with the
    /// caller's other writes.
    ///
    /// As always in PostgreSQL, a statement that fails with a database error
    /// (a duplicate id, say) aborts the surrounding transaction; version
    /// conflicts and not-found results do not.
    pub fn on<'c>(&self, conn: &'c mut PgConnection) -> OnConnection<'c, E> {
        OnConnection {
            inner: Arc::clone(&self.inner),
            conn,
        }
    }

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

    async fn conn(&self) -> Result<sqlx::pool::PoolConnection<Postgres>> {
        Ok(self.pool.acquire().await?)
    }
}

/// A [`PgRepository`]'s operations bound to one connection (see
/// [`PgRepository::on`]). Errors are [`RepositoryError`]s, which convert
/// into [`keel_core::Error`] with `?`.
pub struct OnConnection<'c, E: Mapped> {
    inner: Arc<Inner<E>>,
    conn: &'c mut PgConnection,
}

impl<E: Mapped> fmt::Debug for OnConnection<'_, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OnConnection")
            .field("entity", &E::NAME)
            .finish_non_exhaustive()
    }
}

impl<E: Mapped> OnConnection<'_, E> {
    /// See [`EntityWriter::insert`].
    pub async fn insert(&mut self, entity: E) -> Result<Stored<E>> {
        self.inner.insert(self.conn, &entity).await
    }

    /// See [`EntityWriter::insert_many`].
    pub async fn insert_many(&mut self, entities: Vec<E>) -> Result<Vec<Stored<E>>> {
        self.inner.insert_many(self.conn, &entities).await
    }

    /// See [`EntityWriter::update`].
    pub async fn update(&mut self, entity: E, expected: Version) -> Result<Stored<E>> {
        self.inner.update(self.conn, &entity, expected).await
    }

    /// See [`EntityWriter::upsert`].
    pub async fn upsert(&mut self, entity: E) -> Result<Stored<E>> {
        self.inner.upsert(self.conn, &entity).await
    }

    /// See [`EntityWriter::soft_delete`].
    pub async fn soft_delete(&mut self, id: &E::Id, expected: Version) -> Result<Stored<E>> {
        self.inner
            .transition(self.conn, id, expected, Transition::SoftDelete)
            .await
    }

    /// See [`EntityWriter::restore`].
    pub async fn restore(&mut self, id: &E::Id, expected: Version) -> Result<Stored<E>> {
        self.inner
            .transition(self.conn, id, expected, Transition::Restore)
            .await
    }

    /// See [`EntityWriter::hard_delete`].
    pub async fn hard_delete(&mut self, id: &E::Id, expected: Version) -> Result<()> {
        self.inner.hard_delete(self.conn, id, expected).await
    }

    /// See [`EntityReader::get`].
    pub async fn get(&mut self, id: &E::Id) -> Result<Option<Stored<E>>> {
        self.inner.get(self.conn, id, false).await
    }

    /// See [`EntityReader::get_including_deleted`].
    pub async fn get_including_deleted(&mut self, id: &E::Id) -> Result<Option<Stored<E>>> {
        self.inner.get(self.conn, id, true).await
    }

    /// See [`EntityReader::get_many`].
    pub async fn get_many(&mut self, ids: &[E::Id]) -> Result<Vec<Stored<E>>> {
        self.inner.get_many(self.conn, ids).await
    }

    /// See [`EntityReader::exists`].
    pub async fn exists(&mut self, id: &E::Id) -> Result<bool> {
        self.inner.exists(self.conn, id).await
    }

    /// See [`EntityReader::count`].
    pub async fn count(&mut self, filters: &[Filter], deleted: Deleted) -> Result<u64> {
        self.inner.count(self.conn, filters, deleted).await
    }

    /// See [`EntityReader::list`].
    pub async fn list(&mut self, query: &ListQuery) -> Result<Page<Stored<E>>> {
        self.inner.list(self.conn, query).await
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Transition {
    SoftDelete,
    Restore,
}

fn add(args: &mut PgArguments, value: &Value, ty: ColumnType) -> Result<()> {
    args.add(Param(value, ty))
        .map_err(|e| RepositoryError::Database(sqlx::Error::Encode(e)))
}

impl<E: Mapped> Inner<E> {
    fn now(&self) -> Option<DateTime<Utc>> {
        self.clock.as_ref().map(|c| truncate_micros(c.now()))
    }

    fn id_value(&self, id: &E::Id) -> Result<Value> {
        self.schema.check_id(E::id_value(id))
    }

    fn record(&self, row: &PgRow) -> Result<Record> {
        decode(&self.schema, row)
    }

    fn stored(&self, row: &PgRow) -> Result<Stored<E>> {
        self.record(row)?.into_stored(&self.schema)
    }

    /// Classifies a failed write: duplicates by SQLSTATE 23505 and the
    /// constraint's name, refused data by SQLSTATE class 22/23.
    fn write_error(&self, e: sqlx::Error, subject: impl FnOnce() -> String) -> RepositoryError {
        if let sqlx::Error::Database(db) = &e {
            if db.is_unique_violation() {
                return RepositoryError::AlreadyExists {
                    subject: subject(),
                    constraint: db.constraint().map(str::to_owned),
                };
            }
            if let Some(code) = db.code()
                && (code.starts_with("22") || code.starts_with("23"))
            {
                return RepositoryError::Rejected {
                    entity: self.schema.entity,
                    sqlstate: code.into_owned(),
                    message: db.message().to_owned(),
                    constraint: db.constraint().map(str::to_owned),
                };
            }
        }
        RepositoryError::Database(e)
    }

    fn row_args(&self, values: &[Value]) -> Result<PgArguments> {
        let mut args = PgArguments::default();
        for (v, c) in values.iter().zip(&self.schema.columns) {
            add(&mut args, v, c.ty)?;
        }
        Ok(args)
    }

    fn add_now(&self, args: &mut PgArguments) -> Result<()> {
        if let Some(now) = self.now() {
            add(args, &Value::Timestamp(now), ColumnType::Timestamp)?;
        }
        Ok(())
    }

    async fn insert(&self, conn: &mut PgConnection, entity: &E) -> Result<Stored<E>> {
        self.write_row(conn, &self.sql.insert, entity).await
    }

    /// Runs `statement` (the insert or the upsert) with the entity's row
    /// and the clock's time, and returns the stored row.
    async fn write_row(
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

    async fn insert_many(&self, conn: &mut PgConnection, entities: &[E]) -> Result<Vec<Stored<E>>> {
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

    async fn insert_chunk(
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

    async fn update(
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

    async fn upsert(&self, conn: &mut PgConnection, entity: &E) -> Result<Stored<E>> {
        self.write_row(conn, &self.sql.upsert, entity).await
    }

    async fn transition(
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

    async fn hard_delete(
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
    async fn explain_miss(
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

    async fn get(
        &self,
        conn: &mut PgConnection,
        id: &E::Id,
        any: bool,
    ) -> Result<Option<Stored<E>>> {
        let mut args = PgArguments::default();
        add(&mut args, &self.id_value(id)?, self.schema.id_type())?;
        let sql = if any {
            &self.sql.get_any
        } else {
            &self.sql.get_live
        };
        let row = sqlx::query_with(sql, args).fetch_optional(conn).await?;
        row.map(|r| self.stored(&r)).transpose()
    }

    async fn get_many(&self, conn: &mut PgConnection, ids: &[E::Id]) -> Result<Vec<Stored<E>>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys = ids
            .iter()
            .map(|id| self.id_value(id))
            .collect::<Result<Vec<_>>>()?;
        // One typed array parameter: the statement text is the same for
        // any number of ids.
        let mut args = PgArguments::default();
        args.add(ArrayParam(&keys, self.schema.id_type()))
            .map_err(|e| RepositoryError::Database(sqlx::Error::Encode(e)))?;
        let rows = sqlx::query_with(&self.sql.get_many, args)
            .fetch_all(conn)
            .await?;
        let mut found = BTreeMap::new();
        for row in rows {
            let record = self.record(&row)?;
            found.insert(Key(record.values[self.schema.id].clone()), record);
        }
        keys.into_iter()
            .filter_map(|k| found.remove(&Key(k)))
            .map(|r| r.into_stored(&self.schema))
            .collect()
    }

    async fn exists(&self, conn: &mut PgConnection, id: &E::Id) -> Result<bool> {
        let mut args = PgArguments::default();
        add(&mut args, &self.id_value(id)?, self.schema.id_type())?;
        Ok(sqlx::query_scalar_with(&self.sql.exists, args)
            .fetch_one(conn)
            .await?)
    }

    async fn count(
        &self,
        conn: &mut PgConnection,
        filters: &[Filter],
        deleted: Deleted,
    ) -> Result<u64> {
        let conds = plan_filters(&self.schema, filters)?;
        self.count_conds(conn, &conds, deleted).await
    }

    async fn count_conds(
        &self,
        conn: &mut PgConnection,
        conds: &[crate::query::Cond],
        deleted: Deleted,
    ) -> Result<u64> {
        let mut qb =
            QueryBuilder::<Postgres>::new(format!("SELECT count(*) FROM {}", self.sql.table));
        push_where(&mut qb, &self.schema, deleted, conds);
        let n: i64 = qb.build_query_scalar().fetch_one(conn).await?;
        Ok(u64::try_from(n).unwrap_or_default())
    }

    async fn list(&self, conn: &mut PgConnection, query: &ListQuery) -> Result<Page<Stored<E>>> {
        let plan = Plan::new(&self.schema, query, self.max_page_size, &self.codec)?;
        let mut qb = QueryBuilder::<Postgres>::new(format!(
            "SELECT {} FROM {}",
            self.sql.select, self.sql.table
        ));
        push_where(&mut qb, &self.schema, plan.deleted, &plan.conds);
        match &plan.page {
            PagePlan::Offset { offset, size } => {
                push_order(&mut qb, &self.schema, &plan);
                qb.push(" LIMIT ").push_bind(i64::from(*size));
                qb.push(" OFFSET ")
                    .push_bind(i64::try_from(*offset).unwrap_or(i64::MAX));
                let rows = qb.build().fetch_all(&mut *conn).await?;
                let items = rows
                    .iter()
                    .map(|r| self.stored(r))
                    .collect::<Result<Vec<_>>>()?;
                let total = self.count_conds(conn, &plan.conds, plan.deleted).await?;
                Ok(Page::new(items, Some(total), None))
            }
            PagePlan::Keyset { after, size } => {
                if let Some(key) = after {
                    push_after(&mut qb, &self.schema, &plan, key);
                }
                push_order(&mut qb, &self.schema, &plan);
                qb.push(" LIMIT ").push_bind(i64::from(*size) + 1);
                let rows = qb.build().fetch_all(&mut *conn).await?;
                let mut records = rows
                    .iter()
                    .map(|r| self.record(r))
                    .collect::<Result<Vec<_>>>()?;
                let next = if records.len() > *size as usize {
                    records.truncate(*size as usize);
                    let last = records.last().map(|r| plan.key_of(r)).unwrap_or_default();
                    Some(self.codec.encode(&plan.fingerprint, &last)?)
                } else {
                    None
                };
                let items = records
                    .into_iter()
                    .map(|r| r.into_stored(&self.schema))
                    .collect::<Result<Vec<_>>>()?;
                Ok(Page::new(items, None, next))
            }
        }
    }
}

/// Adds the expected version as a parameter. Stored versions fit in
/// `BIGINT`; an expectation beyond it matches no row (`-1`), so the write
/// reports the actual version as a conflict, as the in-memory repository
/// does.
fn add_expected(args: &mut PgArguments, expected: Version) -> Result<()> {
    let v = i64::try_from(expected.get()).unwrap_or(-1);
    add(args, &Value::I64(v), ColumnType::I64)
}

/// Maps a database failure onto the port's error: connection trouble,
/// shutdowns, serialization failures and deadlocks are retryable
/// `Unavailable`; everything else is `Internal`. Decided by error variant
/// and SQLSTATE, never by message text.
pub(crate) fn classify(e: sqlx::Error) -> keel_core::Error {
    let retryable = match &e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|c| {
            c.starts_with("08") // connection exception
                || c.starts_with("53") // insufficient resources
                || matches!(&*c, "40001" | "40P01" | "57P01" | "57P02" | "57P03" | "57014")
        }),
        _ => false,
    };
    if retryable {
        keel_core::Error::unavailable("postgres", e.to_string(), e)
    } else {
        keel_core::Error::internal("database error", e)
    }
}

#[async_trait]
impl<E: Mapped> EntityReader<E> for PgRepository<E> {
    async fn get(&self, id: &E::Id) -> keel_core::Result<Option<Stored<E>>> {
        Ok(self.inner.get(&mut *self.conn().await?, id, false).await?)
    }

    async fn get_including_deleted(&self, id: &E::Id) -> keel_core::Result<Option<Stored<E>>> {
        Ok(self.inner.get(&mut *self.conn().await?, id, true).await?)
    }

    async fn get_many(&self, ids: &[E::Id]) -> keel_core::Result<Vec<Stored<E>>> {
        Ok(self.inner.get_many(&mut *self.conn().await?, ids).await?)
    }

    async fn exists(&self, id: &E::Id) -> keel_core::Result<bool> {
        Ok(self.inner.exists(&mut *self.conn().await?, id).await?)
    }

    async fn count(&self, filters: &[Filter], deleted: Deleted) -> keel_core::Result<u64> {
        Ok(self
            .inner
            .count(&mut *self.conn().await?, filters, deleted)
            .await?)
    }

    async fn list(&self, query: &ListQuery) -> keel_core::Result<Page<Stored<E>>> {
        Ok(self.inner.list(&mut *self.conn().await?, query).await?)
    }
}

#[async_trait]
impl<E: Mapped> EntityWriter<E> for PgRepository<E> {
    async fn insert(&self, entity: E) -> keel_core::Result<Stored<E>> {
        Ok(self.inner.insert(&mut *self.conn().await?, &entity).await?)
    }

    async fn insert_many(&self, entities: Vec<E>) -> keel_core::Result<Vec<Stored<E>>> {
        Ok(self
            .inner
            .insert_many(&mut *self.conn().await?, &entities)
            .await?)
    }

    async fn update(&self, entity: E, expected: Version) -> keel_core::Result<Stored<E>> {
        Ok(self
            .inner
            .update(&mut *self.conn().await?, &entity, expected)
            .await?)
    }

    async fn upsert(&self, entity: E) -> keel_core::Result<Stored<E>> {
        Ok(self.inner.upsert(&mut *self.conn().await?, &entity).await?)
    }

    async fn soft_delete(&self, id: &E::Id, expected: Version) -> keel_core::Result<Stored<E>> {
        Ok(self
            .inner
            .transition(
                &mut *self.conn().await?,
                id,
                expected,
                Transition::SoftDelete,
            )
            .await?)
    }

    async fn restore(&self, id: &E::Id, expected: Version) -> keel_core::Result<Stored<E>> {
        Ok(self
            .inner
            .transition(&mut *self.conn().await?, id, expected, Transition::Restore)
            .await?)
    }

    async fn hard_delete(&self, id: &E::Id, expected: Version) -> keel_core::Result<()> {
        Ok(self
            .inner
            .hard_delete(&mut *self.conn().await?, id, expected)
            .await?)
    }
}
