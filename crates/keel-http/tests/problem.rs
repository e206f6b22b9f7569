//! Errors returned by real axum handlers, read back as HTTP responses.

use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::routing::get;
use http::{Request, StatusCode, header};
use http_body_util::BodyExt as _;
use keel_core::{CommandError, DomainError, Error, ExpectedVersion, Version, VersionConflict};
use keel_http::{ApiError, PROBLEM_JSON, Problem, status_for};
use tower::ServiceExt as _;

const PASSWORD: &str = "hunter2-Sup3rSecret";
const HOST: &str = "pg-primary.internal.example.com";

fn leaky_source() -> std::io::Error {
    std::io::Error::other(format!(
        "connection to postgres://orders:{PASSWORD}@{HOST}:5432/orders refused; SELECT * FROM orders WHERE id = 1"
    ))
}

fn app() -> Router {
    Router::new()
        .route(
            "/conflict",
            get(|| async {
                Err::<(), ApiError>(
                    Error::from(VersionConflict {
                        subject: "Order-42".into(),
                        expected: ExpectedVersion::Exact(Version::new(3)),
                        actual: Version::new(5),
                    })
                    .into(),
                )
            }),
        )
        .route(
            "/internal",
            get(|| async {
                Err::<(), ApiError>(
                    Error::internal(format!("query failed on {HOST}"), leaky_source()).into(),
                )
            }),
        )
        .route(
            "/unavailable",
            get(|| async {
                Err::<(), ApiError>(
                    Error::unavailable(
                        "postgres",
                        format!("cannot reach {HOST} as orders:{PASSWORD}"),
                        leaky_source(),
                    )
                    .into(),
                )
            }),
        )
        .route(
            "/timeout",
            get(|| async {
                Err::<(), ApiError>(
                    Error::Timeout {
                        operation: format!("acquire on {HOST}").into(),
                        after: Duration::from_secs(5),
                    }
                    .into(),
                )
            }),
        )
        .route(
            "/invalid",
            get(|| async {
                Err::<(), ApiError>(
                    Error::invalid_input("page_size", "must be between 1 and 1000").into(),
                )
            }),
        )
        .route(
            "/missing",
            get(|| async { Err::<(), ApiError>(Error::not_found("order 42").into()) }),
        )
        .route(
            "/unauthorized",
            get(|| async {
                Err::<(), ApiError>(
                    Error::Unauthorized {
                        reason: "the token has expired".into(),
                    }
                    .into(),
                )
            }),
        )
        .route(
            "/rejected",
            get(|| async {
                let outcome: Result<(), CommandError<DomainError>> = Err(CommandError::Rejected(
                    DomainError::new("order.already_shipped", "the order has already shipped"),
                ));
                outcome?;
                Ok::<(), ApiError>(())
            }),
        )
        .route(
            "/command-infra",
            get(|| async {
                let outcome: Result<(), CommandError<DomainError>> =
                    Err(CommandError::Infrastructure(Error::not_found("cart 7")));
                outcome?;
                Ok::<(), ApiError>(())
            }),
        )
}

async fn call(path: &str) -> (StatusCode, http::HeaderMap, String, serde_json::Value) {
    let response = app()
        .oneshot(Request::get(path).body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8(bytes.to_vec()).unwrap();
    let json = serde_json::from_str(&text).unwrap();
    (status, headers, text, json)
}

#[tokio::test]
async fn a_version_conflict_is_409_with_expected_and_actual() {
    let (status, headers, _, body) = call("/conflict").await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(headers[header::CONTENT_TYPE], PROBLEM_JSON);
    assert_eq!(body["type"], "urn:keel:problem:keel.conflict.version");
    assert_eq!(body["title"], "Version conflict");
    assert_eq!(body["status"], 409);
    assert_eq!(body["code"], "keel.conflict.version");
    assert_eq!(body["expected"], "version 3");
    assert_eq!(body["actual"], 5);
    assert_eq!(body["retryable"], false);
    assert!(body["detail"].as_str().unwrap().contains("Order-42"));
}

#[tokio::test]
async fn internal_and_dependency_failures_leak_nothing() {
    for (path, status, code, retryable) in [
        (
            "/internal",
            StatusCode::INTERNAL_SERVER_ERROR,
            "keel.internal",
            false,
        ),
        (
            "/unavailable",
            StatusCode::SERVICE_UNAVAILABLE,
            "keel.unavailable",
            true,
        ),
        (
            "/timeout",
            StatusCode::GATEWAY_TIMEOUT,
            "keel.timeout",
            true,
        ),
    ] {
        let (got, headers, text, body) = call(path).await;
        assert_eq!(got, status, "{path}");
        assert_eq!(headers[header::CONTENT_TYPE], PROBLEM_JSON);
        assert_eq!(body["code"], code);
        assert_eq!(body["retryable"], retryable);
        for secret in [PASSWORD, HOST, "SELECT", "postgres", "5432"] {
            assert!(!text.contains(secret), "{path} leaked {secret:?}: {text}");
        }
        assert!(!body["detail"].as_str().unwrap().is_empty());
    }
}

#[tokio::test]
async fn caller_errors_keep_their_safe_detail() {
    let (status, _, _, body) = call("/invalid").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["code"], "keel.invalid_input");
    assert_eq!(body["field"], "page_size");
    assert_eq!(
        body["detail"],
        "invalid page_size: must be between 1 and 1000"
    );

    let (status, _, _, body) = call("/missing").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["detail"], "order 42 was not found");

    let (status, headers, _, body) = call("/unauthorized").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(headers[header::WWW_AUTHENTICATE], "Bearer");
    assert_eq!(body["detail"], "the token has expired");
}

#[tokio::test]
async fn command_errors_map_rejections_to_422_and_infrastructure_by_kind() {
    let (status, _, _, body) = call("/rejected").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["code"], "order.already_shipped");
    assert_eq!(body["type"], "urn:keel:problem:order.already_shipped");
    assert_eq!(body["detail"], "the order has already shipped");

    let (status, _, _, body) = call("/command-infra").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["code"], "keel.not_found");
}

#[test]
fn every_kind_has_a_status_and_problems_round_trip() {
    use keel_core::ErrorKind::*;
    let expected = [
        (Conflict, 409),
        (NotFound, 404),
        (InvalidInput, 400),
        (Unauthorized, 401),
        (Forbidden, 403),
        (Unavailable, 503),
        (Timeout, 504),
        (Internal, 500),
    ];
    for (kind, status) in expected {
        assert_eq!(status_for(kind).as_u16(), status, "{kind}");
    }
    let problem = Problem::from_error(&Error::Forbidden {
        reason: "orders of another tenant".into(),
    })
    .with_instance("/orders/9");
    let back: Problem = serde_json::from_str(&serde_json::to_string(&problem).unwrap()).unwrap();
    assert_eq!(back, problem);
    assert_eq!(back.status, 403);
}
