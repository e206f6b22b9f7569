//! What the outbox records without any decorator: the relay's backlog
//! gauges (read back through the OpenTelemetry SDK's in-memory exporter),
//! and the trace context the writer stores for the relay to publish.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use keel_core::uow::TransactionSource;
use keel_core::{Metadata, TraceContext};
use keel_eventbus::InMemoryBus;
use keel_outbox::{Outbox, PgOutbox, Relay, RelayConfig};
use keel_telemetry::metrics::names::{ATTR_RELAY, OUTBOX_LAG, OUTBOX_PENDING};
use keel_telemetry::testing::MetricsProbe;
use opentelemetry::Context;
use opentelemetry::context::FutureExt as _;
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId};

const WAIT: Duration = Duration::from_secs(30);

fn quick(name: &str) -> RelayConfig {
    RelayConfig::default()
        .with_name(name)
        .with_poll_interval(Duration::from_millis(50))
        .with_retry_backoff(Duration::from_millis(20), Duration::from_millis(100))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_records_its_backlog_and_lag() {
    let db = database().await;
    let probe = MetricsProbe::new();
    let relay = Relay::new(
        db.pool().clone(),
        Arc::new(InMemoryBus::new()),
        quick("relay-a"),
    )
    .unwrap()
    .with_metrics(probe.metrics());
    let attr = [(ATTR_RELAY, "relay-a")];

    commit(
        db.pool(),
        &[event("orders", "a", 1), event("orders", "b", 1)],
    )
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let stats = relay.record_metrics().await.unwrap();
    assert_eq!(stats.pending, 2);
    assert_eq!(probe.value(OUTBOX_PENDING, &attr), 2.0);
    let lag = probe.value(OUTBOX_LAG, &attr);
    assert!((0.1..30.0).contains(&lag), "lag {lag}");

    assert_eq!(relay.relay_once().await.unwrap().published, 2);
    relay.record_metrics().await.unwrap();
    assert_eq!(probe.value(OUTBOX_PENDING, &attr), 0.0);
    assert_eq!(probe.value(OUTBOX_LAG, &attr), 0.0, "nothing waits");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_relay_samples_the_backlog_periodically() {
    let db = database().await;
    let probe = MetricsProbe::new();
    let handle = Relay::new(
        db.pool().clone(),
        Arc::new(InMemoryBus::new()),
        quick("relay-b").with_metrics_interval(Duration::from_millis(50)),
    )
    .unwrap()
    .with_metrics(probe.metrics())
    .spawn();
    let attr = [(ATTR_RELAY, "relay-b")];

    // No traffic yet: the first sample says nothing waits.
    eventually("a first sample", WAIT, || async {
        !probe.matching(OUTBOX_PENDING, &attr).is_empty()
    })
    .await;
    commit(db.pool(), &[event("orders", "c", 1)]).await;
    eventually("published", WAIT, || async {
        unpublished(db.pool()).await == 0
    })
    .await;
    // A sample taken after the publish sees an empty backlog again.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(probe.value(OUTBOX_PENDING, &attr), 0.0);
    handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_inside_a_trace_carries_it_to_the_consumer() {
    let db = database().await;
    let bus = InMemoryBus::new();
    let recorder = Recorder::default();
    let _sub = subscribe(&bus, "traced", "test", Arc::new(recorder.clone())).await;

    let cx = Context::new().with_remote_span_context(SpanContext::new(
        TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
        SpanId::from_hex("00f067aa0ba902b7").unwrap(),
        TraceFlags::SAMPLED,
        true,
        Default::default(),
    ));
    let own = TraceContext::new(
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        None,
    )
    .unwrap();
    let plain = event("traced", "a", 1);
    let carried = {
        let e = event("traced", "a", 2);
        let message = e
            .message()
            .clone()
            .with_metadata(Metadata::new().with_trace_context(own.clone()));
        keel_outbox::OutboxMessage::new("traced", "Order", "a", message)
    };
    let untraced = event("traced", "b", 1);

    let mut tx = TransactionSource::begin(&database_of(db.pool()))
        .await
        .unwrap();
    PgOutbox::new()
        .within(&mut *tx)
        .write_all(&[plain.clone(), carried.clone()])
        .with_context(cx)
        .await
        .unwrap();
    PgOutbox::new()
        .within(&mut *tx)
        .write(&untraced)
        .await
        .unwrap();
    tx.commit().await.unwrap();

    let relay = Relay::new(db.pool().clone(), Arc::new(bus.clone()), quick("relay-c")).unwrap();
    assert_eq!(relay.relay_once().await.unwrap().published, 3);
    eventually("three deliveries", WAIT, || async { recorder.len() >= 3 }).await;
    let trace_of = |id| {
        recorder
            .deliveries()
            .into_iter()
            .find(|d| d.message.event_id == id)
            .unwrap()
            .message
            .metadata
            .trace_context
    };
    assert_eq!(
        trace_of(plain.message().event_id).map(|tc| tc.traceparent().to_owned()),
        Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned())
    );
    assert_eq!(trace_of(carried.message().event_id), Some(own));
    assert_eq!(trace_of(untraced.message().event_id), None);
}
