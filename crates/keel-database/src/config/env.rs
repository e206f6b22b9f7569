//! Environment variable names read by [`DatabaseConfig::from_env`], and
//! the reading itself.

use super::*;

/// Connection URL, `postgres://user:password@host:port/database?sslmode=…`.
pub const DATABASE_URL: &str = "DATABASE_URL";
/// Password, overriding the one in the URL (for secrets injected apart).
pub const PASSWORD: &str = "KEEL_DB_PASSWORD";
/// Maximum pool size.
pub const MAX_CONNECTIONS: &str = "KEEL_DB_MAX_CONNECTIONS";
/// Minimum number of connections kept open.
pub const MIN_CONNECTIONS: &str = "KEEL_DB_MIN_CONNECTIONS";
/// How long to wait for a pooled connection.
pub const ACQUIRE_TIMEOUT: &str = "KEEL_DB_ACQUIRE_TIMEOUT";
/// How long to wait for a new connection to be established.
pub const CONNECT_TIMEOUT: &str = "KEEL_DB_CONNECT_TIMEOUT";
/// How long an idle connection is kept (`0` keeps it forever).
pub const IDLE_TIMEOUT: &str = "KEEL_DB_IDLE_TIMEOUT";
/// Maximum age of a connection (`0` means no limit).
pub const MAX_LIFETIME: &str = "KEEL_DB_MAX_LIFETIME";
/// Server-side `statement_timeout` (`0` disables it).
pub const STATEMENT_TIMEOUT: &str = "KEEL_DB_STATEMENT_TIMEOUT";
/// Server-side `lock_timeout` (`0` disables it).
pub const LOCK_TIMEOUT: &str = "KEEL_DB_LOCK_TIMEOUT";
/// Server-side `idle_in_transaction_session_timeout` (`0` disables it).
pub const IDLE_IN_TRANSACTION_TIMEOUT: &str = "KEEL_DB_IDLE_IN_TRANSACTION_TIMEOUT";
/// `application_name` shown in `pg_stat_activity`.
pub const APPLICATION_NAME: &str = "KEEL_DB_APPLICATION_NAME";
/// TLS mode: `disable`, `prefer`, `require`, `verify-ca`, `verify-full`.
pub const TLS_MODE: &str = "KEEL_DB_TLS_MODE";
/// PEM file with the CA certificate(s) that sign the server certificate.
pub const TLS_CA_FILE: &str = "KEEL_DB_TLS_CA_FILE";
/// Attempts [`Database::transaction`](crate::Database::transaction) makes
/// before giving up on serialization failures and deadlocks.
pub const TRANSACTION_ATTEMPTS: &str = "KEEL_DB_TRANSACTION_ATTEMPTS";

impl DatabaseConfig {
    /// Reads the configuration from the process environment; see
    /// [`config::env`](crate::config::env) for the variable names. Only
    /// `DATABASE_URL` is required.
    pub fn from_env() -> Result<Self> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Like [`from_env`](Self::from_env), reading variables through `lookup`
    /// (handy in tests and with configuration layers).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let get = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());
        let mut b = DatabaseConfig::builder();
        match get(env::DATABASE_URL) {
            Some(url) => b = b.url(url),
            None => {
                return Err(config_error(
                    env::DATABASE_URL,
                    "is not set; expected postgres://user:password@host:port/database",
                ));
            }
        }
        if let Some(p) = lookup(env::PASSWORD).filter(|p| !p.is_empty()) {
            b = b.password(p);
        }
        if let Some(v) = get(env::MAX_CONNECTIONS) {
            b = b.max_connections(parse_count(env::MAX_CONNECTIONS, &v)?);
        }
        if let Some(v) = get(env::MIN_CONNECTIONS) {
            b = b.min_connections(parse_count(env::MIN_CONNECTIONS, &v)?);
        }
        if let Some(v) = get(env::ACQUIRE_TIMEOUT) {
            b = b.acquire_timeout(parse_duration(env::ACQUIRE_TIMEOUT, &v)?);
        }
        if let Some(v) = get(env::CONNECT_TIMEOUT) {
            b = b.connect_timeout(parse_duration(env::CONNECT_TIMEOUT, &v)?);
        }
        if let Some(v) = get(env::IDLE_TIMEOUT) {
            b = b.idle_timeout(non_zero(parse_duration(env::IDLE_TIMEOUT, &v)?));
        }
        if let Some(v) = get(env::MAX_LIFETIME) {
            b = b.max_lifetime(non_zero(parse_duration(env::MAX_LIFETIME, &v)?));
        }
        if let Some(v) = get(env::STATEMENT_TIMEOUT) {
            b = b.statement_timeout(non_zero(parse_duration(env::STATEMENT_TIMEOUT, &v)?));
        }
        if let Some(v) = get(env::LOCK_TIMEOUT) {
            b = b.lock_timeout(non_zero(parse_duration(env::LOCK_TIMEOUT, &v)?));
        }
        if let Some(v) = get(env::IDLE_IN_TRANSACTION_TIMEOUT) {
            b = b.idle_in_transaction_timeout(non_zero(parse_duration(
                env::IDLE_IN_TRANSACTION_TIMEOUT,
                &v,
            )?));
        }
        if let Some(v) = get(env::APPLICATION_NAME) {
            b = b.application_name(v);
        }
        if let Some(v) = get(env::TLS_MODE) {
            b = b.tls_mode(v.parse().map_err(rename_setting)?);
        }
        if let Some(v) = get(env::TLS_CA_FILE) {
            b = b.tls_ca_file(v);
        }
        if let Some(v) = get(env::TRANSACTION_ATTEMPTS) {
            let attempts = parse_count(env::TRANSACTION_ATTEMPTS, &v)?;
            b = b.retry(RetryPolicy::default().max_attempts(attempts));
        }
        b.build().map_err(rename_setting)
    }
}
