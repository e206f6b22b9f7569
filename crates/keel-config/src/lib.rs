//! One layered configuration for a service built on Keel.
//!
//! A service reads its settings and every Keel crate's from one tree, each
//! crate under its own key (`database`, `eventstore`, `eventbus`, `cache`,
//! `telemetry`, `security`, `grpc`, `repository`, plus `service`), and
//! its own sections beside them ([`KeelConfig::extract`]). The layers, later
//! ones winning:
//!
//! 1. Keel's built-in defaults (and the service's, [`ConfigLoader::set_default`]);
//! 2. the base file `config/base.toml`;
//! 3. the environment's file `config/<environment>.toml`, the environment
//!    (`development`, `test` or `production`) chosen by `KEEL_ENV`;
//! 4. environment variables: `KEEL_<SECTION>__<KEY>` for any key, and the
//!    names Keel's crates have always read (`DATABASE_URL`, `KEEL_DB_*`,
//!    `KEEL_LOG_FORMAT`, `PUBSUB_EMULATOR_HOST`, …; [`env::LEGACY_VARIABLES`]);
//! 5. secrets: a value written `{ secret = "name" }` or `secret://name` is
//!    read through a [`SecretProvider`](keel_security::SecretProvider).
//!
//! Loading checks everything and reports **every** problem at once, each
//! naming its key and the layer the value came from (the file, the variable,
//! the default, the secret), never the value. Secret-bearing keys are
//! [`Secret`](keel_security::Secret)s: `Debug` and `Serialize` print
//! `[REDACTED]`.
//!
//! The public development keys (the repository's cursor-signing key, an
//! unkeyed audit log) are allowed in `development` only: in `test` and
//! `production`, `repository.cursor_key` and `security.audit.key` must be
//! configured, and loading fails naming them otherwise.
//!
//! The full list of keys, defaults and variables is `docs/configuration.md`.
//!
//! # Example
//!
//! ```
//! use std::sync::Arc;
//! use keel_config::{ConfigLoader, Environment, Source};
//! use keel_security::EnvSecrets;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let dir = tempfile::tempdir().unwrap();
//! std::fs::write(dir.path().join("base.toml"), r#"
//!     [service]
//!     name = "orders"
//!     [database]
//!     max_connections = 20
//! "#).unwrap();
//!
//! let config = ConfigLoader::new()
//!     .dir(dir.path())
//!     .environment(Environment::Development)
//!     .vars([("KEEL_DB_MIN_CONNECTIONS", "4"), ("KEEL_CACHE__KEY_PREFIX", "orders:")])
//!     .secrets(Arc::new(EnvSecrets::new()))
//!     .load()
//!     .await
//!     .unwrap();
//! assert_eq!(config.service.name, "orders");
//! assert_eq!(config.database.max_connections, 20);
//! assert_eq!(config.database.min_connections, Some(4));
//! assert_eq!(config.cache.key_prefix, "orders:");
//! assert_eq!(config.source_of("database.min_connections"),
//!            Source::EnvVar("KEEL_DB_MIN_CONNECTIONS".into()));
//!
//! // Every problem at once, by key and layer.
//! let errors = ConfigLoader::new()
//!     .dir(dir.path())
//!     .environment(Environment::Production)
//!     .vars([("KEEL_DB_MAX_CONNECTIONS", "lots"), ("KEEL_GRPC__ADDRESS", "nowhere")])
//!     .load()
//!     .await
//!     .unwrap_err();
//! let keys: Vec<&str> = errors.errors().iter().map(|e| e.key.as_str()).collect();
//! assert_eq!(keys, ["database.max_connections", "security.audit.key",
//!                   "grpc.address", "repository.cursor_key"]);
//! # }
//! ```
//!
//! # Feature flags
//!
//! Each builds the conversion into one crate's own configuration type
//! (all on by default):
//!
//! * `database`: [`DatabaseSettings::to_config`];
//! * `eventstore`: [`EventStoreSettings::store_config`],
//!   [`EventStoreSettings::subscription_options`];
//! * `eventbus`: [`EventBusSettings::pubsub_config`],
//!   [`EventBusSettings::subscription_config`];
//! * `cache`: [`CacheSettings::redis_config`];
//! * `telemetry`: [`TelemetrySettings::to_config`], [`KeelConfig::telemetry_config`];
//! * `repository`: [`KeelConfig::cursor_key`].

mod duration;
pub mod env;
mod environment;
mod error;
mod layer;
mod loader;
mod secrets;
mod settings;

use std::fmt;
use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;

pub use environment::{ENVIRONMENT_VAR, Environment, UnknownEnvironment};
pub use error::{ConfigError, ConfigErrors, Source};
pub use loader::{BASE_FILE, CONFIG_DIR_VAR, ConfigLoader, DEFAULT_CONFIG_DIR};
pub use secrets::{SECRET_KEY, SECRET_SCHEME};
pub use settings::{
    AuditSettings, BusBackend, BusSubscriptionSettings, CacheBackend, CacheSettings,
    DatabaseSettings, EventBusSettings, EventStoreSettings, GrpcSettings, JwtSettings,
    LogFormatSetting, RepositorySettings, SecuritySettings, ServiceSettings,
    StoreSubscriptionSettings, TelemetrySettings,
};

/// The loaded configuration: every Keel section, checked, with secrets
/// resolved. Cheap to clone.
///
/// `Debug` and `Serialize` show the effective settings with every secret
/// as `[REDACTED]`, so the whole configuration can be logged at start-up.
#[derive(Clone, Serialize)]
#[non_exhaustive]
pub struct KeelConfig {
    /// The environment the configuration was loaded for.
    pub environment: Environment,
    /// `service`.
    pub service: ServiceSettings,
    /// `database`.
    pub database: DatabaseSettings,
    /// `eventstore`.
    pub eventstore: EventStoreSettings,
    /// `eventbus`.
    pub eventbus: EventBusSettings,
    /// `cache`.
    pub cache: CacheSettings,
    /// `telemetry`.
    pub telemetry: TelemetrySettings,
    /// `security`.
    pub security: SecuritySettings,
    /// `grpc`.
    pub grpc: GrpcSettings,
    /// `repository`.
    pub repository: RepositorySettings,
    #[serde(skip)]
    tree: Arc<loader::Resolved>,
}

impl fmt::Debug for KeelConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The merged tree holds resolved secrets in the clear: never shown.
        f.debug_struct("KeelConfig")
            .field("environment", &self.environment)
            .field("service", &self.service)
            .field("database", &self.database)
            .field("eventstore", &self.eventstore)
            .field("eventbus", &self.eventbus)
            .field("cache", &self.cache)
            .field("telemetry", &self.telemetry)
            .field("security", &self.security)
            .field("grpc", &self.grpc)
            .field("repository", &self.repository)
            .finish_non_exhaustive()
    }
}

impl KeelConfig {
    /// A loader (the same as [`ConfigLoader::new`]).
    pub fn loader() -> ConfigLoader {
        ConfigLoader::new()
    }

    /// Every key with its default, as the tree the defaults layer holds
    /// (what `docs/configuration.md` lists).
    #[must_use]
    pub fn default_keys() -> Vec<(String, String)> {
        let mut out = Vec::new();
        flatten(&loader::defaults(), "", &mut out);
        out
    }

    /// The layer `key`'s value came from.
    #[must_use]
    pub fn source_of(&self, key: &str) -> Source {
        self.tree.source_of(key)
    }

    /// The service's own section at `key` (e.g. `orders`), from the same
    /// layers, secrets resolved. Keys are mapped from variables the same
    /// way: `KEEL_ORDERS__MAX_ITEMS` sets `orders.max_items`.
    ///
    /// # Errors
    ///
    /// [`ConfigErrors`] naming the key and layer of each problem serde
    /// reports.
    pub fn extract<T: DeserializeOwned>(&self, key: &str) -> Result<T, ConfigErrors> {
        self.tree.extract(key)
    }

    /// The configuration of [`keel_telemetry::init`].
    #[cfg(feature = "telemetry")]
    #[must_use]
    pub fn telemetry_config(&self) -> keel_telemetry::TelemetryConfig {
        self.telemetry.to_config(&self.service, self.environment)
    }

    /// The key that signs pagination cursors: `repository.cursor_key`, or,
    /// in the development environment only, the public development key.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] outside development when no key is set, or when
    /// the key is too short (both already refused by [`ConfigLoader::load`]).
    #[cfg(feature = "repository")]
    pub fn cursor_key(&self) -> Result<keel_repository::CursorKey, ConfigError> {
        let error = |message: String| ConfigError {
            key: "repository.cursor_key".to_owned(),
            source: self.source_of("repository.cursor_key"),
            message,
        };
        match &self.repository.cursor_key {
            Some(key) => keel_repository::CursorKey::new(key.expose_secret().as_bytes())
                .map_err(|e| error(e.to_string())),
            None if self.environment == Environment::Development => {
                Ok(keel_repository::CursorKey::insecure_development_key())
            }
            None => Err(error(format!(
                "required in the {} environment",
                self.environment
            ))),
        }
    }
}

fn flatten(dict: &figment::value::Dict, prefix: &str, out: &mut Vec<(String, String)>) {
    use figment::value::Value;
    for (k, v) in dict {
        let key = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            Value::Dict(_, d) if !d.is_empty() => flatten(d, &key, out),
            Value::Empty(..) => out.push((key, String::new())),
            Value::String(_, s) if s.is_empty() => out.push((key, "\"\"".to_owned())),
            Value::String(_, s) => out.push((key, s.clone())),
            Value::Array(_, items) => {
                let items: Vec<String> = items
                    .iter()
                    .map(|i| i.as_str().map_or_else(|| format!("{i:?}"), str::to_owned))
                    .collect();
                out.push((key, format!("[{}]", items.join(", "))));
            }
            Value::Bool(_, b) => out.push((key, b.to_string())),
            Value::Num(_, n) => out.push((key, num(*n))),
            other => out.push((key, format!("{other:?}"))),
        }
    }
}

fn num(n: figment::value::Num) -> String {
    use figment::value::Num;
    match n {
        Num::U8(v) => v.to_string(),
        Num::U16(v) => v.to_string(),
        Num::U32(v) => v.to_string(),
        Num::U64(v) => v.to_string(),
        Num::U128(v) => v.to_string(),
        Num::USize(v) => v.to_string(),
        Num::I8(v) => v.to_string(),
        Num::I16(v) => v.to_string(),
        Num::I32(v) => v.to_string(),
        Num::I64(v) => v.to_string(),
        Num::I128(v) => v.to_string(),
        Num::ISize(v) => v.to_string(),
        Num::F32(v) => v.to_string(),
        Num::F64(v) => v.to_string(),
    }
}
