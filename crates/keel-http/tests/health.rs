//! The health router with real checks: PostgreSQL on 127.0.0.1:5432 through
//! keel-database's readiness check, an unreachable database, a check that
//! hangs, served through axum.

use std::time::Duration;

use async_trait::async_trait;
use axum::Router;
use axum::body::Body;
use http::{Request, StatusCode, header};
use http_body_util::BodyExt as _;
use keel_core::{HealthCheck, HealthReport, Probe};
use keel_database::{Database, DatabaseConfig, DatabaseReadiness};
use keel_http::health_router;
use keel_telemetry::health::{CheckOptions, HealthRegistry};
use tower::ServiceExt as _;

fn database(url: &str) -> Database {
    Database::connect_lazy(
        DatabaseConfig::builder()
            .url(url)
            .min_connections(0)
            .max_connections(2)
            .connect_timeout(Duration::from_secs(2))
            .acquire_timeout(Duration::from_secs(2))
            .build()
            .unwrap(),
    )
}

fn postgres() -> Database {
    let url = std::env::var("KEEL_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
    database(&url)
}

struct Hangs;

#[async_trait]
impl HealthCheck for Hangs {
    fn name(&self) -> &str {
        "pubsub"
    }
    async fn check(&self) -> HealthReport {
        std::future::pending().await
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

async fn get(app: &Router, path: &str) -> (StatusCode, http::HeaderMap, serde_json::Value) {
    let response = app
        .clone()
        .oneshot(Request::get(path).body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, headers, serde_json::from_slice(&bytes).unwrap())
}

#[tokio::test]
async fn ready_with_a_reachable_postgres() {
    let registry = HealthRegistry::new();
    registry.register(DatabaseReadiness::new(postgres()));
    registry.register(Alive);
    let app: Router = health_router(registry);

    let (status, headers, body) = get(&app, "/health/ready").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(headers[header::CONTENT_TYPE], "application/json");
    assert_eq!(headers[header::CACHE_CONTROL], "no-store");
    assert_eq!(body["probe"], "readiness");
    assert_ne!(body["status"], "unhealthy");
    assert_eq!(body["checks"][0]["name"], "postgres");

    let (status, _, body) = get(&app, "/health/live").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["checks"][0]["name"], "runtime");
    assert_eq!(body["checks"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn unreachable_postgres_or_a_hanging_check_makes_readiness_503_but_not_liveness() {
    let registry = HealthRegistry::builder().show_details(true).build();
    // Nothing listens on port 1.
    registry.register(DatabaseReadiness::new(database(
        "postgres://orders:pw@127.0.0.1:1/orders",
    )));
    registry.register_with(
        Hangs,
        CheckOptions::new().timeout(Duration::from_millis(300)),
    );
    let app: Router = health_router(registry);

    let (status, _, body) = get(&app, "/health/ready").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["status"], "unhealthy");
    let checks = body["checks"].as_array().unwrap();
    assert_eq!(checks[0]["name"], "postgres");
    assert_eq!(checks[0]["status"], "unhealthy");
    assert_eq!(checks[1]["name"], "pubsub");
    assert_eq!(checks[1]["status"], "unhealthy");
    assert_eq!(checks[1]["detail"], "no answer within 300ms");

    // A database outage must not get the process restarted.
    let (status, _, body) = get(&app, "/health/live").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "healthy");
}

#[tokio::test]
async fn details_are_hidden_by_default() {
    let registry = HealthRegistry::new();
    registry.register(DatabaseReadiness::new(database(
        "postgres://orders:pw@127.0.0.1:1/orders",
    )));
    let app: Router = health_router(registry);
    let (status, _, body) = get(&app, "/health/ready").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body["checks"][0].get("detail").is_none(), "{body}");
    assert!(!body.to_string().contains("127.0.0.1"));
}
