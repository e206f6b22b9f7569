//! The standard gRPC health service (`grpc.health.v1.Health`), answered
//! from a [`HealthRegistry`].

use std::pin::Pin;
use std::time::Duration;

use futures::{Stream, StreamExt as _};
use keel_core::Probe;
use keel_telemetry::HealthRegistry;
use tonic::{Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

/// The service name for liveness.
pub const LIVENESS_SERVICE: &str = "liveness";
/// The service name for readiness. The empty name (the server as a whole)
/// means readiness too.
pub const READINESS_SERVICE: &str = "readiness";

/// How often `Watch` re-evaluates by default.
pub const DEFAULT_WATCH_INTERVAL: Duration = Duration::from_secs(5);

/// `grpc.health.v1.Health` backed by a [`HealthRegistry`].
///
/// `Check` with service `""` or `"readiness"` answers readiness, with
/// `"liveness"` answers liveness: `SERVING` when the probe is healthy or
/// degraded, `NOT_SERVING` otherwise. Other names are `NOT_FOUND`.
/// `Watch` sends the status at once and again whenever it changes.
///
/// ```no_run
/// # async fn serve() -> Result<(), Box<dyn std::error::Error>> {
/// use keel_telemetry::HealthRegistry;
///
/// let registry = HealthRegistry::new();
/// let health = keel_grpc::health_server(registry);
/// // tonic::transport::Server::builder().add_service(health).serve(addr).await?;
/// # let _ = health; Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct HealthService {
    registry: HealthRegistry,
    watch_interval: Duration,
}

/// The health service wrapped as a tonic server, ready for
/// `Server::builder().add_service(..)`.
pub fn health_server(registry: HealthRegistry) -> HealthServer<HealthService> {
    HealthServer::new(HealthService::new(registry))
}

impl HealthService {
    /// The service over `registry`.
    #[must_use]
    pub fn new(registry: HealthRegistry) -> Self {
        Self {
            registry,
            watch_interval: DEFAULT_WATCH_INTERVAL,
        }
    }

    /// How often `Watch` re-evaluates (the registry's cache still applies).
    #[must_use]
    pub fn watch_interval(mut self, interval: Duration) -> Self {
        self.watch_interval = interval;
        self
    }

    /// The tonic server for this service.
    #[must_use]
    pub fn into_server(self) -> HealthServer<Self> {
        HealthServer::new(self)
    }

    async fn status(&self, probe: Probe) -> ServingStatus {
        if self.registry.report(probe).await.is_serving() {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        }
    }
}

fn probe_for(service: &str) -> Option<Probe> {
    match service {
        "" | READINESS_SERVICE => Some(Probe::Readiness),
        LIVENESS_SERVICE => Some(Probe::Liveness),
        _ => None,
    }
}

fn response(status: ServingStatus) -> HealthCheckResponse {
    HealthCheckResponse {
        status: status as i32,
    }
}

/// The stream type of `Watch`.
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Health for HealthService {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        let service = &request.get_ref().service;
        let probe = probe_for(service)
            .ok_or_else(|| Status::not_found(format!("unknown service {service:?}")))?;
        Ok(Response::new(response(self.status(probe).await)))
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let Some(probe) = probe_for(&request.get_ref().service) else {
            // The protocol keeps the call open for unknown services.
            let stream =
                futures::stream::once(async { Ok(response(ServingStatus::ServiceUnknown)) })
                    .chain(futures::stream::pending());
            return Ok(Response::new(Box::pin(stream)));
        };
        let service = self.clone();
        let stream = futures::stream::unfold(
            (service, None::<ServingStatus>),
            move |(service, last)| async move {
                loop {
                    if last.is_some() {
                        tokio::time::sleep(service.watch_interval).await;
                    }
                    let now = service.status(probe).await;
                    if Some(now) != last {
                        return Some((Ok(response(now)), (service, Some(now))));
                    }
                }
            },
        );
        Ok(Response::new(Box::pin(stream)))
    }
}
