//! A fresh PostgreSQL database per test, cloned from a migrated template.

use std::fmt;

use sha2::{Digest, Sha256};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, Executor, PgConnection, PgPool};

use crate::Error;
use crate::schema::Schema;

/// The advisory lock (on the server's `postgres` database) held while a
/// template is looked for, built, or dropped.
const TEMPLATE_LOCK: i64 = 7_343_209_821;

/// The prefix of every template database the kit builds.
pub const TEMPLATE_PREFIX: &str = "keel_tpl_";

/// A database created for one test from a template that already has the
/// migrations applied, and dropped when this value is dropped.
///
/// The server comes from [`services::postgres_url`](crate::services::postgres_url).
/// The template (`keel_tpl_<hash of the migrations>`) is built once per
/// server and set of migrations, under an advisory lock so that concurrent
/// test processes build it once; each test then gets a copy
/// (`CREATE DATABASE … TEMPLATE …`), which takes milliseconds.
///
/// Templates stay on the server between runs (the next run reuses them).
/// [`TestDatabase::drop_templates`], or the command
/// `cargo run -p keel-testkit --bin keel-testkit-clean`, removes them; on a
/// server the kit started itself they go with the server.
///
/// ```no_run
/// # static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate::Migrator::DEFAULT;
/// # async fn example() -> keel_testkit::Result<()> {
/// let db = keel_testkit::TestDatabase::create(&MIGRATOR).await?;
/// let one: i32 = sqlx::query_scalar("SELECT 1").fetch_one(db.pool()).await?;
/// # Ok(()) }
/// ```
pub struct TestDatabase {
    name: String,
    options: PgConnectOptions,
    pool: PgPool,
}

impl fmt::Debug for TestDatabase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestDatabase")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl TestDatabase {
    /// Creates a database with `schema`'s migrations applied: a sqlx
    /// [`Migrator`](sqlx::migrate::Migrator), Keel's sets
    /// (`&keel_eventstore::MIGRATIONS`, with keel-database's `testkit`
    /// feature), or an array of them (see [`Schema`]).
    pub async fn create<S: Schema + ?Sized>(schema: &S) -> Result<Self, Error> {
        let server: PgConnectOptions = crate::services::postgres_url().await?.parse()?;
        let admin_opts = server.clone().database("postgres");
        let mut admin = PgConnection::connect_with(&admin_opts).await?;

        let template = template_name(&schema.fingerprint());
        let name = format!("keel_test_{}", uuid::Uuid::new_v4().simple());
        // A template dropped by `keel-testkit-clean` between the check and
        // the copy is built again, once.
        let mut attempts = 0;
        loop {
            attempts += 1;
            // One creator at a time, across processes: the lock is held
            // while the template is checked for and, if missing, built.
            sqlx::query("SELECT pg_advisory_lock($1)")
                .bind(TEMPLATE_LOCK)
                .execute(&mut admin)
                .await?;
            let built = ensure_template(&mut admin, &admin_opts, &template, schema).await;
            sqlx::query("SELECT pg_advisory_unlock($1)")
                .bind(TEMPLATE_LOCK)
                .execute(&mut admin)
                .await?;
            built?;
            let copied = admin
                .execute(format!(r#"CREATE DATABASE "{name}" TEMPLATE "{template}""#).as_str())
                .await;
            match copied {
                Ok(_) => break,
                Err(e) if attempts < 2 && is_missing_database(&e) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        admin.close().await?;

        let options = server.database(&name);
        let pool = PgPoolOptions::new()
            .max_connections(20)
            .after_release(|conn, _| Box::pin(release_check(conn)))
            .connect_with(options.clone())
            .await?;
        Ok(Self {
            name,
            options,
            pool,
        })
    }

    /// Drops every template database (`keel_tpl_*`) on the server the kit
    /// uses (`DATABASE_URL` or the default local one; never one the kit
    /// would start), and the per-test databases (`keel_test_*`) that
    /// crashed tests left behind and nobody is connected to. Returns the
    /// names dropped. Tests running meanwhile rebuild what they need.
    pub async fn drop_templates() -> Result<Vec<String>, Error> {
        let found = crate::services::Discovery::from_env()
            .start_local(false)
            .containers(false)
            .find(crate::services::Service::Postgres)
            .await?;
        Self::drop_templates_at(found.connection_string()).await
    }

    /// [`drop_templates`](Self::drop_templates) on the server at `url`.
    pub async fn drop_templates_at(url: &str) -> Result<Vec<String>, Error> {
        let server: PgConnectOptions = url.parse()?;
        let mut admin = PgConnection::connect_with(&server.database("postgres")).await?;
        sqlx::query("SELECT pg_advisory_lock($1)")
            .bind(TEMPLATE_LOCK)
            .execute(&mut admin)
            .await?;
        let dropped = drop_matching(&mut admin).await;
        sqlx::query("SELECT pg_advisory_unlock($1)")
            .bind(TEMPLATE_LOCK)
            .execute(&mut admin)
            .await?;
        admin.close().await?;
        dropped
    }

    /// A pool connected to this test's database.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Connection options for this test's database.
    pub fn connect_options(&self) -> PgConnectOptions {
        self.options.clone()
    }

    /// The connection URL of this test's database.
    pub fn url(&self) -> String {
        self.options.to_url_lossy().to_string()
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// Keeps a connection on release only if it is outside any transaction:
/// the check `keel_database::close_unclean_connections` gives production
/// pools (a `BEGIN` cancelled in flight leaves a connection inside a
/// transaction that sqlx does not know about), repeated here because
/// `keel-database` depends on this crate, so test pools behave like the
/// pools the adapters get in production. Simple-query text on purpose: see
/// the reasoning in keel-database's `release.rs`.
async fn release_check(conn: &mut PgConnection) -> Result<bool, sqlx::Error> {
    let answer = conn
        .fetch_one("SELECT transaction_timestamp() = statement_timestamp()")
        .await
        .and_then(|row| sqlx::Row::try_get::<bool, _>(&row, 0));
    match answer {
        Err(sqlx::Error::Database(_)) => Ok(false),
        other => other,
    }
}

fn template_name(fingerprint: &[u8]) -> String {
    let hash = Sha256::new().chain_update(fingerprint);
    let digest = hash.finalize();
    let hex: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    format!("{TEMPLATE_PREFIX}{hex}")
}

/// `3D000`: the database (here: the template) does not exist.
fn is_missing_database(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .and_then(|db| db.code())
        .is_some_and(|code| code == "3D000")
}

async fn drop_matching(admin: &mut PgConnection) -> Result<Vec<String>, Error> {
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT datname FROM pg_database
         WHERE starts_with(datname, 'keel_tpl_') OR starts_with(datname, 'keel_test_')
         ORDER BY datname",
    )
    .fetch_all(&mut *admin)
    .await?;
    let mut dropped = Vec::new();
    for name in names {
        // No FORCE: a database someone is connected to (a test running
        // now) is left alone.
        let sql = format!(r#"DROP DATABASE IF EXISTS "{name}""#);
        if admin.execute(sql.as_str()).await.is_ok() {
            dropped.push(name);
        }
    }
    Ok(dropped)
}

async fn ensure_template<S: Schema + ?Sized>(
    admin: &mut PgConnection,
    admin_opts: &PgConnectOptions,
    template: &str,
    schema: &S,
) -> Result<(), Error> {
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(template)
            .fetch_one(&mut *admin)
            .await?;
    if exists {
        return Ok(());
    }
    admin
        .execute(format!(r#"CREATE DATABASE "{template}""#).as_str())
        .await?;
    let mut conn = PgConnection::connect_with(&admin_opts.clone().database(template)).await?;
    let migrated = schema.apply(&mut conn).await;
    conn.close().await?;
    if let Err(e) = migrated {
        admin
            .execute(format!(r#"DROP DATABASE IF EXISTS "{template}""#).as_str())
            .await?;
        return Err(match e.downcast::<sqlx::migrate::MigrateError>() {
            Ok(sqlx_error) => Error::Migrate(*sqlx_error),
            Err(other) => Error::Schema(other),
        });
    }
    Ok(())
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let name = self.name.clone();
        let admin_opts = self.options.clone().database("postgres");
        // Drop runs outside any async context we may block on, so the
        // database is dropped from a short-lived thread with its own runtime.
        let handle = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            if let Ok(rt) = rt {
                rt.block_on(async move {
                    if let Ok(mut admin) = PgConnection::connect_with(&admin_opts).await {
                        let _ = admin
                            .execute(
                                format!(r#"DROP DATABASE IF EXISTS "{name}" WITH (FORCE)"#)
                                    .as_str(),
                            )
                            .await;
                        let _ = admin.close().await;
                    }
                });
            }
        });
        let _ = handle.join();
    }
}
