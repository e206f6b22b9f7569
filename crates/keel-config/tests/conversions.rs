//! The settings turn into each crate's own configuration, and the variables
//! the crates always read keep their meaning.

use std::path::Path;
use std::time::Duration;

use keel_config::{ConfigLoader, Environment, KeelConfig};
use keel_database::DatabaseConfig;
use keel_telemetry::LogFormat;

async fn load(dir: &Path, vars: &[(&str, &str)]) -> KeelConfig {
    ConfigLoader::new()
        .dir(dir)
        .environment(Environment::Development)
        .vars(vars.iter().map(|(k, v)| (*k, *v)))
        .load()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

#[tokio::test]
async fn the_database_variables_mean_what_keel_database_reads_them_as() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, "not checked until connecting").unwrap();
    let ca = ca.display().to_string();
    let vars = [
        ("DATABASE_URL", "postgres://app:pw@db.internal:6432/orders"),
        ("KEEL_DB_PASSWORD", "override-pw"),
        ("KEEL_DB_MAX_CONNECTIONS", "33"),
        ("KEEL_DB_MIN_CONNECTIONS", "3"),
        ("KEEL_DB_ACQUIRE_TIMEOUT", "750ms"),
        ("KEEL_DB_CONNECT_TIMEOUT", "2s"),
        ("KEEL_DB_IDLE_TIMEOUT", "0"),
        ("KEEL_DB_MAX_LIFETIME", "1h"),
        ("KEEL_DB_STATEMENT_TIMEOUT", "15s"),
        ("KEEL_DB_LOCK_TIMEOUT", "2s"),
        ("KEEL_DB_IDLE_IN_TRANSACTION_TIMEOUT", "1m"),
        ("KEEL_DB_APPLICATION_NAME", "orders-svc"),
        ("KEEL_DB_TLS_MODE", "verify-full"),
        ("KEEL_DB_TLS_CA_FILE", ca.as_str()),
        ("KEEL_DB_TRANSACTION_ATTEMPTS", "9"),
    ];
    let config = load(dir.path(), &vars).await;
    let from_config = config.database.to_config().unwrap();
    let from_env = DatabaseConfig::from_lookup(|name| {
        vars.iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| (*v).to_owned())
    })
    .unwrap();
    // Debug shows every setting (the password redacted).
    assert_eq!(format!("{from_config:?}"), format!("{from_env:?}"));
    assert_eq!(from_config.max_connections(), 33);
    assert_eq!(from_config.idle_timeout(), None);
    assert_eq!(from_config.retry_policy(), from_env.retry_policy());

    // Without a URL there is no database, and asking for one says which key.
    let none = load(dir.path(), &[]).await;
    let e = none.database.to_config().unwrap_err();
    assert_eq!(e.key, "database.url");
}

#[tokio::test]
async fn a_bad_url_is_reported_at_load_under_its_key_without_the_password() {
    let dir = tempfile::tempdir().unwrap();
    let errors = ConfigLoader::new()
        .dir(dir.path())
        .vars([("DATABASE_URL", "mysql://root:topsecret@db/x")])
        .load()
        .await
        .unwrap_err();
    let e = errors.for_key("database.url").unwrap();
    assert_eq!(e.source, keel_config::Source::EnvVar("DATABASE_URL".into()));
    assert!(!errors.to_string().contains("topsecret"), "{errors}");
}

#[tokio::test]
async fn event_store_bus_and_cache_settings_reach_their_crates() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("base.toml"),
        r#"
        [eventstore]
        max_payload_bytes = 2048
        read_batch_size = 100
        notify_on_append = false
        settle_timeout = "2s"
        horizon_max_age = "0s"
        [eventstore.subscription]
        batch_size = 50
        checkpoint_every_events = 10
        checkpoint_interval = "250ms"
        [eventbus]
        backend = "pubsub"
        project = "orders-prod"
        auto_create = false
        name_prefix = "staging"
        [eventbus.subscription]
        max_delivery_attempts = 12
        min_backoff = "1s"
        max_backoff = "30s"
        handler_timeout = "20s"
        [cache]
        backend = "redis"
        url = "redis://127.0.0.1:6379/2"
        key_prefix = "orders:"
        "#,
    )
    .unwrap();
    let config = load(dir.path(), &[("PUBSUB_EMULATOR_HOST", "127.0.0.1:8085")]).await;

    let store = config.eventstore.store_config();
    assert_eq!(store.max_payload_bytes, 2048);
    assert_eq!(store.read_batch_size, 100);
    assert!(!store.notify_on_append);
    assert_eq!(store.settle_timeout, Duration::from_secs(2));
    assert_eq!(store.horizon_max_age, Duration::ZERO);
    let sub = config.eventstore.subscription_options("projector");
    assert_eq!(sub.name, "projector");
    assert_eq!(sub.batch_size, 50);
    assert_eq!(sub.checkpoint_every_events, 10);
    assert_eq!(sub.checkpoint_interval, Duration::from_millis(250));

    let pubsub = config.eventbus.pubsub_config().unwrap().unwrap();
    assert_eq!(pubsub.project(), "orders-prod");
    assert_eq!(pubsub.endpoint(), Some("http://127.0.0.1:8085"));
    let sub = config.eventbus.subscription_config("billing");
    assert_eq!(sub.consumer(), "billing");
    assert_eq!(sub.max_delivery_attempts(), 12);
    assert_eq!(
        sub.backoff(),
        (Duration::from_secs(1), Duration::from_secs(30))
    );
    assert_eq!(sub.handler_timeout(), Some(Duration::from_secs(20)));
    sub.validate().unwrap();

    let redis = config.cache.redis_config().unwrap().unwrap();
    assert!(format!("{redis:?}").contains("orders:"));

    // The in-memory defaults need nothing.
    let memory = load(
        dir.path(),
        &[
            ("KEEL_EVENTBUS__BACKEND", "memory"),
            ("KEEL_CACHE__BACKEND", "memory"),
        ],
    )
    .await;
    assert!(memory.eventbus.pubsub_config().unwrap().is_none());
    assert!(memory.cache.redis_config().unwrap().is_none());
}

#[tokio::test]
async fn telemetry_and_security_settings_reach_their_crates() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("base.toml"),
        r#"
        [service]
        name = "orders"
        version = "1.2.3"
        [telemetry]
        log_filter = "info,sqlx=warn"
        sample_ratio = 0.25
        [security.jwt]
        issuers = ["https://idp.example", "https://idp2.example"]
        audiences = ["orders-api"]
        algorithms = ["RS256", "ES256"]
        leeway = "30s"
        [security.audit]
        key = "an-audit-key-of-at-least-thirty-two-bytes"
        key_id = "2026-12"
        "#,
    )
    .unwrap();
    let config = load(
        dir.path(),
        &[
            ("KEEL_LOG_FORMAT", "gcp"),
            ("GOOGLE_CLOUD_PROJECT", "orders-prod"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317"),
            (
                "KEEL_SECURITY__JWT__AUDIENCES",
                "[orders-api, \"admin-api\"]",
            ),
        ],
    )
    .await;
    let telemetry = config.telemetry_config();
    assert_eq!(telemetry.service_name(), "orders");
    assert_eq!(telemetry.environment_name(), "development");
    assert_eq!(telemetry.resolved_log_format(|_| None), LogFormat::Gcp);
    assert_eq!(
        telemetry.resolved_otlp_endpoint(|_| None).as_deref(),
        Some("http://collector:4317")
    );
    assert_eq!(telemetry.resolved_sampling(|_| None).unwrap().ratio, 0.25);
    assert!(format!("{telemetry:?}").contains("orders-prod"));
    assert_eq!(config.eventbus.project.as_deref(), Some("orders-prod"));

    let jwt = config.security.jwt_config().unwrap().unwrap();
    assert_eq!(jwt.issuers.len(), 2);
    // A variable holding `[a, b]` is a list.
    assert_eq!(jwt.audiences, ["orders-api", "admin-api"]);
    assert_eq!(jwt.algorithms.len(), 2);
    assert_eq!(jwt.leeway, Duration::from_secs(30));
    let keys = config.security.audit_keys().unwrap().unwrap();
    assert_eq!(keys.current().id(), "2026-12");
}
