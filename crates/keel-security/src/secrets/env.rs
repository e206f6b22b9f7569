//! Secrets from environment variables.

use async_trait::async_trait;

use super::{SecretProvider, check_name};
use crate::Secret;
use crate::error::{Result, SecurityError};

/// Reads secrets from environment variables, optionally under a prefix
/// (`EnvSecrets::with_prefix("ORDERS_")` reads `db_password` from
/// `ORDERS_db_password`).
///
/// The environment is read on every call, so a value changed by the
/// process itself is seen at once.
#[derive(Debug, Clone, Default)]
pub struct EnvSecrets {
    prefix: String,
}

impl EnvSecrets {
    /// Reads variables named exactly like the secrets.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads variables named `prefix` + the secret's name.
    #[must_use]
    pub fn with_prefix(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }
}

#[async_trait]
impl SecretProvider for EnvSecrets {
    async fn get(&self, name: &str) -> Result<Secret<String>> {
        check_name(name)?;
        let variable = format!("{}{name}", self.prefix);
        match std::env::var(&variable) {
            Ok(value) => Ok(Secret::new(value)),
            Err(std::env::VarError::NotPresent) => Err(SecurityError::SecretNotFound {
                name: name.to_owned(),
            }),
            Err(std::env::VarError::NotUnicode(_)) => Err(SecurityError::SecretInvalid {
                name: name.to_owned(),
                reason: "the value is not UTF-8",
            }),
        }
    }
}
