//! The sections of the configuration tree, one per Keel crate, each under
//! its own key.
//!
//! Every section deserializes from the merged layers with
//! `#[serde(default, deny_unknown_fields)]`: a key left out takes its
//! default, and a misspelt key is an error rather than silently ignored.
//! Secret-bearing keys hold [`Secret`](keel_security::Secret), so
//! `Debug` and `Serialize` print `[REDACTED]`.

mod cache;
mod database;
mod eventbus;
mod eventstore;
mod grpc;
mod repository;
mod security;
mod service;
mod telemetry;

pub use cache::{CacheBackend, CacheSettings};
pub use database::DatabaseSettings;
pub use eventbus::{BusBackend, BusSubscriptionSettings, EventBusSettings};
pub use eventstore::{EventStoreSettings, StoreSubscriptionSettings};
pub use grpc::GrpcSettings;
pub use repository::RepositorySettings;
pub use security::{AuditSettings, JwtSettings, SecuritySettings};
pub use service::ServiceSettings;
pub use telemetry::{LogFormatSetting, TelemetrySettings};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::Environment;

/// One section of the tree: its key, its defaults, and the checks that
/// serde's types cannot express (ranges, keys that need each other).
pub(crate) trait Section: Serialize + DeserializeOwned + Default {
    /// The section's key at the root of the tree.
    const KEY: &'static str;

    /// Reports every problem through `check`.
    fn validate(&self, check: &mut Check<'_>);
}

/// Collects the problems of one section, by key relative to the section.
pub(crate) struct Check<'a> {
    pub(crate) environment: Environment,
    pub(crate) problems: &'a mut Vec<(String, String)>,
}

impl Check<'_> {
    /// `key` (relative to the section) is wrong because of `message`.
    pub(crate) fn fail(&mut self, key: &str, message: impl Into<String>) {
        self.problems.push((key.to_owned(), message.into()));
    }
}
