//! W3C trace context across gRPC calls: a client interceptor that sends
//! the current span's context, and a server layer that continues it.

use std::task::{Context, Poll};

use keel_core::{Metadata, TraceContext};
use tonic::metadata::MetadataValue;
use tonic::{Request, Status};
use tracing::Instrument as _;
use tracing::instrument::Instrumented;

/// A client interceptor that adds the current span's `traceparent` (and
/// `tracestate`) to each outgoing request.
///
/// ```
/// # async fn connect(channel: tonic::transport::Channel) {
/// use keel_grpc::health_proto::health_client::HealthClient;
///
/// let client = HealthClient::with_interceptor(channel, keel_grpc::propagate_trace);
/// # let _ = client; }
/// ```
///
/// # Errors
///
/// Never: a request without a traced span goes out unchanged.
#[allow(clippy::result_large_err)] // the signature tonic's interceptors have
pub fn propagate_trace(mut request: Request<()>) -> Result<Request<()>, Status> {
    if let Some(tc) = keel_telemetry::propagation::current_trace_context() {
        if let Ok(v) = MetadataValue::try_from(tc.traceparent()) {
            request.metadata_mut().insert("traceparent", v);
        }
        if let Some(Ok(v)) = tc.tracestate().map(MetadataValue::try_from) {
            request.metadata_mut().insert("tracestate", v);
        }
    }
    Ok(request)
}

/// A tower layer for tonic servers that runs each call in a server span
/// (`<package.Service>/<Method>`), a child of the caller's span when the
/// call carries W3C trace context.
///
/// ```
/// # fn build() {
/// let server = tonic::transport::Server::builder().layer(keel_grpc::TraceLayer);
/// # let _ = server; }
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct TraceLayer;

impl<S> tower::Layer<S> for TraceLayer {
    type Service = TraceService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        TraceService { inner }
    }
}

/// The service [`TraceLayer`] wraps around a tonic server.
#[derive(Clone, Debug)]
pub struct TraceService<S> {
    inner: S,
}

impl<S, B> tower::Service<http::Request<B>> for TraceService<S>
where
    S: tower::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Instrumented<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let path = request.uri().path();
        let (service, method) = path
            .trim_start_matches('/')
            .split_once('/')
            .unwrap_or((path, ""));
        let span = tracing::info_span!(
            "keel.grpc.request",
            otel.name = %path.trim_start_matches('/'),
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.service = %service,
            rpc.method = %method,
        );
        if let Some(tc) = trace_context_from_headers(request.headers()) {
            keel_telemetry::propagation::set_parent(&span, &Metadata::new().with_trace_context(tc));
        }
        self.inner.call(request).instrument(span)
    }
}

/// The caller's W3C trace context from the `traceparent` / `tracestate`
/// metadata of a call, if present and valid. A malformed `traceparent` is
/// ignored: the call starts a new trace instead of failing.
#[must_use]
pub fn trace_context_from_headers(headers: &http::HeaderMap) -> Option<TraceContext> {
    let traceparent = headers.get("traceparent")?.to_str().ok()?;
    let tracestate = headers
        .get("tracestate")
        .and_then(|v| v.to_str().ok())
        .filter(|s| !s.is_empty())
        .map(str::to_owned);
    TraceContext::new(traceparent, tracestate).ok()
}
