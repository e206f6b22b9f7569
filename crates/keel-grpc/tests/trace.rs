//! A call made inside a span continues that trace on the server: client
//! interceptor, real tonic server with `TraceLayer`, SDK in-memory exporter.
//! The server runs on tasks of its own, so telemetry is installed globally
//! and this binary holds this one test.

use std::time::Duration;

use keel_grpc::health_proto::HealthCheckRequest;
use keel_grpc::health_proto::health_client::HealthClient;
use keel_grpc::{TraceLayer, health_server, propagate_trace};
use keel_telemetry::{HealthRegistry, Telemetry, TelemetryConfig};
use opentelemetry::trace::SpanKind;
use opentelemetry_sdk::trace::InMemorySpanExporter;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Channel, Server};
use tracing::Instrument as _;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_span_is_a_child_of_the_callers_span() {
    let spans = InMemorySpanExporter::default();
    let exporter = spans.clone();
    let guard = Telemetry::build(
        TelemetryConfig::new("orders")
            .without_otlp()
            .log_writer(std::io::sink)
            .configure_tracer_provider(move |b| b.with_simple_exporter(exporter)),
    )
    .unwrap()
    .install()
    .unwrap();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        Server::builder()
            .layer(TraceLayer)
            .add_service(health_server(HealthRegistry::new()))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .unwrap();
    let mut client = HealthClient::with_interceptor(channel, propagate_trace);

    let caller = tracing::info_span!("place_order");
    let caller_tc = keel_telemetry::propagation::trace_context_of(&caller).unwrap();
    client
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .instrument(caller.clone())
        .await
        .unwrap();
    drop(caller);

    guard.flush().unwrap();
    let finished = spans.get_finished_spans().unwrap();
    let server = finished
        .iter()
        .find(|s| s.span_kind == SpanKind::Server)
        .expect("a server span");
    let caller = finished
        .iter()
        .find(|s| s.name == "place_order")
        .expect("the caller span");
    assert_eq!(server.name, "grpc.health.v1.Health/Check");
    assert_eq!(
        server.span_context.trace_id(),
        caller.span_context.trace_id()
    );
    assert_eq!(server.parent_span_id, caller.span_context.span_id());
    assert!(server.parent_span_is_remote);
    assert_eq!(
        caller_tc.trace_id(),
        caller.span_context.trace_id().to_string()
    );
}
