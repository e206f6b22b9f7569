//! The builder of a validated [`DatabaseConfig`].

use super::*;

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
