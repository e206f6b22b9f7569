//! The deployment environment, chosen by `KEEL_ENV`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The variable that chooses the environment (and so the environment's
/// configuration file). Unset means [`Environment::Development`].
pub const ENVIRONMENT_VAR: &str = "KEEL_ENV";

/// Where the service runs. It chooses the file `<dir>/<environment>.toml`
/// and decides whether insecure development defaults are allowed: only in
/// `development`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Environment {
    /// A developer's machine: the public development keys are allowed.
    #[default]
    Development,
    /// Automated tests and CI: every security key must be configured (a
    /// test key in `config/test.toml` is fine).
    Test,
    /// Production (and staging): every security key must be configured.
    Production,
}

impl Environment {
    /// The name used in `KEEL_ENV` and in the file name.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Environment::Development => "development",
            Environment::Test => "test",
            Environment::Production => "production",
        }
    }
}

impl fmt::Display for Environment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error of parsing an [`Environment`] name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnknownEnvironment;

impl fmt::Display for UnknownEnvironment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("unknown environment; expected development, test or production")
    }
}

impl std::error::Error for UnknownEnvironment {}

impl FromStr for Environment {
    type Err = UnknownEnvironment;

    /// `development` (or `dev`), `test`, `production` (or `prod`), in any
    /// case.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "development" | "dev" => Ok(Environment::Development),
            "test" => Ok(Environment::Test),
            "production" | "prod" => Ok(Environment::Production),
            _ => Err(UnknownEnvironment),
        }
    }
}
