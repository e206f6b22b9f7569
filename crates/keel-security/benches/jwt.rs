//! Bearer-token verification: `JwtVerifier` with a fixed key and with a
//! cached JSON Web Key Set (served by a local axum server), against a raw
//! `jsonwebtoken::decode` of the same token with the same checks, in the
//! same run.
//!
//! Run with `cargo bench -p keel-security --bench jwt`; figures are in
//! `docs/benchmarks-security.md`.

#![allow(
    missing_docs,
    reason = "criterion's macros generate undocumented items"
)]

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::header;
use axum::routing::get;
use criterion::{Criterion, criterion_group, criterion_main};
use jsonwebtoken::{DecodingKey, EncodingKey, Header, Validation};
use keel_security::{
    Algorithm, JwksConfig, JwksKeySource, JwtConfig, JwtVerifier, KeySource, Secret,
    VerificationKey,
};
use serde_json::{Value, json};
use tokio::runtime::Runtime;

// Test-only keys, see tests/fixtures/README.md.
const KEY1_PRIVATE: &[u8] = include_bytes!("../tests/fixtures/key1.private.pem");
const KEY1_PUBLIC: &[u8] = include_bytes!("../tests/fixtures/key1.public.pem");
const KEY1_JWK: &str = include_str!("../tests/fixtures/key1.jwk.json");
const HMAC_SECRET: &[u8] = b"a benchmark HMAC secret of 32+ bytes";

const ISSUER: &str = "https://idp.bench";
const AUDIENCE: &str = "orders-api";

fn claims() -> Value {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs();
    json!({
        "iss": ISSUER, "aud": AUDIENCE, "sub": "user-42", "iat": now, "exp": now + 3_600,
        "tenant": "acme", "roles": ["clerk", "auditor"], "scope": "orders:read orders:write",
    })
}

fn token(alg: Algorithm, key: &EncodingKey) -> String {
    let mut header = Header::new(alg);
    header.kid = Some("key1".into());
    jsonwebtoken::encode(&header, &claims(), key).expect("sign")
}

fn raw_validation(alg: Algorithm) -> Validation {
    let mut v = Validation::new(alg);
    v.set_issuer(&[ISSUER]);
    v.set_audience(&[AUDIENCE]);
    v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
    v
}

/// Serves `{"keys": [key1]}` on a local port; returns the URL.
fn jwks_server(rt: &Runtime) -> String {
    rt.block_on(async {
        let jwk: Value = serde_json::from_str(KEY1_JWK).expect("fixture JWK");
        let body = json!({ "keys": [jwk] }).to_string();
        let app = axum::Router::new().route(
            "/jwks",
            get(move || {
                let body = body.clone();
                async move { ([(header::CONTENT_TYPE, "application/json")], body) }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}/jwks", listener.local_addr().expect("addr"));
        tokio::spawn(async move { axum::serve(listener, app).await.expect("serve") });
        url
    })
}

fn bench_rs256(c: &mut Criterion) {
    let rt = Runtime::new().expect("runtime");
    let token = token(
        Algorithm::RS256,
        &EncodingKey::from_rsa_pem(KEY1_PRIVATE).expect("private key"),
    );
    let config = || JwtConfig::new(ISSUER, AUDIENCE, [Algorithm::RS256]);
    let fixed = JwtVerifier::new(
        config(),
        KeySource::fixed([VerificationKey::rsa_pem(Some("key1"), KEY1_PUBLIC).expect("key")]),
    )
    .expect("verifier");
    let jwks = Arc::new(
        JwksKeySource::new(
            JwksConfig::new(jwks_server(&rt))
                .require_https(false)
                .max_age(Duration::from_secs(3_600)),
        )
        .expect("jwks source"),
    );
    rt.block_on(jwks.refresh()).expect("first fetch");
    let cached = JwtVerifier::new(config(), KeySource::jwks(jwks)).expect("verifier");
    let raw_key = DecodingKey::from_rsa_pem(KEY1_PUBLIC).expect("public key");
    let raw_validation = raw_validation(Algorithm::RS256);
    // Every contender must accept the token, or the figures mean nothing.
    assert_eq!(
        rt.block_on(fixed.verify(&token)).expect("fixed").subject,
        "user-42"
    );
    assert_eq!(
        rt.block_on(cached.verify(&token)).expect("jwks").subject,
        "user-42"
    );
    jsonwebtoken::decode::<Value>(&token, &raw_key, &raw_validation).expect("raw");

    let mut group = c.benchmark_group("jwt_rs256");
    group.bench_function("raw_jsonwebtoken_decode", |b| {
        b.iter(|| jsonwebtoken::decode::<Value>(&token, &raw_key, &raw_validation).expect("raw"));
    });
    group.bench_function("keel_fixed_key", |b| {
        b.to_async(&rt)
            .iter(|| async { fixed.verify(&token).await.expect("fixed") });
    });
    group.bench_function("keel_cached_jwks", |b| {
        b.to_async(&rt)
            .iter(|| async { cached.verify(&token).await.expect("jwks") });
    });
    group.finish();
}

fn bench_hs256(c: &mut Criterion) {
    let rt = Runtime::new().expect("runtime");
    let token = token(Algorithm::HS256, &EncodingKey::from_secret(HMAC_SECRET));
    let secret = Secret::new(HMAC_SECRET.to_vec());
    let fixed = JwtVerifier::new(
        JwtConfig::new(ISSUER, AUDIENCE, [Algorithm::HS256]),
        KeySource::fixed([VerificationKey::hmac(Some("key1"), &secret).expect("key")]),
    )
    .expect("verifier");
    let raw_key = DecodingKey::from_secret(HMAC_SECRET);
    let raw_validation = raw_validation(Algorithm::HS256);
    assert_eq!(
        rt.block_on(fixed.verify(&token)).expect("fixed").subject,
        "user-42"
    );
    jsonwebtoken::decode::<Value>(&token, &raw_key, &raw_validation).expect("raw");

    let mut group = c.benchmark_group("jwt_hs256");
    group.bench_function("raw_jsonwebtoken_decode", |b| {
        b.iter(|| jsonwebtoken::decode::<Value>(&token, &raw_key, &raw_validation).expect("raw"));
    });
    group.bench_function("keel_fixed_key", |b| {
        b.to_async(&rt)
            .iter(|| async { fixed.verify(&token).await.expect("fixed") });
    });
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench_rs256, bench_hs256
}
criterion_main!(benches);
