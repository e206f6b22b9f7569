//! Server spans for incoming requests, continuing the caller's W3C trace.

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use http::HeaderMap;
use keel_core::{Metadata, TraceContext};
use tracing::Instrument as _;

/// The caller's W3C trace context from `traceparent` / `tracestate`
/// headers, if present and valid.
#[must_use]
pub fn trace_context_from_headers(headers: &HeaderMap) -> Option<TraceContext> {
    let traceparent = headers.get("traceparent")?.to_str().ok()?;
    let tracestate = headers
        .get("tracestate")
        .and_then(|v| v.to_str().ok())
        .filter(|s| !s.is_empty())
        .map(str::to_owned);
    TraceContext::new(traceparent, tracestate).ok()
}

/// axum middleware that runs each request in a server span
/// (`<METHOD> <route>`), a child of the caller's span when the request
/// carries W3C trace context, and records the response status (5xx marks
/// the span as failed).
///
/// Inside handlers, [`propagation::with_current_trace`](keel_telemetry::propagation::with_current_trace)
/// then writes the caller's trace into stored events and published
/// messages, and [`ApiError`](crate::ApiError) answers with its trace id.
///
/// ```
/// use axum::{Router, middleware, routing::get};
///
/// let app: Router = Router::new()
///     .route("/orders/{id}", get(|| async { "order" }))
///     .layer(middleware::from_fn(keel_http::trace_requests));
/// ```
pub async fn trace_requests(request: Request, next: Next) -> Response {
    let method = request.method().clone();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned());
    let name = match &route {
        Some(route) => format!("{method} {route}"),
        None => method.to_string(),
    };
    let user_agent = request
        .headers()
        .get(http::header::USER_AGENT)
        .and_then(|v| v.to_str().ok());
    let protocol = match request.version() {
        http::Version::HTTP_09 => "0.9",
        http::Version::HTTP_10 => "1.0",
        http::Version::HTTP_2 => "2",
        http::Version::HTTP_3 => "3",
        _ => "1.1",
    };
    // OpenTelemetry's semantic-convention names, which keel-telemetry's
    // `gcp` log format turns into Cloud Logging's `httpRequest`.
    let span = tracing::info_span!(
        "keel.http.request",
        otel.name = %name,
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        http.request.method = %method,
        http.route = route.as_deref(),
        url.path = %request.uri().path(),
        url.query = request.uri().query(),
        user_agent.original = user_agent,
        network.protocol.version = protocol,
        http.response.status_code = tracing::field::Empty,
    );
    if let Some(tc) = trace_context_from_headers(request.headers()) {
        keel_telemetry::propagation::set_parent(&span, &Metadata::new().with_trace_context(tc));
    }
    let response = next.run(request).instrument(span.clone()).await;
    let status = response.status();
    span.record("http.response.status_code", status.as_u16());
    if status.is_server_error() {
        span.record("otel.status_code", "error");
    }
    response
}
