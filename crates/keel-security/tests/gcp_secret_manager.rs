//! `GcpSecretManager` driven through the real client, with its endpoint
//! overridden and anonymous credentials, against a local server speaking
//! Secret Manager's REST API (`common::secret_manager`).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::secret_manager::{FakeSecretManager, PROJECT, VersionState};
use keel_core::ErrorKind;
use keel_security::{
    CachedSecrets, GcpSecretManager, GcpSecretManagerConfig, SecretProvider, SecretRef,
    SecretVersion, SecurityError,
};
use tokio::task::JoinSet;

const VALUE: &str = "s3cr3t-Vq7xLr2pN";
const ROTATED: &str = "r0tat3d-Kd93mZaT";

fn kind(err: SecurityError) -> ErrorKind {
    keel_core::Error::from(err).kind()
}

#[tokio::test]
async fn reads_the_latest_a_pinned_or_an_aliased_version() {
    let server = FakeSecretManager::start().await;
    server.add_version("db-password", VALUE);
    server.add_version("db-password", ROTATED);
    server
        .store()
        .aliases
        .insert(("db-password".into(), "prod".into()), 1);
    let provider = server.provider().await;

    let read = |name: &'static str| {
        let provider = &provider;
        async move { provider.get(name).await.unwrap().expose_secret().clone() }
    };
    assert_eq!(read("db-password").await, ROTATED);
    assert_eq!(read("db-password@latest").await, ROTATED);
    assert_eq!(read("db-password@1").await, VALUE);
    assert_eq!(read("db-password@prod").await, VALUE);
    assert_eq!(
        read("projects/keel-test/secrets/db-password/versions/1").await,
        VALUE
    );

    let accessed = provider
        .access(&SecretRef::latest("db-password").unwrap())
        .await
        .unwrap();
    assert_eq!(accessed.version, "2", "latest resolves to a number");
    assert_eq!(accessed.value.expose_secret(), ROTATED);

    // A pin in the configuration applies to the bare name only.
    let pinned = server
        .provider_with(|c| c.pin("db-password", SecretVersion::pinned(1).unwrap()))
        .await;
    assert_eq!(
        pinned.get("db-password").await.unwrap().expose_secret(),
        VALUE
    );
    assert_eq!(
        pinned.get("db-password@2").await.unwrap().expose_secret(),
        ROTATED
    );

    assert_eq!(server.requests("db-password"), 8);
    assert!(
        !server.store().saw_authorization,
        "anonymous credentials send no token"
    );
}

#[tokio::test]
async fn a_missing_secret_or_version_is_not_found() {
    let server = FakeSecretManager::start().await;
    server.add_version("db-password", VALUE);
    let provider = server.provider().await;

    for name in [
        "nope",
        "db-password@9",
        "db-password@stage",
        "projects/other/secrets/db-password",
    ] {
        let err = provider.get(name).await.unwrap_err();
        assert!(
            matches!(&err, SecurityError::SecretNotFound { name: n } if n == name),
            "{name}: {err:?}"
        );
        let core = keel_core::Error::from(err);
        assert_eq!(
            (core.kind(), core.code()),
            (ErrorKind::NotFound, "keel.not_found")
        );
        assert!(!core.is_retryable());
    }
}

#[tokio::test]
async fn a_refused_identity_is_permission_denied() {
    let server = FakeSecretManager::start().await;
    server.add_version("payroll-key", VALUE);
    server.store().denied.insert("payroll-key".into());
    let provider = server.provider().await;

    let err = provider.get("payroll-key").await.unwrap_err();
    assert!(
        matches!(err, SecurityError::SecretPermissionDenied { .. }),
        "{err:?}"
    );
    let core = keel_core::Error::from(err);
    assert_eq!(
        (core.kind(), core.code()),
        (ErrorKind::Forbidden, "keel.forbidden")
    );
    assert_eq!(
        server.requests("payroll-key"),
        1,
        "a refusal is not retried"
    );
}

#[tokio::test]
async fn disabled_and_destroyed_versions_are_refused_by_state() {
    let server = FakeSecretManager::start().await;
    server.add_version("api-key", VALUE);
    server.add_version("api-key", ROTATED);
    server.add_version("api-key", "third");
    server.set_state("api-key", 2, VersionState::Disabled);
    server.set_state("api-key", 3, VersionState::Destroyed);
    let provider = server.provider().await;

    for (name, version) in [
        ("api-key@2", "2"),
        ("api-key@3", "3"),
        ("api-key", "latest"),
    ] {
        let err = provider.get(name).await.unwrap_err();
        assert!(
            matches!(&err, SecurityError::SecretVersionDisabled { version: v, .. } if v == version),
            "{name}: {err:?}"
        );
        assert_eq!(kind(err), ErrorKind::NotFound);
    }
    assert_eq!(
        provider.get("api-key@1").await.unwrap().expose_secret(),
        VALUE
    );

    // Re-enabling makes the version readable again.
    server.set_state("api-key", 2, VersionState::Enabled);
    assert_eq!(
        provider.get("api-key@2").await.unwrap().expose_secret(),
        ROTATED
    );
}

#[tokio::test]
async fn a_server_that_stalls_past_the_time_limit_times_out() {
    let server = FakeSecretManager::start().await;
    server.add_version("slow", VALUE);
    server
        .store()
        .delays
        .insert("slow".into(), Duration::from_secs(120));
    let provider = server
        .provider_with(|c| c.with_timeout(Duration::from_millis(300)))
        .await;

    let err = provider.get("slow").await.unwrap_err();
    assert!(
        matches!(&err, SecurityError::SecretTimeout { after, .. } if *after == Duration::from_millis(300)),
        "{err:?}"
    );
    let core = keel_core::Error::from(err);
    assert_eq!(
        (core.kind(), core.code()),
        (ErrorKind::Timeout, "keel.timeout")
    );
    assert!(core.is_retryable());
}

#[tokio::test]
async fn an_unavailable_server_is_retried_then_reported() {
    let server = FakeSecretManager::start().await;
    server.add_version("flaky", VALUE);

    // Two failures, three attempts: the third answers.
    server.store().failures.insert("flaky".into(), 2);
    let provider = server.provider_with(|c| c.with_attempts(3)).await;
    assert_eq!(provider.get("flaky").await.unwrap().expose_secret(), VALUE);
    assert_eq!(server.requests("flaky"), 3);

    // More failures than attempts: unavailable, retryable.
    server.store().failures.insert("flaky".into(), 5);
    let provider = server.provider_with(|c| c.with_attempts(2)).await;
    let err = provider.get("flaky").await.unwrap_err();
    assert!(
        matches!(err, SecurityError::SecretUnavailable { .. }),
        "{err:?}"
    );
    let core = keel_core::Error::from(err);
    assert_eq!(
        (core.kind(), core.code()),
        (ErrorKind::Unavailable, "keel.unavailable")
    );
    assert_eq!(server.requests("flaky"), 5);

    // Nothing listening at all.
    let gone = GcpSecretManager::connect(
        GcpSecretManagerConfig::local(PROJECT, "http://127.0.0.1:1")
            .unwrap()
            .with_attempts(1),
    )
    .await
    .unwrap();
    let err = gone.get("flaky").await.unwrap_err();
    assert_eq!(kind(err), ErrorKind::Unavailable);
}

#[tokio::test]
async fn a_payload_that_fails_its_checksum_or_is_not_text_is_refused() {
    let server = FakeSecretManager::start().await;
    server.add_version("tampered", VALUE);
    server.store().corrupt.insert("tampered".into());
    server.add_version("binary", vec![0xff, 0xfe, 0x00]);
    let provider = server.provider().await;

    let err = provider.get("tampered").await.unwrap_err();
    assert!(
        matches!(&err, SecurityError::SecretInvalid { reason, .. } if reason.contains("CRC32C")),
        "{err:?}"
    );
    assert!(!format!("{err} {err:?}").contains(VALUE));
    assert_eq!(kind(err), ErrorKind::Internal);

    let err = provider.get("binary").await.unwrap_err();
    assert!(
        matches!(&err, SecurityError::SecretInvalid { reason, .. } if reason.contains("UTF-8")),
        "{err:?}"
    );
}

#[tokio::test]
async fn names_are_checked_before_any_request() {
    let server = FakeSecretManager::start().await;
    let provider = server.provider().await;
    for bad in ["../x", "a/b", "x@0", "x?alt=media", "x@1:access"] {
        let err = provider.get(bad).await.unwrap_err();
        assert!(
            matches!(err, SecurityError::SecretInvalid { .. }),
            "{bad}: {err:?}"
        );
    }
    assert!(server.store().requests.is_empty());
}

#[tokio::test]
async fn a_rotation_is_seen_after_the_ttl_and_not_before() {
    let server = FakeSecretManager::start().await;
    server.add_version("token", VALUE);
    let ttl = Duration::from_secs(2);
    let cache = CachedSecrets::new(Arc::new(server.provider().await), ttl);

    assert_eq!(cache.get("token").await.unwrap().expose_secret(), VALUE);
    server.add_version("token", ROTATED);
    assert_eq!(
        cache.get("token").await.unwrap().expose_secret(),
        VALUE,
        "within the TTL the cached value is served"
    );
    assert_eq!(server.requests("token"), 1);

    tokio::time::sleep(ttl + Duration::from_millis(200)).await;
    assert_eq!(
        cache.get("token").await.unwrap().expose_secret(),
        ROTATED,
        "after the TTL the new version is read"
    );
    assert_eq!(server.requests("token"), 2);
}

#[tokio::test]
async fn a_rejected_value_is_refetched_after_invalidate() {
    let server = FakeSecretManager::start().await;
    server.add_version("db-password", VALUE);
    let secrets: Arc<dyn SecretProvider> = Arc::new(CachedSecrets::new(
        Arc::new(server.provider().await),
        Duration::from_secs(3600),
    ));
    assert_eq!(
        secrets.get("db-password").await.unwrap().expose_secret(),
        VALUE
    );

    // The password was rotated and the database now refuses the old one.
    server.add_version("db-password", ROTATED);
    assert_eq!(
        secrets.get("db-password").await.unwrap().expose_secret(),
        VALUE
    );
    secrets.invalidate("db-password").await;
    assert_eq!(
        secrets.get("db-password").await.unwrap().expose_secret(),
        ROTATED
    );
    assert_eq!(server.requests("db-password"), 2);
}

#[tokio::test]
async fn concurrent_callers_share_one_request() {
    let server = FakeSecretManager::start().await;
    server.add_version("hot", VALUE);
    server.add_version("hot-denied", VALUE);
    {
        let mut store = server.store();
        // Held back so every caller arrives while the first read is out.
        store
            .delays
            .insert("hot".into(), Duration::from_millis(300));
        store
            .delays
            .insert("hot-denied".into(), Duration::from_millis(300));
        store.denied.insert("hot-denied".into());
    }
    let cache = Arc::new(CachedSecrets::new(
        Arc::new(server.provider().await),
        Duration::from_secs(3600),
    ));

    let mut tasks = JoinSet::new();
    for i in 0..48 {
        let cache = Arc::clone(&cache);
        let name = if i % 2 == 0 { "hot" } else { "hot-denied" };
        tasks.spawn(async move { (name, cache.get(name).await) });
    }
    for (name, result) in tasks.join_all().await {
        match (name, result) {
            ("hot", Ok(value)) => assert_eq!(value.expose_secret(), VALUE),
            ("hot-denied", Err(SecurityError::SecretPermissionDenied { .. })) => {}
            (name, other) => panic!("{name}: {other:?}"),
        }
    }
    assert_eq!(server.requests("hot"), 1, "24 callers, one request");
    assert_eq!(server.requests("hot-denied"), 1, "24 callers, one refusal");
}

#[tokio::test]
async fn a_revoked_version_stops_being_served_but_an_outage_does_not() {
    let server = FakeSecretManager::start().await;
    server.add_version("token", VALUE);
    let cache = CachedSecrets::new(
        Arc::new(server.provider_with(|c| c.with_attempts(1)).await),
        Duration::ZERO,
    );
    assert_eq!(cache.get("token").await.unwrap().expose_secret(), VALUE);

    // Secret Manager is down: the last good value is served.
    server.store().failures.insert("token".into(), 1);
    assert_eq!(cache.get("token").await.unwrap().expose_secret(), VALUE);

    // The version is disabled (revoked): no longer served.
    server.set_state("token", 1, VersionState::Disabled);
    let err = cache.get("token").await.unwrap_err();
    assert!(
        matches!(err, SecurityError::SecretVersionDisabled { .. }),
        "{err:?}"
    );
    server.store().failures.insert("token".into(), 1);
    let err = cache.get("token").await.unwrap_err();
    assert_eq!(kind(err), ErrorKind::Unavailable, "nothing left to serve");
}

#[tokio::test]
async fn values_stay_out_of_debug_output() {
    let server = FakeSecretManager::start().await;
    server.add_version("db-password", VALUE);
    let provider = server.provider().await;
    let accessed = provider
        .access(&"db-password".parse().unwrap())
        .await
        .unwrap();
    let cache = CachedSecrets::new(Arc::new(provider), Duration::from_secs(60));
    let value = cache.get("db-password").await.unwrap();
    let shown = format!("{accessed:?} {cache:?} {value:?} {value}");
    assert!(!shown.contains(VALUE), "{shown}");
    assert!(shown.contains("[REDACTED]"), "{shown}");
    assert_eq!(value.expose_secret(), VALUE);
}

#[tokio::test]
async fn an_unusable_configuration_is_refused_at_connect() {
    let local = || GcpSecretManagerConfig::local(PROJECT, "http://127.0.0.1:1").unwrap();
    for config in [
        local().with_timeout(Duration::ZERO),
        local().with_attempts(0),
        local().with_endpoint("not a url"),
    ] {
        let err = GcpSecretManager::connect(config).await.unwrap_err();
        assert!(matches!(err, SecurityError::Config(_)), "{err:?}");
        assert_eq!(kind(err), ErrorKind::Internal);
    }
    let err = GcpSecretManagerConfig::new("Not_A_Project").unwrap_err();
    assert!(
        matches!(err, SecurityError::SecretInvalid { .. }),
        "{err:?}"
    );
}

#[tokio::test]
async fn regional_secrets_are_named_with_their_location() {
    let server = FakeSecretManager::start().await;
    server.add_version("db-password", VALUE);
    let provider = server
        .provider_with(|c| c.with_location("europe-west1").unwrap())
        .await;
    assert_eq!(
        provider.get("db-password@1").await.unwrap().expose_secret(),
        VALUE
    );
    assert_eq!(
        server.store().paths,
        ["projects/keel-test/locations/europe-west1/secrets/db-password/versions/1"]
    );
    assert!(
        GcpSecretManagerConfig::new(PROJECT)
            .unwrap()
            .with_location("Europe/West")
            .is_err()
    );
}
