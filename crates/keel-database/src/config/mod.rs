//! Pool configuration: a builder and environment variables.
//!
//! Split the way sqlx-postgres splits its connection options: the validated
//! [`DatabaseConfig`] here, its [builder](DatabaseConfigBuilder), the
//! [environment variables](mod@env), [TLS modes](TlsMode) and the parsing of
//! URLs and values.

use std::borrow::Cow;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgSslMode};

use crate::error::{DatabaseError, Result};
use crate::retry::RetryPolicy;

mod builder;
pub mod env;
mod parse;
#[cfg(test)]
mod tests;
mod tls;

pub use builder::DatabaseConfigBuilder;
pub(crate) use parse::{config_error, parse_duration};
use parse::{non_zero, parse_count, parse_url, positive, rename_setting};
pub use tls::TlsMode;

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
