//! A producer span's context travels in message metadata, and the consumer
//! span is its child: proved with the SDK's in-memory span exporter.

mod common;

use std::sync::Mutex;

use async_trait::async_trait;
use common::{MetricsProbe, attr, traced};
use keel_core::{
    Delivery, Error, EventHandler, EventPublisher, HandlerError, Message, Metadata, TraceContext,
};
use keel_telemetry::metrics::names;
use keel_telemetry::{TelemetryConfig, TracedHandler, TracedPublisher, propagation};
use opentelemetry::trace::{SpanKind, TraceContextExt as _};
use tracing::Instrument as _;
use tracing::instrument::WithSubscriber as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// The inner publisher: keeps what it was given, as a broker would.
#[derive(Default)]
struct RecordingPublisher {
    published: Mutex<Vec<(String, Message)>>,
    fail: bool,
}

#[async_trait]
impl EventPublisher for RecordingPublisher {
    async fn publish(&self, topic: &str, messages: &[Message]) -> keel_core::Result<()> {
        if self.fail {
            return Err(Error::unavailable(
                "pubsub",
                "broker refused the connection",
                std::io::Error::other("connection refused"),
            ));
        }
        let mut published = self.published.lock().unwrap();
        for m in messages {
            published.push((topic.to_owned(), m.clone()));
        }
        Ok(())
    }
}

/// The inner handler: records the trace it ran in and answers as told.
struct RecordingHandler {
    seen_trace_ids: Mutex<Vec<String>>,
    answer: fn() -> Result<(), HandlerError>,
}

impl RecordingHandler {
    fn answering(answer: fn() -> Result<(), HandlerError>) -> Self {
        Self {
            seen_trace_ids: Mutex::new(Vec::new()),
            answer,
        }
    }
}

#[async_trait]
impl EventHandler for RecordingHandler {
    async fn handle(&self, _delivery: &Delivery) -> Result<(), HandlerError> {
        let cx = tracing::Span::current().context();
        self.seen_trace_ids
            .lock()
            .unwrap()
            .push(cx.span().span_context().trace_id().to_string());
        (self.answer)()
    }
}

/// Serializes a message's metadata the way a broker attribute map or a
/// stored event would carry it, and reads it back.
fn over_the_wire(message: &Message) -> Message {
    let json = serde_json::to_string(message).unwrap();
    serde_json::from_str(&json).unwrap()
}

#[tokio::test]
async fn consumer_span_is_a_child_of_the_producer_span() {
    let t = traced(TelemetryConfig::new("orders"));
    let probe = MetricsProbe::new();
    let publisher = TracedPublisher::new(RecordingPublisher::default(), probe.metrics.clone());
    let handler = TracedHandler::new(
        RecordingHandler::answering(|| Ok(())),
        probe.metrics.clone(),
    );

    async {
        let request = tracing::info_span!("place_order");
        async {
            publisher
                .publish(
                    "orders",
                    &[Message::new("order.placed", serde_json::json!({"id": 7}))],
                )
                .await
                .unwrap();
        }
        .instrument(request)
        .await;

        let (topic, sent) = publisher.inner().published.lock().unwrap()[0].clone();
        assert_eq!(topic, "orders");
        let delivery = Delivery::new(over_the_wire(&sent), 1, "billing-on-orders");
        handler.handle(&delivery).await.unwrap();
    }
    .with_subscriber(t.dispatch.clone())
    .await;

    let request = t.span("place_order");
    let publish = t.span("publish orders");
    let process = t.span("process billing-on-orders");
    let trace_id = request.span_context.trace_id();

    assert_eq!(publish.span_context.trace_id(), trace_id);
    assert_eq!(publish.parent_span_id, request.span_context.span_id());
    assert_eq!(publish.span_kind, SpanKind::Producer);
    assert_eq!(
        attr(&publish, "messaging.destination.name").as_deref(),
        Some("orders")
    );

    assert_eq!(process.span_context.trace_id(), trace_id);
    assert_eq!(process.parent_span_id, publish.span_context.span_id());
    assert_eq!(process.span_kind, SpanKind::Consumer);
    assert_eq!(
        attr(&process, "keel.event_type").as_deref(),
        Some("order.placed")
    );

    // The message carried exactly the publish span's context.
    let sent = publisher.inner().published.lock().unwrap()[0].1.clone();
    let tc = sent.metadata.trace_context.expect("trace context injected");
    assert_eq!(tc.trace_id(), trace_id.to_string());
    assert!(
        tc.traceparent()
            .contains(&publish.span_context.span_id().to_string())
    );

    // Code inside the handler runs in the same trace.
    assert_eq!(
        *handler.inner().seen_trace_ids.lock().unwrap(),
        vec![trace_id.to_string()]
    );

    let published = probe.point(
        names::BUS_PUBLISHED_MESSAGES,
        &[
            ("messaging.destination.name", "orders"),
            ("keel.outcome", "ok"),
        ],
    );
    assert_eq!(published.value, 1.0);
    let acks = probe.point(
        names::BUS_ACKS,
        &[(
            "messaging.destination.subscription.name",
            "billing-on-orders",
        )],
    );
    assert_eq!(acks.value, 1.0);
    let duration = probe.point(names::BUS_HANDLER_DURATION, &[("keel.outcome", "ok")]);
    assert_eq!(duration.value, 1.0);
    assert_eq!(duration.unit, "s");
}

#[tokio::test]
async fn helpers_inject_and_continue_a_trace_without_decorators() {
    let t = traced(TelemetryConfig::new("orders"));
    let (metadata, producer_trace) = async {
        let span = tracing::info_span!("append_events");
        let _entered = span.enter();
        let mut metadata = Metadata::new();
        assert!(propagation::inject(&mut metadata));
        let current = propagation::current_trace_context().unwrap();
        (metadata, current)
    }
    .with_subscriber(t.dispatch.clone())
    .await;
    assert_eq!(metadata.trace_context.as_ref(), Some(&producer_trace));

    async {
        let consumer = tracing::info_span!("project_order");
        assert!(propagation::set_parent(&consumer, &metadata));
        consumer.in_scope(|| tracing::info!("projecting"));
    }
    .with_subscriber(t.dispatch.clone())
    .await;

    let producer = t.span("append_events");
    let consumer = t.span("project_order");
    assert_eq!(
        consumer.span_context.trace_id(),
        producer.span_context.trace_id()
    );
    assert_eq!(consumer.parent_span_id, producer.span_context.span_id());
    assert!(consumer.parent_span_is_remote);
}

#[tokio::test]
async fn an_existing_trace_context_is_kept_and_no_span_means_no_injection() {
    let t = traced(TelemetryConfig::new("relay"));
    let original = TraceContext::new(
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        None,
    )
    .unwrap();
    let publisher =
        TracedPublisher::new(RecordingPublisher::default(), MetricsProbe::new().metrics);
    async {
        publisher
            .publish(
                "orders",
                &[
                    Message::new("order.placed", serde_json::json!({}))
                        .with_metadata(Metadata::new().with_trace_context(original.clone())),
                    Message::new("order.paid", serde_json::json!({})),
                ],
            )
            .await
            .unwrap();
    }
    .with_subscriber(t.dispatch.clone())
    .await;
    let published = publisher.inner().published.lock().unwrap().clone();
    assert_eq!(
        published[0].1.metadata.trace_context.as_ref(),
        Some(&original)
    );
    let fresh = published[1].1.metadata.trace_context.as_ref().unwrap();
    assert_ne!(fresh.trace_id(), original.trace_id());

    // Outside any subscriber there is no span context to write.
    let mut metadata = Metadata::new();
    assert!(!propagation::inject(&mut metadata));
    assert!(metadata.trace_context.is_none());
}

#[tokio::test]
async fn failures_are_recorded_on_spans_and_metrics() {
    let t = traced(TelemetryConfig::new("orders"));
    let probe = MetricsProbe::new();
    let publisher = TracedPublisher::new(
        RecordingPublisher {
            fail: true,
            ..Default::default()
        },
        probe.metrics.clone(),
    );
    let retrying = TracedHandler::new(
        RecordingHandler::answering(|| Err(HandlerError::retry("database busy"))),
        probe.metrics.clone(),
    );
    let rejecting = TracedHandler::new(
        RecordingHandler::answering(|| Err(HandlerError::reject("unknown event type"))),
        probe.metrics.clone(),
    );
    async {
        let err = publisher
            .publish(
                "orders",
                &[Message::new("order.placed", serde_json::json!({}))],
            )
            .await
            .unwrap_err();
        assert_eq!(err.code(), "keel.unavailable");
        let delivery = Delivery::new(Message::new("x", serde_json::json!({})), 3, "sub-a");
        assert!(matches!(
            retrying.handle(&delivery).await,
            Err(HandlerError::Retry(_))
        ));
        assert!(matches!(
            rejecting.handle(&delivery).await,
            Err(HandlerError::Reject(_))
        ));
    }
    .with_subscriber(t.dispatch.clone())
    .await;

    let publish = t.span("publish orders");
    assert!(matches!(
        publish.status,
        opentelemetry::trace::Status::Error { .. }
    ));
    assert_eq!(
        attr(&publish, "error.type").as_deref(),
        Some("keel.unavailable")
    );
    assert_eq!(
        probe
            .point(names::BUS_PUBLISHED_MESSAGES, &[("keel.outcome", "error")])
            .value,
        1.0
    );
    assert_eq!(probe.point(names::BUS_NACKS, &[]).value, 1.0);
    assert_eq!(
        probe
            .point(names::BUS_DEAD_LETTERS, &[("keel.reason", "rejected")])
            .value,
        1.0
    );
    assert!(!probe.has(names::BUS_ACKS), "nothing was acked");
    assert_eq!(
        probe
            .point(names::BUS_HANDLER_DURATION, &[("keel.outcome", "retry")])
            .value,
        1.0
    );
    let logs = t.logs.text();
    assert!(logs.contains("the message will be redelivered"), "{logs}");
    assert!(logs.contains("dead-letter topic"), "{logs}");
}

#[tokio::test]
async fn json_log_lines_carry_the_trace_and_span_ids() {
    let t = traced(TelemetryConfig::new("orders").environment("prod"));
    tracing::dispatcher::with_default(&t.dispatch, || {
        tracing::info!("outside any span");
        let span = tracing::info_span!("handle_request", order = 7);
        span.in_scope(|| tracing::info!("inside"));
    });
    let request = t.span("handle_request");
    let lines: Vec<serde_json::Value> = t
        .logs
        .text()
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON"))
        .collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(lines[0]["message"], "outside any span");
    assert!(lines[0].get("trace_id").is_none());
    assert_eq!(lines[1]["message"], "inside");
    assert_eq!(
        lines[1]["trace_id"],
        request.span_context.trace_id().to_string().as_str()
    );
    assert_eq!(
        lines[1]["span_id"],
        request.span_context.span_id().to_string().as_str()
    );
    assert_eq!(lines[1]["span"]["order"], 7);
}

#[tokio::test]
async fn the_active_context_is_what_adapters_inject() {
    // Set by other OpenTelemetry instrumentation, with no tracing span at
    // all: still written, tracestate included.
    let remote = propagation::context_from(
        &TraceContext::new(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            Some("vendor=abc".to_owned()),
        )
        .unwrap(),
    );
    {
        let _attached = remote.attach();
        let tc = propagation::current_trace_context().unwrap();
        assert_eq!(
            tc.traceparent(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
        assert_eq!(tc.tracestate(), Some("vendor=abc"));
    }
    assert_eq!(propagation::current_trace_context(), None);

    // Under the subscriber from `init`: the instrumented future's span,
    // after an await point too, and the same as the span-based helper.
    let t = traced(TelemetryConfig::new("orders"));
    let span =
        tracing::dispatcher::with_default(&t.dispatch, || tracing::info_span!("place_order"));
    let expected = {
        let span = span.clone();
        async move { propagation::trace_context_of(&span).unwrap() }
            .with_subscriber(t.dispatch.clone())
            .await
    };
    let seen = async {
        tokio::task::yield_now().await;
        propagation::with_current_trace(Metadata::new()).trace_context
    }
    .instrument(span)
    .with_subscriber(t.dispatch.clone())
    .await;
    assert_eq!(seen, Some(expected));
}
