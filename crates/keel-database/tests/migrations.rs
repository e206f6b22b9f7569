//! Keel's migrations beside a service's own sqlx migrations, against the
//! real PostgreSQL: any order, every start, carry-over from the old shared
//! history, failures that name their cause, checksum drift, concurrency.

use std::borrow::Cow;

use keel_database::{DatabaseError, MigrateError, Migrations, migrate};
use keel_testkit::TestDatabase;
use sqlx::PgPool;
use sqlx::migrate::Migrator;

// The sets the adapter crates export, built from the same files.
static EVENTSTORE: Migrations = Migrations::new(
    "keel-eventstore",
    sqlx::migrate!("../keel-eventstore/migrations"),
);
static OUTBOX: Migrations =
    Migrations::new("keel-outbox", sqlx::migrate!("../keel-outbox/migrations"));
static SECURITY: Migrations = Migrations::new(
    "keel-security",
    sqlx::migrate!("../keel-security/migrations"),
);
static ALL: [&Migrations; 3] = [&EVENTSTORE, &OUTBOX, &SECURITY];

/// A service's own migrations (versions before, between and after Keel's).
static SERVICE: Migrator = sqlx::migrate!("tests/fixtures/service");
static EMPTY: Migrator = Migrator::DEFAULT;

async fn empty_database() -> TestDatabase {
    TestDatabase::create(&EMPTY).await.unwrap()
}

/// The first `n` of the service's migrations, as its binary at an older
/// release would embed them.
fn service_release(n: usize) -> Migrator {
    Migrator {
        migrations: Cow::Owned(SERVICE.migrations[..n].to_vec()),
        ..Migrator::DEFAULT
    }
}

/// Every Keel migration in one plain sqlx migrator: what
/// `keel_database::MIGRATOR` was before Keel kept its own history.
fn old_keel_migrator() -> Migrator {
    let mut all: Vec<_> = keel_database::MIGRATIONS
        .iter()
        .chain(ALL.iter().flat_map(|s| s.iter()))
        // Only what Keel shipped while it still wrote into _sqlx_migrations;
        // later migrations were never recorded there.
        .filter(|m| m.version < 20261124000000)
        .cloned()
        .collect();
    all.sort_by_key(|m| m.version);
    Migrator {
        migrations: Cow::Owned(all),
        ..Migrator::DEFAULT
    }
}

async fn sqlx_history(pool: &PgPool) -> Vec<i64> {
    sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success ORDER BY version")
        .fetch_all(pool)
        .await
        .unwrap()
}

async fn keel_history(pool: &PgPool) -> Vec<(String, i64)> {
    sqlx::query_as("SELECT component, version FROM keel.schema_history ORDER BY component, version")
        .fetch_all(pool)
        .await
        .unwrap()
}

fn expected_keel(sets: &[&Migrations]) -> Vec<(String, i64)> {
    let mut out: Vec<(String, i64)> = std::iter::once(&keel_database::MIGRATIONS)
        .chain(sets.iter().copied())
        .flat_map(|s| s.iter().map(|m| (s.component().to_owned(), m.version)))
        .collect();
    out.sort();
    out
}

fn versions(m: &Migrator) -> Vec<i64> {
    m.iter().map(|m| m.version).collect()
}

async fn table_exists(pool: &PgPool, name: &str) -> bool {
    sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(name)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Both histories hold exactly their own side's versions, and Keel's tables
/// and the service's are there.
async fn assert_both_intact(pool: &PgPool, service: &Migrator, keel: &[&Migrations]) {
    assert_eq!(sqlx_history(pool).await, versions(service));
    assert_eq!(keel_history(pool).await, expected_keel(keel));
    assert!(table_exists(pool, "orders").await);
    for table in ["keel.events", "keel.outbox", "keel.audit_log"] {
        assert!(table_exists(pool, table).await, "{table} missing");
    }
}

#[tokio::test]
async fn service_migrations_first_then_keel_at_every_start() {
    let db = empty_database().await;
    let pool = db.pool();
    for _start in 0..3 {
        SERVICE.run(pool).await.unwrap();
        migrate(pool, &ALL).await.unwrap();
    }
    assert_both_intact(pool, &SERVICE, &ALL).await;
}

#[tokio::test]
async fn keel_first_then_service_migrations_at_every_start() {
    let db = empty_database().await;
    let pool = db.pool();
    for _start in 0..3 {
        migrate(pool, &ALL).await.unwrap();
        SERVICE.run(pool).await.unwrap();
    }
    assert_both_intact(pool, &SERVICE, &ALL).await;
}

#[tokio::test]
async fn releases_interleave_service_and_keel_migrations() {
    let db = empty_database().await;
    let pool = db.pool();
    // Each release adds service migrations and links more Keel crates; each
    // start runs both sides, Keel's before or after the service's.
    let releases: [(usize, &[&Migrations]); 4] = [
        (1, &[]),
        (1, &[&EVENTSTORE]),
        (2, &[&EVENTSTORE, &OUTBOX]),
        (3, &[&OUTBOX, &EVENTSTORE, &SECURITY]),
    ];
    for (i, (n, sets)) in releases.into_iter().enumerate() {
        let service = service_release(n);
        if i % 2 == 0 {
            service.run(pool).await.unwrap();
            migrate(pool, sets).await.unwrap();
        } else {
            migrate(pool, sets).await.unwrap();
            service.run(pool).await.unwrap();
        }
        assert_eq!(sqlx_history(pool).await, versions(&service));
        assert_eq!(keel_history(pool).await, expected_keel(sets));
    }
    // The service's own migrator still runs cleanly, and so does Keel's.
    SERVICE.run(pool).await.unwrap();
    migrate(pool, &ALL).await.unwrap();
    assert_both_intact(pool, &SERVICE, &ALL).await;
}

#[tokio::test]
async fn an_old_shared_history_is_carried_over() {
    let db = empty_database().await;
    let pool = db.pool();
    // The old behaviour: Keel's migrations in _sqlx_migrations, and the
    // service's there too (it had to ignore Keel's versions to start).
    old_keel_migrator().run(pool).await.unwrap();
    let mut service = service_release(3);
    service.set_ignore_missing(true);
    service.run(pool).await.unwrap();
    let installed_before: Vec<(i64, String)> = sqlx::query_as(
        "SELECT version, installed_on::text FROM _sqlx_migrations WHERE version >= 20261123000000 \
         AND version < 20261124000000 AND version <> 20261123030000 ORDER BY version",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert_eq!(installed_before.len(), 6);

    // Linking only the event store still carries over every Keel row (its
    // migrations written since the carry-over are applied after them).
    migrate(pool, &[&EVENTSTORE]).await.unwrap();
    assert_eq!(sqlx_history(pool).await, versions(&SERVICE));
    // The rows carried over (migrations added since the old layout are
    // applied now, after them).
    let adopted: Vec<(i64, String)> = sqlx::query_as(
        "SELECT version, installed_on::text FROM keel.schema_history \
         WHERE version < 20261124000000 ORDER BY version",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert_eq!(
        adopted, installed_before,
        "history kept, nothing re-applied"
    );

    // Every later start of either side is clean (re-running any of Keel's
    // migrations would fail: they create functions without OR REPLACE).
    migrate(pool, &ALL).await.unwrap();
    SERVICE.run(pool).await.unwrap();
    assert_both_intact(pool, &SERVICE, &ALL).await;
}

#[tokio::test]
async fn a_failed_migration_names_migration_statement_and_message() {
    static BROKEN: Migrations = Migrations::new("broken", sqlx::migrate!("tests/fixtures/broken"));
    let db = empty_database().await;
    let pool = db.pool();
    let e = migrate(pool, &[&EVENTSTORE, &BROKEN]).await.unwrap_err();
    let text = e.to_string();
    let DatabaseError::Migration(inner) = e else {
        panic!("expected a migration error, got {e:?}");
    };
    let MigrateError::Failed {
        migration,
        line,
        statement,
        code,
        message,
        ..
    } = *inner
    else {
        panic!("expected Failed, got {inner:?}");
    };
    assert_eq!(migration.component, "broken");
    assert_eq!(migration.version, 20_300_101_000_000);
    assert_eq!(migration.description, "broken");
    assert_eq!(code, "42P01");
    assert!(message.contains("no_such_table"), "{message}");
    assert!(
        statement.starts_with("INSERT INTO keel.broken_first"),
        "{statement}"
    );
    assert_eq!(line, 11, "the server points at no_such_table, on line 11");
    for part in [
        "broken migration 20300101000000 (broken)",
        "line 11",
        "42P01",
        "no_such_table",
    ] {
        assert!(text.contains(part), "{part:?} not in {text:?}");
    }

    // Nothing of the failed migration stays; what came before it does.
    assert!(!table_exists(pool, "keel.broken_first").await);
    let function: bool = sqlx::query_scalar("SELECT to_regproc('keel.broken_fn') IS NOT NULL")
        .fetch_one(pool)
        .await
        .unwrap();
    assert!(!function);
    assert!(
        !table_exists(pool, "keel.never").await,
        "later migrations did not run"
    );
    assert_eq!(keel_history(pool).await, expected_keel(&[&EVENTSTORE]));
}

#[tokio::test]
async fn a_syntax_error_points_at_its_line() {
    static SYNTAX: Migrations = Migrations::new("syntax", sqlx::migrate!("tests/fixtures/syntax"));
    let db = empty_database().await;
    let e = migrate(db.pool(), &[&SYNTAX]).await.unwrap_err();
    let DatabaseError::Migration(inner) = e else {
        panic!("expected a migration error, got {e:?}");
    };
    let MigrateError::Failed {
        line,
        statement,
        code,
        ..
    } = *inner
    else {
        panic!("expected Failed, got {inner:?}");
    };
    assert_eq!(code, "42704", "undefined type");
    assert_eq!(line, 5);
    assert!(
        statement.starts_with("CREATE TABLE keel.typed"),
        "{statement}"
    );
}

#[tokio::test]
async fn a_changed_applied_migration_is_refused() {
    static V1: Migrations = Migrations::new("drift", sqlx::migrate!("tests/fixtures/drift_v1"));
    static V2: Migrations = Migrations::new("drift", sqlx::migrate!("tests/fixtures/drift_v2"));
    let db = empty_database().await;
    let pool = db.pool();
    migrate(pool, &[&V1]).await.unwrap();
    let e = migrate(pool, &[&V2]).await.unwrap_err();
    assert!(
        e.to_string()
            .contains("drift migration 20300201000000 (drift)"),
        "{e}"
    );
    let DatabaseError::Migration(inner) = e else {
        panic!("expected a migration error, got {e:?}");
    };
    let Some(id) = inner.migration() else {
        panic!("no migration named in {inner:?}");
    };
    assert!(matches!(*inner, MigrateError::ChecksumMismatch { .. }));
    assert_eq!(
        (id.component.as_str(), id.version),
        ("drift", 20_300_201_000_000)
    );
    // Refused before anything new ran.
    assert!(!table_exists(pool, "keel.after_drift").await);
    // The unchanged set still starts cleanly.
    migrate(pool, &[&V1]).await.unwrap();
}

#[tokio::test]
async fn replicas_starting_together_apply_each_migration_once() {
    static COUNTED: Migrations =
        Migrations::new("counted", sqlx::migrate!("tests/fixtures/counted"));
    let db = empty_database().await;
    // The service's migrator too, at the same time, as a replica would.
    let mut tasks = Vec::new();
    for i in 0..8 {
        let options = db.connect_options();
        tasks.push(tokio::spawn(async move {
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(2)
                .connect_with(options)
                .await
                .unwrap();
            if i % 2 == 0 {
                SERVICE.run(&pool).await.unwrap();
            }
            migrate(&pool, &[&EVENTSTORE, &OUTBOX, &SECURITY, &COUNTED]).await
        }));
    }
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    let pool = db.pool();
    let counts: Vec<i32> = sqlx::query_scalar("SELECT n FROM keel.applied_count ORDER BY n")
        .fetch_all(pool)
        .await
        .unwrap();
    assert_eq!(counts, [1, 2], "each migration ran once");
    assert_eq!(
        keel_history(pool).await,
        expected_keel(&[&EVENTSTORE, &OUTBOX, &SECURITY, &COUNTED])
    );
    assert_eq!(sqlx_history(pool).await, versions(&SERVICE));
}

#[tokio::test]
async fn bad_sets_are_refused_before_anything_runs() {
    static BAD_NAME: Migrations = Migrations::new("Bad Name", Migrator::DEFAULT);
    static OTHER_OUTBOX: Migrations =
        Migrations::new("keel-outbox", sqlx::migrate!("tests/fixtures/drift_v1"));
    let db = empty_database().await;
    let pool = db.pool();
    let e = migrate(pool, &[&BAD_NAME]).await.unwrap_err();
    assert!(
        matches!(&e, DatabaseError::Migration(m) if matches!(**m, MigrateError::InvalidSet { .. })),
        "{e:?}"
    );
    let e = migrate(pool, &[&OUTBOX, &OTHER_OUTBOX]).await.unwrap_err();
    assert!(e.to_string().contains("keel-outbox"), "{e}");
    assert!(!table_exists(pool, "keel.schema_history").await);
    // The same set twice is fine.
    migrate(pool, &[&OUTBOX, &OUTBOX, &keel_database::MIGRATIONS])
        .await
        .unwrap();
}

#[tokio::test]
async fn test_databases_from_keel_sets_hold_keel_history() {
    let db = TestDatabase::create(&[&EVENTSTORE, &OUTBOX]).await.unwrap();
    assert_eq!(
        keel_history(db.pool()).await,
        expected_keel(&[&EVENTSTORE, &OUTBOX])
    );
    assert!(!table_exists(db.pool(), "_sqlx_migrations").await);
    // And a later start finds nothing to do.
    migrate(db.pool(), &[&EVENTSTORE, &OUTBOX]).await.unwrap();
}
