//! Loading: the order of the layers, where each value came from, secrets,
//! and every problem reported at once without its value.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use keel_config::{
    BusBackend, CacheBackend, ConfigLoader, Environment, KeelConfig, LogFormatSetting, Source,
};
use keel_security::{FileSecrets, Secret, SecretProvider, SecurityError};

/// A secret store in memory that counts reads.
#[derive(Debug, Default)]
struct Vault {
    secrets: HashMap<String, String>,
    reads: std::sync::atomic::AtomicUsize,
}

impl Vault {
    fn with(pairs: &[(&str, &str)]) -> Arc<Self> {
        Arc::new(Self {
            secrets: pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            reads: Default::default(),
        })
    }
}

#[async_trait]
impl SecretProvider for Vault {
    async fn get(&self, name: &str) -> keel_security::Result<Secret<String>> {
        self.reads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        match name {
            "broken" => Err(SecurityError::SecretUnavailable {
                name: name.to_owned(),
                source: "backend down".into(),
            }),
            _ => self
                .secrets
                .get(name)
                .map(|v| Secret::new(v.clone()))
                .ok_or_else(|| SecurityError::SecretNotFound {
                    name: name.to_owned(),
                }),
        }
    }
}

const CURSOR_KEY: &str = "cursor-key-of-at-least-32-bytes-0123456789";
const AUDIT_KEY: &str = "audit-key-of-at-least-32-bytes-abcdefghijk";
const DB_PASSWORD: &str = "pw-Zq81!never-in-output";

fn write(dir: &Path, file: &str, text: &str) {
    std::fs::write(dir.join(file), text).unwrap();
}

fn loader(dir: &Path) -> ConfigLoader {
    ConfigLoader::new()
        .dir(dir)
        .vars(Vec::<(String, String)>::new())
}

#[tokio::test]
async fn with_nothing_configured_every_key_has_its_default() {
    let dir = tempfile::tempdir().unwrap();
    let config = loader(dir.path()).load().await.unwrap();
    assert_eq!(config.environment, Environment::Development);
    assert_eq!(config.database.max_connections, 100);
    assert_eq!(config.database.min_connections, None);
    assert_eq!(
        config.database.statement_timeout,
        Some(Duration::from_secs(30))
    );
    assert_eq!(config.database.lock_timeout, None);
    assert!(config.database.url.is_none());
    assert_eq!(config.eventbus.backend, BusBackend::Memory);
    assert_eq!(config.cache.backend, CacheBackend::Memory);
    assert_eq!(config.telemetry.log_format, LogFormatSetting::Auto);
    assert_eq!(config.grpc.address.port(), 50051);
    assert_eq!(
        config.source_of("database.max_connections"),
        Source::Default
    );
    // Development may use the public cursor key, asked for by name.
    assert!(config.cursor_key().unwrap().is_public());
    assert!(config.security.audit_keys().unwrap().is_none());
}

#[tokio::test]
async fn later_layers_win_and_each_value_names_its_layer() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "base.toml",
        r#"
        [database]
        max_connections = 40
        min_connections = 2
        acquire_timeout = "2s"
        application_name = "from-base"
        [cache]
        key_prefix = "base:"
        "#,
    );
    write(
        dir.path(),
        "test.toml",
        r#"
        [database]
        min_connections = 3
        application_name = "from-test-file"
        [repository]
        cursor_key = { secret = "cursor" }
        [security.audit]
        key = "secret://audit"
        "#,
    );
    // A file for another environment is never read.
    write(
        dir.path(),
        "production.toml",
        "[database]\nmax_connections = 1\n",
    );
    let vault = Vault::with(&[("cursor", CURSOR_KEY), ("audit", AUDIT_KEY)]);
    let config = ConfigLoader::new()
        .dir(dir.path())
        .vars([
            ("KEEL_ENV", "test"),
            ("KEEL_DB_APPLICATION_NAME", "from-legacy-var"),
            ("KEEL_DB_ACQUIRE_TIMEOUT", "3s"),
            ("KEEL_DATABASE__ACQUIRE_TIMEOUT", "4s"),
            ("KEEL_CACHE__KEY_PREFIX", "env:"),
            ("KEEL_EVENTBUS__SUBSCRIPTION__MAX_DELIVERY_ATTEMPTS", "7"),
            ("UNRELATED", "x"),
        ])
        .set_default("service.name", "orders")
        .secrets(vault.clone())
        .load()
        .await
        .unwrap();
    assert_eq!(config.environment, Environment::Test);
    assert_eq!(config.service.name, "orders");
    assert_eq!(config.source_of("service.name"), Source::Code);
    assert_eq!(config.database.max_connections, 40);
    assert_eq!(
        config.source_of("database.max_connections"),
        Source::File(dir.path().join("base.toml"))
    );
    assert_eq!(config.database.min_connections, Some(3));
    assert_eq!(
        config.source_of("database.min_connections"),
        Source::File(dir.path().join("test.toml"))
    );
    assert_eq!(
        config.database.application_name.as_deref(),
        Some("from-legacy-var")
    );
    assert_eq!(
        config.source_of("database.application_name"),
        Source::EnvVar("KEEL_DB_APPLICATION_NAME".into())
    );
    // The generic name wins over the legacy one.
    assert_eq!(config.database.acquire_timeout, Duration::from_secs(4));
    assert_eq!(
        config.source_of("database.acquire_timeout"),
        Source::EnvVar("KEEL_DATABASE__ACQUIRE_TIMEOUT".into())
    );
    assert_eq!(config.cache.key_prefix, "env:");
    assert_eq!(config.eventbus.subscription.max_delivery_attempts, 7);
    assert_eq!(
        config.source_of("eventbus.subscription.max_delivery_attempts"),
        Source::EnvVar("KEEL_EVENTBUS__SUBSCRIPTION__MAX_DELIVERY_ATTEMPTS".into())
    );
    // Secrets are the last layer, and say who referred to them.
    assert_eq!(
        config
            .repository
            .cursor_key
            .as_ref()
            .unwrap()
            .expose_secret(),
        CURSOR_KEY
    );
    assert_eq!(
        config.source_of("repository.cursor_key"),
        Source::Secret {
            name: "cursor".into(),
            referenced_by: Box::new(Source::File(dir.path().join("test.toml"))),
        }
    );
    assert!(!config.cursor_key().unwrap().is_public());
    let keys = config.security.audit_keys().unwrap().unwrap();
    assert_eq!(keys.current().id(), "k1");
    assert_eq!(vault.reads.load(std::sync::atomic::Ordering::Relaxed), 2);
}

#[tokio::test]
async fn keel_env_chooses_the_file_and_an_unknown_name_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "production.toml",
        "[grpc]\naddress = \"127.0.0.1:9000\"\n",
    );
    let errors = loader(dir.path())
        .vars([("KEEL_ENV", "staging")])
        .load()
        .await
        .unwrap_err();
    let e = errors.for_key("KEEL_ENV").expect("the variable is named");
    assert_eq!(e.source, Source::EnvVar("KEEL_ENV".into()));
    // Checked as strictly as production meanwhile.
    assert!(
        errors.for_key("repository.cursor_key").is_some(),
        "{errors}"
    );

    for name in ["prod", "Production", " production "] {
        let errors = loader(dir.path())
            .vars([("KEEL_ENV", name)])
            .load()
            .await
            .unwrap_err();
        assert!(errors.for_key("KEEL_ENV").is_none(), "{name}: {errors}");
    }
}

#[tokio::test]
async fn every_problem_is_reported_at_once_with_key_and_layer_and_never_the_value() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "base.toml",
        r#"
        [database]
        max_conections = 5           # misspelt
        idle_timeout = 30            # a number without a unit
        [eventbus]
        backend = "kafka"
        [eventbus.subscription]
        max_delivery_attempts = 2
        [telemetry]
        sample_ratio = 2.5
        log_filter = "info,,=["
        [security.jwt]
        issuers = ["https://idp.example"]
        algorithms = ["RS256", "ROT13"]
        "#,
    );
    let errors = loader(dir.path())
        .environment(Environment::Production)
        .vars([
            ("KEEL_DB_MAX_CONNECTIONS", "many"),
            ("KEEL_DB_PASSWORD", DB_PASSWORD),
            ("KEEL_CACHE__BACKEND", "redis"),
            ("KEEL_GRPC__ADDRESS", "hunter2-not-an-address"),
            ("KEEL_REPOSITORY__CURSOR_KEY", "tooshort-value-XYZ"),
        ])
        .load()
        .await
        .unwrap_err();
    let base = Source::File(dir.path().join("base.toml"));
    let expect = [
        ("database.max_conections", base.clone(), "unknown key"),
        ("database.idle_timeout", base.clone(), "needs a unit"),
        (
            "database.max_connections",
            Source::EnvVar("KEEL_DB_MAX_CONNECTIONS".into()),
            "expected",
        ),
        ("eventbus.backend", base.clone(), "expected one of"),
        (
            "eventbus.subscription.max_delivery_attempts",
            base.clone(),
            "5",
        ),
        (
            "cache.url",
            Source::Unset,
            "required when cache.backend is redis",
        ),
        ("telemetry.sample_ratio", base.clone(), "between 0 and 1"),
        ("telemetry.log_filter", base.clone(), "not a valid filter"),
        ("security.jwt.algorithms", base.clone(), "unknown algorithm"),
        ("security.jwt.audiences", Source::Default, "required"),
        (
            "security.audit.key",
            Source::Unset,
            "required in the production environment",
        ),
        (
            "grpc.address",
            Source::EnvVar("KEEL_GRPC__ADDRESS".into()),
            "",
        ),
        (
            "repository.cursor_key",
            Source::EnvVar("KEEL_REPOSITORY__CURSOR_KEY".into()),
            "at least 32 bytes",
        ),
    ];
    for (key, source, words) in &expect {
        let e = errors
            .for_key(key)
            .unwrap_or_else(|| panic!("no error for {key} in:\n{errors}"));
        assert_eq!(&e.source, source, "{e}");
        assert!(e.message.contains(words), "{e}");
    }
    assert_eq!(errors.len(), expect.len(), "{errors}");
    let text = format!("{errors}\n{errors:?}");
    for value in [
        DB_PASSWORD,
        "hunter2",
        "tooshort-value",
        "many",
        "kafka",
        "ROT13",
    ] {
        assert!(!text.contains(value), "{value} leaked:\n{text}");
    }
    assert!(text.starts_with("13 configuration errors:"), "{text}");
}

#[tokio::test]
async fn secrets_resolve_from_a_real_provider_and_failures_name_the_reference() {
    let dir = tempfile::tempdir().unwrap();
    let secrets = tempfile::tempdir().unwrap();
    std::fs::write(
        secrets.path().join("db-url"),
        "postgres://app:s3cr3t@db/orders\n",
    )
    .unwrap();
    write(
        dir.path(),
        "base.toml",
        r#"
        [database]
        url = { secret = "db-url" }
        [cache]
        url = "secret://missing"
        "#,
    );
    let errors = loader(dir.path())
        .secrets(Arc::new(FileSecrets::new(secrets.path())))
        .vars([("KEEL_SECURITY__AUDIT__KEY", "secret://")])
        .load()
        .await
        .unwrap_err();
    let missing = errors.for_key("cache.url").unwrap();
    assert_eq!(missing.source, Source::File(dir.path().join("base.toml")));
    assert!(missing.message.contains("missing"), "{missing}");
    let malformed = errors.for_key("security.audit.key").unwrap();
    assert_eq!(
        malformed.source,
        Source::EnvVar("KEEL_SECURITY__AUDIT__KEY".into())
    );
    assert!(malformed.message.contains("secret://name"), "{malformed}");
    assert_eq!(errors.len(), 2, "{errors}");

    std::fs::write(secrets.path().join("missing"), "redis://cache:6379").unwrap();
    let config = loader(dir.path())
        .secrets(Arc::new(FileSecrets::new(secrets.path())))
        .load()
        .await
        .unwrap();
    let db = config.database.to_config().unwrap();
    assert_eq!(db.host(), "db");
    assert_eq!(db.database(), Some("orders"));
    // Nothing that prints the configuration shows the secrets.
    let shown = format!(
        "{config:?}\n{config:#?}\n{}\n{db:?}",
        serde_json::to_string(&config).unwrap()
    );
    assert!(!shown.contains("s3cr3t"), "{shown}");
    assert!(!shown.contains("redis://cache"), "{shown}");
    assert!(shown.contains("[REDACTED]"));
}

#[tokio::test]
async fn a_reference_without_a_provider_or_with_extra_keys_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "base.toml",
        r#"
        [database]
        password = { secret = "db-password" }
        [repository]
        cursor_key = { secret = "k", version = "3" }
        "#,
    );
    let errors = loader(dir.path()).load().await.unwrap_err();
    assert!(
        errors
            .for_key("database.password")
            .unwrap()
            .message
            .contains("no SecretProvider"),
        "{errors}"
    );
    assert!(
        errors
            .for_key("repository.cursor_key")
            .unwrap()
            .message
            .contains("nothing else"),
        "{errors}"
    );
    assert_eq!(errors.len(), 2, "{errors}");

    let errors = loader(dir.path())
        .secrets(Vault::with(&[]))
        .vars([("DATABASE_URL", "secret://broken")])
        .load()
        .await
        .unwrap_err();
    let e = errors.for_key("database.url").unwrap();
    assert_eq!(e.source, Source::EnvVar("DATABASE_URL".into()));
    assert!(
        e.message.contains("broken") && e.message.contains("could not be read"),
        "{e}"
    );
}

#[tokio::test]
async fn production_needs_the_security_keys_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    for environment in [Environment::Production, Environment::Test] {
        let errors = loader(dir.path())
            .environment(environment)
            .load()
            .await
            .unwrap_err();
        assert_eq!(errors.len(), 2, "{errors}");
        let cursor = errors.for_key("repository.cursor_key").unwrap();
        assert_eq!(cursor.source, Source::Unset);
        assert!(cursor.message.contains("forge"), "{cursor}");
        assert!(errors.for_key("security.audit.key").is_some(), "{errors}");
    }
    // Opting out of the audit key is explicit; the cursor key has no way out.
    write(
        dir.path(),
        "production.toml",
        "[security.audit]\nunkeyed = true\n",
    );
    let config = loader(dir.path())
        .environment(Environment::Production)
        .secrets(Vault::with(&[("c", CURSOR_KEY)]))
        .vars([("KEEL_REPOSITORY__CURSOR_KEY", "secret://c")])
        .load()
        .await
        .unwrap();
    assert!(config.security.audit_keys().unwrap().is_none());
    assert!(!config.cursor_key().unwrap().is_public());
}

#[tokio::test]
async fn a_malformed_file_is_named_without_its_content() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "base.toml",
        "[database]\npassword = \"pw-Zq81!never-in-output\n",
    );
    let errors = loader(dir.path()).load().await.unwrap_err();
    assert_eq!(errors.len(), 1, "{errors}");
    let e = &errors.errors()[0];
    assert_eq!(e.source, Source::File(dir.path().join("base.toml")));
    assert!(e.message.starts_with("not valid TOML"), "{e}");
    assert!(!errors.to_string().contains("never-in-output"), "{errors}");
}

#[tokio::test]
async fn an_explicit_directory_must_exist_and_the_default_one_may_be_missing() {
    let errors = ConfigLoader::new()
        .vars([("KEEL_CONFIG_DIR", "/nonexistent/keel-config")])
        .load()
        .await
        .unwrap_err();
    let e = errors.for_key("KEEL_CONFIG_DIR").unwrap();
    assert_eq!(e.source, Source::EnvVar("KEEL_CONFIG_DIR".into()));
    // No directory named: ./config may be absent.
    ConfigLoader::new()
        .vars(Vec::<(String, String)>::new())
        .load()
        .await
        .unwrap();
}

#[tokio::test]
async fn the_service_reads_its_own_sections_from_the_same_layers() {
    #[derive(Debug, serde::Deserialize)]
    struct Orders {
        max_items: u32,
        api_token: Secret<String>,
        #[serde(default)]
        region: Option<String>,
    }
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "base.toml",
        "[orders]\nmax_items = 10\napi_token = { secret = \"orders-token\" }\n",
    );
    let config = loader(dir.path())
        .secrets(Vault::with(&[("orders-token", "tok-123")]))
        .vars([("KEEL_ORDERS__MAX_ITEMS", "25")])
        .load()
        .await
        .unwrap();
    let orders: Orders = config.extract("orders").unwrap();
    assert_eq!(orders.max_items, 25);
    assert_eq!(orders.api_token.expose_secret(), "tok-123");
    assert_eq!(orders.region, None);

    let bad = loader(dir.path())
        .secrets(Vault::with(&[("orders-token", "tok-123")]))
        .vars([("KEEL_ORDERS__MAX_ITEMS", "plenty")])
        .load()
        .await
        .unwrap();
    let errors = bad.extract::<Orders>("orders").unwrap_err();
    let e = errors
        .for_key("orders.max_items")
        .unwrap_or_else(|| panic!("{errors}"));
    assert_eq!(e.source, Source::EnvVar("KEEL_ORDERS__MAX_ITEMS".into()));
    assert!(!errors.to_string().contains("plenty"), "{errors}");
}

#[test]
fn the_default_keys_cover_every_section() {
    let keys = KeelConfig::default_keys();
    for key in [
        "service.name",
        "database.url",
        "database.max_connections",
        "eventstore.subscription.poll_interval",
        "eventbus.subscription.ack_deadline",
        "cache.url",
        "telemetry.log_format",
        "security.jwt.algorithms",
        "security.audit.key",
        "grpc.address",
        "repository.cursor_key",
    ] {
        assert!(keys.iter().any(|(k, _)| k == key), "{key} missing");
    }
    let get = |k: &str| keys.iter().find(|(key, _)| key == k).unwrap().1.clone();
    assert_eq!(get("database.idle_timeout"), "10m");
    assert_eq!(get("database.lock_timeout"), "0");
    assert_eq!(get("database.url"), "");
    assert_eq!(get("security.jwt.algorithms"), "[RS256]");
}

#[tokio::test]
async fn every_bad_pool_setting_is_reported_and_a_small_pool_needs_no_minimum() {
    let dir = tempfile::tempdir().unwrap();
    let errors = loader(dir.path())
        .vars([
            ("KEEL_DB_MAX_CONNECTIONS", "0"),
            ("KEEL_DB_ACQUIRE_TIMEOUT", "0"),
            ("KEEL_DB_APPLICATION_NAME", "bad\u{7}name"),
            ("KEEL_DB_TLS_MODE", "sometimes"),
        ])
        .load()
        .await
        .unwrap_err();
    for key in [
        "database.max_connections",
        "database.acquire_timeout",
        "database.application_name",
        "database.tls_mode",
    ] {
        assert!(
            errors.for_key(key).is_some(),
            "{key} missing from:\n{errors}"
        );
    }
    assert_eq!(errors.len(), 4, "{errors}");

    // A pool smaller than the default minimum keeps its size.
    let config = loader(dir.path())
        .vars([
            ("KEEL_DB_MAX_CONNECTIONS", "4"),
            ("DATABASE_URL", "postgres://db/x"),
        ])
        .load()
        .await
        .unwrap();
    let pool = config.database.to_config().unwrap();
    assert_eq!((pool.min_connections(), pool.max_connections()), (4, 4));
}
