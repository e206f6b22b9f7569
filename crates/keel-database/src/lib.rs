//! PostgreSQL plumbing for Keel: pool, units of work, health, migrations.
//!
//! (Work in progress: only the migrations are here so far.)

use sqlx::migrate::Migrator;

/// Every Keel table, as embedded migrations from the workspace's
/// `migrations/` folder. Run them with [`migrate`].
pub static MIGRATOR: Migrator = sqlx::migrate!("../../migrations");

/// Applies Keel's migrations that have not been applied yet.
pub async fn migrate(pool: &sqlx::PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run(pool).await
}
