//! Secret providers, the cache, and the promise that values never leak into
//! logs, errors or panic messages.

use std::sync::Arc;
use std::time::Duration;

use keel_security::{CachedSecrets, EnvSecrets, FileSecrets, SecretProvider, SecurityError};

const VALUE: &str = "s3cr3t-Vq7xLr2pN";
const ROTATED: &str = "r0tat3d-Kd93mZaT";

fn write(dir: &tempfile::TempDir, name: &str, contents: &str) {
    std::fs::write(dir.path().join(name), contents).unwrap();
}

#[tokio::test]
async fn file_secrets_read_a_mounted_directory() {
    let dir = tempfile::tempdir().unwrap();
    write(&dir, "db-password", &format!("{VALUE}\n"));
    write(&dir, "api-key", "  spaced  ");
    write(&dir, "crlf", "line\r\n");
    let provider = FileSecrets::new(dir.path());

    assert_eq!(
        provider.get("db-password").await.unwrap().expose_secret(),
        VALUE
    );
    assert_eq!(
        provider.get("api-key").await.unwrap().expose_secret(),
        "  spaced  "
    );
    assert_eq!(provider.get("crlf").await.unwrap().expose_secret(), "line");

    let err = provider.get("missing").await.unwrap_err();
    assert!(
        matches!(&err, SecurityError::SecretNotFound { name } if name == "missing"),
        "{err:?}"
    );
    let err = provider.get("../db-password").await.unwrap_err();
    assert!(
        matches!(err, SecurityError::SecretInvalid { .. }),
        "{err:?}"
    );

    std::fs::write(dir.path().join("binary"), [0xff, 0xfe, 0x00]).unwrap();
    let err = provider.get("binary").await.unwrap_err();
    assert!(
        matches!(err, SecurityError::SecretInvalid { .. }),
        "{err:?}"
    );
    write(&dir, "huge", &"x".repeat(64 * 1024 + 1));
    let err = provider.get("huge").await.unwrap_err();
    assert!(
        matches!(err, SecurityError::SecretInvalid { .. }),
        "{err:?}"
    );
}

#[tokio::test]
async fn file_secrets_see_a_rotated_mount_at_once() {
    let dir = tempfile::tempdir().unwrap();
    write(&dir, "token", VALUE);
    let provider = FileSecrets::new(dir.path());
    assert_eq!(provider.get("token").await.unwrap().expose_secret(), VALUE);
    write(&dir, "token", ROTATED);
    assert_eq!(
        provider.get("token").await.unwrap().expose_secret(),
        ROTATED
    );
}

#[tokio::test]
async fn env_secrets_read_prefixed_variables() {
    // Setting variables is unsafe in edition 2024 (and unsafe code is
    // forbidden here), so read one cargo sets for every test run.
    let provider = EnvSecrets::new();
    let value = provider.get("CARGO_PKG_NAME").await.unwrap();
    assert_eq!(value.expose_secret(), env!("CARGO_PKG_NAME"));
    let prefixed = EnvSecrets::with_prefix("CARGO_PKG_");
    assert_eq!(
        prefixed.get("NAME").await.unwrap().expose_secret(),
        env!("CARGO_PKG_NAME")
    );

    let err = provider
        .get("KEEL_SECURITY_TEST_SURELY_UNSET_7f3a")
        .await
        .unwrap_err();
    assert!(
        matches!(err, SecurityError::SecretNotFound { .. }),
        "{err:?}"
    );
}

#[tokio::test]
async fn the_cache_serves_until_the_ttl_then_rereads() {
    let dir = tempfile::tempdir().unwrap();
    write(&dir, "token", VALUE);
    let cache = CachedSecrets::new(
        Arc::new(FileSecrets::new(dir.path())),
        Duration::from_millis(200),
    );
    assert_eq!(cache.get("token").await.unwrap().expose_secret(), VALUE);

    write(&dir, "token", ROTATED);
    assert_eq!(
        cache.get("token").await.unwrap().expose_secret(),
        VALUE,
        "cached"
    );
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(
        cache.get("token").await.unwrap().expose_secret(),
        ROTATED,
        "reread after the TTL"
    );
}

#[tokio::test]
async fn the_cache_keeps_the_last_good_value_through_a_transient_failure() {
    let dir = tempfile::tempdir().unwrap();
    write(&dir, "token", VALUE);
    let cache = CachedSecrets::new(Arc::new(FileSecrets::new(dir.path())), Duration::ZERO);
    cache.get("token").await.unwrap();

    // A directory in the file's place: reading fails with an I/O error.
    std::fs::remove_file(dir.path().join("token")).unwrap();
    std::fs::create_dir(dir.path().join("token")).unwrap();
    assert_eq!(cache.get("token").await.unwrap().expose_secret(), VALUE);
    assert_eq!(cache.refresh_all().await, 0);
    assert_eq!(cache.get("token").await.unwrap().expose_secret(), VALUE);

    cache.invalidate("token").await;
    let err = cache.get("token").await.unwrap_err();
    assert!(
        matches!(err, SecurityError::SecretUnavailable { .. }),
        "{err:?}"
    );
}

#[tokio::test]
async fn the_cache_drops_a_value_the_backend_no_longer_has() {
    let dir = tempfile::tempdir().unwrap();
    write(&dir, "token", VALUE);
    let cache = CachedSecrets::new(Arc::new(FileSecrets::new(dir.path())), Duration::ZERO);
    cache.get("token").await.unwrap();

    // Removing the secret is an answer (often a revocation), not an outage.
    std::fs::remove_file(dir.path().join("token")).unwrap();
    let err = cache.get("token").await.unwrap_err();
    assert!(
        matches!(err, SecurityError::SecretNotFound { .. }),
        "{err:?}"
    );
    assert_eq!(cache.refresh_all().await, 0, "nothing left to refresh");
}

#[tokio::test]
async fn refresh_all_rereads_every_cached_secret() {
    let dir = tempfile::tempdir().unwrap();
    write(&dir, "a", VALUE);
    write(&dir, "b", VALUE);
    let cache = CachedSecrets::new(
        Arc::new(FileSecrets::new(dir.path())),
        Duration::from_secs(3600),
    );
    cache.get("a").await.unwrap();
    cache.get("b").await.unwrap();
    write(&dir, "a", ROTATED);
    assert_eq!(cache.refresh_all().await, 2);
    assert_eq!(cache.get("a").await.unwrap().expose_secret(), ROTATED);
}
