//! Backups of a `ThrowawayPostgres` with PostgreSQL's own tools: base
//! backups, WAL archiving, point-in-time recovery into a new cluster, and
//! logical dumps.

use keel_testkit::{Error, RecoveryTarget, ThrowawayPostgres};
use sqlx::{Connection, PgConnection};

async fn exec(pg: &ThrowawayPostgres, sql: &str) {
    let mut conn = PgConnection::connect_with(&pg.connect_options())
        .await
        .unwrap();
    sqlx::raw_sql(sql).execute(&mut conn).await.unwrap();
    conn.close().await.unwrap();
}

async fn rows(pg: &ThrowawayPostgres, database: &str) -> Vec<i32> {
    let mut conn = PgConnection::connect_with(&pg.connect_options().database(database))
        .await
        .unwrap();
    let rows = sqlx::query_scalar("SELECT n FROM t ORDER BY n")
        .fetch_all(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    rows
}

#[tokio::test]
async fn recovery_stops_at_the_target_and_the_result_accepts_writes() {
    let pg = ThrowawayPostgres::with_wal_archive().await.unwrap();
    let archive = pg.wal_archive().expect("an archive directory");
    exec(
        &pg,
        "CREATE TABLE t (n int PRIMARY KEY); INSERT INTO t VALUES (1)",
    )
    .await;
    let backup = pg.base_backup().await.unwrap();
    assert!(backup.dir().join("PG_VERSION").is_file());
    exec(&pg, "INSERT INTO t VALUES (2)").await;
    exec(&pg, "SELECT pg_create_restore_point('after-two')").await;
    exec(&pg, "INSERT INTO t VALUES (3)").await;
    pg.archive_current_wal().await.unwrap();
    assert!(std::fs::read_dir(&archive).unwrap().count() > 0);

    let at_two = pg
        .recover(&backup, RecoveryTarget::Name("after-two".into()))
        .await
        .unwrap();
    assert_ne!(at_two.port(), pg.port());
    assert_eq!(rows(&at_two, "postgres").await, vec![1, 2]);
    exec(&at_two, "INSERT INTO t VALUES (4)").await; // promoted: writable
    assert_eq!(rows(&at_two, "postgres").await, vec![1, 2, 4]);

    let at_backup = pg
        .recover(&backup, RecoveryTarget::Immediate)
        .await
        .unwrap();
    assert_eq!(rows(&at_backup, "postgres").await, vec![1]);
    let at_end = pg
        .recover(&backup, RecoveryTarget::EndOfArchive)
        .await
        .unwrap();
    assert_eq!(rows(&at_end, "postgres").await, vec![1, 2, 3]);

    // The source never noticed.
    assert_eq!(rows(&pg, "postgres").await, vec![1, 2, 3]);
}

#[tokio::test]
async fn a_target_the_archive_never_reaches_fails_with_the_servers_log() {
    let pg = ThrowawayPostgres::with_wal_archive().await.unwrap();
    let backup = pg.base_backup().await.unwrap();
    exec(&pg, "CREATE TABLE t (n int)").await;
    pg.archive_current_wal().await.unwrap();
    let e = pg
        .recover(&backup, RecoveryTarget::Name("never-made".into()))
        .await
        .unwrap_err();
    let Error::StartFailed { log_tail, .. } = &e else {
        panic!("expected StartFailed, got {e}");
    };
    assert!(log_tail.contains("recovery"), "{e}");
}

#[tokio::test]
async fn only_a_cluster_that_archives_can_recover() {
    let plain = ThrowawayPostgres::new().await.unwrap();
    assert!(plain.wal_archive().is_none());
    let archiving = ThrowawayPostgres::with_wal_archive().await.unwrap();
    let backup = archiving.base_backup().await.unwrap();
    let e = plain
        .recover(&backup, RecoveryTarget::Immediate)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("with_wal_archive"), "{e}");
}

#[tokio::test]
async fn a_dump_restores_into_another_cluster() {
    let source = ThrowawayPostgres::new().await.unwrap();
    let target = ThrowawayPostgres::new().await.unwrap();
    exec(
        &source,
        "CREATE TABLE t (n int PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 50)",
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("db.dump");
    source.dump("postgres", &file).await.unwrap();
    target.restore_dump(&file, "copy").await.unwrap();
    assert_eq!(rows(&target, "copy").await, (1..=50).collect::<Vec<_>>());

    // Into a database that exists already: refused.
    assert!(target.restore_dump(&file, "copy").await.is_err());
    // A dump of a database that does not exist: refused, with pg_dump's words.
    let e = source
        .dump("no_such_db", &dir.path().join("x.dump"))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("no_such_db"), "{e}");
}
