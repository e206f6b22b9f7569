//! The pool records its size, idle connections and acquisition waits
//! (read back through the OpenTelemetry SDK's in-memory exporter), against a
//! real PostgreSQL.

use std::time::Duration;

use keel_database::{Database, DatabaseConfig, MIGRATIONS};
use keel_telemetry::metrics::names::{ATTR_POOL, POOL_IDLE, POOL_SIZE, POOL_WAIT_DURATION};
use keel_telemetry::testing::MetricsProbe;
use keel_testkit::TestDatabase;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn size_idle_and_waits_are_recorded_under_the_application_name() {
    let t = TestDatabase::create(&MIGRATIONS).await.unwrap();
    let db = Database::connect(
        DatabaseConfig::builder()
            .connect_options(t.connect_options())
            .application_name("orders-svc")
            .min_connections(0)
            .max_connections(2)
            .build()
            .unwrap(),
    )
    .await
    .unwrap();
    let probe = MetricsProbe::new();
    db.set_metrics(probe.metrics());
    let pool = [(ATTR_POOL, "orders-svc")];
    // Recorded at once: nothing open yet.
    assert_eq!(probe.value(POOL_SIZE, &pool), 0.0);
    assert_eq!(probe.matching(POOL_SIZE, &pool).len(), 1);

    // Two acquisitions (one a unit of work), each recording its wait.
    let held = db.acquire().await.unwrap();
    let uow = db.begin().await.unwrap();
    assert_eq!(probe.value(POOL_WAIT_DURATION, &pool), 2.0);

    // The background sampler sees both connections in use...
    db.set_pool_metrics_interval(Duration::from_millis(20));
    // (the sleep in progress may still be the default one: sample now too)
    db.record_pool_metrics();
    assert_eq!(probe.value(POOL_SIZE, &pool), 2.0);
    assert_eq!(probe.value(POOL_IDLE, &pool), 0.0);

    // ...and, once they are returned, idle again, without being asked.
    drop(held);
    uow.rollback().await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while probe.value(POOL_IDLE, &pool) < 2.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the sampler never recorded the idle connections"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(probe.value(POOL_SIZE, &pool), 2.0);

    // A readiness probe refreshes the gauges too.
    let report = keel_core::HealthCheck::check(&db.readiness_check()).await;
    assert_eq!(report.status, keel_core::HealthStatus::Healthy);
    assert_eq!(probe.value(POOL_WAIT_DURATION, &pool), 3.0);
}
