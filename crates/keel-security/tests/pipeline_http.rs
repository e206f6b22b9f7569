//! Bearer authentication at the HTTP and gRPC edge: an axum router and a
//! gRPC-shaped service behind `BearerAuthLayer`.
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
use serde_json::{Value, json};
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

async fn body_text(response: Response<Body>) -> String {
    let bytes = axum::body::to_bytes(response.into_body(), 64 * 1024)
        .await
        .unwrap();
    String::from_utf8(bytes.to_vec()).unwrap()
}

#[tokio::test]
async fn axum_routes_see_the_principal_and_refusals_are_problem_json() {
    let app = Router::new()
        .route("/me", get(me))
        .layer(BearerAuthLayer::new(verifier()));
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
        assert_eq!(refused.headers()[header::WWW_AUTHENTICATE], "Bearer");
        assert_eq!(
            refused.headers()[header::CONTENT_TYPE],
            "application/problem+json"
        );
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
async fn grpc_services_get_unauthenticated_status_and_the_inner_service_never_runs() {
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
    let service = tower::Layer::layer(&BearerAuthLayer::grpc(verifier()), inner);
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
    assert_eq!(refused.status(), StatusCode::OK);
    assert_eq!(refused.headers()["grpc-status"], "16");
    assert_eq!(refused.headers()["grpc-message"], "token expired");
    assert_eq!(refused.headers()[header::CONTENT_TYPE], "application/grpc");
    assert!(refused.body().is_empty());
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}
