//! Bearer-token verification, against fixed keys and a JWKS served by a
//! local HTTP server, including the attacks that must fail.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{EncodingKey, Header};
use keel_security::{
    Algorithm, ClaimMapping, JwksConfig, JwksKeySource, JwtConfig, JwtVerifier, KeySource,
    SecurityError, VerificationKey,
};
use serde_json::{Value, json};

// Test-only keys, see tests/fixtures/README.md.
const KEY1_PRIVATE: &[u8] = include_bytes!("fixtures/key1.private.pem");
const KEY1_PUBLIC: &[u8] = include_bytes!("fixtures/key1.public.pem");
const KEY1_JWK: &str = include_str!("fixtures/key1.jwk.json");
const KEY2_PRIVATE: &[u8] = include_bytes!("fixtures/key2.private.pem");
const KEY2_JWK: &str = include_str!("fixtures/key2.jwk.json");

const ISSUER: &str = "https://idp.test";
const AUDIENCE: &str = "orders-api";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Claims of a token that every check accepts.
fn valid_claims() -> Value {
    json!({
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "user-42",
        "iat": now(),
        "exp": now() + 600,
        "tenant": "acme",
        "roles": ["clerk", "auditor"],
        "scope": "orders:read orders:write",
        "email": "user42@acme.test",
    })
}

fn sign_rs256(private_pem: &[u8], kid: Option<&str>, claims: &Value) -> String {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(
        &header,
        claims,
        &EncodingKey::from_rsa_pem(private_pem).unwrap(),
    )
    .unwrap()
}

fn key1_token(claims: &Value) -> String {
    sign_rs256(KEY1_PRIVATE, Some("key1"), claims)
}

fn config() -> JwtConfig {
    JwtConfig::new(ISSUER, AUDIENCE, [Algorithm::RS256])
}

fn static_verifier(config: JwtConfig) -> JwtVerifier {
    let key = VerificationKey::rsa_pem(Some("key1"), KEY1_PUBLIC).unwrap();
    JwtVerifier::new(config, KeySource::fixed([key])).unwrap()
}

fn b64(value: &Value) -> String {
    URL_SAFE_NO_PAD.encode(value.to_string())
}

#[tokio::test]
async fn a_valid_token_becomes_a_principal() {
    let mapping = ClaimMapping::default().keep(["email", "absent"]);
    let verifier = static_verifier(config().claims(mapping));
    let principal = verifier
        .verify_bearer(&format!("bearer {}", key1_token(&valid_claims())))
        .await
        .unwrap();
    assert_eq!(principal.subject, "user-42");
    assert_eq!(principal.tenant.as_deref(), Some("acme"));
    assert_eq!(principal.issuer.as_deref(), Some(ISSUER));
    assert_eq!(
        principal.roles.iter().collect::<Vec<_>>(),
        ["auditor", "clerk"]
    );
    assert!(principal.has_scope("orders:read") && principal.has_scope("orders:write"));
    assert_eq!(principal.claim("email"), Some(&json!("user42@acme.test")));
    assert_eq!(
        principal.claims.len(),
        1,
        "only kept claims that exist are copied"
    );
}

#[tokio::test]
async fn scopes_as_an_array_and_a_custom_roles_claim_are_mapped() {
    let mapping = ClaimMapping::default()
        .scopes("scp")
        .roles("groups")
        .tenant(None);
    let verifier = static_verifier(config().claims(mapping));
    let mut claims = valid_claims();
    claims["scp"] = json!(["a", "b"]);
    claims["groups"] = json!(["admins"]);
    let principal = verifier.verify(&key1_token(&claims)).await.unwrap();
    assert_eq!(principal.scopes.iter().collect::<Vec<_>>(), ["a", "b"]);
    assert!(principal.has_role("admins") && !principal.has_role("clerk"));
    assert_eq!(principal.tenant, None);
}

#[tokio::test]
async fn a_non_bearer_authorization_header_is_missing_token() {
    let verifier = static_verifier(config());
    for value in ["Basic dXNlcjpwdw==", "Bearer", "Bearer   ", "token"] {
        let err = verifier.verify_bearer(value).await.unwrap_err();
        assert!(
            matches!(err, SecurityError::MissingToken),
            "{value:?}: {err:?}"
        );
    }
}

#[tokio::test]
async fn alg_none_is_refused() {
    let verifier = static_verifier(config());
    let payload = b64(&valid_claims());
    for alg in ["none", "None", "NONE"] {
        let header = b64(&json!({"alg": alg, "typ": "JWT", "kid": "key1"}));
        for token in [
            format!("{header}.{payload}."),
            format!("{header}.{payload}.c2ln"),
        ] {
            let err = verifier.verify(&token).await.unwrap_err();
            assert!(
                matches!(&err, SecurityError::AlgorithmNotAllowed { algorithm } if algorithm == alg),
                "{alg}: {err:?}"
            );
        }
    }
}

#[tokio::test]
async fn hs256_signed_with_the_rsa_public_key_is_refused() {
    // The classic algorithm confusion: the attacker knows the public key and
    // uses its PEM bytes as an HMAC secret.
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("key1".into());
    let forged = jsonwebtoken::encode(
        &header,
        &valid_claims(),
        &EncodingKey::from_secret(KEY1_PUBLIC),
    )
    .unwrap();

    let err = static_verifier(config()).verify(&forged).await.unwrap_err();
    assert!(
        matches!(&err, SecurityError::AlgorithmNotAllowed { algorithm } if algorithm == "HS256"),
        "{err:?}"
    );

    // Even a verifier that (wrongly) allows HS256 too never uses an RSA key
    // as an HMAC secret.
    let permissive = JwtConfig::new(ISSUER, AUDIENCE, [Algorithm::RS256, Algorithm::HS256]);
    let err = static_verifier(permissive)
        .verify(&forged)
        .await
        .unwrap_err();
    assert!(
        matches!(err, SecurityError::KeyAlgorithmMismatch { .. }),
        "{err:?}"
    );
}

#[tokio::test]
async fn an_expired_token_is_refused() {
    let mut claims = valid_claims();
    claims["exp"] = json!(now() - 3600);
    let err = static_verifier(config())
        .verify(&key1_token(&claims))
        .await
        .unwrap_err();
    assert!(matches!(err, SecurityError::Expired), "{err:?}");
}

#[tokio::test]
async fn leeway_tolerates_small_clock_skew_only() {
    let mut claims = valid_claims();
    claims["exp"] = json!(now() - 20);
    let token = key1_token(&claims);
    static_verifier(config().leeway(Duration::from_secs(60)))
        .verify(&token)
        .await
        .unwrap();
    let err = static_verifier(config().leeway(Duration::ZERO))
        .verify(&token)
        .await
        .unwrap_err();
    assert!(matches!(err, SecurityError::Expired), "{err:?}");
}

#[tokio::test]
async fn a_token_not_yet_valid_is_refused() {
    let mut claims = valid_claims();
    claims["nbf"] = json!(now() + 3600);
    let err = static_verifier(config())
        .verify(&key1_token(&claims))
        .await
        .unwrap_err();
    assert!(matches!(err, SecurityError::NotYetValid), "{err:?}");
}

#[tokio::test]
async fn a_wrong_issuer_is_refused() {
    let mut claims = valid_claims();
    claims["iss"] = json!("https://evil.test");
    let err = static_verifier(config())
        .verify(&key1_token(&claims))
        .await
        .unwrap_err();
    assert!(matches!(err, SecurityError::WrongIssuer), "{err:?}");
}

#[tokio::test]
async fn a_wrong_audience_is_refused() {
    let mut claims = valid_claims();
    claims["aud"] = json!(["billing-api", "other"]);
    let err = static_verifier(config())
        .verify(&key1_token(&claims))
        .await
        .unwrap_err();
    assert!(matches!(err, SecurityError::WrongAudience), "{err:?}");
}

#[tokio::test]
async fn missing_required_claims_are_refused() {
    let verifier = static_verifier(config());
    for claim in ["exp", "sub", "iss", "aud"] {
        let mut claims = valid_claims();
        claims.as_object_mut().unwrap().remove(claim);
        let err = verifier.verify(&key1_token(&claims)).await.unwrap_err();
        assert!(
            matches!(&err, SecurityError::MissingClaim { claim: c } if c == claim),
            "{claim}: {err:?}"
        );
    }
}

#[tokio::test]
async fn badly_shaped_principal_claims_are_refused() {
    let verifier = static_verifier(config());
    for (claim, value) in [
        ("roles", json!("admin")),
        ("roles", json!([1])),
        ("tenant", json!(7)),
        ("sub", json!("")),
    ] {
        let mut claims = valid_claims();
        claims[claim] = value;
        let err = verifier.verify(&key1_token(&claims)).await.unwrap_err();
        assert!(
            matches!(&err, SecurityError::InvalidClaim { claim: c, .. } if c == claim),
            "{claim}: {err:?}"
        );
    }
}

#[tokio::test]
async fn a_tampered_payload_is_refused() {
    let token = key1_token(&valid_claims());
    let (header, rest) = token.split_once('.').unwrap();
    let (_, signature) = rest.split_once('.').unwrap();
    let mut claims = valid_claims();
    claims["roles"] = json!(["admin"]);
    let tampered = format!("{header}.{}.{signature}", b64(&claims));
    let err = static_verifier(config())
        .verify(&tampered)
        .await
        .unwrap_err();
    assert!(matches!(err, SecurityError::InvalidSignature), "{err:?}");
}

#[tokio::test]
async fn a_token_signed_by_another_key_under_a_known_kid_is_refused() {
    let forged = sign_rs256(KEY2_PRIVATE, Some("key1"), &valid_claims());
    let err = static_verifier(config()).verify(&forged).await.unwrap_err();
    assert!(matches!(err, SecurityError::InvalidSignature), "{err:?}");
}

#[tokio::test]
async fn an_oversized_token_is_refused_before_parsing() {
    let mut claims = valid_claims();
    claims["padding"] = json!("x".repeat(2048));
    let token = key1_token(&claims);
    let verifier = static_verifier(config().max_token_bytes(1024));
    let err = verifier.verify(&token).await.unwrap_err();
    assert!(
        matches!(err, SecurityError::TokenTooLarge { size, limit: 1024 } if size == token.len()),
        "{err:?}"
    );
    // Garbage of any size is refused by length alone.
    let err = verifier.verify(&"A".repeat(1 << 20)).await.unwrap_err();
    assert!(
        matches!(err, SecurityError::TokenTooLarge { .. }),
        "{err:?}"
    );
}

#[tokio::test]
async fn malformed_tokens_are_refused() {
    let verifier = static_verifier(config());
    let good_header = b64(&json!({"alg": "RS256", "kid": "key1"}));
    let payload = b64(&valid_claims());
    let cases = [
        String::new(),
        "abc".to_owned(),
        "a.b".to_owned(),
        format!("{good_header}.{payload}.sig.extra"),
        format!("!!!.{payload}.sig"),
        format!("{}.{payload}.sig", URL_SAFE_NO_PAD.encode("not json")),
        format!("{}.{payload}.sig", b64(&json!({"kid": "key1"}))),
        format!(
            "{}.{payload}.sig",
            b64(&json!({"alg": "RS256", "kid": "key1", "crit": ["exp"]}))
        ),
    ];
    for token in cases {
        let err = verifier.verify(&token).await.unwrap_err();
        assert!(
            matches!(err, SecurityError::MalformedToken { .. }),
            "{token:?}: {err:?}"
        );
        assert!(err.is_unauthorized());
    }
    // A well-formed header with garbage after it fails on the signature or
    // the encoding, never with a panic.
    for token in [
        format!("{good_header}.%%%.sig"),
        format!("{good_header}.{payload}.%%%"),
    ] {
        let err = verifier.verify(&token).await.unwrap_err();
        assert!(err.is_unauthorized(), "{token:?}: {err:?}");
    }
}

#[tokio::test]
async fn errors_never_echo_the_token() {
    let mut claims = valid_claims();
    claims["exp"] = json!(now() - 3600);
    let token = key1_token(&claims);
    let err = static_verifier(config()).verify(&token).await.unwrap_err();
    let core: keel_core::Error = err.into();
    assert_eq!(core.kind(), keel_core::ErrorKind::Unauthorized);
    let signature = token.rsplit('.').next().unwrap();
    for text in [core.to_string(), format!("{core:?}")] {
        assert!(!text.contains(signature), "{text}");
    }
}

#[tokio::test]
async fn a_token_without_kid_needs_exactly_one_fitting_key() {
    let token = sign_rs256(KEY1_PRIVATE, None, &valid_claims());
    let key1 = VerificationKey::rsa_pem(None, KEY1_PUBLIC).unwrap();
    let single = JwtVerifier::new(config(), KeySource::fixed([key1.clone()])).unwrap();
    assert_eq!(single.verify(&token).await.unwrap().subject, "user-42");

    // With two candidate keys the verifier refuses to guess.
    let key2 = VerificationKey::from_jwk(&serde_json::from_str(KEY2_JWK).unwrap()).unwrap();
    let ambiguous = JwtVerifier::new(config(), KeySource::fixed([key1, key2])).unwrap();
    let err = ambiguous.verify(&token).await.unwrap_err();
    assert!(
        matches!(err, SecurityError::UnknownKey { kid: None }),
        "{err:?}"
    );
}

#[test]
fn weak_keys_and_open_configurations_are_refused_up_front() {
    let short = keel_security::Secret::new(b"too short".to_vec());
    let err = VerificationKey::hmac(None, &short).unwrap_err();
    assert!(matches!(err, SecurityError::InvalidKey { .. }), "{err:?}");

    let rsa = VerificationKey::rsa_pem(Some("key1"), KEY1_PUBLIC).unwrap();
    let err = rsa.clone().pinned_to(Algorithm::HS256).unwrap_err();
    assert!(matches!(err, SecurityError::InvalidKey { .. }), "{err:?}");
    let pinned = rsa.pinned_to(Algorithm::PS256).unwrap();
    assert!(pinned.can_verify(Algorithm::PS256) && !pinned.can_verify(Algorithm::RS256));

    let err = VerificationKey::rsa_pem(None, b"-----BEGIN PUBLIC KEY-----\nnope\n").unwrap_err();
    assert!(matches!(err, SecurityError::InvalidKey { .. }), "{err:?}");

    let mut no_issuer = config();
    no_issuer.issuers.clear();
    let mut no_audience = config();
    no_audience.audiences.clear();
    let no_algorithm = JwtConfig::new(ISSUER, AUDIENCE, []);
    for (config, missing) in [
        (no_issuer, "issuer"),
        (no_audience, "audience"),
        (no_algorithm, "algorithm"),
    ] {
        let err = JwtVerifier::new(config, KeySource::fixed([])).unwrap_err();
        assert!(
            matches!(&err, SecurityError::Config(m) if m.contains(missing)),
            "{err:?}"
        );
    }
}

// ---------------------------------------------------------------- JWKS ---

/// A JWKS endpoint on 127.0.0.1 that counts its requests.
struct JwksServer {
    url: String,
    hits: Arc<AtomicUsize>,
    keys: Arc<Mutex<Vec<Value>>>,
    failing: Arc<AtomicBool>,
}

#[derive(Clone)]
struct ServerState {
    hits: Arc<AtomicUsize>,
    keys: Arc<Mutex<Vec<Value>>>,
    failing: Arc<AtomicBool>,
}

async fn serve_jwks(state: State<ServerState>) -> Response {
    state.hits.fetch_add(1, Ordering::SeqCst);
    if state.failing.load(Ordering::SeqCst) {
        return (StatusCode::SERVICE_UNAVAILABLE, "down").into_response();
    }
    let body = json!({"keys": *state.keys.lock().unwrap()}).to_string();
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

impl JwksServer {
    async fn start(keys: &[&str]) -> Self {
        let state = ServerState {
            hits: Arc::default(),
            keys: Arc::new(Mutex::new(
                keys.iter()
                    .map(|k| serde_json::from_str(k).unwrap())
                    .collect(),
            )),
            failing: Arc::default(),
        };
        let app = axum::Router::new()
            .route("/jwks", get(serve_jwks))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/jwks", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self {
            url,
            hits: state.hits,
            keys: state.keys,
            failing: state.failing,
        }
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    fn jwks_config(&self, min_refetch_interval: Duration) -> JwksConfig {
        JwksConfig::new(&self.url)
            .require_https(false)
            .min_refetch_interval(min_refetch_interval)
    }

    fn verifier(&self, config: JwksConfig) -> JwtVerifier {
        let source = Arc::new(JwksKeySource::new(config).unwrap());
        JwtVerifier::new(self::config(), KeySource::jwks(source)).unwrap()
    }
}

#[tokio::test]
async fn jwks_keys_are_fetched_once_and_cached() {
    let server = JwksServer::start(&[KEY1_JWK]).await;
    let verifier = server.verifier(server.jwks_config(Duration::from_secs(60)));
    let token = key1_token(&valid_claims());
    for _ in 0..3 {
        assert_eq!(verifier.verify(&token).await.unwrap().subject, "user-42");
    }
    assert_eq!(server.hits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_start_burst_shares_one_fetch() {
    let server = JwksServer::start(&[KEY1_JWK]).await;
    let verifier = server.verifier(server.jwks_config(Duration::from_secs(60)));
    let token = key1_token(&valid_claims());
    let mut burst = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let (verifier, token) = (verifier.clone(), token.clone());
        burst.spawn(async move { verifier.verify(&token).await });
    }
    for result in burst.join_all().await {
        assert_eq!(result.unwrap().subject, "user-42");
    }
    assert_eq!(server.hits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_kid_refetches_once_then_is_refused_without_hammering() {
    let interval = Duration::from_secs(1);
    let server = JwksServer::start(&[KEY1_JWK]).await;
    let verifier = server.verifier(server.jwks_config(interval));
    // Signing is slow in debug builds: sign before the clock matters.
    let (known, ghost) = (
        key1_token(&valid_claims()),
        sign_rs256(KEY2_PRIVATE, Some("ghost"), &valid_claims()),
    );
    verifier.verify(&known).await.unwrap();
    assert_eq!(server.hits(), 1);

    // The set was just loaded: an unknown kid does not refetch yet.
    let err = verifier.verify(&ghost).await.unwrap_err();
    assert!(
        matches!(&err, SecurityError::UnknownKey { kid: Some(k) } if k == "ghost"),
        "{err:?}"
    );
    assert_eq!(server.hits(), 1);

    tokio::time::sleep(interval + Duration::from_millis(100)).await;
    // A burst of forged kids, sequential and concurrent: one refetch in all.
    let mut burst = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let (verifier, ghost) = (verifier.clone(), ghost.clone());
        burst.spawn(async move { verifier.verify(&ghost).await });
    }
    for result in burst.join_all().await {
        assert!(
            matches!(result, Err(SecurityError::UnknownKey { .. })),
            "{result:?}"
        );
    }
    for _ in 0..5 {
        assert!(matches!(
            verifier.verify(&ghost).await,
            Err(SecurityError::UnknownKey { .. })
        ));
    }
    assert_eq!(server.hits(), 2);
}

#[tokio::test]
async fn a_rotated_key_is_accepted_without_restart() {
    let interval = Duration::from_millis(200);
    let server = JwksServer::start(&[KEY1_JWK]).await;
    let verifier = server.verifier(server.jwks_config(interval));
    verifier.verify(&key1_token(&valid_claims())).await.unwrap();

    // The identity provider publishes key2 and starts signing with it.
    server
        .keys
        .lock()
        .unwrap()
        .push(serde_json::from_str(KEY2_JWK).unwrap());
    tokio::time::sleep(interval + Duration::from_millis(50)).await;
    let rotated = sign_rs256(KEY2_PRIVATE, Some("key2"), &valid_claims());
    assert_eq!(verifier.verify(&rotated).await.unwrap().subject, "user-42");
    assert_eq!(server.hits(), 2);
    // Both keys now verify from the cache.
    verifier.verify(&key1_token(&valid_claims())).await.unwrap();
    verifier.verify(&rotated).await.unwrap();
    assert_eq!(server.hits(), 2);
}

#[tokio::test]
async fn an_unreachable_key_set_is_unavailable_and_not_hammered() {
    let server = JwksServer::start(&[KEY1_JWK]).await;
    server.failing.store(true, Ordering::SeqCst);
    let verifier = server.verifier(server.jwks_config(Duration::from_secs(60)));
    let token = key1_token(&valid_claims());
    for _ in 0..3 {
        let err = verifier.verify(&token).await.unwrap_err();
        assert!(matches!(err, SecurityError::KeyFetch { .. }), "{err:?}");
        assert!(!err.is_unauthorized());
        let core: keel_core::Error = err.into();
        assert!(core.is_retryable(), "{core:?}");
    }
    assert_eq!(server.hits(), 1);
}

#[tokio::test]
async fn a_failed_refresh_keeps_the_previous_keys() {
    let server = JwksServer::start(&[KEY1_JWK]).await;
    let config = server
        .jwks_config(Duration::ZERO)
        .max_age(Duration::from_millis(100));
    let verifier = server.verifier(config);
    let token = key1_token(&valid_claims());
    verifier.verify(&token).await.unwrap();

    server.failing.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(150)).await;
    // Stale, refresh fails: the key loaded before still verifies.
    verifier.verify(&token).await.unwrap();
    assert_eq!(server.hits(), 2);
}

#[tokio::test]
async fn a_non_numeric_exp_is_an_invalid_claim_not_a_missing_one() {
    let verifier = static_verifier(config());
    for exp in [json!("tomorrow"), json!(true), json!("1700000000")] {
        let mut claims = valid_claims();
        claims["exp"] = exp.clone();
        let err = verifier.verify(&key1_token(&claims)).await.unwrap_err();
        assert!(
            matches!(&err, SecurityError::InvalidClaim { claim, .. } if claim == "exp"),
            "{exp}: {err:?}"
        );
        assert!(err.is_unauthorized(), "{err:?}");
    }
    // Absent is still missing.
    let mut claims = valid_claims();
    claims.as_object_mut().unwrap().remove("exp");
    let err = verifier.verify(&key1_token(&claims)).await.unwrap_err();
    assert!(
        matches!(&err, SecurityError::MissingClaim { claim } if claim == "exp"),
        "{err:?}"
    );
}

#[test]
fn key_ids_are_printed_plainly() {
    let shown = |e: SecurityError| e.to_string();
    assert_eq!(
        shown(SecurityError::UnknownKey {
            kid: Some("ghost".into())
        }),
        "no key for kid ghost"
    );
    assert_eq!(
        shown(SecurityError::UnknownKey { kid: None }),
        "no key for a token with no kid"
    );
    assert_eq!(
        shown(SecurityError::KeyAlgorithmMismatch {
            kid: Some("key1".into()),
            algorithm: "HS256".into()
        }),
        "key (kid key1) cannot verify HS256 tokens"
    );
    let forged = shown(SecurityError::UnknownKey {
        kid: Some("a\nb".into()),
    });
    assert!(!forged.contains('\n'), "{forged}");
    for e in [
        SecurityError::InvalidKey {
            kid: None,
            reason: "bad PEM".into(),
        },
        SecurityError::UnknownKey { kid: None },
    ] {
        let text = e.to_string();
        assert!(!text.contains("Some(") && !text.contains("None"), "{text}");
    }
}
