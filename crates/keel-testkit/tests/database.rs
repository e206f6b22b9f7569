//! `TestDatabase`: a migrated database per test, on the discovered server.

use keel_testkit::TestDatabase;
use sqlx::migrate::Migrator;
use sqlx::{Connection, PgConnection};

static MIGRATOR: Migrator = sqlx::migrate!("tests/migrations");

#[tokio::test]
async fn each_test_gets_its_own_migrated_database_dropped_afterwards() {
    let (a, b) = tokio::join!(
        TestDatabase::create(&MIGRATOR),
        TestDatabase::create(&MIGRATOR)
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_ne!(a.name(), b.name());

    sqlx::query("INSERT INTO notes (body) VALUES ('only in a')")
        .execute(a.pool())
        .await
        .unwrap();
    let count = |db: &TestDatabase| {
        let pool = db.pool().clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM notes")
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    assert_eq!(count(&a).await, 1);
    assert_eq!(count(&b).await, 0, "the databases share data");

    let name = a.name().to_owned();
    let server = keel_testkit::services::postgres_url().await.unwrap();
    drop(a);
    let mut admin = PgConnection::connect(&server).await.unwrap();
    let left: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(&name)
            .fetch_one(&mut admin)
            .await
            .unwrap();
    assert!(!left, "database {name} was not dropped");
}

#[tokio::test]
async fn connection_details_point_at_the_test_database() {
    let db = TestDatabase::create(&MIGRATOR).await.unwrap();
    assert!(db.url().contains(db.name()));
    let mut conn = PgConnection::connect_with(&db.connect_options())
        .await
        .unwrap();
    let current: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(current, db.name());
}

#[tokio::test]
async fn drop_templates_removes_templates_and_abandoned_test_databases_only() {
    use sqlx::{Connection, Executor};

    // On a server of its own: other test runs may be using their templates
    // on the shared one.
    let pg = keel_testkit::ThrowawayPostgres::new().await.unwrap();
    let mut admin = sqlx::PgConnection::connect(&pg.url()).await.unwrap();
    for name in [
        "keel_tpl_0123",
        "keel_test_abandoned",
        "keel_test_running",
        "app",
    ] {
        admin
            .execute(format!("CREATE DATABASE {name}").as_str())
            .await
            .unwrap();
    }
    let running =
        sqlx::PgConnection::connect_with(&pg.connect_options().database("keel_test_running"))
            .await
            .unwrap();

    let dropped = TestDatabase::drop_templates_at(&pg.url()).await.unwrap();
    assert_eq!(dropped, ["keel_test_abandoned", "keel_tpl_0123"]);
    let left: Vec<String> = sqlx::query_scalar(
        "SELECT datname FROM pg_database WHERE datname LIKE 'keel%' OR datname = 'app' ORDER BY 1",
    )
    .fetch_all(&mut admin)
    .await
    .unwrap();
    assert_eq!(left, ["app", "keel_test_running"]);
    running.close().await.unwrap();
}
