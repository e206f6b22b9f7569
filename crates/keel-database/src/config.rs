//! Pool configuration: a builder and environment variables.

use std::borrow::Cow;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgSslMode};

use crate::error::{DatabaseError, Result};
use crate::retry::RetryPolicy;

/// Default [`DatabaseConfig::max_connections`].
pub const DEFAULT_MAX_CONNECTIONS: u32 = 100;
/// Default [`DatabaseConfig::min_connections`].
pub const DEFAULT_MIN_CONNECTIONS: u32 = 10;
/// Default [`DatabaseConfig::acquire_timeout`].
pub const DEFAULT_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);
/// Default [`DatabaseConfig::connect_timeout`].
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default [`DatabaseConfig::idle_timeout`].
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(10 * 60);
/// Default [`DatabaseConfig::max_lifetime`].
pub const DEFAULT_MAX_LIFETIME: Duration = Duration::from_secs(30 * 60);
/// Default [`DatabaseConfig::statement_timeout`].
pub const DEFAULT_STATEMENT_TIMEOUT: Duration = Duration::from_secs(30);

/// Upper bound on `max_connections`, to catch typos such as `10000`.
const MAX_POOL_SIZE: u32 = 10_000;
/// PostgreSQL keeps `NAMEDATALEN - 1` bytes of an application name.
const MAX_APPLICATION_NAME: usize = 63;

/// Environment variable names read by [`DatabaseConfig::from_env`].
pub mod env {
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
}

/// How the connection uses TLS (always through rustls).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
#[non_exhaustive]
pub enum TlsMode {
    /// Never use TLS.
    Disable,
    /// Use TLS when the server offers it, without verifying the certificate.
    Prefer,
    /// Require TLS, without verifying the certificate.
    Require,
    /// Require TLS and a certificate signed by a trusted CA.
    ///
    /// Caveat: with sqlx 0.8.6 and rustls 0.23.24 or later, the host name is
    /// checked too, as in [`VerifyFull`](TlsMode::VerifyFull) (sqlx issue
    /// #3793, fixed upstream after 0.8.6). That is stricter, never weaker;
    /// connect by a name the certificate lists.
    VerifyCa,
    /// Require TLS, a trusted certificate, and a host name that matches it.
    VerifyFull,
}

impl TlsMode {
    /// The libpq name of the mode, e.g. `verify-full`.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            TlsMode::Disable => "disable",
            TlsMode::Prefer => "prefer",
            TlsMode::Require => "require",
            TlsMode::VerifyCa => "verify-ca",
            TlsMode::VerifyFull => "verify-full",
        }
    }

    fn to_sqlx(self) -> PgSslMode {
        match self {
            TlsMode::Disable => PgSslMode::Disable,
            TlsMode::Prefer => PgSslMode::Prefer,
            TlsMode::Require => PgSslMode::Require,
            TlsMode::VerifyCa => PgSslMode::VerifyCa,
            TlsMode::VerifyFull => PgSslMode::VerifyFull,
        }
    }

    fn from_sqlx(mode: PgSslMode) -> Self {
        match mode {
            PgSslMode::Disable => TlsMode::Disable,
            PgSslMode::Allow | PgSslMode::Prefer => TlsMode::Prefer,
            PgSslMode::Require => TlsMode::Require,
            PgSslMode::VerifyCa => TlsMode::VerifyCa,
            PgSslMode::VerifyFull => TlsMode::VerifyFull,
        }
    }
}

impl fmt::Display for TlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TlsMode {
    type Err = DatabaseError;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "disable" => Ok(TlsMode::Disable),
            "prefer" => Ok(TlsMode::Prefer),
            "require" => Ok(TlsMode::Require),
            "verify-ca" | "verify_ca" => Ok(TlsMode::VerifyCa),
            "verify-full" | "verify_full" => Ok(TlsMode::VerifyFull),
            other => Err(config_error(
                "tls_mode",
                format!(
                    "unknown TLS mode {other:?}; expected disable, prefer, require, verify-ca or verify-full"
                ),
            )),
        }
    }
}

/// Everything needed to build a [`Database`](crate::Database): where the
/// server is, how large the pool is, and the timeouts.
///
/// Build one with [`DatabaseConfig::builder`] or [`DatabaseConfig::from_env`];
/// both validate everything up front. `Debug` never shows the password.
///
/// ```
/// use std::time::Duration;
/// use keel_database::DatabaseConfig;
///
/// let config = DatabaseConfig::builder()
///     .url("postgres://app:secret@db.internal:5432/orders")
///     .max_connections(20)
///     .statement_timeout(Duration::from_secs(10))
///     .application_name("orders-service")
///     .build()
///     .unwrap();
/// assert_eq!(config.max_connections(), 20);
/// assert!(!format!("{config:?}").contains("secret"));
/// ```
#[derive(Clone)]
pub struct DatabaseConfig {
    options: PgConnectOptions,
    has_password: bool,
    max_connections: u32,
    min_connections: u32,
    acquire_timeout: Duration,
    connect_timeout: Duration,
    idle_timeout: Option<Duration>,
    max_lifetime: Option<Duration>,
    statement_timeout: Option<Duration>,
    lock_timeout: Option<Duration>,
    idle_in_transaction_timeout: Option<Duration>,
    tls_mode: TlsMode,
    tls_ca_file: Option<PathBuf>,
    retry: RetryPolicy,
}

impl fmt::Debug for DatabaseConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatabaseConfig")
            .field("host", &self.host())
            .field("port", &self.port())
            .field("database", &self.database())
            .field("username", &self.username())
            .field(
                "password",
                &if self.has_password {
                    "<redacted>"
                } else {
                    "<none>"
                },
            )
            .field("max_connections", &self.max_connections)
            .field("min_connections", &self.min_connections)
            .field("acquire_timeout", &self.acquire_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .field("max_lifetime", &self.max_lifetime)
            .field("statement_timeout", &self.statement_timeout)
            .field("lock_timeout", &self.lock_timeout)
            .field(
                "idle_in_transaction_timeout",
                &self.idle_in_transaction_timeout,
            )
            .field("application_name", &self.application_name())
            .field("tls_mode", &self.tls_mode)
            .field("tls_ca_file", &self.tls_ca_file)
            .field("retry", &self.retry)
            .finish()
    }
}

impl DatabaseConfig {
    /// A builder with the defaults (min 10 / max 100 connections, 5 s
    /// acquire and connect timeouts, 30 s statement timeout).
    #[must_use]
    pub fn builder() -> DatabaseConfigBuilder {
        DatabaseConfigBuilder::default()
    }

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

    /// The host name (or socket directory).
    #[must_use]
    pub fn host(&self) -> Cow<'_, str> {
        match self.options.get_socket() {
            Some(dir) => Cow::Owned(dir.display().to_string()),
            None => Cow::Borrowed(self.options.get_host()),
        }
    }

    /// The port.
    #[must_use]
    pub fn port(&self) -> u16 {
        self.options.get_port()
    }

    /// The database name, when one was given.
    #[must_use]
    pub fn database(&self) -> Option<&str> {
        self.options.get_database()
    }

    /// The user name.
    #[must_use]
    pub fn username(&self) -> &str {
        self.options.get_username()
    }

    /// The application name sent to the server.
    #[must_use]
    pub fn application_name(&self) -> Option<&str> {
        self.options.get_application_name()
    }

    /// Maximum number of connections in the pool.
    #[must_use]
    pub fn max_connections(&self) -> u32 {
        self.max_connections
    }

    /// Number of connections the pool keeps open even when idle.
    #[must_use]
    pub fn min_connections(&self) -> u32 {
        self.min_connections
    }

    /// How long an operation waits for a pooled connection.
    #[must_use]
    pub fn acquire_timeout(&self) -> Duration {
        self.acquire_timeout
    }

    /// How long opening one new connection may take.
    #[must_use]
    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    /// How long an idle connection above the minimum is kept.
    #[must_use]
    pub fn idle_timeout(&self) -> Option<Duration> {
        self.idle_timeout
    }

    /// Maximum age of a connection before it is replaced.
    #[must_use]
    pub fn max_lifetime(&self) -> Option<Duration> {
        self.max_lifetime
    }

    /// The server-side `statement_timeout` set on every connection.
    #[must_use]
    pub fn statement_timeout(&self) -> Option<Duration> {
        self.statement_timeout
    }

    /// The server-side `lock_timeout` set on every connection.
    #[must_use]
    pub fn lock_timeout(&self) -> Option<Duration> {
        self.lock_timeout
    }

    /// The server-side `idle_in_transaction_session_timeout`.
    #[must_use]
    pub fn idle_in_transaction_timeout(&self) -> Option<Duration> {
        self.idle_in_transaction_timeout
    }

    /// The TLS mode.
    #[must_use]
    pub fn tls_mode(&self) -> TlsMode {
        self.tls_mode
    }

    /// The CA file used to verify the server certificate, if any.
    #[must_use]
    pub fn tls_ca_file(&self) -> Option<&std::path::Path> {
        self.tls_ca_file.as_deref()
    }

    /// The retry policy of [`Database::transaction`](crate::Database::transaction).
    #[must_use]
    pub fn retry_policy(&self) -> &RetryPolicy {
        &self.retry
    }

    /// The connection options, with the timeouts applied as server
    /// settings. Not public: its `Debug` shows the password.
    pub(crate) fn connect_options(&self) -> &PgConnectOptions {
        &self.options
    }
}

/// Builds a validated [`DatabaseConfig`]; see [`DatabaseConfig::builder`].
#[derive(Clone, Default)]
pub struct DatabaseConfigBuilder {
    url: Option<String>,
    options: Option<PgConnectOptions>,
    password: Option<String>,
    max_connections: Option<u32>,
    min_connections: Option<u32>,
    acquire_timeout: Option<Duration>,
    connect_timeout: Option<Duration>,
    idle_timeout: Option<Option<Duration>>,
    max_lifetime: Option<Option<Duration>>,
    statement_timeout: Option<Option<Duration>>,
    lock_timeout: Option<Duration>,
    idle_in_transaction_timeout: Option<Duration>,
    application_name: Option<String>,
    tls_mode: Option<TlsMode>,
    tls_ca_file: Option<PathBuf>,
    retry: Option<RetryPolicy>,
}

impl fmt::Debug for DatabaseConfigBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatabaseConfigBuilder")
            .field("max_connections", &self.max_connections)
            .field("min_connections", &self.min_connections)
            .finish_non_exhaustive()
    }
}

impl DatabaseConfigBuilder {
    /// The connection URL (`postgres://` or `postgresql://`). Query
    /// parameters such as `sslmode` and `application_name` are honoured;
    /// the builder's own settings win over them.
    #[must_use]
    pub fn url(mut self, url: impl Into<String>) -> Self {
        self.url = Some(url.into());
        self.options = None;
        self
    }

    /// Ready-made connection options instead of a URL.
    #[must_use]
    pub fn connect_options(mut self, options: PgConnectOptions) -> Self {
        self.options = Some(options);
        self.url = None;
        self
    }

    /// The password, overriding any in the URL.
    #[must_use]
    pub fn password(mut self, password: impl Into<String>) -> Self {
        self.password = Some(password.into());
        self
    }

    /// Maximum pool size (default 100).
    #[must_use]
    pub fn max_connections(mut self, n: u32) -> Self {
        self.max_connections = Some(n);
        self
    }

    /// Connections kept open even when idle (default 10, capped at the
    /// maximum only if you set it so; a minimum above the maximum is an
    /// error).
    #[must_use]
    pub fn min_connections(mut self, n: u32) -> Self {
        self.min_connections = Some(n);
        self
    }

    /// How long to wait for a pooled connection (default 5 s).
    #[must_use]
    pub fn acquire_timeout(mut self, t: Duration) -> Self {
        self.acquire_timeout = Some(t);
        self
    }

    /// How long opening one connection may take (default 5 s).
    #[must_use]
    pub fn connect_timeout(mut self, t: Duration) -> Self {
        self.connect_timeout = Some(t);
        self
    }

    /// How long an idle connection above the minimum is kept (default
    /// 10 min; `None` keeps it).
    #[must_use]
    pub fn idle_timeout(mut self, t: Option<Duration>) -> Self {
        self.idle_timeout = Some(t);
        self
    }

    /// Maximum connection age (default 30 min; `None` means no limit).
    #[must_use]
    pub fn max_lifetime(mut self, t: Option<Duration>) -> Self {
        self.max_lifetime = Some(t);
        self
    }

    /// Server-side `statement_timeout` on every connection (default 30 s;
    /// `None` leaves the server's setting).
    #[must_use]
    pub fn statement_timeout(mut self, t: impl Into<Option<Duration>>) -> Self {
        self.statement_timeout = Some(t.into());
        self
    }

    /// Server-side `lock_timeout` on every connection (default: the
    /// server's setting).
    #[must_use]
    pub fn lock_timeout(mut self, t: impl Into<Option<Duration>>) -> Self {
        self.lock_timeout = t.into();
        self
    }

    /// Server-side `idle_in_transaction_session_timeout`: the server ends
    /// sessions that keep a transaction open and idle this long (default:
    /// the server's setting).
    #[must_use]
    pub fn idle_in_transaction_timeout(mut self, t: impl Into<Option<Duration>>) -> Self {
        self.idle_in_transaction_timeout = t.into();
        self
    }

    /// `application_name`, shown in `pg_stat_activity` (at most 63
    /// printable ASCII characters).
    #[must_use]
    pub fn application_name(mut self, name: impl Into<String>) -> Self {
        self.application_name = Some(name.into());
        self
    }

    /// TLS mode (default: the URL's `sslmode`, else `prefer`).
    #[must_use]
    pub fn tls_mode(mut self, mode: TlsMode) -> Self {
        self.tls_mode = Some(mode);
        self
    }

    /// PEM file with the CA certificate(s) for `verify-ca` and
    /// `verify-full` (default: the web PKI roots).
    #[must_use]
    pub fn tls_ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.tls_ca_file = Some(path.into());
        self
    }

    /// The retry policy of [`Database::transaction`](crate::Database::transaction).
    #[must_use]
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = Some(policy);
        self
    }

    /// Validates everything and builds the configuration.
    ///
    /// Fails with [`DatabaseError::Config`] naming the setting when the URL
    /// is missing or malformed, a pool size or timeout is out of range, the
    /// application name is unusable, or the CA file does not exist.
    pub fn build(self) -> Result<DatabaseConfig> {
        let (mut options, mut has_password) = match (self.options, self.url) {
            (Some(options), _) => (options, false),
            (None, Some(url)) => parse_url(&url)?,
            (None, None) => {
                return Err(config_error(
                    "url",
                    "no connection URL or options given; expected postgres://user:password@host:port/database",
                ));
            }
        };
        if let Some(password) = &self.password {
            options = options.password(password);
            has_password = true;
        }

        let max_connections = self.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS);
        if max_connections == 0 || max_connections > MAX_POOL_SIZE {
            return Err(config_error(
                "max_connections",
                format!("must be between 1 and {MAX_POOL_SIZE}, got {max_connections}"),
            ));
        }
        let min_connections = match self.min_connections {
            Some(n) if n > max_connections => {
                return Err(config_error(
                    "min_connections",
                    format!("{n} is more than max_connections ({max_connections})"),
                ));
            }
            Some(n) => n,
            // The default minimum never exceeds a smaller chosen maximum.
            None => DEFAULT_MIN_CONNECTIONS.min(max_connections),
        };

        let acquire_timeout = positive(
            "acquire_timeout",
            self.acquire_timeout.unwrap_or(DEFAULT_ACQUIRE_TIMEOUT),
        )?;
        let connect_timeout = positive(
            "connect_timeout",
            self.connect_timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT),
        )?;
        let idle_timeout = self
            .idle_timeout
            .unwrap_or(Some(DEFAULT_IDLE_TIMEOUT))
            .filter(|d| !d.is_zero());
        let max_lifetime = self
            .max_lifetime
            .unwrap_or(Some(DEFAULT_MAX_LIFETIME))
            .filter(|d| !d.is_zero());
        let statement_timeout = self
            .statement_timeout
            .unwrap_or(Some(DEFAULT_STATEMENT_TIMEOUT))
            .filter(|d| !d.is_zero());
        let lock_timeout = self.lock_timeout.filter(|d| !d.is_zero());
        let idle_in_transaction_timeout = self.idle_in_transaction_timeout.filter(|d| !d.is_zero());

        let mut settings: Vec<(&str, u128)> = Vec::new();
        for (name, value) in [
            ("statement_timeout", statement_timeout),
            ("lock_timeout", lock_timeout),
            (
                "idle_in_transaction_session_timeout",
                idle_in_transaction_timeout,
            ),
        ] {
            if let Some(d) = value {
                let ms = d.as_millis();
                if ms == 0 || ms > i32::MAX as u128 {
                    return Err(config_error(
                        name,
                        format!("must be between 1ms and {}ms, got {d:?}", i32::MAX),
                    ));
                }
                settings.push((name, ms));
            }
        }
        if !settings.is_empty() {
            // Sent in the startup packet, so every connection (including
            // ones the pool opens after a server restart) has them before
            // its first statement.
            options = options.options(settings);
        }

        if let Some(name) = &self.application_name {
            if name.is_empty()
                || name.len() > MAX_APPLICATION_NAME
                || !name.bytes().all(|b| (0x20..0x7f).contains(&b))
            {
                return Err(config_error(
                    "application_name",
                    format!(
                        "must be 1 to {MAX_APPLICATION_NAME} printable ASCII characters, got {} bytes",
                        name.len()
                    ),
                ));
            }
            options = options.application_name(name);
        }

        let tls_mode = self
            .tls_mode
            .unwrap_or_else(|| TlsMode::from_sqlx(options.get_ssl_mode()));
        options = options.ssl_mode(tls_mode.to_sqlx());
        if let Some(path) = &self.tls_ca_file {
            if !path.is_file() {
                return Err(config_error(
                    "tls_ca_file",
                    format!("{} does not exist or is not a file", path.display()),
                ));
            }
            options = options.ssl_root_cert(path);
        }

        let retry = self.retry.unwrap_or_default();
        retry.validate()?;

        Ok(DatabaseConfig {
            options,
            has_password,
            max_connections,
            min_connections,
            acquire_timeout,
            connect_timeout,
            idle_timeout,
            max_lifetime,
            statement_timeout,
            lock_timeout,
            idle_in_transaction_timeout,
            tls_mode,
            tls_ca_file: self.tls_ca_file,
            retry,
        })
    }
}

/// The query parameters sqlx understands in a connection URL.
const KNOWN_URL_PARAMETERS: &[&str] = &[
    "sslmode",
    "ssl-mode",
    "sslrootcert",
    "ssl-root-cert",
    "ssl-ca",
    "sslcert",
    "ssl-cert",
    "sslkey",
    "ssl-key",
    "statement-cache-capacity",
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "password",
    "application_name",
    "options",
];

/// Parses a connection URL, never echoing it (it may hold a password).
fn parse_url(url: &str) -> Result<(PgConnectOptions, bool)> {
    let url = url.trim();
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(config_error(
            "url",
            "not a URL; expected postgres://user:password@host:port/database",
        ));
    };
    if !scheme.eq_ignore_ascii_case("postgres") && !scheme.eq_ignore_ascii_case("postgresql") {
        return Err(config_error(
            "url",
            format!("unsupported scheme {scheme:?}; expected postgres:// or postgresql://"),
        ));
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let userinfo = authority.rsplit_once('@').map(|(u, _)| u);
    let password = userinfo.and_then(|u| u.split_once(':')).map(|(_, p)| p);
    let query = rest
        .split_once('?')
        .map(|(_, q)| q.split('#').next().unwrap_or_default())
        .unwrap_or_default();
    let mut query_password = false;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let key = pair.split_once('=').map_or(pair, |(k, _)| k);
        // sqlx ignores unknown parameters with a log line that includes the
        // value; a misspelt `pasword=` would leak it and be ignored. Refuse
        // them instead, naming only the key.
        let known = KNOWN_URL_PARAMETERS.contains(&key)
            || (key.starts_with("options[") && key.ends_with(']'));
        if !known {
            return Err(config_error(
                "url",
                format!(
                    "unknown connection parameter {key:?}; expected one of {}",
                    KNOWN_URL_PARAMETERS.join(", ")
                ),
            ));
        }
        query_password |= key == "password";
    }
    let has_password = password.is_some_and(|p| !p.is_empty()) || query_password;

    let options = PgConnectOptions::from_str(url).map_err(|e| {
        let mut reason = match &e {
            sqlx::Error::Configuration(inner) => inner.to_string(),
            other => other.to_string(),
        };
        // Belt and braces: the parser's messages do not quote the URL
        // today; make sure a future one cannot leak the credentials.
        for secret in [userinfo, password].into_iter().flatten() {
            if !secret.is_empty() {
                reason = reason.replace(secret, "<redacted>");
            }
        }
        config_error("url", format!("malformed connection URL: {reason}"))
    })?;
    Ok((options, has_password))
}

pub(crate) fn config_error(
    setting: impl Into<Cow<'static, str>>,
    reason: impl Into<String>,
) -> DatabaseError {
    DatabaseError::Config {
        setting: setting.into(),
        reason: reason.into(),
    }
}

/// Errors from `build()` name builder settings; `from_env` renames the
/// ones that came from a variable.
fn rename_setting(e: DatabaseError) -> DatabaseError {
    match e {
        DatabaseError::Config { setting, reason } => {
            let var = match &*setting {
                "url" => Some(env::DATABASE_URL),
                "max_connections" => Some(env::MAX_CONNECTIONS),
                "min_connections" => Some(env::MIN_CONNECTIONS),
                "acquire_timeout" => Some(env::ACQUIRE_TIMEOUT),
                "connect_timeout" => Some(env::CONNECT_TIMEOUT),
                "statement_timeout" => Some(env::STATEMENT_TIMEOUT),
                "lock_timeout" => Some(env::LOCK_TIMEOUT),
                "idle_in_transaction_session_timeout" => Some(env::IDLE_IN_TRANSACTION_TIMEOUT),
                "application_name" => Some(env::APPLICATION_NAME),
                "tls_mode" => Some(env::TLS_MODE),
                "tls_ca_file" => Some(env::TLS_CA_FILE),
                "retry.max_attempts" => Some(env::TRANSACTION_ATTEMPTS),
                _ => None,
            };
            DatabaseError::Config {
                setting: var.map_or(setting, Cow::Borrowed),
                reason,
            }
        }
        other => other,
    }
}

fn positive(setting: &'static str, d: Duration) -> Result<Duration> {
    if d.is_zero() {
        Err(config_error(setting, "must be greater than zero"))
    } else {
        Ok(d)
    }
}

fn non_zero(d: Duration) -> Option<Duration> {
    (!d.is_zero()).then_some(d)
}

fn parse_count(var: &'static str, value: &str) -> Result<u32> {
    value.trim().parse::<u32>().map_err(|_| {
        config_error(
            var,
            format!("expected a whole number, got {:?}", value.trim()),
        )
    })
}

/// Parses `500ms`, `5s`, `2m`, `1h` or `0`.
pub(crate) fn parse_duration(var: &'static str, value: &str) -> Result<Duration> {
    let v = value.trim();
    let bad = || {
        config_error(
            var,
            format!("expected a duration such as 500ms, 5s, 2m or 1h, got {v:?}"),
        )
    };
    if v == "0" {
        return Ok(Duration::ZERO);
    }
    let split = v.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (number, unit) = v.split_at(split);
    let n: u64 = number.parse().map_err(|_| bad())?;
    let d = match unit.trim() {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" | "min" => Duration::from_secs(n.checked_mul(60).ok_or_else(bad)?),
        "h" => Duration::from_secs(n.checked_mul(3600).ok_or_else(bad)?),
        _ => return Err(bad()),
    };
    Ok(d)
}

#[cfg(test)]
mod tests {
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
}
