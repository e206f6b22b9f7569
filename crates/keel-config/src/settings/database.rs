use std::path::PathBuf;
use std::time::Duration;

use keel_security::Secret;
use serde::{Deserialize, Serialize};

use super::{Check, Section};
use crate::duration;

/// `database`: the PostgreSQL pool of `keel-database`, shared by the event
/// store, outbox, repository and audit log.
///
/// The keys mirror [`DatabaseConfig`](keel_database::DatabaseConfig)'s
/// builder and keep the environment variables `keel-database` has always
/// read (`DATABASE_URL`, `KEEL_DB_*`). Timeouts that can be turned off take
/// `0` or `off`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct DatabaseSettings {
    /// `postgres://user:password@host:port/database`; unset means no
    /// database is configured (services on in-memory adapters).
    pub url: Option<Secret<String>>,
    /// A password overriding the URL's, for secrets injected apart.
    pub password: Option<Secret<String>>,
    /// Maximum pool size (default 100).
    pub max_connections: u32,
    /// Connections kept open when idle, at most `max_connections` (default
    /// 10, or `max_connections` when that is smaller).
    pub min_connections: Option<u32>,
    /// How long an operation waits for a pooled connection (default 5s).
    #[serde(with = "duration::required")]
    pub acquire_timeout: Duration,
    /// How long opening one connection may take (default 5s).
    #[serde(with = "duration::required")]
    pub connect_timeout: Duration,
    /// How long an idle connection above the minimum is kept (default 10m).
    #[serde(with = "duration::optional")]
    pub idle_timeout: Option<Duration>,
    /// Maximum age of a connection (default 30m).
    #[serde(with = "duration::optional")]
    pub max_lifetime: Option<Duration>,
    /// Server-side `statement_timeout` (default 30s).
    #[serde(with = "duration::optional")]
    pub statement_timeout: Option<Duration>,
    /// Server-side `lock_timeout` (default off).
    #[serde(with = "duration::optional")]
    pub lock_timeout: Option<Duration>,
    /// Server-side `idle_in_transaction_session_timeout` (default off).
    #[serde(with = "duration::optional")]
    pub idle_in_transaction_timeout: Option<Duration>,
    /// `application_name` shown in `pg_stat_activity` (default unset).
    pub application_name: Option<String>,
    /// `disable`, `prefer`, `require`, `verify-ca` or `verify-full`
    /// (default: the URL's `sslmode`, else `prefer`).
    pub tls_mode: Option<String>,
    /// PEM file of the CA that signs the server certificate.
    pub tls_ca_file: Option<PathBuf>,
    /// Attempts of a retried transaction (default 5).
    pub transaction_attempts: u32,
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        Self {
            url: None,
            password: None,
            max_connections: 100,
            min_connections: None,
            acquire_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            idle_timeout: Some(Duration::from_secs(600)),
            max_lifetime: Some(Duration::from_secs(1800)),
            statement_timeout: Some(Duration::from_secs(30)),
            lock_timeout: None,
            idle_in_transaction_timeout: None,
            application_name: None,
            tls_mode: None,
            tls_ca_file: None,
            transaction_attempts: 5,
        }
    }
}

impl Section for DatabaseSettings {
    const KEY: &'static str = "database";

    fn validate(&self, check: &mut Check<'_>) {
        #[cfg(feature = "database")]
        {
            // The pool settings are checked even without a URL, against a
            // placeholder that never leaves this function. The builder
            // stops at its first complaint: put that setting back to its
            // default and ask again, so every bad setting is reported.
            let url = self
                .url
                .as_ref()
                .map_or("postgres://localhost/keel", |u| u.expose_secret());
            let mut probe = self.clone();
            let mut seen = Vec::new();
            while let Err((key, message)) = probe.build(url) {
                if seen.contains(&key) {
                    break;
                }
                check.fail(key, message);
                seen.push(key);
                if !probe.reset(key) {
                    break;
                }
            }
        }
        #[cfg(not(feature = "database"))]
        {
            if self.max_connections == 0 {
                check.fail("max_connections", "must be at least 1");
            }
            if self
                .min_connections
                .is_some_and(|min| min > self.max_connections)
            {
                check.fail("min_connections", "is more than max_connections");
            }
        }
    }
}

#[cfg(feature = "database")]
impl DatabaseSettings {
    /// The pool configuration, validated by `keel-database`'s builder.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`](crate::ConfigError) naming the key when
    /// `database.url` is unset or a value is refused (the values were
    /// already checked when the configuration loaded, so only an unset URL
    /// is expected here).
    pub fn to_config(&self) -> Result<keel_database::DatabaseConfig, crate::ConfigError> {
        let Some(url) = &self.url else {
            return Err(crate::ConfigError {
                key: "database.url".to_owned(),
                source: crate::Source::Unset,
                message: "no database is configured; set database.url (DATABASE_URL)".to_owned(),
            });
        };
        self.build(url.expose_secret())
            .map_err(|(key, message)| crate::ConfigError {
                key: format!("database.{key}"),
                source: crate::Source::Unset,
                message,
            })
    }

    /// Puts `key` back to its default; `false` when that cannot help.
    fn reset(&mut self, key: &str) -> bool {
        let d = Self::default();
        match key {
            "max_connections" => self.max_connections = d.max_connections,
            "min_connections" => self.min_connections = d.min_connections,
            "acquire_timeout" => self.acquire_timeout = d.acquire_timeout,
            "connect_timeout" => self.connect_timeout = d.connect_timeout,
            "statement_timeout" => self.statement_timeout = d.statement_timeout,
            "lock_timeout" => self.lock_timeout = d.lock_timeout,
            "idle_in_transaction_timeout" => {
                self.idle_in_transaction_timeout = d.idle_in_transaction_timeout;
            }
            "application_name" => self.application_name = d.application_name,
            "tls_mode" => self.tls_mode = d.tls_mode,
            "tls_ca_file" => self.tls_ca_file = d.tls_ca_file,
            "transaction_attempts" => self.transaction_attempts = d.transaction_attempts,
            _ => return false,
        }
        true
    }

    fn build(&self, url: &str) -> Result<keel_database::DatabaseConfig, (&'static str, String)> {
        use keel_database::{DatabaseConfig, DatabaseError, RetryPolicy, TlsMode};
        let mut b = DatabaseConfig::builder()
            .url(url)
            .max_connections(self.max_connections)
            .acquire_timeout(self.acquire_timeout)
            .connect_timeout(self.connect_timeout)
            .idle_timeout(self.idle_timeout)
            .max_lifetime(self.max_lifetime)
            .statement_timeout(self.statement_timeout)
            .lock_timeout(self.lock_timeout)
            .idle_in_transaction_timeout(self.idle_in_transaction_timeout)
            .retry(RetryPolicy::default().max_attempts(self.transaction_attempts));
        if let Some(min) = self.min_connections {
            b = b.min_connections(min);
        }
        if let Some(password) = &self.password {
            b = b.password(password.expose_secret());
        }
        if let Some(name) = &self.application_name {
            b = b.application_name(name);
        }
        if let Some(mode) = &self.tls_mode {
            let mode: TlsMode = mode.parse().map_err(|_| {
                (
                    "tls_mode",
                    "expected disable, prefer, require, verify-ca or verify-full".to_owned(),
                )
            })?;
            b = b.tls_mode(mode);
        }
        if let Some(path) = &self.tls_ca_file {
            b = b.tls_ca_file(path);
        }
        b.build().map_err(|e| match e {
            DatabaseError::Config { setting, reason } => {
                let key = match &*setting {
                    "url" => "url",
                    "max_connections" => "max_connections",
                    "min_connections" => "min_connections",
                    "acquire_timeout" => "acquire_timeout",
                    "connect_timeout" => "connect_timeout",
                    "statement_timeout" => "statement_timeout",
                    "lock_timeout" => "lock_timeout",
                    "idle_in_transaction_session_timeout" => "idle_in_transaction_timeout",
                    "application_name" => "application_name",
                    "tls_ca_file" => "tls_ca_file",
                    _ if setting.starts_with("retry") => "transaction_attempts",
                    _ => "url",
                };
                (key, reason)
            }
            other => ("url", other.to_string()),
        })
    }
}
