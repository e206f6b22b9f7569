//! Shared setup: a fresh database per test and a `Database` on it.

#![allow(dead_code, unreachable_pub)] // each test binary uses a different part

use keel_database::{Database, DatabaseConfig, MIGRATIONS};
use keel_testkit::TestDatabase;
use sqlx::Executor;

/// A per-test database and a small pool on it (the per-test servers are
/// shared by many tests, so the pools stay small).
pub async fn database() -> (TestDatabase, Database) {
    let test_db = TestDatabase::create(&MIGRATIONS).await.unwrap();
    let config = DatabaseConfig::builder()
        .connect_options(test_db.connect_options())
        .min_connections(0)
        .max_connections(8)
        .build()
        .unwrap();
    let db = Database::connect(config).await.unwrap();
    (test_db, db)
}

/// Same as [`database`], with a table `items (id int primary key, note text)`.
pub async fn database_with_items() -> (TestDatabase, Database) {
    let (test_db, db) = database().await;
    db.pool()
        .execute("CREATE TABLE items (id int PRIMARY KEY, note text NOT NULL DEFAULT '')")
        .await
        .unwrap();
    (test_db, db)
}

/// The ids in `items`, ascending.
pub async fn item_ids(db: &Database) -> Vec<i32> {
    sqlx::query_scalar("SELECT id FROM items ORDER BY id")
        .fetch_all(db.pool())
        .await
        .unwrap()
}

/// Inserts one item through any executor.
pub async fn insert_item(conn: &mut sqlx::PgConnection, id: i32) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO items (id) VALUES ($1)")
        .bind(id)
        .execute(conn)
        .await
        .map(|_| ())
}
