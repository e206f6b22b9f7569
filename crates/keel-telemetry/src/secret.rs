//! A wrapper that keeps secrets out of logs, traces and serialized output.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// What a [`Secret`] prints and serializes as.
pub const REDACTED: &str = "[REDACTED]";

/// A value that must never be written anywhere by accident: passwords,
/// tokens, API keys, connection strings with credentials.
///
/// `Debug`, `Display` and `Serialize` all produce `[REDACTED]`, so a
/// configuration struct holding secrets can derive `Debug` and be logged
/// whole. Reading the value takes an explicit, greppable
/// [`expose_secret`](Self::expose_secret). Deserializing reads the plain
/// value, so secrets load from configuration files and environment
/// variables as usual.
///
/// ```
/// use keel_telemetry::Secret;
///
/// #[derive(Debug, serde::Deserialize)]
/// struct DbConfig { user: String, password: Secret<String> }
///
/// let config: DbConfig =
///     serde_json::from_str(r#"{"user":"app","password":"hunter2"}"#).unwrap();
/// assert_eq!(format!("{config:?}"), r#"DbConfig { user: "app", password: [REDACTED] }"#);
/// assert_eq!(config.password.expose_secret(), "hunter2");
/// ```
///
/// It guards against accidental output, not against memory inspection: the
/// value is not wiped when dropped.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret<T>(T);

impl<T> Secret<T> {
    /// Wraps a secret value.
    pub const fn new(value: T) -> Self {
        Self(value)
    }

    /// The secret value. Every call site is a place where the secret
    /// leaves its wrapper: keep them few and obvious.
    pub fn expose_secret(&self) -> &T {
        &self.0
    }

    /// Unwraps the secret value.
    pub fn into_inner(self) -> T {
        self.0
    }

    /// Transforms the secret without exposing it, e.g. to trim it.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Secret<U> {
        Secret(f(self.0))
    }
}

impl<T> From<T> for Secret<T> {
    fn from(value: T) -> Self {
        Self(value)
    }
}

impl From<&str> for Secret<String> {
    fn from(value: &str) -> Self {
        Self(value.to_owned())
    }
}

impl<T> fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl<T> fmt::Display for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl<T> Serialize for Secret<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(REDACTED)
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Secret<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        T::deserialize(deserializer).map(Secret)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_output_path_is_redacted() {
        let s = Secret::new("s3cr3t-value".to_owned());
        assert_eq!(format!("{s:?}"), REDACTED);
        assert_eq!(format!("{s:#?}"), REDACTED);
        assert_eq!(s.to_string(), REDACTED);
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"[REDACTED]\"");
        assert_eq!(s.expose_secret(), "s3cr3t-value");
    }

    #[test]
    fn deserializes_the_plain_value_and_maps_without_exposing() {
        let s: Secret<String> = serde_json::from_str("\"  tok  \"").unwrap();
        let trimmed = s.map(|v| v.trim().to_owned());
        assert_eq!(trimmed.expose_secret(), "tok");
        let n: Secret<u32> = serde_json::from_str("42").unwrap();
        assert_eq!(n.into_inner(), 42);
        assert_eq!(Secret::from("x"), Secret::new("x".to_owned()));
    }
}
