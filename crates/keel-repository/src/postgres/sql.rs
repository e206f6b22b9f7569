//! SQL text, generated once per repository from the validated mapping, and
//! the query builder for lists and counts.
//!
//! Identifiers come only from the mapping (validated as lower-case
//! identifiers, then double-quoted); every value is a bound parameter.
//!
//! Why this SQL is built at run time rather than with sqlx's checked
//! `query!` macros, which Keel uses for its fixed-schema statements: the
//! column set comes from the service's [`Mapped`](crate::Mapped) impl, so
//! no statement text exists when this crate compiles, and the filters,
//! sort keys and page of a list are chosen per call, so the `WHERE` and
//! `ORDER BY` clauses differ from one call to the next. What stands in for
//! the compile-time check: names are looked up in the validated mapping
//! (an unknown one is refused, never pasted), values are typed parameters,
//! and `verify_schema` compares the live table with the mapping.

use keel_core::{Deleted, Direction};
use sqlx::{Postgres, QueryBuilder};

use super::bind::{ArrayParam, Param};
use crate::mapping::{Schema, quote, quote_path};
use crate::query::{Cond, Plan};
use crate::value::{ColumnType, Value};

/// The fixed statements of one repository.
#[derive(Clone, Debug)]
pub(crate) struct Statements {
    pub(crate) select: String,
    pub(crate) table: String,
    pub(crate) get_live: String,
    pub(crate) get_any: String,
    pub(crate) get_many: String,
    pub(crate) exists: String,
    pub(crate) diagnose: String,
    pub(crate) insert: String,
    pub(crate) update: String,
    pub(crate) upsert: String,
    pub(crate) soft_delete: String,
    pub(crate) restore: String,
    pub(crate) hard_delete: String,
}

impl Statements {
    pub(crate) fn new(schema: &Schema, server_time: bool) -> Self {
        let table = quote_path(&schema.table);
        let cols: Vec<String> = schema.columns.iter().map(|c| quote(&c.name)).collect();
        let n = cols.len();
        let id = &cols[schema.id];
        let id_pos = schema.id + 1;
        let select = format!(
            "{}, \"version\", \"created_at\", \"updated_at\", \"deleted_at\"",
            cols.join(", ")
        );
        // The time parameter comes after the others; `now()` is the
        // transaction's start time, the same for every row it writes.
        let ts = |pos: usize| {
            if server_time {
                "now()".to_owned()
            } else {
                format!("${pos}")
            }
        };
        let placeholders: Vec<String> = (1..=n).map(|i| format!("${i}")).collect();
        let insert = format!(
            "INSERT INTO {table} AS cur ({}, \"version\", \"created_at\", \"updated_at\", \
             \"deleted_at\") VALUES ({}, 1, {t}, {t}, NULL)",
            cols.join(", "),
            placeholders.join(", "),
            t = ts(n + 1),
        );
        let assignments: Vec<String> = cols
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != schema.id)
            .map(|(i, c)| format!("{c} = ${}", i + 1))
            .collect();
        let excluded: Vec<String> = cols
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != schema.id)
            .map(|(_, c)| format!("{c} = EXCLUDED.{c}"))
            .collect();
        let mut set_update = assignments.clone();
        set_update.push("\"version\" = \"version\" + 1".into());
        set_update.push(format!("\"updated_at\" = {}", ts(n + 2)));
        let mut set_upsert = excluded;
        set_upsert.extend([
            "\"version\" = cur.\"version\" + 1".to_owned(),
            "\"updated_at\" = EXCLUDED.\"updated_at\"".to_owned(),
            "\"deleted_at\" = NULL".to_owned(),
        ]);
        Statements {
            get_live: format!(
                "SELECT {select} FROM {table} WHERE {id} = $1 AND \"deleted_at\" IS NULL"
            ),
            get_any: format!("SELECT {select} FROM {table} WHERE {id} = $1"),
            get_many: format!(
                "SELECT {select} FROM {table} WHERE {id} = ANY($1) AND \"deleted_at\" IS NULL"
            ),
            exists: format!(
                "SELECT EXISTS (SELECT 1 FROM {table} WHERE {id} = $1 AND \"deleted_at\" IS NULL)"
            ),
            diagnose: format!(
                "SELECT \"version\", \"deleted_at\" IS NOT NULL FROM {table} WHERE {id} = $1"
            ),
            upsert: format!(
                "{insert} ON CONFLICT ({id}) DO UPDATE SET {} RETURNING {select}",
                set_upsert.join(", ")
            ),
            insert: format!("{insert} RETURNING {select}"),
            update: format!(
                "UPDATE {table} SET {} WHERE {id} = ${id_pos} AND \"version\" = ${} \
                 AND \"deleted_at\" IS NULL RETURNING {select}",
                set_update.join(", "),
                n + 1
            ),
            soft_delete: format!(
                "UPDATE {table} SET \"deleted_at\" = {t}, \"updated_at\" = {t}, \
                 \"version\" = \"version\" + 1 WHERE {id} = $1 AND \"version\" = $2 \
                 AND \"deleted_at\" IS NULL RETURNING {select}",
                t = ts(3)
            ),
            restore: format!(
                "UPDATE {table} SET \"deleted_at\" = NULL, \"updated_at\" = {t}, \
                 \"version\" = \"version\" + 1 WHERE {id} = $1 AND \"version\" = $2 \
                 AND \"deleted_at\" IS NOT NULL RETURNING {select}",
                t = ts(3)
            ),
            hard_delete: format!("DELETE FROM {table} WHERE {id} = $1 AND \"version\" = $2"),
            select,
            table,
        }
    }
}

/// A field as an SQL expression: its quoted name, with the `"C"` collation
/// for text so that ordering is byte-wise whatever the database's locale.
pub(crate) fn field_sql(schema: &Schema, f: usize) -> String {
    let field = &schema.fields[f];
    if field.ty == ColumnType::Text {
        format!("{} COLLATE \"C\"", quote(&field.name))
    } else {
        quote(&field.name)
    }
}

/// Escapes `\`, `%` and `_` so that a prefix matches literally under
/// `LIKE … ESCAPE '\'`.
pub(crate) fn like_prefix(prefix: &str) -> String {
    let mut out = String::with_capacity(prefix.len() + 1);
    for c in prefix.chars() {
        if matches!(c, '\\' | '%' | '_') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('%');
    out
}

/// Appends ` WHERE …` for a scope and conditions.
pub(crate) fn push_where<'a>(
    qb: &mut QueryBuilder<'a, Postgres>,
    schema: &Schema,
    deleted: Deleted,
    conds: &'a [Cond],
) {
    qb.push(match deleted {
        Deleted::Exclude => " WHERE \"deleted_at\" IS NULL",
        Deleted::Include => " WHERE TRUE",
        Deleted::Only => " WHERE \"deleted_at\" IS NOT NULL",
    });
    for cond in conds {
        qb.push(" AND ");
        match cond {
            // Equality, in-lists and prefixes mean the same under any
            // deterministic collation, so they keep the column's own, which
            // lets its indexes serve them.
            Cond::Eq(f, v) => {
                qb.push(quote(&schema.fields[*f].name)).push(" = ");
                qb.push_bind(Param(v, schema.fields[*f].ty));
            }
            Cond::Range(f, low, high) => {
                qb.push("(TRUE");
                if let Some(low) = low {
                    qb.push(" AND ").push(field_sql(schema, *f)).push(" >= ");
                    qb.push_bind(Param(low, schema.fields[*f].ty));
                }
                if let Some(high) = high {
                    qb.push(" AND ").push(field_sql(schema, *f)).push(" <= ");
                    qb.push_bind(Param(high, schema.fields[*f].ty));
                }
                qb.push(")");
            }
            Cond::In(f, values) => {
                qb.push(quote(&schema.fields[*f].name)).push(" = ANY(");
                qb.push_bind(ArrayParam(values, schema.fields[*f].ty));
                qb.push(")");
            }
            Cond::Prefix(f, prefix) => {
                qb.push(quote(&schema.fields[*f].name)).push(" LIKE ");
                qb.push_bind(like_prefix(prefix));
                qb.push(" ESCAPE '\\'");
            }
        }
    }
}

/// Appends the keyset condition "after `key` in the plan's order".
pub(crate) fn push_after<'a>(
    qb: &mut QueryBuilder<'a, Postgres>,
    schema: &Schema,
    plan: &Plan,
    key: &'a [Value],
) {
    let first = plan.sort[0].1;
    if plan.sort.iter().all(|(_, d)| *d == first) {
        // One direction: a row comparison, which a matching index serves.
        qb.push(" AND (");
        let mut fields = qb.separated(", ");
        for (f, _) in &plan.sort {
            fields.push(field_sql(schema, *f));
        }
        qb.push(if first == Direction::Asc {
            ") > ("
        } else {
            ") < ("
        });
        let mut values = qb.separated(", ");
        for ((f, _), v) in plan.sort.iter().zip(key) {
            values.push_bind(Param(v, schema.fields[*f].ty));
        }
        qb.push(")");
        return;
    }
    // Mixed directions: (a > x) OR (a = x AND b < y) OR …
    qb.push(" AND (FALSE");
    for i in 0..plan.sort.len() {
        qb.push(" OR (TRUE");
        for (j, ((f, dir), v)) in plan.sort.iter().zip(key).enumerate().take(i + 1) {
            let op = if j < i {
                " = "
            } else if *dir == Direction::Asc {
                " > "
            } else {
                " < "
            };
            qb.push(" AND ").push(field_sql(schema, *f)).push(op);
            qb.push_bind(Param(v, schema.fields[*f].ty));
        }
        qb.push(")");
    }
    qb.push(")");
}

/// Appends ` ORDER BY …` for the plan's sort keys.
pub(crate) fn push_order(qb: &mut QueryBuilder<'_, Postgres>, schema: &Schema, plan: &Plan) {
    qb.push(" ORDER BY ");
    let mut keys = qb.separated(", ");
    for (f, dir) in &plan.sort {
        keys.push(format!(
            "{} {}",
            field_sql(schema, *f),
            if *dir == Direction::Asc {
                "ASC"
            } else {
                "DESC"
            }
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn like_metacharacters_are_escaped() {
        assert_eq!(like_prefix("50%_off\\"), "50\\%\\_off\\\\%");
        assert_eq!(like_prefix(""), "%");
    }
}
