//! Calls made through a factory's channel carry the caller's trace
//! context. Telemetry is installed globally, so this binary holds this one
//! test.

mod client_common;

use std::sync::Arc;

use client_common::{Recorder, TestServer};
use keel_grpc::client::{ChannelConfig, ChannelFactory, Target};
use keel_grpc::proto::examples::ordering::v1 as api;
use keel_telemetry::{Telemetry, TelemetryConfig};
use opentelemetry_sdk::trace::InMemorySpanExporter;
use tracing::Instrument as _;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_callers_trace_context_reaches_the_server() {
    let spans = InMemorySpanExporter::default();
    let exporter = spans.clone();
    let _guard = Telemetry::build(
        TelemetryConfig::new("shipping")
            .without_otlp()
            .log_writer(std::io::sink)
            .configure_tracer_provider(move |b| b.with_simple_exporter(exporter)),
    )
    .unwrap()
    .install()
    .unwrap();

    let recorder = Arc::new(Recorder::default());
    let server = TestServer::start(recorder.clone()).await;
    let factory = ChannelFactory::new(ChannelConfig::new()).unwrap();
    let channel = factory
        .channel(&Target::new(server.uri()).unwrap())
        .unwrap();
    let mut client = api::ordering_service_client::OrderingServiceClient::new(channel);

    let caller = tracing::info_span!("ship_order");
    let caller_tc = keel_telemetry::propagation::trace_context_of(&caller).unwrap();
    client
        .get_order(api::GetOrderRequest {
            order_id: "o-1".into(),
        })
        .instrument(caller.clone())
        .await
        .unwrap();
    // Outside any span: no trace context is made up.
    client
        .get_order(api::GetOrderRequest {
            order_id: "o-2".into(),
        })
        .await
        .unwrap();

    let seen = recorder.seen();
    let traced = seen[0].traceparent.as_deref().expect("a traceparent");
    let trace_id = traced.split('-').nth(1).unwrap();
    assert_eq!(trace_id, caller_tc.trace_id());
    assert_eq!(traced, caller_tc.traceparent());
    assert_eq!(seen[1].traceparent, None, "{seen:?}");
    server.stop().await;
}
