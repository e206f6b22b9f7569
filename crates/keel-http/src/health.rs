//! `/health/live` and `/health/ready`, served from a [`HealthRegistry`].

use axum::Router;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http::{HeaderValue, StatusCode, header};
use keel_core::Probe;
use keel_telemetry::HealthRegistry;
use keel_telemetry::health::ProbeReport;

/// The liveness path.
pub const LIVENESS_PATH: &str = "/health/live";
/// The readiness path.
pub const READINESS_PATH: &str = "/health/ready";

/// A router with `GET /health/live` and `GET /health/ready` (and `HEAD`),
/// answering 200 when the probe is serving (healthy or degraded) and 503
/// when it is not, with the JSON report as the body.
///
/// Merge it into the service's router, or serve it on a separate port
/// for the orchestrator.
///
/// ```
/// use axum::Router;
/// use keel_telemetry::HealthRegistry;
///
/// let registry = HealthRegistry::new();
/// // registry.register(keel_database::DatabaseReadiness::new(db.clone()));
/// let app: Router = Router::new().merge(keel_http::health_router(registry));
/// ```
pub fn health_router<S>(registry: HealthRegistry) -> Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    Router::new()
        .route(LIVENESS_PATH, get(live))
        .route(READINESS_PATH, get(ready))
        .with_state(registry)
}

async fn live(State(registry): State<HealthRegistry>) -> Response {
    respond(&registry.report(Probe::Liveness).await)
}

async fn ready(State(registry): State<HealthRegistry>) -> Response {
    respond(&registry.report(Probe::Readiness).await)
}

fn respond(report: &ProbeReport) -> Response {
    let status = if report.is_serving() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::to_vec(&report).unwrap_or_default();
    let mut response = (status, body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}
