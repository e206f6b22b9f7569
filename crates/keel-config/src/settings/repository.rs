use keel_security::Secret;
use serde::{Deserialize, Serialize};

use super::{Check, Section};
use crate::Environment;

/// The shortest cursor key accepted, in bytes.
pub(crate) const MIN_CURSOR_KEY_BYTES: usize = 32;

/// `repository`: `keel-repository`'s cursor-signing key and page limit.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct RepositorySettings {
    /// The HMAC key that signs pagination cursors, at least 32 bytes;
    /// usually a secret reference (`{ secret = "cursor-key" }`). Required
    /// outside the development environment; in development, the public
    /// development key is used when it is unset.
    pub cursor_key: Option<Secret<String>>,
    /// The largest page size accepted (default 1000).
    pub max_page_size: u32,
}

impl Default for RepositorySettings {
    fn default() -> Self {
        Self {
            cursor_key: None,
            max_page_size: 1000,
        }
    }
}

impl Section for RepositorySettings {
    const KEY: &'static str = "repository";

    fn validate(&self, check: &mut Check<'_>) {
        match &self.cursor_key {
            Some(key) if key.expose_secret().len() < MIN_CURSOR_KEY_BYTES => check.fail(
                "cursor_key",
                format!("must be at least {MIN_CURSOR_KEY_BYTES} bytes"),
            ),
            Some(_) => {}
            None if check.environment != Environment::Development => check.fail(
                "cursor_key",
                format!(
                    "required in the {} environment: without it cursors are signed with the \
                     public development key and anyone can forge them; set repository.cursor_key \
                     (e.g. {{ secret = \"cursor-key\" }})",
                    check.environment
                ),
            ),
            None => {}
        }
        if self.max_page_size == 0 {
            check.fail("max_page_size", "must be at least 1");
        }
    }
}
