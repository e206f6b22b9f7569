//! Keel's migrations, kept apart from the service's own.
//!
//! Each Keel crate that stores data owns its migrations as one
//! [`Migrations`] set (`keel_eventstore::MIGRATIONS`,
//! `keel_outbox::MIGRATIONS`, `keel_security::MIGRATIONS`); this crate owns
//! the base set ([`MIGRATIONS`]: schema `keel`), which every call applies
//! first. A service applies the sets of the crates it links in one call:
//!
//! ```no_run
//! # async fn run(pool: sqlx::PgPool) -> Result<(), keel_database::DatabaseError> {
//! # static EVENTSTORE: keel_database::Migrations =
//! #     keel_database::Migrations::new("keel-eventstore", sqlx::migrate::Migrator::DEFAULT);
//! // keel_database::migrate(&pool, &[&keel_eventstore::MIGRATIONS, &keel_outbox::MIGRATIONS])
//! keel_database::migrate(&pool, &[&EVENTSTORE]).await?;
//! # Ok(()) }
//! ```
//!
//! * The history lives in `keel.schema_history`, keyed by component and
//!   version, never in the service's `_sqlx_migrations`: the service's sqlx
//!   migrator and Keel's run in any order and never see each other's
//!   versions.
//! * A session advisory lock serializes concurrent callers (replicas
//!   starting together): each migration is applied once.
//! * Each migration runs in its own transaction (unless its file starts with
//!   `-- no-transaction`), statement by statement, so a failure names the
//!   statement, its line and the server's message, and leaves nothing of the
//!   migration behind.
//! * Applied migrations are checked against their checksums before anything
//!   new runs; a changed one is refused ([`MigrateError::ChecksumMismatch`]).
//! * Keel's rows in `_sqlx_migrations` (left there by older Keel versions)
//!   are moved into `keel.schema_history` on the first run.
//!
//! Order: the base set first, then every other set's migrations by version.
//! A crate's migrations may depend on the base set only, not on another
//! crate's.

// A `MigrateError` is built at most once per start, never on a hot path,
// and the public API carries it boxed (`DatabaseError::Migration`).
#![allow(clippy::result_large_err)]

mod adopt;
mod error;
mod run;
mod split;
#[cfg(feature = "testkit")]
mod testkit;

use sqlx::migrate::{Migration, Migrator};
use sqlx::{PgConnection, PgPool};

pub use error::{MigrateError, MigrationId};

use crate::DatabaseError;

/// The migrations of one Keel component (usually a crate), embedded with
/// `sqlx::migrate!`.
///
/// ```
/// use keel_database::Migrations;
///
/// /// The `billing` tables (in schema `keel`).
/// pub static MIGRATIONS: Migrations =
///     Migrations::new("billing", sqlx::migrate::Migrator::DEFAULT);
/// // in a real crate: Migrations::new("billing", sqlx::migrate!("./migrations"))
/// # assert_eq!(MIGRATIONS.component(), "billing");
/// ```
#[derive(Debug)]
pub struct Migrations {
    component: &'static str,
    migrator: Migrator,
}

impl Migrations {
    /// A set named `component` (lowercase letters, digits, `-`, `_`, `.`;
    /// at most 63 characters), holding `migrator`'s migrations. Only the
    /// migrations, versions, descriptions, checksums and `no_tx` flags of
    /// `migrator` are used; its own settings (locking, `ignore_missing`) are
    /// not.
    #[must_use]
    pub const fn new(component: &'static str, migrator: Migrator) -> Self {
        Self {
            component,
            migrator,
        }
    }

    /// The component name, as recorded in `keel.schema_history`.
    #[must_use]
    pub fn component(&self) -> &'static str {
        self.component
    }

    /// The set's migrations (up migrations only), by version.
    pub fn iter(&self) -> impl Iterator<Item = &Migration> {
        self.migrator
            .iter()
            .filter(|m| !m.migration_type.is_down_migration())
    }

    /// Bytes that change whenever the set changes (component, versions and
    /// checksums): test kits name template databases after them.
    #[must_use]
    pub fn fingerprint(&self) -> Vec<u8> {
        let mut out = self.component.as_bytes().to_vec();
        out.push(0);
        for m in self.iter() {
            out.extend_from_slice(&m.version.to_le_bytes());
            out.extend_from_slice(&m.checksum);
        }
        out
    }

    fn validate(&self) -> Result<(), MigrateError> {
        let c = self.component;
        let ok = !c.is_empty()
            && c.len() <= 63
            && c.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.')
            });
        if ok {
            Ok(())
        } else {
            Err(MigrateError::InvalidSet {
                component: error::shorten(c, 64),
                reason: "a component name is 1 to 63 of a-z, 0-9, '-', '_', '.'",
            })
        }
    }
}

/// Keel's base migrations: schema `keel`. Always applied first by
/// [`migrate`]; passing it explicitly changes nothing.
pub static MIGRATIONS: Migrations =
    Migrations::new("keel-database", sqlx::migrate!("./migrations"));

/// Applies the base set and `sets` (each crate's `MIGRATIONS`), skipping
/// what is applied already; safe to call at every start, from every replica
/// at once, before or after the service's own migrations.
///
/// Fails with [`DatabaseError::Migration`] (a [`MigrateError`] naming the
/// migration, statement and server message, or a changed applied
/// migration), or a connection variant when the server went away.
pub async fn migrate(pool: &PgPool, sets: &[&Migrations]) -> Result<(), DatabaseError> {
    let mut conn = pool.acquire().await.map_err(DatabaseError::from)?;
    // The session carries a lock and a changed statement timeout: it is not
    // handed back to the pool.
    conn.close_on_drop();
    migrate_connection(&mut conn, sets).await
}

/// [`migrate`] on one connection (a test kit building a template database,
/// a tool without a pool).
pub async fn migrate_connection(
    conn: &mut PgConnection,
    sets: &[&Migrations],
) -> Result<(), DatabaseError> {
    let plan = run::plan(sets).map_err(DatabaseError::from)?;
    run::run(conn, &plan).await.map_err(DatabaseError::from)
}

impl From<MigrateError> for DatabaseError {
    fn from(e: MigrateError) -> Self {
        match e {
            // A migration that failed because the server went away is a
            // connection problem, not a broken migration.
            MigrateError::Failed { source, .. } | MigrateError::History { source, .. }
                if crate::is_connection_error(&source) =>
            {
                DatabaseError::from(source)
            }
            other => DatabaseError::Migration(Box::new(other)),
        }
    }
}
