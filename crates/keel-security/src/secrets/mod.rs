//! Secrets: a provider port, environment, mounted-file and Google Cloud
//! Secret Manager providers, and a caching wrapper.
//!
//! Values travel as [`Secret<String>`](crate::Secret) from the moment they
//! are read: `Debug`, `Display` and `Serialize` print `[REDACTED]`, and
//! errors and log lines name the secret, never its value.

mod cache;
mod env;
mod file;
#[cfg(feature = "gcp-secret-manager")]
mod gcp;

use std::fmt::Debug;

use async_trait::async_trait;

pub use cache::CachedSecrets;
pub use env::EnvSecrets;
pub use file::FileSecrets;
#[cfg(feature = "gcp-secret-manager")]
pub use gcp::{AccessedSecret, GcpSecretManager, GcpSecretManagerConfig, SecretRef, SecretVersion};

use crate::Secret;
use crate::error::{Result, SecurityError};

/// Where a service reads its secrets from: environment variables, files
/// mounted by the platform, a cloud secret manager.
///
/// Object-safe, so a composition root can hold `Arc<dyn SecretProvider>`
/// and choose the backend from configuration. Implementations must not
/// cache (wrap them in [`CachedSecrets`] for that) and must keep values out
/// of their errors and logs.
#[async_trait]
pub trait SecretProvider: Send + Sync + Debug {
    /// The current value of the secret called `name`.
    ///
    /// # Errors
    ///
    /// [`SecurityError::SecretNotFound`] when the provider has no such
    /// secret; [`SecurityError::SecretInvalid`] for a name the provider
    /// cannot hold or a value that is not UTF-8;
    /// [`SecurityError::SecretUnavailable`] when the backend failed.
    async fn get(&self, name: &str) -> Result<Secret<String>>;

    /// Reports that the value last read for `name` was refused where it
    /// was used (a database rejected the password, an API the key), so the
    /// next [`get`](Self::get) reads it from the backend again instead of a
    /// cache. Providers that do not cache (the default) have nothing to do;
    /// [`CachedSecrets`] drops its copy.
    async fn invalidate(&self, name: &str) {
        let _ = name;
    }
}

/// Refuses names that are empty, absurdly long or contain characters no
/// backend should see (path separators, `=`, control characters).
pub(crate) fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 255
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if ok {
        Ok(())
    } else {
        Err(SecurityError::SecretInvalid {
            name: crate::error::truncate(name, 64),
            reason: "names use ASCII letters, digits, '_', '-' and '.', and do not start with '.'",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_could_escape_a_backend_are_refused() {
        for bad in [
            "",
            "../etc/passwd",
            "a/b",
            "..data",
            ".hidden",
            "A=B",
            "x\0y",
            "é",
        ] {
            assert!(
                matches!(check_name(bad), Err(SecurityError::SecretInvalid { .. })),
                "{bad:?}"
            );
        }
        for good in ["DATABASE_PASSWORD", "db-password", "tls.key"] {
            check_name(good).unwrap();
        }
    }
}
