//! Incoming requests continue the caller's trace, checked with the SDK's
//! in-memory span exporter.

use axum::Router;
use axum::body::Body;
use axum::middleware;
use axum::routing::get;
use http::{Request, StatusCode};
use keel_core::{Error, Metadata};
use keel_http::{ApiError, trace_requests};
use keel_telemetry::{Telemetry, TelemetryConfig, propagation};
use opentelemetry::trace::{SpanKind, Status};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SpanData};
use tower::ServiceExt as _;
use tracing::instrument::WithSubscriber as _;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

fn app() -> Router {
    Router::new()
        .route(
            "/orders/{id}",
            get(|| async {
                // What a handler writes into an event it stores.
                let metadata = propagation::with_current_trace(Metadata::new());
                metadata.trace_context.unwrap().trace_id().to_owned()
            }),
        )
        .route(
            "/broken",
            get(|| async { Err::<(), ApiError>(Error::internal_msg("boom").into()) }),
        )
        .layer(middleware::from_fn(trace_requests))
}

async fn run(request: Request<Body>) -> (StatusCode, String, Vec<SpanData>) {
    let spans = InMemorySpanExporter::default();
    let exporter = spans.clone();
    let (dispatch, guard) = Telemetry::build(
        TelemetryConfig::new("orders")
            .without_otlp()
            .log_writer(std::io::sink)
            .configure_tracer_provider(move |b| b.with_simple_exporter(exporter)),
    )
    .unwrap()
    .into_parts();
    let response = app()
        .oneshot(request)
        .with_subscriber(dispatch)
        .await
        .unwrap();
    let status = response.status();
    let body = http_body_util::BodyExt::collect(response.into_body())
        .await
        .unwrap()
        .to_bytes();
    guard.flush().unwrap();
    (
        status,
        String::from_utf8(body.to_vec()).unwrap(),
        spans.get_finished_spans().unwrap(),
    )
}

fn server_span(spans: &[SpanData]) -> &SpanData {
    spans
        .iter()
        .find(|s| s.span_kind == SpanKind::Server)
        .expect("a server span")
}

fn attr(span: &SpanData, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.to_string())
}

#[tokio::test]
async fn a_request_with_traceparent_continues_the_callers_trace() {
    let (status, body, spans) = run(Request::get("/orders/7")
        .header("traceparent", format!("00-{TRACE_ID}-{CALLER_SPAN}-01"))
        .body(Body::empty())
        .unwrap())
    .await;
    assert_eq!(status, StatusCode::OK);
    // The handler saw the caller's trace.
    assert_eq!(body, TRACE_ID);
    let span = server_span(&spans);
    assert_eq!(span.name, "GET /orders/{id}");
    assert_eq!(span.span_context.trace_id().to_string(), TRACE_ID);
    assert_eq!(span.parent_span_id.to_string(), CALLER_SPAN);
    assert!(span.parent_span_is_remote);
    assert_eq!(attr(span, "http.route").as_deref(), Some("/orders/{id}"));
    assert_eq!(
        attr(span, "http.response.status_code").as_deref(),
        Some("200")
    );
}

#[tokio::test]
async fn an_invalid_traceparent_starts_a_new_trace_and_5xx_is_an_error() {
    let (status, body, spans) = run(Request::get("/broken")
        .header("traceparent", "not-a-traceparent")
        .body(Body::empty())
        .unwrap())
    .await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    let span = server_span(&spans);
    assert_ne!(span.span_context.trace_id().to_string(), TRACE_ID);
    assert_eq!(
        span.parent_span_id,
        opentelemetry::trace::SpanId::INVALID,
        "a root span"
    );
    assert!(matches!(span.status, Status::Error { .. }));
    // The problem names the new trace.
    let problem: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        problem["trace_id"],
        span.span_context.trace_id().to_string().as_str()
    );
}
