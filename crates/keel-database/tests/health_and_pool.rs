//! Health checks, pool statistics and the configured server-side timeouts,
//! against a real PostgreSQL.

mod common;

use std::sync::Arc;
use std::time::Duration;

use keel_core::{HealthCheck, HealthStatus, Probe};
use keel_database::{Database, DatabaseConfig, DatabaseError, MIGRATIONS};
use keel_testkit::TestDatabase;

async fn small_pool(
    max: u32,
    tweak: impl FnOnce(keel_database::DatabaseConfigBuilder) -> keel_database::DatabaseConfigBuilder,
) -> (TestDatabase, Database) {
    let t = TestDatabase::create(&MIGRATIONS).await.unwrap();
    let builder = DatabaseConfig::builder()
        .connect_options(t.connect_options())
        .min_connections(0)
        .max_connections(max);
    let db = Database::connect(tweak(builder).build().unwrap())
        .await
        .unwrap();
    (t, db)
}

#[tokio::test]
async fn readiness_is_healthy_and_reports_latency() {
    let (_t, db) = common::database().await;
    let check = db.readiness_check();
    assert_eq!(check.name(), "postgres");
    assert!(check.applies_to(Probe::Readiness));
    assert!(!check.applies_to(Probe::Liveness));
    let report = check.check().await;
    assert_eq!(report.status, HealthStatus::Healthy, "{report:?}");
    assert!(report.latency > Duration::ZERO);

    // The checks are usable as trait objects, as a registry holds them.
    let checks: Vec<Arc<dyn HealthCheck>> = vec![
        Arc::new(db.readiness_check().named("primary")),
        Arc::new(db.liveness_check()),
    ];
    assert_eq!(checks[0].name(), "primary");
    assert!(checks[1].applies_to(Probe::Liveness));
    for c in &checks {
        assert_eq!(c.check().await.status, HealthStatus::Healthy);
    }
}

#[tokio::test]
async fn readiness_degrades_when_slow_or_saturated() {
    let (_t, db) = small_pool(3, |b| b).await;
    // Any real round trip is slower than a zero threshold.
    let slow = db
        .readiness_check()
        .degraded_after(Duration::ZERO)
        .check()
        .await;
    assert_eq!(slow.status, HealthStatus::Degraded);
    assert!(slow.detail.contains("slow"), "{slow:?}");

    // Two of three connections busy: the check takes the last one.
    let held = [db.acquire().await.unwrap(), db.acquire().await.unwrap()];
    let saturated = db.readiness_check().check().await;
    assert_eq!(saturated.status, HealthStatus::Degraded, "{saturated:?}");
    assert!(saturated.detail.contains("saturated"), "{saturated:?}");

    // All three busy: the check cannot get a connection within its limit.
    let third = db.acquire().await.unwrap();
    let stuck = db
        .readiness_check()
        .timeout(Duration::from_millis(200))
        .check()
        .await;
    assert_eq!(stuck.status, HealthStatus::Unhealthy, "{stuck:?}");
    assert!(stuck.detail.contains("no answer"), "{stuck:?}");
    drop((held, third));

    let stats = db.stats();
    assert_eq!(stats.max_connections, 3);
    assert_eq!(stats.size, 3);
    assert!(stats.acquires >= 5, "{stats:?}");
    assert_eq!(stats.acquire_timeouts, 0);
}

#[tokio::test]
async fn closed_pool_is_unhealthy_and_refuses_work() {
    let (_t, db) = common::database().await;
    db.close().await;
    assert!(db.is_closed());
    assert!(db.stats().closed);
    assert_eq!(
        db.readiness_check().check().await.status,
        HealthStatus::Unhealthy
    );
    assert_eq!(
        db.liveness_check().check().await.status,
        HealthStatus::Unhealthy
    );
    let e = db.begin().await.unwrap_err();
    assert!(matches!(e, DatabaseError::PoolClosed), "{e:?}");
    assert_eq!(
        keel_core::Error::from(e).kind(),
        keel_core::ErrorKind::Unavailable
    );
}

#[tokio::test]
async fn stats_count_connections_in_use() {
    let (_t, db) = small_pool(4, |b| b).await;
    let a = db.acquire().await.unwrap();
    let b = db.begin().await.unwrap();
    let stats = db.stats();
    assert_eq!(stats.in_use, 2, "{stats:?}");
    assert_eq!(stats.size, stats.idle + stats.in_use);
    assert_eq!(stats.acquires, 2);
    assert_eq!(stats.acquire_timeouts, 0);
    drop(a);
    b.commit().await.unwrap();
    // Returned connections become idle (the pool returns them in the
    // background, so give it a moment).
    let mut idle = 0;
    for _ in 0..100 {
        idle = db.stats().idle;
        if idle == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(idle, 2);
}

#[tokio::test]
async fn configured_statement_timeout_cancels_long_statements() {
    let (_t, db) = small_pool(2, |b| {
        b.statement_timeout(Duration::from_millis(100))
            .application_name("keel-db-test")
    })
    .await;
    let name: String = sqlx::query_scalar("SHOW application_name")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(name, "keel-db-test");

    let mut uow = db.begin().await.unwrap();
    let err = sqlx::query("SELECT pg_sleep(5)")
        .execute(uow.conn())
        .await
        .unwrap_err();
    let err = db.classify(err);
    match &err {
        DatabaseError::StatementTimeout { after, .. } => {
            assert_eq!(*after, Some(Duration::from_millis(100)));
        }
        other => panic!("expected a statement timeout, got {other:?}"),
    }
    assert!(err.is_retryable());
    let keel = keel_core::Error::from(err);
    assert_eq!(keel.kind(), keel_core::ErrorKind::Timeout);
    assert_eq!(keel.to_string(), "postgres statement timed out after 100ms");
    uow.rollback().await.unwrap();

    // Injection through a setting is impossible: the application name is
    // validated, never interpolated into SQL.
    let e = DatabaseConfig::builder()
        .url("postgres://localhost/x")
        .application_name("x' ; DROP DATABASE postgres; --\u{7}")
        .build()
        .unwrap_err();
    assert!(matches!(e, DatabaseError::Config { .. }));
}

#[tokio::test]
async fn migrate_is_idempotent() {
    let (_t, db) = common::database().await;
    db.migrate(&[]).await.unwrap();
    db.migrate(&[&MIGRATIONS]).await.unwrap();
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM keel.schema_history")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(applied, i64::try_from(MIGRATIONS.iter().count()).unwrap());
}

/// Pooled connections are not pinged before they are handed out, so a
/// connection the server killed while it sat idle is only found when used:
/// `begin` (and so `transaction`) then takes another one by itself, and the
/// broken one never comes back.
#[tokio::test]
async fn begin_skips_connections_killed_while_idle() {
    let (t, db) = small_pool(2, |b| b).await;
    // Two idle connections, both killed behind the pool's back.
    let mut pids = Vec::new();
    {
        let mut a = db.acquire().await.unwrap();
        let mut b = db.acquire().await.unwrap();
        for c in [&mut a, &mut b] {
            let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
                .fetch_one(&mut **c)
                .await
                .unwrap();
            pids.push(pid);
        }
    }
    // Released connections come back to the idle set from a spawned task.
    tokio::time::timeout(Duration::from_secs(10), async {
        while db.stats().idle < 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("both connections back in the pool");
    for pid in &pids {
        let killed: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
            .bind(pid)
            .fetch_one(t.pool())
            .await
            .unwrap();
        assert!(killed);
    }
    let mut uow = db.begin().await.expect("begin takes a live connection");
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(uow.conn())
        .await
        .unwrap();
    assert!(!pids.contains(&pid), "a killed connection was handed out");
    uow.commit().await.unwrap();
    let n = db
        .transaction(|uow| {
            Box::pin(async move {
                sqlx::query_scalar::<_, i32>("SELECT 1")
                    .fetch_one(uow.conn())
                    .await
                    .map_err(DatabaseError::from)
            })
        })
        .await
        .unwrap();
    assert_eq!(n, 1);
}
