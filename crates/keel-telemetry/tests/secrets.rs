//! A configuration holding secrets, logged through the real subscriber in
//! both formats, never shows them.

mod common;

use common::traced;
use keel_telemetry::{LogFormat, Secret, TelemetryConfig};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
struct DatabaseConfig {
    host: String,
    user: String,
    password: Secret<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct ServiceConfig {
    name: String,
    database: DatabaseConfig,
    api_token: Secret<String>,
}

const PASSWORD: &str = "pa55-w0rd-correct-horse";
const TOKEN: &str = "tok_live_9f8e7d6c5b4a";

fn config() -> ServiceConfig {
    // Loaded the way a service loads it: from a file or the environment.
    serde_json::from_value(serde_json::json!({
        "name": "orders",
        "database": { "host": "db.internal", "user": "orders_app", "password": PASSWORD },
        "api_token": TOKEN,
    }))
    .unwrap()
}

fn log_everything(config: &ServiceConfig) {
    tracing::info!(?config, "loaded configuration");
    tracing::info!(config = %serde_json::to_string(config).unwrap(), "as json");
    tracing::warn!(password = %config.database.password, token = ?config.api_token, "fields");
    let span = tracing::info_span!("connect", user = %config.database.user, password = ?config.database.password);
    span.in_scope(|| tracing::info!("connecting"));
}

fn assert_redacted(logs: &str) {
    assert!(!logs.contains(PASSWORD), "password leaked: {logs}");
    assert!(!logs.contains(TOKEN), "token leaked: {logs}");
    // The rest of the configuration did reach the output.
    assert!(logs.contains("orders_app"), "{logs}");
    assert!(logs.contains("db.internal"), "{logs}");
    assert!(logs.matches("[REDACTED]").count() >= 6, "{logs}");
}

#[test]
fn json_logs_never_contain_secrets() {
    let t = traced(TelemetryConfig::new("orders").environment("prod"));
    assert_eq!(t.guard.log_format(), LogFormat::Json);
    let config = config();
    assert_eq!(config.database.password.expose_secret(), PASSWORD);
    tracing::dispatcher::with_default(&t.dispatch, || log_everything(&config));
    let logs = t.logs.text();
    for line in logs.lines() {
        serde_json::from_str::<serde_json::Value>(line).expect("every line is JSON");
    }
    assert_redacted(&logs);
}

#[test]
fn text_logs_never_contain_secrets() {
    let t = traced(TelemetryConfig::new("orders").environment("development"));
    assert_eq!(t.guard.log_format(), LogFormat::Text);
    let config = config();
    tracing::dispatcher::with_default(&t.dispatch, || log_everything(&config));
    assert_redacted(&t.logs.text());
}

#[test]
fn log_filter_applies_to_logs_but_not_to_traces() {
    let t = traced(
        TelemetryConfig::new("orders")
            .environment("prod")
            .default_log_filter("warn"),
    );
    tracing::dispatcher::with_default(&t.dispatch, || {
        let span = tracing::info_span!("quiet_span");
        span.in_scope(|| {
            tracing::info!("hidden info");
            tracing::warn!("shown warning");
        });
    });
    let logs = t.logs.text();
    // RUST_LOG may be set by whoever runs the tests; only assert the filter
    // when it is not.
    if std::env::var_os("RUST_LOG").is_none() {
        assert!(!logs.contains("hidden info"), "{logs}");
    }
    assert!(logs.contains("shown warning"), "{logs}");
    // The span is still traced although logs are at warn.
    t.span("quiet_span");
}
