//! Bearer authentication at the edge: an axum router and a gRPC-shaped
//! service behind `BearerAuthLayer`, each with a rejection of its own (the
//! transports' renderings, problem+json and gRPC status, are tested in
//! keel-http and keel-grpc).
#![cfg(feature = "http")]

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::routing::get;
use axum::{Extension, Router};
use http::{Request, Response, StatusCode, header};
use jsonwebtoken::{EncodingKey, Header};
use keel_security::pipeline::BearerAuthLayer;
use keel_security::{
    Algorithm, JwtConfig, JwtVerifier, KeySource, Principal, Secret, VerificationKey,
};
use serde_json::json;
use tower::ServiceExt;

const SECRET: &[u8] = b"a test-only HMAC secret, 32 bytes or more";

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

async fn me(Extension(principal): Extension<Principal>) -> String {
    format!(
        "{}@{}",
        principal.subject,
        principal.tenant.unwrap_or_default()
    )
}

/// Refuses with the status and the caller-safe detail, as text.
fn refuse_as_text(error: &keel_core::Error) -> Response<Body> {
    let shown = error.describe();
    let mut response = Response::new(Body::from(format!("{}: {}", shown.code, shown.detail)));
    *response.status_mut() = StatusCode::from_u16(shown.http_status).unwrap();
    response
}

async fn body_text(response: Response<Body>) -> String {
    let bytes = axum::body::to_bytes(response.into_body(), 64 * 1024)
        .await
        .unwrap();
    String::from_utf8(bytes.to_vec()).unwrap()
}

#[tokio::test]
async fn axum_routes_see_the_principal_and_refusals_go_to_the_rejection() {
    let app = Router::new()
        .route("/me", get(me))
        .layer(BearerAuthLayer::new(verifier(), refuse_as_text));
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
    assert_eq!(body_text(ok).await, "alice@acme");

    for (auth, detail) in [
        (None, "no bearer token"),
        (Some(format!("Basic {}", token(600))), "no bearer token"),
        (Some(format!("Bearer {}", token(-3600))), "token expired"),
        (Some("Bearer not.a.token".to_owned()), "malformed token"),
    ] {
        let refused = app.clone().oneshot(request(auth.clone())).await.unwrap();
        assert_eq!(refused.status(), StatusCode::UNAUTHORIZED, "{auth:?}");
        let text = body_text(refused).await;
        assert!(
            text.starts_with(&format!("keel.unauthorized: {detail}")),
            "{auth:?}: {text}"
        );
    }
}

#[tokio::test]
async fn refused_calls_never_reach_the_inner_service() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&calls);
    let inner = tower::service_fn(move |request: Request<String>| {
        let counted = Arc::clone(&counted);
        async move {
            counted.fetch_add(1, Ordering::SeqCst);
            let subject = request
                .extensions()
                .get::<Principal>()
                .map(|p| p.subject.clone())
                .unwrap_or_default();
            Ok::<_, Infallible>(Response::new(subject))
        }
    });
    let refuse = |error: &keel_core::Error| {
        let mut response = Response::new(String::new());
        response
            .headers_mut()
            .insert("refused-with", error.code().parse().unwrap());
        response
    };
    let service = tower::Layer::layer(&BearerAuthLayer::new(verifier(), refuse), inner);
    let call = |auth: &str| {
        Request::post("/carts.v1.Carts/Rename")
            .header(header::AUTHORIZATION, auth)
            .body(String::new())
            .unwrap()
    };

    let ok = service
        .clone()
        .oneshot(call(&format!("Bearer {}", token(600))))
        .await
        .unwrap();
    assert_eq!(ok.body(), "alice");

    let refused = service
        .clone()
        .oneshot(call(&format!("Bearer {}", token(-3600))))
        .await
        .unwrap();
    assert_eq!(refused.headers()["refused-with"], "keel.unauthorized");
    assert!(refused.body().is_empty());
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}
