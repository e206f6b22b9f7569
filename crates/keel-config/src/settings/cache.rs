use std::time::Duration;

use keel_security::Secret;
use serde::{Deserialize, Serialize};

use super::{Check, Section};
use crate::duration;

/// Which cache backend the service wires.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum CacheBackend {
    /// The in-process cache (the default; needs no server).
    #[default]
    Memory,
    /// Redis at `cache.url`.
    Redis,
}

/// `cache`: `keel-cache`'s backend and its Redis connection.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct CacheSettings {
    /// `memory` (default) or `redis`.
    pub backend: CacheBackend,
    /// `redis://[user:password@]host:port/db`; required with `redis`.
    pub url: Option<Secret<String>>,
    /// Put before every key, so services sharing a Redis stay apart.
    pub key_prefix: String,
    /// How long one connection attempt may take (default 1s).
    #[serde(with = "duration::required")]
    pub connect_timeout: Duration,
    /// How long Redis may take to answer (default 1s).
    #[serde(with = "duration::required")]
    pub response_timeout: Duration,
    /// Reconnect attempts before a request fails (default 3).
    pub reconnect_attempts: usize,
    /// The longest key accepted, prefix included (default 1024).
    pub max_key_bytes: usize,
    /// The largest value accepted (default 16 MiB).
    pub max_value_bytes: usize,
}

impl Default for CacheSettings {
    fn default() -> Self {
        Self {
            backend: CacheBackend::Memory,
            url: None,
            key_prefix: String::new(),
            connect_timeout: Duration::from_secs(1),
            response_timeout: Duration::from_secs(1),
            reconnect_attempts: 3,
            max_key_bytes: 1024,
            max_value_bytes: 16 * 1024 * 1024,
        }
    }
}

impl Section for CacheSettings {
    const KEY: &'static str = "cache";

    fn validate(&self, check: &mut Check<'_>) {
        match &self.url {
            None if self.backend == CacheBackend::Redis => {
                check.fail("url", "required when cache.backend is redis");
            }
            Some(url) => {
                let url = url.expose_secret();
                if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                    check.fail("url", "expected a redis:// or rediss:// URL");
                }
            }
            None => {}
        }
        for (key, d) in [
            ("connect_timeout", self.connect_timeout),
            ("response_timeout", self.response_timeout),
        ] {
            if d.is_zero() {
                check.fail(key, "must be greater than zero");
            }
        }
        if self.max_key_bytes == 0 {
            check.fail("max_key_bytes", "must be at least 1");
        }
        if self.max_value_bytes == 0 {
            check.fail("max_value_bytes", "must be at least 1");
        }
    }
}

#[cfg(feature = "cache")]
impl CacheSettings {
    /// The Redis configuration, or `None` when the backend is `memory`.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`](crate::ConfigError) when the backend is `redis`
    /// and no URL is set (already refused when the configuration loaded).
    pub fn redis_config(&self) -> Result<Option<keel_cache::RedisConfig>, crate::ConfigError> {
        if self.backend != CacheBackend::Redis {
            return Ok(None);
        }
        let url = self.url.as_ref().ok_or_else(|| crate::ConfigError {
            key: "cache.url".to_owned(),
            source: crate::Source::Unset,
            message: "required when cache.backend is redis".to_owned(),
        })?;
        Ok(Some(
            keel_cache::RedisConfig::new(url.expose_secret().clone())
                .key_prefix(self.key_prefix.clone())
                .connect_timeout(self.connect_timeout)
                .response_timeout(self.response_timeout)
                .reconnect_attempts(self.reconnect_attempts)
                .max_key_bytes(self.max_key_bytes)
                .max_value_bytes(self.max_value_bytes),
        ))
    }
}
