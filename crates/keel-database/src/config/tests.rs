//! Tests of the configuration: defaults, environment, validation, TLS.

use std::collections::HashMap;

use super::*;

fn lookup(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let map: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    move |k| map.get(k).cloned()
}

fn setting_of(e: &DatabaseError) -> &str {
    match e {
        DatabaseError::Config { setting, .. } => setting,
        other => panic!("expected a configuration error, got {other:?}"),
    }
}

#[test]
fn defaults() {
    let c = DatabaseConfig::builder()
        .url("postgres://app@localhost/orders")
        .build()
        .unwrap();
    assert_eq!(c.max_connections(), 100);
    assert_eq!(c.min_connections(), 10);
    assert_eq!(c.acquire_timeout(), Duration::from_secs(5));
    assert_eq!(c.statement_timeout(), Some(Duration::from_secs(30)));
    assert_eq!(c.lock_timeout(), None);
    assert_eq!(c.database(), Some("orders"));
    assert_eq!(c.username(), "app");
    assert_eq!(c.tls_mode(), TlsMode::Prefer);
    assert_eq!(
        c.connect_options().get_options(),
        Some("-c statement_timeout=30000")
    );
}

#[test]
fn from_env_reads_every_variable() {
    let c = DatabaseConfig::from_lookup(lookup(&[
        (
            "DATABASE_URL",
            "postgresql://svc:pw@db:6543/main?sslmode=require",
        ),
        ("KEEL_DB_MAX_CONNECTIONS", "40"),
        ("KEEL_DB_MIN_CONNECTIONS", "2"),
        ("KEEL_DB_ACQUIRE_TIMEOUT", "1500ms"),
        ("KEEL_DB_CONNECT_TIMEOUT", "2s"),
        ("KEEL_DB_IDLE_TIMEOUT", "0"),
        ("KEEL_DB_MAX_LIFETIME", "1h"),
        ("KEEL_DB_STATEMENT_TIMEOUT", "2m"),
        ("KEEL_DB_LOCK_TIMEOUT", "3s"),
        ("KEEL_DB_IDLE_IN_TRANSACTION_TIMEOUT", "1m"),
        ("KEEL_DB_APPLICATION_NAME", "billing"),
        ("KEEL_DB_TRANSACTION_ATTEMPTS", "7"),
    ]))
    .unwrap();
    assert_eq!(c.host(), "db");
    assert_eq!(c.port(), 6543);
    assert_eq!(c.max_connections(), 40);
    assert_eq!(c.min_connections(), 2);
    assert_eq!(c.acquire_timeout(), Duration::from_millis(1500));
    assert_eq!(c.connect_timeout(), Duration::from_secs(2));
    assert_eq!(c.idle_timeout(), None);
    assert_eq!(c.max_lifetime(), Some(Duration::from_secs(3600)));
    assert_eq!(c.statement_timeout(), Some(Duration::from_secs(120)));
    assert_eq!(c.application_name(), Some("billing"));
    assert_eq!(c.tls_mode(), TlsMode::Require);
    assert_eq!(c.retry_policy().attempts(), 7);
    assert_eq!(
        c.connect_options().get_options(),
        Some(
            "-c statement_timeout=120000 -c lock_timeout=3000 -c idle_in_transaction_session_timeout=60000"
        )
    );
}

#[test]
fn env_errors_name_the_variable() {
    let missing = DatabaseConfig::from_lookup(lookup(&[])).unwrap_err();
    assert_eq!(setting_of(&missing), "DATABASE_URL");

    let bad_number = DatabaseConfig::from_lookup(lookup(&[
        ("DATABASE_URL", "postgres://localhost/x"),
        ("KEEL_DB_MAX_CONNECTIONS", "lots"),
    ]))
    .unwrap_err();
    assert_eq!(setting_of(&bad_number), "KEEL_DB_MAX_CONNECTIONS");
    assert!(bad_number.to_string().contains("\"lots\""));

    let bad_duration = DatabaseConfig::from_lookup(lookup(&[
        ("DATABASE_URL", "postgres://localhost/x"),
        ("KEEL_DB_STATEMENT_TIMEOUT", "30"),
    ]))
    .unwrap_err();
    assert_eq!(setting_of(&bad_duration), "KEEL_DB_STATEMENT_TIMEOUT");

    let min_over_max = DatabaseConfig::from_lookup(lookup(&[
        ("DATABASE_URL", "postgres://localhost/x"),
        ("KEEL_DB_MAX_CONNECTIONS", "5"),
        ("KEEL_DB_MIN_CONNECTIONS", "6"),
    ]))
    .unwrap_err();
    assert_eq!(setting_of(&min_over_max), "KEEL_DB_MIN_CONNECTIONS");

    let bad_tls = DatabaseConfig::from_lookup(lookup(&[
        ("DATABASE_URL", "postgres://localhost/x"),
        ("KEEL_DB_TLS_MODE", "sometimes"),
    ]))
    .unwrap_err();
    assert_eq!(setting_of(&bad_tls), "KEEL_DB_TLS_MODE");

    let bad_url = DatabaseConfig::from_lookup(lookup(&[(
        "DATABASE_URL",
        "postgres://u:hunter2@host:notaport/db",
    )]))
    .unwrap_err();
    assert_eq!(setting_of(&bad_url), "DATABASE_URL");
    assert!(!bad_url.to_string().contains("hunter2"));
    assert!(!format!("{bad_url:?}").contains("hunter2"));
}

#[test]
fn malformed_urls_are_refused_without_echoing_secrets() {
    for url in [
        "localhost:5432",
        "mysql://u:hunter2@host/db",
        "postgres://u:hunter2@host:99999/db",
        "postgres://u:hunter2@[::1/db",
        "postgres://u:hunter2@host/db?sslmode=bogus",
        "postgres://u@host/db?pasword=hunter2",
    ] {
        let e = DatabaseConfig::builder().url(url).build().unwrap_err();
        assert_eq!(setting_of(&e), "url", "{url}");
        assert!(!e.to_string().contains("hunter2"), "{url}: {e}");
        assert!(!format!("{e:?}").contains("hunter2"), "{url}: {e:?}");
    }
}

#[test]
fn debug_never_shows_the_password() {
    let c = DatabaseConfig::builder()
        .url("postgres://app:s3cr%40t@localhost/orders")
        .build()
        .unwrap();
    let shown = format!("{c:?}");
    assert!(!shown.contains("s3cr"), "{shown}");
    assert!(shown.contains("<redacted>"));
    let c = DatabaseConfig::builder()
        .url("postgres://app@localhost/orders")
        .password("hunter2")
        .build()
        .unwrap();
    assert!(!format!("{c:?}").contains("hunter2"));
    let c = DatabaseConfig::builder()
        .url("postgres://localhost/orders?user=app&password=hunter2&sslmode=disable&options[search_path]=app")
        .build()
        .unwrap();
    let shown = format!("{c:?}");
    assert!(
        !shown.contains("hunter2") && shown.contains("<redacted>"),
        "{shown}"
    );
    assert_eq!(c.username(), "app");
}

#[test]
fn limits_are_validated() {
    let base = || DatabaseConfig::builder().url("postgres://localhost/x");
    assert_eq!(
        setting_of(&base().max_connections(0).build().unwrap_err()),
        "max_connections"
    );
    assert_eq!(
        setting_of(&base().acquire_timeout(Duration::ZERO).build().unwrap_err()),
        "acquire_timeout"
    );
    assert_eq!(
        setting_of(
            &base()
                .statement_timeout(Duration::from_secs(u64::MAX / 4))
                .build()
                .unwrap_err()
        ),
        "statement_timeout"
    );
    assert_eq!(
        setting_of(
            &base()
                .application_name("x'; DROP TABLE y; --\n")
                .build()
                .unwrap_err()
        ),
        "application_name"
    );
    assert_eq!(
        setting_of(
            &base()
                .tls_ca_file("/nonexistent/ca.pem")
                .build()
                .unwrap_err()
        ),
        "tls_ca_file"
    );
    // A small maximum lowers the default minimum rather than failing.
    let small = base().max_connections(3).build().unwrap();
    assert_eq!(small.min_connections(), 3);
    // Statement timeout can be switched off.
    let off = base().statement_timeout(None).build().unwrap();
    assert_eq!(off.statement_timeout(), None);
    assert_eq!(off.connect_options().get_options(), None);
}

#[test]
fn durations() {
    assert_eq!(
        parse_duration("x", "250ms").unwrap(),
        Duration::from_millis(250)
    );
    assert_eq!(parse_duration("x", " 3s ").unwrap(), Duration::from_secs(3));
    assert_eq!(
        parse_duration("x", "2min").unwrap(),
        Duration::from_secs(120)
    );
    assert_eq!(parse_duration("x", "0").unwrap(), Duration::ZERO);
    for bad in ["", "5", "s", "-1s", "1.5s", "3 days"] {
        assert!(parse_duration("x", bad).is_err(), "{bad}");
    }
}

#[test]
fn tls_modes_round_trip() {
    for mode in [
        TlsMode::Disable,
        TlsMode::Prefer,
        TlsMode::Require,
        TlsMode::VerifyCa,
        TlsMode::VerifyFull,
    ] {
        assert_eq!(mode.as_str().parse::<TlsMode>().unwrap(), mode);
    }
    let c = DatabaseConfig::builder()
        .url("postgres://localhost/x?sslmode=verify-full")
        .build()
        .unwrap();
    assert_eq!(c.tls_mode(), TlsMode::VerifyFull);
    let c = DatabaseConfig::builder()
        .url("postgres://localhost/x?sslmode=verify-full")
        .tls_mode(TlsMode::Disable)
        .build()
        .unwrap();
    assert_eq!(c.tls_mode(), TlsMode::Disable);
}
