//! A fresh PostgreSQL database per test, cloned from a migrated template.

use std::fmt;

use sha2::{Digest, Sha256};
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, Executor, PgConnection, PgPool};

use crate::Error;

/// A database created for one test from a template that already has the
/// migrations applied, and dropped when this value is dropped.
///
/// The server comes from [`services::postgres_url`](crate::services::postgres_url).
/// The template (`keel_tpl_<hash of the migrations>`) is built once per
/// server and set of migrations, under an advisory lock so that concurrent
/// test processes build it once; each test then gets a copy
/// (`CREATE DATABASE … TEMPLATE …`), which takes milliseconds.
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
    /// Creates a database with `migrator`'s migrations applied.
    pub async fn create(migrator: &Migrator) -> Result<Self, Error> {
        let server: PgConnectOptions = crate::services::postgres_url().await?.parse()?;
        let admin_opts = server.clone().database("postgres");
        let mut admin = PgConnection::connect_with(&admin_opts).await?;

        let template = template_name(migrator);
        // One creator at a time, across processes: the lock is held while the
        // template is checked for and, if missing, built.
        admin.execute("SELECT pg_advisory_lock(7343209821)").await?;
        let built = ensure_template(&mut admin, &admin_opts, &template, migrator).await;
        admin
            .execute("SELECT pg_advisory_unlock(7343209821)")
            .await?;
        built?;

        let name = format!("keel_test_{}", uuid::Uuid::new_v4().simple());
        admin
            .execute(format!(r#"CREATE DATABASE "{name}" TEMPLATE "{template}""#).as_str())
            .await?;
        admin.close().await?;

        let options = server.database(&name);
        let pool = PgPoolOptions::new()
            .max_connections(20)
            .connect_with(options.clone())
            .await?;
        Ok(Self {
            name,
            options,
            pool,
        })
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

fn template_name(migrator: &Migrator) -> String {
    let mut hash = Sha256::new();
    for m in migrator.iter() {
        hash.update(m.version.to_le_bytes());
        hash.update(&*m.checksum);
    }
    let digest = hash.finalize();
    let hex: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    format!("keel_tpl_{hex}")
}

async fn ensure_template(
    admin: &mut PgConnection,
    admin_opts: &PgConnectOptions,
    template: &str,
    migrator: &Migrator,
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
    let migrated = migrator.run_direct(&mut conn).await;
    conn.close().await?;
    if let Err(e) = migrated {
        admin
            .execute(format!(r#"DROP DATABASE IF EXISTS "{template}""#).as_str())
            .await?;
        return Err(e.into());
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
