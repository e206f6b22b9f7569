//! The promise that secret values never leak into logs, errors or panic
//! messages.
//!
//! This test installs a capturing `tracing` subscriber, so it lives in a test
//! binary of its own: `tracing` caches per-callsite interest for the whole
//! process, and a test running at the same time without a subscriber could
//! make the callsites it shares with this one look uninteresting.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_security::{CachedSecrets, FileSecrets, SecretProvider};

const VALUE: &str = "s3cr3t-Vq7xLr2pN";

fn write(dir: &tempfile::TempDir, name: &str, contents: &str) {
    std::fs::write(dir.path().join(name), contents).unwrap();
}

/// A `MakeWriter` collecting everything logged into one string.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

#[tokio::test]
async fn secret_values_never_reach_logs_errors_or_panics() {
    let logs = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(logs.clone())
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let dir = tempfile::tempdir().unwrap();
    write(&dir, "db-password", VALUE);
    let provider: Arc<dyn SecretProvider> = Arc::new(FileSecrets::new(dir.path()));
    let cache = CachedSecrets::new(provider, Duration::ZERO);
    let secret = cache.get("db-password").await.unwrap();

    // Make the file unreadable (a directory in its place: a transient I/O
    // failure), so the cache logs a failed refresh while still holding the
    // secret.
    std::fs::remove_file(dir.path().join("db-password")).unwrap();
    std::fs::create_dir(dir.path().join("db-password")).unwrap();
    let served = cache.get("db-password").await.unwrap();
    tracing::info!(?secret, %served, cache = ?cache, "logging the secret by accident");
    std::fs::write(dir.path().join("binary"), [0xff, 0xfe]).unwrap();
    let invalid = FileSecrets::new(dir.path())
        .get("binary")
        .await
        .unwrap_err();
    let unavailable = FileSecrets::new(dir.path().join("db-password"))
        .get("x")
        .await
        .unwrap_err();
    let core: keel_core::Error = invalid.into();

    // The same through Secret Manager: a read, a refresh that fails while
    // the value is held (logged), and a payload refused for its checksum.
    let server = common::secret_manager::FakeSecretManager::start().await;
    server.add_version("api-key", VALUE);
    let gcp = CachedSecrets::new(
        Arc::new(server.provider_with(|c| c.with_attempts(1)).await),
        Duration::ZERO,
    );
    let from_gcp = gcp.get("api-key").await.unwrap();
    server.store().failures.insert("api-key".into(), 1);
    let served_by_gcp = gcp.get("api-key").await.unwrap();
    server.store().corrupt.insert("api-key".into());
    let corrupt = server.provider().await.get("api-key").await.unwrap_err();
    tracing::info!(?from_gcp, %served_by_gcp, gcp = ?gcp, "logging the secret by accident");

    // A panic formats its payload with Debug: make one that carries the
    // secret (a successful read met by `expect_err`).
    let read = cache.get("db-password").await;
    let panic = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        read.expect_err("unexpected success")
    }))
    .unwrap_err();
    let panic_message = panic.downcast_ref::<String>().cloned().unwrap_or_default();

    let texts = [
        String::from_utf8(logs.0.lock().unwrap().clone()).unwrap(),
        format!("{core} {core:?}"),
        format!("{unavailable} {unavailable:?}"),
        format!("{secret} {secret:?} {served:#?}"),
        serde_json::to_string(&secret).unwrap(),
        panic_message.clone(),
        format!("{corrupt} {corrupt:?} {from_gcp:?} {served_by_gcp:#?}"),
    ];
    assert!(
        texts[0].contains("secret refresh failed"),
        "the failure was logged: {}",
        texts[0]
    );
    assert!(texts[0].contains("db-password"), "by name: {}", texts[0]);
    assert!(texts[0].contains("api-key"), "by name: {}", texts[0]);
    assert!(panic_message.contains("[REDACTED]"), "{panic_message}");
    for text in &texts {
        assert!(!text.contains(VALUE), "secret leaked: {text}");
    }
    assert_eq!(served.expose_secret(), VALUE, "the value itself is intact");
}
