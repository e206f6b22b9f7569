//! The runner: lock, history table, carry-over, checksum checks, and one
//! transaction per migration.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use sqlx::migrate::Migration;
use sqlx::postgres::PgErrorPosition;
use sqlx::{Connection, Executor, PgConnection, Row};

use super::Migrations;
use super::error::{MigrateError, MigrationId, shorten};
use super::split::{self, Statement};

/// The session advisory lock every Keel migrator takes ("keelmigr").
const LOCK_KEY: i64 = 0x6B65_656C_6D69_6772;

/// One migration to apply, with the component that owns it.
#[derive(Clone, Copy)]
pub(crate) struct Planned<'a> {
    pub(crate) component: &'static str,
    pub(crate) migration: &'a Migration,
}

impl Planned<'_> {
    fn id(&self) -> MigrationId {
        MigrationId {
            component: self.component.to_owned(),
            version: self.migration.version,
            description: self.migration.description.to_string(),
        }
    }
}

/// The migrations of `sets` in the order they apply: the base set first,
/// then everything else by version (components break ties), each set once.
pub(crate) fn plan<'a>(sets: &[&'a Migrations]) -> Result<Vec<Planned<'a>>, MigrateError> {
    let mut chosen: Vec<&'a Migrations> = Vec::new();
    for set in std::iter::once(&&super::MIGRATIONS).chain(sets) {
        set.validate()?;
        match chosen.iter().find(|c| c.component() == set.component()) {
            Some(same) if same.fingerprint() == set.fingerprint() => {}
            Some(_) => {
                return Err(MigrateError::InvalidSet {
                    component: set.component().to_owned(),
                    reason: "two different sets use this component name",
                });
            }
            None => chosen.push(set),
        }
    }
    let (base, rest) = chosen.split_at(1);
    let planned = |set: &&'a Migrations| {
        let component = set.component();
        set.iter().map(move |migration| Planned {
            component,
            migration,
        })
    };
    let mut later: Vec<Planned<'a>> = rest.iter().flat_map(planned).collect();
    later.sort_by_key(|p| (p.migration.version, p.component));
    Ok(base.iter().flat_map(planned).chain(later).collect())
}

/// Applies `plan` on `conn`, holding Keel's migration lock throughout.
pub(crate) async fn run(conn: &mut PgConnection, plan: &[Planned<'_>]) -> Result<(), MigrateError> {
    let history = |what| move |source| MigrateError::History { what, source };
    // A replica waiting for another one's long migration must not give up
    // after the pool's statement timeout.
    conn.execute("SET statement_timeout = 0")
        .await
        .map_err(history("clearing the statement timeout"))?;
    lock(conn).await?;
    let result = run_locked(conn, plan).await;
    let unlocked = sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(LOCK_KEY)
        .execute(&mut *conn)
        .await
        .map_err(history("releasing Keel's migration lock"));
    result.and(unlocked.map(drop))
}

/// Takes Keel's migration lock, polling instead of blocking in
/// `pg_advisory_lock`: a session blocked inside a statement holds a
/// snapshot, and `CREATE INDEX CONCURRENTLY` in the lock holder's
/// migration would wait for that snapshot forever (a deadlock PostgreSQL
/// breaks by failing one side). Between polls nothing runs.
async fn lock(conn: &mut PgConnection) -> Result<(), MigrateError> {
    let mut pause = Duration::from_millis(20);
    loop {
        let taken: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(LOCK_KEY)
            .fetch_one(&mut *conn)
            .await
            .map_err(|source| MigrateError::History {
                what: "taking Keel's migration lock",
                source,
            })?;
        if taken {
            return Ok(());
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(500));
    }
}

async fn run_locked(conn: &mut PgConnection, plan: &[Planned<'_>]) -> Result<(), MigrateError> {
    ensure_history_table(conn).await?;
    let moved = super::adopt::adopt(conn, plan).await?;
    if moved > 0 {
        tracing::info!(
            moved,
            "keel: carried Keel's migration history over from _sqlx_migrations to keel.schema_history"
        );
    }
    let applied = applied(conn).await?;
    // Every applied migration is checked before anything new runs.
    for p in plan {
        if let Some(checksum) = applied.get(&(p.component.to_owned(), p.migration.version))
            && checksum.as_slice() != &*p.migration.checksum
        {
            return Err(MigrateError::ChecksumMismatch { migration: p.id() });
        }
    }
    for p in plan {
        if !applied.contains_key(&(p.component.to_owned(), p.migration.version)) {
            apply(conn, p).await?;
        }
    }
    Ok(())
}

async fn ensure_history_table(conn: &mut PgConnection) -> Result<(), MigrateError> {
    let history = |what| move |source| MigrateError::History { what, source };
    // Checked first: `CREATE … IF NOT EXISTS` needs the privilege to create
    // even when the object exists, and a service may run without it.
    let (schema, table): (bool, bool) = sqlx::query_as(
        "SELECT to_regnamespace('keel') IS NOT NULL, to_regclass('keel.schema_history') IS NOT NULL",
    )
    .fetch_one(&mut *conn)
    .await
    .map_err(history("looking for keel.schema_history"))?;
    if !schema {
        conn.execute("CREATE SCHEMA IF NOT EXISTS keel")
            .await
            .map_err(history("creating schema keel"))?;
    }
    if !table {
        conn.execute(
            "CREATE TABLE IF NOT EXISTS keel.schema_history (
                 component    text        NOT NULL,
                 version      bigint      NOT NULL,
                 description  text        NOT NULL,
                 checksum     bytea       NOT NULL,
                 installed_on timestamptz NOT NULL DEFAULT now(),
                 execution_ms bigint      NOT NULL,
                 PRIMARY KEY (component, version)
             );
             COMMENT ON TABLE keel.schema_history IS
                 'Migrations applied by keel_database::migrate, apart from the service''s own history';",
        )
        .await
        .map_err(history("creating keel.schema_history"))?;
    }
    Ok(())
}

async fn applied(conn: &mut PgConnection) -> Result<HashMap<(String, i64), Vec<u8>>, MigrateError> {
    // Rows of components this binary does not link, or of versions newer
    // than it knows (a newer replica got there first), are left alone.
    let rows = sqlx::query("SELECT component, version, checksum FROM keel.schema_history")
        .fetch_all(&mut *conn)
        .await
        .map_err(|source| MigrateError::History {
            what: "reading keel.schema_history",
            source,
        })?;
    Ok(rows
        .into_iter()
        .map(|row| ((row.get(0), row.get(1)), row.get(2)))
        .collect())
}

async fn apply(conn: &mut PgConnection, p: &Planned<'_>) -> Result<(), MigrateError> {
    let started = Instant::now();
    let sql: &str = &p.migration.sql;
    let statements = split::statements(sql).unwrap_or_else(|| vec![Statement { sql, line: 1 }]);
    if p.migration.no_tx {
        for statement in &statements {
            execute(conn, p, statement).await?;
        }
        record(conn, p, started).await
    } else {
        let mut tx = conn.begin().await.map_err(|source| MigrateError::History {
            what: "starting a migration's transaction",
            source,
        })?;
        for statement in &statements {
            execute(&mut tx, p, statement).await?;
        }
        record(&mut tx, p, started).await?;
        tx.commit().await.map_err(|source| MigrateError::History {
            what: "committing a migration",
            source,
        })
    }
}

async fn execute(
    conn: &mut PgConnection,
    p: &Planned<'_>,
    statement: &Statement<'_>,
) -> Result<(), MigrateError> {
    let Err(source) = conn.execute(statement.sql).await else {
        return Ok(());
    };
    let (code, message, position) = match source.as_database_error() {
        Some(db) => {
            let pg = db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>();
            let position = pg.and_then(|pg| match pg.position() {
                Some(PgErrorPosition::Original(at)) => Some(at),
                _ => None,
            });
            (
                db.code().map(|c| c.into_owned()).unwrap_or_default(),
                db.message().to_owned(),
                position,
            )
        }
        None => (String::new(), source.to_string(), None),
    };
    // The server counts characters from 1; turn that into a line offset.
    let line = match position {
        Some(at) => {
            let byte = statement
                .sql
                .char_indices()
                .nth(at.saturating_sub(1))
                .map_or(statement.sql.len(), |(b, _)| b);
            statement.line + split::line_of(statement.sql, byte) - 1
        }
        None => statement.line,
    };
    Err(MigrateError::Failed {
        migration: p.id(),
        line,
        statement: shorten(statement.sql, 300),
        code,
        message: shorten(&message, 500),
        source,
    })
}

async fn record(
    conn: &mut PgConnection,
    p: &Planned<'_>,
    started: Instant,
) -> Result<(), MigrateError> {
    let elapsed = i64::try_from(started.elapsed().as_millis()).unwrap_or(i64::MAX);
    sqlx::query(
        "INSERT INTO keel.schema_history (component, version, description, checksum, execution_ms)
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(p.component)
    .bind(p.migration.version)
    .bind(&*p.migration.description)
    .bind(&*p.migration.checksum)
    .bind(elapsed)
    .execute(&mut *conn)
    .await
    .map_err(|source| MigrateError::History {
        what: "recording a migration in keel.schema_history",
        source,
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_send<T: Send>(_: T) {}

    // The runner's futures must be `Send`, so test kits can box them.
    #[allow(dead_code)]
    fn futures_are_send(conn: &mut PgConnection, plan: &[Planned<'_>]) {
        is_send(run(conn, plan));
    }
}
