//! The read statements: by id, by ids, existence, counts and pages.

use std::collections::BTreeMap;

use keel_core::{Deleted, Filter, ListQuery, Page, Stored};
use sqlx::postgres::PgArguments;
use sqlx::{Arguments, PgConnection, Postgres, QueryBuilder};

use super::Inner;
use super::bind::ArrayParam;
use super::sql::{push_after, push_order, push_where};
use super::write::add;
use crate::error::{RepositoryError, Result};
use crate::mapping::Mapped;
use crate::query::{PagePlan, Plan, plan_filters};
use crate::value::Key;

impl<E: Mapped> Inner<E> {
    pub(super) async fn get(
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

    pub(super) async fn get_many(
        &self,
        conn: &mut PgConnection,
        ids: &[E::Id],
    ) -> Result<Vec<Stored<E>>> {
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
            .map_err(|e| RepositoryError::from(sqlx::Error::Encode(e)))?;
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

    pub(super) async fn exists(&self, conn: &mut PgConnection, id: &E::Id) -> Result<bool> {
        let mut args = PgArguments::default();
        add(&mut args, &self.id_value(id)?, self.schema.id_type())?;
        Ok(sqlx::query_scalar_with(&self.sql.exists, args)
            .fetch_one(conn)
            .await?)
    }

    pub(super) async fn count(
        &self,
        conn: &mut PgConnection,
        filters: &[Filter],
        deleted: Deleted,
    ) -> Result<u64> {
        let conds = plan_filters(&self.schema, filters)?;
        self.count_conds(conn, &conds, deleted).await
    }

    pub(super) async fn count_conds(
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

    pub(super) async fn list(
        &self,
        conn: &mut PgConnection,
        query: &ListQuery,
    ) -> Result<Page<Stored<E>>> {
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
