//! The Redis readiness check against the real server, a stopped one and an
//! unreachable port.

#[allow(dead_code)] // shared with the failure tests; this binary uses a few
mod common;

use std::time::{Duration, Instant};

use common::{OwnRedis, closed_port};
use keel_cache::{RedisCache, RedisConfig};
use keel_core::{HealthCheck, HealthStatus, Probe};
use keel_telemetry::{CheckOptions, HealthRegistry};

#[tokio::test]
async fn a_running_redis_is_ready() {
    let url = keel_testkit::services::redis_url()
        .await
        .expect("these tests need Redis");
    let redis = RedisCache::connect(RedisConfig::new(url)).await.unwrap();
    let check = redis.readiness_check();
    assert_eq!(check.name(), "redis");
    assert_eq!(check.probes(), &[Probe::Readiness]);
    let report = check.check().await;
    assert_eq!(report.status, HealthStatus::Healthy, "{report:?}");
    assert!(report.latency < Duration::from_secs(1));

    // Slower than a zero threshold: degraded, still answering.
    let report = redis
        .readiness_check()
        .degraded_after(Duration::ZERO)
        .check()
        .await;
    assert_eq!(report.status, HealthStatus::Degraded, "{report:?}");
}

#[tokio::test]
async fn an_unreachable_redis_is_unhealthy_within_the_timeout() {
    // Nothing listens on the port, and the connection manager would retry
    // for longer than the check's limit.
    let redis = RedisCache::connect_lazy(
        RedisConfig::new(format!("redis://127.0.0.1:{}", closed_port()))
            .connect_timeout(Duration::from_secs(5))
            .reconnect_attempts(10),
    )
    .unwrap();
    let check = redis
        .readiness_check()
        .named("redis-sessions")
        .timeout(Duration::from_millis(300));
    let started = Instant::now();
    let report = check.check().await;
    let took = started.elapsed();
    assert_eq!(report.status, HealthStatus::Unhealthy, "{report:?}");
    assert!(took < Duration::from_secs(2), "took {took:?}");

    // Registered as non-critical, it degrades readiness without failing it.
    let registry = HealthRegistry::new();
    registry.register_with(check, CheckOptions::new().non_critical());
    let probe = registry.readiness().await;
    assert!(probe.is_serving());
    assert_eq!(
        probe.check("redis-sessions").map(|c| c.status),
        Some(HealthStatus::Unhealthy)
    );
}

#[tokio::test]
async fn a_stopped_redis_turns_unhealthy_and_back() {
    let mut server = OwnRedis::start().await;
    let redis = RedisCache::connect(
        RedisConfig::new(server.url())
            .connect_timeout(Duration::from_millis(200))
            .reconnect_attempts(1),
    )
    .await
    .unwrap();
    let check = redis.readiness_check().timeout(Duration::from_millis(500));
    assert_eq!(check.check().await.status, HealthStatus::Healthy);

    server.kill().await;
    let started = Instant::now();
    let report = check.check().await;
    assert_eq!(report.status, HealthStatus::Unhealthy, "{report:?}");
    assert!(started.elapsed() < Duration::from_secs(2));

    server.restart().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let report = check.check().await;
        if report.status == HealthStatus::Healthy {
            break;
        }
        assert!(Instant::now() < deadline, "never recovered: {report:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
