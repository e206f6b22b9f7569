//! The embedded migrations apply to a fresh database.

use keel_testkit::TestDatabase;

#[tokio::test]
async fn migrations_create_the_keel_schema() {
    let db = TestDatabase::create(&keel_database::MIGRATOR)
        .await
        .unwrap();
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'keel')")
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert!(exists);
}
