//! `keel_http::problem_response` as the rejection of keel-security's
//! `BearerAuthLayer`: refused requests get problem+json, accepted ones
//! carry the principal.

use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::routing::get;
use axum::{Extension, Router};
use http::{Request, StatusCode, header};
use jsonwebtoken::{EncodingKey, Header};
use keel_http::{PROBLEM_JSON, problem_response};
use keel_security::pipeline::BearerAuthLayer;
use keel_security::{
    Algorithm, JwtConfig, JwtVerifier, KeySource, Principal, Secret, VerificationKey,
};
use serde_json::{Value, json};
use tower::ServiceExt;

const SECRET: &[u8] = b"a test-only HMAC secret for keel-http, 32+ bytes";

fn verifier() -> JwtVerifier {
    JwtVerifier::new(
        JwtConfig::new("https://idp.test", "carts-api", [Algorithm::HS256]),
        KeySource::fixed([VerificationKey::hmac(None, &Secret::new(SECRET.to_vec())).unwrap()]),
    )
    .unwrap()
}

fn token(expires_in: i64) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &json!({"iss": "https://idp.test", "aud": "carts-api", "sub": "alice",
                "tenant": "acme", "exp": now + expires_in}),
        &EncodingKey::from_secret(SECRET),
    )
    .unwrap()
}

async fn body_text(response: axum::response::Response) -> String {
    let bytes = axum::body::to_bytes(response.into_body(), 64 * 1024)
        .await
        .unwrap();
    String::from_utf8(bytes.to_vec()).unwrap()
}

#[tokio::test]
async fn refused_requests_get_problem_json_and_accepted_ones_the_principal() {
    let app = Router::new()
        .route(
            "/me",
            get(|Extension(p): Extension<Principal>| async move { p.subject }),
        )
        .layer(BearerAuthLayer::new(verifier(), problem_response));
    let request = |auth: Option<String>| {
        let mut builder = Request::get("/me");
        if let Some(auth) = auth {
            builder = builder.header(header::AUTHORIZATION, auth);
        }
        builder.body(Body::empty()).unwrap()
    };

    let ok = app
        .clone()
        .oneshot(request(Some(format!("Bearer {}", token(600)))))
        .await
        .unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
    assert_eq!(body_text(ok).await, "alice");

    for (auth, detail) in [
        (None, "no bearer token"),
        (Some(format!("Basic {}", token(600))), "no bearer token"),
        (Some(format!("Bearer {}", token(-3600))), "token expired"),
        (Some("Bearer not.a.token".to_owned()), "malformed token"),
    ] {
        let refused = app.clone().oneshot(request(auth.clone())).await.unwrap();
        assert_eq!(refused.status(), StatusCode::UNAUTHORIZED, "{auth:?}");
        assert_eq!(refused.headers()[header::WWW_AUTHENTICATE], "Bearer");
        assert_eq!(refused.headers()[header::CONTENT_TYPE], PROBLEM_JSON);
        let problem: Value = serde_json::from_str(&body_text(refused).await).unwrap();
        assert_eq!(problem["status"], 401);
        assert_eq!(problem["code"], "keel.unauthorized");
        assert_eq!(problem["type"], "urn:keel:problem:keel.unauthorized");
        assert!(
            problem["detail"].as_str().unwrap().starts_with(detail),
            "{auth:?}: {problem}"
        );
    }
}

#[tokio::test]
async fn a_key_set_that_cannot_be_fetched_is_a_retryable_503_without_its_url() {
    let down = keel_core::Error::unavailable(
        "jwks",
        "could not load the key set from https://idp.internal/jwks",
        std::io::Error::other("refused"),
    );
    let response = problem_response(&down);
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let text = body_text(response).await;
    assert!(!text.contains("idp.internal"), "{text}");
    let problem: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(problem["retryable"], true);
}

#[tokio::test]
async fn resource_exhausted_is_429_with_retry_after_rounded_up() {
    let busy = keel_core::Error::ResourceExhausted {
        resource: "concurrent calls".into(),
        retry_after: Some(std::time::Duration::from_millis(1500)),
    };
    let response = problem_response(&busy);
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(response.headers()[header::RETRY_AFTER], "2");
    let problem: Value = serde_json::from_str(&body_text(response).await).unwrap();
    assert_eq!(problem["code"], "keel.resource_exhausted");
    assert_eq!(problem["retry_after"], 2);
    assert_eq!(problem["retryable"], true);
}
