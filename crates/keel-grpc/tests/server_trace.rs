//! A call through `GrpcServer` continues the caller's trace: the handler
//! runs in the caller's trace, and the server span is a child of the
//! caller's span. Telemetry is installed globally, so this binary holds
//! this one test.

mod common;

use common::*;
use keel_grpc::GrpcServer;
use keel_telemetry::{Telemetry, TelemetryConfig};
use opentelemetry::trace::SpanKind;
use opentelemetry_sdk::trace::InMemorySpanExporter;
use tracing::Instrument as _;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trace_continues_across_the_call() {
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

    let server = GrpcServer::builder()
        .add_service(EchoServer::default())
        .authenticate(verifier())
        .serve(addr())
        .await
        .unwrap();
    let channel = channel(server.local_addr()).await;

    let caller = tracing::info_span!("place_order");
    let caller_tc = keel_telemetry::propagation::trace_context_of(&caller).unwrap();
    let request = {
        let _entered = caller.enter();
        let request = with_bearer(echo("traced"), &token("alice", &[], 600));
        keel_grpc::propagate_trace(tonic::Request::new(()))
            .unwrap()
            .metadata()
            .clone()
            .into_headers()
            .iter()
            .fold(request, |mut r, (k, v)| {
                r.metadata_mut().insert(
                    tonic::metadata::MetadataKey::from_bytes(k.as_str().as_bytes()).unwrap(),
                    v.to_str().unwrap().parse().unwrap(),
                );
                r
            })
    };
    let reply = call(channel.clone(), request)
        .instrument(caller.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.trace_id, caller_tc.trace_id());
    drop(caller);

    // A call without trace context starts a trace of its own.
    let fresh = call(
        channel,
        with_bearer(echo("fresh"), &token("alice", &[], 600)),
    )
    .await
    .unwrap()
    .into_inner();
    assert!(!fresh.trace_id.is_empty());
    assert_ne!(fresh.trace_id, caller_tc.trace_id());

    server.shutdown().await.unwrap();
    guard.flush().unwrap();
    let finished = spans.get_finished_spans().unwrap();
    let caller = finished
        .iter()
        .find(|s| s.name == "place_order")
        .expect("the caller span");
    let server_span = finished
        .iter()
        .find(|s| {
            s.span_kind == SpanKind::Server
                && s.span_context.trace_id() == caller.span_context.trace_id()
        })
        .expect("a server span in the caller's trace");
    assert_eq!(server_span.name, "keel.test.v1.Echo/Echo");
    assert_eq!(server_span.parent_span_id, caller.span_context.span_id());
    assert!(server_span.parent_span_is_remote);
}
