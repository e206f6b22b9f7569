//! Trace context across the Google Cloud Pub/Sub emulator: the context
//! travels as message attributes through a real broker, and the handler's
//! span is the child of the publisher's. Telemetry is installed globally
//! (the bus runs handlers on tasks of its own), so this binary holds this
//! one test.

mod common;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use keel_core::{Delivery, EventHandler, EventPublisher, HandlerError, Message};
use keel_eventbus::{EventBus, PubSubBus, PubSubConfig, SubscriptionConfig};
use keel_telemetry::{KeelMetrics, Telemetry, TelemetryConfig, TracedHandler, TracedPublisher};
use opentelemetry::trace::{SpanKind, TraceContextExt as _};
use opentelemetry_sdk::trace::InMemorySpanExporter;
use tokio::sync::mpsc;
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// A name no other test run uses.
fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{prefix}-{}-{nanos}", std::process::id())
}

/// Reports the trace id it ran in and the trace context it received.
struct Reporting(mpsc::UnboundedSender<(String, Option<String>)>);

#[async_trait]
impl EventHandler for Reporting {
    async fn handle(&self, delivery: &Delivery) -> Result<(), HandlerError> {
        let cx = tracing::Span::current().context();
        let received = delivery
            .message
            .metadata
            .trace_context
            .as_ref()
            .map(|tc| tc.traceparent().to_owned());
        let _ = self
            .0
            .send((cx.span().span_context().trace_id().to_string(), received));
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_span_is_a_child_of_the_producer_span_across_pubsub() {
    let spans = InMemorySpanExporter::default();
    let exporter = spans.clone();
    let guard = Telemetry::build(
        TelemetryConfig::new("orders")
            .without_otlp()
            .log_writer(common::Captured::default())
            .configure_tracer_provider(move |b| b.with_simple_exporter(exporter)),
    )
    .unwrap()
    .install()
    .unwrap();
    let metrics = KeelMetrics::global();

    let host = keel_testkit::services::pubsub_emulator_host()
        .await
        .expect("the Pub/Sub emulator is available");
    let bus = PubSubBus::connect(PubSubConfig::emulator(unique("keel-telemetry"), &host).unwrap())
        .await
        .unwrap();
    let topic = unique("orders");
    let (tx, mut rx) = mpsc::unbounded_channel();
    let subscription = bus
        .subscribe(
            &topic,
            &SubscriptionConfig::new("billing"),
            Arc::new(TracedHandler::new(Reporting(tx), metrics.clone())),
        )
        .await
        .unwrap();
    let publisher = TracedPublisher::new(bus.clone(), metrics);

    let request = tracing::info_span!("place_order");
    let producer_trace = request.context().span().span_context().trace_id();
    publisher
        .publish(
            &topic,
            &[Message::new("order.placed", serde_json::json!({"id": 1}))],
        )
        .instrument(request)
        .await
        .unwrap();

    let (seen, received) = tokio::time::timeout(Duration::from_secs(60), rx.recv())
        .await
        .expect("the handler ran")
        .unwrap();
    subscription.shutdown().await;
    assert_eq!(seen, producer_trace.to_string());

    guard.flush().unwrap();
    let finished = spans.get_finished_spans().unwrap();
    let publish = finished
        .iter()
        .find(|s| s.span_kind == SpanKind::Producer)
        .expect("a producer span");
    let process = finished
        .iter()
        .find(|s| s.span_kind == SpanKind::Consumer)
        .expect("a consumer span");
    assert_eq!(publish.span_context.trace_id(), producer_trace);
    assert_eq!(process.span_context.trace_id(), producer_trace);
    assert_eq!(process.parent_span_id, publish.span_context.span_id());
    let received = received.expect("the message carried a traceparent");
    assert!(received.contains(&publish.span_context.span_id().to_string()));
}
