//! Every standard instrument, read back through the SDK's in-memory metric
//! exporter: names, units, attributes and values.

mod common;

use std::time::Duration;

use common::MetricsProbe;
use keel_telemetry::metrics::{
    AppendOutcome, CacheTier, DURATION_BUCKETS, DeadLetterReason, HandleOutcome, names,
};

#[test]
fn event_store_appends_conflicts_and_latency() {
    let probe = MetricsProbe::new();
    let m = &probe.metrics;
    m.record_append("Order", 3, Duration::from_millis(4), AppendOutcome::Ok);
    m.record_append("Order", 2, Duration::from_millis(6), AppendOutcome::Ok);
    m.record_append(
        "Order",
        1,
        Duration::from_millis(2),
        AppendOutcome::Conflict,
    );
    m.record_append("Cart", 1, Duration::from_millis(1), AppendOutcome::Error);

    let appended = probe.point(
        names::EVENTSTORE_APPENDED_EVENTS,
        &[(names::ATTR_STREAM_CATEGORY, "Order")],
    );
    assert_eq!(appended.value, 5.0);
    assert_eq!(appended.unit, "{event}");
    assert_eq!(
        probe
            .point(
                names::EVENTSTORE_APPEND_CONFLICTS,
                &[(names::ATTR_STREAM_CATEGORY, "Order")]
            )
            .value,
        1.0
    );
    let ok = probe.point(
        names::EVENTSTORE_APPEND_DURATION,
        &[
            (names::ATTR_STREAM_CATEGORY, "Order"),
            (names::ATTR_OUTCOME, "ok"),
        ],
    );
    assert_eq!(ok.value, 2.0);
    assert!((ok.sum - 0.010).abs() < 1e-9, "{ok:?}");
    assert_eq!(ok.unit, "s");
    let failed = probe.point(
        names::EVENTSTORE_APPEND_DURATION,
        &[
            (names::ATTR_STREAM_CATEGORY, "Cart"),
            (names::ATTR_OUTCOME, "error"),
        ],
    );
    assert_eq!(failed.value, 1.0);
    // A failed append stores nothing.
    assert!(
        probe
            .points()
            .iter()
            .all(|p| !(p.name == names::EVENTSTORE_APPENDED_EVENTS
                && p.attrs.get(names::ATTR_STREAM_CATEGORY).map(String::as_str) == Some("Cart")))
    );
}

#[test]
fn bus_publishes_acks_nacks_dead_letters_and_handler_duration() {
    let probe = MetricsProbe::new();
    let m = &probe.metrics;
    m.record_publish("orders", 10, Duration::from_millis(5), true);
    m.record_publish("orders", 2, Duration::from_millis(5), false);
    m.record_handled("billing", Duration::from_millis(3), HandleOutcome::Ack);
    m.record_handled("billing", Duration::from_millis(3), HandleOutcome::Ack);
    m.record_handled("billing", Duration::from_millis(3), HandleOutcome::Retry);
    m.record_handled("billing", Duration::from_millis(3), HandleOutcome::Reject);
    m.record_dead_letter("billing", DeadLetterReason::AttemptsExhausted);

    let sub = (names::ATTR_SUBSCRIPTION, "billing");
    assert_eq!(
        probe
            .point(
                names::BUS_PUBLISHED_MESSAGES,
                &[(names::ATTR_OUTCOME, "ok")]
            )
            .value,
        10.0
    );
    assert_eq!(
        probe
            .point(
                names::BUS_PUBLISHED_MESSAGES,
                &[(names::ATTR_OUTCOME, "error")]
            )
            .value,
        2.0
    );
    assert_eq!(
        probe
            .point(
                names::BUS_PUBLISH_DURATION,
                &[(names::ATTR_TOPIC, "orders"), (names::ATTR_OUTCOME, "ok")]
            )
            .value,
        1.0
    );
    assert_eq!(probe.point(names::BUS_ACKS, &[sub]).value, 2.0);
    assert_eq!(probe.point(names::BUS_NACKS, &[sub]).value, 1.0);
    assert_eq!(
        probe
            .point(
                names::BUS_DEAD_LETTERS,
                &[sub, (names::ATTR_REASON, "attempts_exhausted")]
            )
            .value,
        1.0
    );
    assert_eq!(
        probe
            .point(
                names::BUS_HANDLER_DURATION,
                &[sub, (names::ATTR_OUTCOME, "reject")]
            )
            .value,
        1.0
    );
}

#[test]
fn cache_pool_and_outbox() {
    let probe = MetricsProbe::new();
    let m = &probe.metrics;
    m.record_cache_hit("products", CacheTier::Local);
    m.record_cache_hit("products", CacheTier::Remote);
    m.record_cache_hit("products", CacheTier::Remote);
    m.record_cache_miss("products");
    m.record_pool("primary", 10, 4);
    m.record_pool("primary", 12, 1);
    m.record_pool_wait("primary", Duration::from_millis(20));
    m.record_outbox("main", Duration::from_millis(1500), 7);

    let cache = (names::ATTR_CACHE, "products");
    assert_eq!(
        probe
            .point(
                names::CACHE_HITS,
                &[cache, (names::ATTR_CACHE_TIER, "remote")]
            )
            .value,
        2.0
    );
    assert_eq!(
        probe
            .point(
                names::CACHE_HITS,
                &[cache, (names::ATTR_CACHE_TIER, "local")]
            )
            .value,
        1.0
    );
    assert_eq!(probe.point(names::CACHE_MISSES, &[cache]).value, 1.0);
    let pool = (names::ATTR_POOL, "primary");
    // Gauges keep the last value recorded.
    assert_eq!(probe.point(names::POOL_SIZE, &[pool]).value, 12.0);
    assert_eq!(probe.point(names::POOL_IDLE, &[pool]).value, 1.0);
    let wait = probe.point(names::POOL_WAIT_DURATION, &[pool]);
    assert_eq!(wait.value, 1.0);
    assert!((wait.sum - 0.020).abs() < 1e-9);
    let relay = (names::ATTR_RELAY, "main");
    let lag = probe.point(names::OUTBOX_LAG, &[relay]);
    assert_eq!(lag.value, 1.5);
    assert_eq!(lag.unit, "s");
    assert_eq!(probe.point(names::OUTBOX_PENDING, &[relay]).value, 7.0);
}

#[test]
fn durations_use_second_buckets_from_1ms_to_10s() {
    assert!(DURATION_BUCKETS.windows(2).all(|w| w[0] < w[1]));
    let probe = MetricsProbe::new();
    let m = &probe.metrics;
    m.record_append("Order", 1, Duration::from_millis(3), AppendOutcome::Ok);
    m.record_publish("orders", 1, Duration::from_millis(3), true);
    m.record_handled("billing", Duration::from_millis(3), HandleOutcome::Ack);
    m.record_pool_wait("primary", Duration::from_millis(3));
    for name in [
        names::EVENTSTORE_APPEND_DURATION,
        names::BUS_PUBLISH_DURATION,
        names::BUS_HANDLER_DURATION,
        names::POOL_WAIT_DURATION,
    ] {
        let point = probe.point(name, &[]);
        assert_eq!(point.bounds, DURATION_BUCKETS, "{name}");
        assert_eq!(point.unit, "s", "{name}");
    }
}
