//! The Pub/Sub readiness check against the emulator and an unreachable
//! endpoint.
#![cfg(feature = "pubsub")]

use std::net::TcpListener;
use std::time::{Duration, Instant};

use keel_core::{HealthCheck, HealthStatus, Probe};
use keel_eventbus::testing::unique;
use keel_eventbus::{EventBus, PubSubBus, PubSubConfig};
use keel_telemetry::HealthRegistry;

async fn emulator_bus() -> PubSubBus {
    let host = keel_testkit::services::pubsub_emulator_host()
        .await
        .expect("the Pub/Sub emulator is available");
    PubSubBus::connect(PubSubConfig::emulator(unique("health"), &host).unwrap())
        .await
        .unwrap()
}

#[tokio::test]
async fn the_emulator_is_ready_and_a_missing_topic_is_not() {
    let bus = emulator_bus().await;
    let check = bus.readiness_check();
    assert_eq!(check.name(), "pubsub");
    assert_eq!(check.probes(), &[Probe::Readiness]);
    let report = check.check().await;
    assert_eq!(report.status, HealthStatus::Healthy, "{report:?}");

    let topic = unique("orders");
    let topic_check = bus.readiness_check().topic(&topic).named("pubsub-orders");
    let report = topic_check.check().await;
    assert_eq!(report.status, HealthStatus::Unhealthy, "{report:?}");
    assert!(report.detail.contains("does not exist"), "{report:?}");

    bus.ensure_topic(&topic).await.unwrap();
    let report = topic_check.check().await;
    assert_eq!(report.status, HealthStatus::Healthy, "{report:?}");

    let report = bus
        .readiness_check()
        .degraded_after(Duration::ZERO)
        .check()
        .await;
    assert_eq!(report.status, HealthStatus::Degraded, "{report:?}");
}

#[tokio::test]
async fn an_unreachable_endpoint_is_unhealthy_within_the_timeout() {
    // A port nothing listens on.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // `connect` would refuse the endpoint; a service started while Pub/Sub
    // is out of reach connects lazily and reports itself unready.
    let bus = PubSubBus::connect_lazy(
        PubSubConfig::emulator("nowhere", &format!("127.0.0.1:{port}")).unwrap(),
    )
    .await
    .unwrap();
    let check = bus.readiness_check().timeout(Duration::from_millis(500));
    let started = Instant::now();
    let report = check.check().await;
    let took = started.elapsed();
    assert_eq!(report.status, HealthStatus::Unhealthy, "{report:?}");
    assert!(took < Duration::from_secs(3), "took {took:?}");

    let registry = HealthRegistry::new();
    registry.register(check);
    let probe = registry.readiness().await;
    assert!(!probe.is_serving(), "a critical check failing: {probe:?}");
}
