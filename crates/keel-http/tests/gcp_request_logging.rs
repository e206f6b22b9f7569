//! A line logged while handling a request, in Cloud Logging's format,
//! carries the request as `httpRequest` and the request's trace. In a binary
//! of its own: `tracing` caches per-callsite interest process-wide.

use std::io;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Body;
use axum::routing::post;
use http::Request;
use keel_telemetry::{LogFormat, Telemetry, TelemetryConfig};
use tower::ServiceExt as _;
use tracing::instrument::WithSubscriber as _;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn a_handler_line_carries_http_request_and_the_callers_trace() {
    let logs = Captured::default();
    let sink = logs.clone();
    let (dispatch, _guard) = Telemetry::build(
        TelemetryConfig::new("orders")
            .without_otlp()
            .log_format(LogFormat::Gcp)
            .gcp_project("orders-prod")
            .log_writer(move || sink.clone()),
    )
    .unwrap()
    .into_parts();

    let app: Router = Router::new()
        .route(
            "/orders/{id}",
            post(|| async {
                tracing::info!(items = 3, "order accepted");
                http::StatusCode::CREATED
            }),
        )
        .layer(axum::middleware::from_fn(keel_http::trace_requests));
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let response = app
        .oneshot(
            Request::post("/orders/7?dry_run=true")
                .header("user-agent", "curl/8.5")
                .header("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01"))
                .body(Body::empty())
                .unwrap(),
        )
        .with_subscriber(dispatch)
        .await
        .unwrap();
    assert_eq!(response.status(), http::StatusCode::CREATED);

    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    let line: serde_json::Value = text
        .lines()
        .find(|l| l.contains("order accepted"))
        .map(|l| serde_json::from_str(l).unwrap())
        .unwrap_or_else(|| panic!("nothing logged: {text}"));
    assert_eq!(line["severity"], "INFO");
    assert_eq!(line["message"], "order accepted");
    assert_eq!(
        line["logging.googleapis.com/trace"],
        format!("projects/orders-prod/traces/{trace_id}")
    );
    assert_eq!(line["logging.googleapis.com/trace_sampled"], true);
    let http = &line["httpRequest"];
    assert_eq!(http["requestMethod"], "POST", "{line}");
    assert_eq!(http["requestUrl"], "/orders/7?dry_run=true");
    assert_eq!(http["userAgent"], "curl/8.5");
    assert_eq!(http["protocol"], "HTTP/1.1");
    assert_eq!(line["items"], 3);
}
