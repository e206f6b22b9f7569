//! Trace context across keel-eventbus's in-memory bus: the message goes
//! through the bus's wire codec and its own delivery tasks, and the handler's
//! span is still the child of the publisher's. Telemetry is installed
//! globally (the bus runs handlers on tasks of its own), so this binary holds
//! this one test.

mod common;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use keel_core::{Delivery, EventHandler, EventPublisher, HandlerError, Message};
use keel_eventbus::{EventBus, InMemoryBus, SubscriptionConfig};
use keel_telemetry::{KeelMetrics, Telemetry, TelemetryConfig, TracedHandler, TracedPublisher};
use opentelemetry::trace::{SpanKind, TraceContextExt as _};
use opentelemetry_sdk::trace::InMemorySpanExporter;
use tokio::sync::mpsc;
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// Reports the trace id it ran in.
struct Reporting(mpsc::UnboundedSender<String>);

#[async_trait]
impl EventHandler for Reporting {
    async fn handle(&self, _delivery: &Delivery) -> Result<(), HandlerError> {
        let cx = tracing::Span::current().context();
        let _ = self.0.send(cx.span().span_context().trace_id().to_string());
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_span_is_a_child_of_the_producer_span_across_the_in_memory_bus() {
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

    let bus = InMemoryBus::new();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let subscription = bus
        .subscribe(
            "orders",
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
            "orders",
            &[Message::new("order.placed", serde_json::json!({"id": 1}))],
        )
        .instrument(request)
        .await
        .unwrap();

    let seen = tokio::time::timeout(Duration::from_secs(30), rx.recv())
        .await
        .expect("the handler ran")
        .unwrap();
    assert_eq!(seen, producer_trace.to_string());
    subscription.shutdown().await;

    guard.flush().unwrap();
    let finished = spans.get_finished_spans().unwrap();
    let by_name = |name: &str| {
        finished
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no span {name}"))
            .clone()
    };
    let publish = by_name("publish orders");
    let process = finished
        .iter()
        .find(|s| s.span_kind == SpanKind::Consumer)
        .expect("a consumer span")
        .clone();
    assert_eq!(publish.span_context.trace_id(), producer_trace);
    assert_eq!(process.span_context.trace_id(), producer_trace);
    assert_eq!(process.parent_span_id, publish.span_context.span_id());
    assert!(process.parent_span_is_remote);
}
