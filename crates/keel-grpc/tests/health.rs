//! The gRPC health service over a real tonic server and client.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use keel_core::{HealthCheck, HealthReport, Probe};
use keel_grpc::HealthService;
use keel_grpc::health_proto::HealthCheckRequest;
use keel_grpc::health_proto::health_check_response::ServingStatus;
use keel_grpc::health_proto::health_client::HealthClient;
use keel_telemetry::HealthRegistry;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Channel, Server};

/// A dependency whose health the test switches.
struct Switch {
    up: Arc<AtomicBool>,
}

#[async_trait]
impl HealthCheck for Switch {
    fn name(&self) -> &str {
        "postgres"
    }
    async fn check(&self) -> HealthReport {
        if self.up.load(Ordering::SeqCst) {
            HealthReport::healthy(Duration::ZERO)
        } else {
            HealthReport::unhealthy(Duration::ZERO, "connection refused")
        }
    }
}

struct Alive;

#[async_trait]
impl HealthCheck for Alive {
    fn name(&self) -> &str {
        "runtime"
    }
    fn probes(&self) -> &[Probe] {
        &[Probe::Liveness]
    }
    async fn check(&self) -> HealthReport {
        HealthReport::healthy(Duration::ZERO)
    }
}

async fn serve(registry: HealthRegistry) -> HealthClient<Channel> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let service = HealthService::new(registry)
        .watch_interval(Duration::from_millis(20))
        .into_server();
    tokio::spawn(
        Server::builder()
            .add_service(service)
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    HealthClient::new(channel)
}

fn req(service: &str) -> HealthCheckRequest {
    HealthCheckRequest {
        service: service.to_owned(),
    }
}

#[tokio::test]
async fn check_answers_readiness_and_liveness() {
    let up = Arc::new(AtomicBool::new(false));
    let registry = HealthRegistry::builder().cache_ttl(Duration::ZERO).build();
    registry.register(Switch { up: up.clone() });
    registry.register(Alive);
    let mut client = serve(registry).await;

    let status =
        |r: tonic::Response<keel_grpc::health_proto::HealthCheckResponse>| r.into_inner().status;
    assert_eq!(
        status(client.check(req("")).await.unwrap()),
        ServingStatus::NotServing as i32
    );
    assert_eq!(
        status(client.check(req("readiness")).await.unwrap()),
        ServingStatus::NotServing as i32
    );
    assert_eq!(
        status(client.check(req("liveness")).await.unwrap()),
        ServingStatus::Serving as i32
    );
    up.store(true, Ordering::SeqCst);
    assert_eq!(
        status(client.check(req("")).await.unwrap()),
        ServingStatus::Serving as i32
    );
    let unknown = client.check(req("billing")).await.unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);
}

#[tokio::test]
async fn watch_reports_changes() {
    let up = Arc::new(AtomicBool::new(true));
    let registry = HealthRegistry::builder().cache_ttl(Duration::ZERO).build();
    registry.register(Switch { up: up.clone() });
    let mut client = serve(registry).await;

    let mut stream = client.watch(req("")).await.unwrap().into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert_eq!(first.status, ServingStatus::Serving as i32);
    up.store(false, Ordering::SeqCst);
    let second = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("a change is reported")
        .unwrap()
        .unwrap();
    assert_eq!(second.status, ServingStatus::NotServing as i32);

    let mut unknown = client.watch(req("billing")).await.unwrap().into_inner();
    assert_eq!(
        unknown.message().await.unwrap().unwrap().status,
        ServingStatus::ServiceUnknown as i32
    );
}
