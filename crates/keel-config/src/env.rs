//! The environment-variable layer: `KEEL_<SECTION>__<KEY>` for every key,
//! and the names Keel's crates have always read (`DATABASE_URL`,
//! `KEEL_DB_*`, `KEEL_LOG_FORMAT`, …) for the keys they map to.

use std::sync::Arc;

use figment::value::{Dict, Map, Value};
use figment::{Metadata, Profile, Provider};

/// The prefix of the generic variables.
pub const PREFIX: &str = "KEEL_";
/// What separates the levels of a key in a generic variable's name.
pub const SEPARATOR: &str = "__";

/// The variables Keel's crates read before `keel-config` existed, and the
/// key each one sets. A generic `KEEL_…__…` variable for the same key wins.
pub const LEGACY_VARIABLES: &[(&str, &str)] = &[
    ("DATABASE_URL", "database.url"),
    ("KEEL_DB_PASSWORD", "database.password"),
    ("KEEL_DB_MAX_CONNECTIONS", "database.max_connections"),
    ("KEEL_DB_MIN_CONNECTIONS", "database.min_connections"),
    ("KEEL_DB_ACQUIRE_TIMEOUT", "database.acquire_timeout"),
    ("KEEL_DB_CONNECT_TIMEOUT", "database.connect_timeout"),
    ("KEEL_DB_IDLE_TIMEOUT", "database.idle_timeout"),
    ("KEEL_DB_MAX_LIFETIME", "database.max_lifetime"),
    ("KEEL_DB_STATEMENT_TIMEOUT", "database.statement_timeout"),
    ("KEEL_DB_LOCK_TIMEOUT", "database.lock_timeout"),
    (
        "KEEL_DB_IDLE_IN_TRANSACTION_TIMEOUT",
        "database.idle_in_transaction_timeout",
    ),
    ("KEEL_DB_APPLICATION_NAME", "database.application_name"),
    ("KEEL_DB_TLS_MODE", "database.tls_mode"),
    ("KEEL_DB_TLS_CA_FILE", "database.tls_ca_file"),
    (
        "KEEL_DB_TRANSACTION_ATTEMPTS",
        "database.transaction_attempts",
    ),
    ("PUBSUB_EMULATOR_HOST", "eventbus.emulator_host"),
    ("GOOGLE_CLOUD_PROJECT", "eventbus.project"),
    ("GOOGLE_CLOUD_PROJECT", "telemetry.gcp_project"),
    ("KEEL_LOG_FORMAT", "telemetry.log_format"),
    ("OTEL_EXPORTER_OTLP_ENDPOINT", "telemetry.otlp_endpoint"),
    ("OTEL_SERVICE_NAME", "telemetry.service_name"),
];

/// The generic variable for `key` (`database.max_connections` →
/// `KEEL_DATABASE__MAX_CONNECTIONS`).
#[must_use]
pub fn variable_for(key: &str) -> String {
    format!(
        "{PREFIX}{}",
        key.split('.')
            .map(str::to_ascii_uppercase)
            .collect::<Vec<_>>()
            .join(SEPARATOR)
    )
}

/// The key a generic variable sets, if it is one (`KEEL_ENV` is not: it has
/// no separator).
fn key_for(variable: &str) -> Option<String> {
    let rest = variable.strip_prefix(PREFIX)?;
    if !rest.contains(SEPARATOR) {
        return None;
    }
    let parts: Vec<String> = rest.split(SEPARATOR).map(str::to_ascii_lowercase).collect();
    if parts.iter().any(|p| p.is_empty()) {
        return None;
    }
    Some(parts.join("."))
}

pub(crate) const GENERIC_NAME: &str = "environment variable";
pub(crate) const LEGACY_NAME: &str = "environment variable (legacy name)";

/// One of the two environment layers.
pub(crate) struct EnvLayer {
    legacy: bool,
    pairs: Vec<(String, String)>,
}

impl EnvLayer {
    pub(crate) fn generic(vars: &[(String, String)]) -> Self {
        let pairs = vars
            .iter()
            .filter_map(|(name, value)| Some((key_for(name)?, value.clone())))
            .collect();
        Self {
            legacy: false,
            pairs,
        }
    }

    pub(crate) fn legacy(vars: &[(String, String)]) -> Self {
        let mut pairs = Vec::new();
        for (variable, key) in LEGACY_VARIABLES {
            if let Some((_, value)) = vars.iter().find(|(name, _)| name == variable) {
                // An empty variable is treated as unset, as before.
                if !value.trim().is_empty() {
                    pairs.push(((*key).to_owned(), value.clone()));
                }
            }
        }
        Self {
            legacy: true,
            pairs,
        }
    }
}

impl Provider for EnvLayer {
    fn metadata(&self) -> Metadata {
        if self.legacy {
            let table: Arc<Vec<(&str, &str)>> = Arc::new(LEGACY_VARIABLES.to_vec());
            Metadata::named(LEGACY_NAME).interpolater(move |_: &Profile, keys: &[&str]| {
                let key = keys.join(".");
                table
                    .iter()
                    .find(|(_, k)| *k == key)
                    .map_or_else(|| variable_for(&key), |(v, _)| (*v).to_owned())
            })
        } else {
            Metadata::named(GENERIC_NAME)
                .interpolater(|_: &Profile, keys: &[&str]| variable_for(&keys.join(".")))
        }
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let mut root = Dict::new();
        for (key, value) in &self.pairs {
            insert(&mut root, key, parse(value));
        }
        Ok(Profile::Default.collect(root))
    }
}

/// A variable's value: `[a, b]` is a list of strings, anything else a
/// string (read as a number or boolean where the key needs one).
fn parse(value: &str) -> Value {
    let trimmed = value.trim();
    match trimmed.strip_prefix('[').and_then(|v| v.strip_suffix(']')) {
        Some(items) => Value::from(
            items
                .split(',')
                .map(str::trim)
                .filter(|i| !i.is_empty())
                .map(|i| Value::from(i.trim_matches('"').to_owned()))
                .collect::<Vec<Value>>(),
        ),
        None => Value::from(value.to_owned()),
    }
}

/// Puts `value` at the dotted `key`, making the tables on the way.
pub(crate) fn insert(root: &mut Dict, key: &str, value: Value) {
    let mut parts = key.split('.').peekable();
    let mut dict = root;
    while let Some(part) = parts.next() {
        if parts.peek().is_none() {
            dict.insert(part.to_owned(), value);
            return;
        }
        let entry = dict
            .entry(part.to_owned())
            .or_insert_with(|| Value::from(Dict::new()));
        if entry.as_dict().is_none() {
            *entry = Value::from(Dict::new());
        }
        let Value::Dict(_, next) = entry else {
            unreachable!("made a table just above")
        };
        dict = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generic_names_map_to_keys_and_back() {
        assert_eq!(
            key_for("KEEL_DATABASE__MAX_CONNECTIONS").as_deref(),
            Some("database.max_connections")
        );
        assert_eq!(
            key_for("KEEL_EVENTBUS__SUBSCRIPTION__ACK_DEADLINE").as_deref(),
            Some("eventbus.subscription.ack_deadline")
        );
        for not_one in [
            "KEEL_ENV",
            "KEEL_DB_MAX_CONNECTIONS",
            "KEEL___X",
            "KEEL_A__",
            "PATH",
        ] {
            assert_eq!(key_for(not_one), None, "{not_one}");
        }
        assert_eq!(
            variable_for("eventbus.subscription.ack_deadline"),
            "KEEL_EVENTBUS__SUBSCRIPTION__ACK_DEADLINE"
        );
    }
}
