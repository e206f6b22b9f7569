//! What the caller does not see is logged, and the two are linked by the
//! trace id. In a binary of its own: `tracing` caches per-callsite interest
//! process-wide, and tests without a subscriber running in parallel could
//! race with this one's.

use std::io;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Body;
use axum::routing::get;
use http::Request;
use http_body_util::BodyExt as _;
use keel_core::Error;
use keel_http::ApiError;
use keel_telemetry::{LogFormat, Telemetry, TelemetryConfig};
use tower::ServiceExt as _;
use tracing::Instrument as _;
use tracing::instrument::WithSubscriber as _;

/// A log sink that keeps everything written to it.
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
async fn internal_errors_are_logged_with_their_chain_and_answered_with_the_trace_id() {
    let logs = Captured::default();
    let sink = logs.clone();
    let (dispatch, _guard) = Telemetry::build(
        TelemetryConfig::new("orders")
            .without_otlp()
            .log_format(LogFormat::Json)
            .log_writer(move || sink.clone()),
    )
    .unwrap()
    .into_parts();

    let (trace_id, body) = async {
        let span = tracing::info_span!("request");
        let trace_id = {
            let _e = span.enter();
            keel_telemetry::propagation::current_trace_context()
                .unwrap()
                .trace_id()
                .to_owned()
        };
        let response = app()
            .oneshot(Request::get("/internal").body(Body::empty()).unwrap())
            .instrument(span)
            .await
            .unwrap();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (
            trace_id,
            serde_json::from_slice::<serde_json::Value>(&bytes).unwrap(),
        )
    }
    .with_subscriber(dispatch)
    .await;

    assert_eq!(body["trace_id"], trace_id.as_str());
    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    let line = text
        .lines()
        .find(|l| l.contains("request failed"))
        .unwrap_or_else(|| panic!("no error logged: {text}"));
    assert!(line.contains(HOST), "the chain is logged: {line}");
    assert!(line.contains("\"level\":\"ERROR\""), "{line}");
}

const HOST: &str = "pg-primary.internal.example.com";

fn app() -> Router {
    Router::new().route(
        "/internal",
        get(|| async {
            Err::<(), ApiError>(
                Error::internal(
                    format!("query failed on {HOST}"),
                    std::io::Error::other("connection reset"),
                )
                .into(),
            )
        }),
    )
}
