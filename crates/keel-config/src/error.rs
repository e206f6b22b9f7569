//! Errors: every problem found while loading, each naming its key and the
//! layer the value came from, never the value.

use std::fmt;
use std::path::PathBuf;

/// Where a configuration value came from.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Source {
    /// Keel's built-in default.
    Default,
    /// A configuration file (the base file or the environment's file).
    File(PathBuf),
    /// An environment variable, by name.
    EnvVar(String),
    /// A secret read through the [`SecretProvider`](keel_security::SecretProvider),
    /// named by a reference found in another layer.
    Secret {
        /// The secret's name.
        name: String,
        /// The layer that holds the reference.
        referenced_by: Box<Source>,
    },
    /// Set in code by the service ([`ConfigLoader::dir`](crate::ConfigLoader::dir),
    /// [`ConfigLoader::set_default`](crate::ConfigLoader::set_default)).
    Code,
    /// Not set anywhere, although it is required.
    Unset,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Default => f.write_str("built-in default"),
            Source::File(path) => write!(f, "file {}", path.display()),
            Source::EnvVar(name) => write!(f, "environment variable {name}"),
            Source::Secret {
                name,
                referenced_by,
            } => write!(f, "secret {name:?} (referenced by {referenced_by})"),
            Source::Code => f.write_str("set in code"),
            Source::Unset => f.write_str("not set"),
        }
    }
}

/// One problem with one key.
///
/// The message says what is wrong and what was expected. It never quotes a
/// value of the configuration (a URL, a key, a string of the wrong type),
/// so a secret put under the wrong key does not leak; it may name a
/// secret's name, a missing file's path or a number out of range.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// The key, dotted from the root (`database.max_connections`).
    pub key: String,
    /// The layer the offending value came from.
    pub source: Source,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}): {}", self.key, self.source, self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Everything wrong with a configuration, found in one pass.
///
/// `Display` lists one problem per line:
///
/// ```text
/// 2 configuration errors:
///   database.max_connections (environment variable KEEL_DB_MAX_CONNECTIONS): expected an unsigned integer, found a string
///   repository.cursor_key (not set): required in the production environment; ...
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct ConfigErrors {
    errors: Vec<ConfigError>,
}

impl ConfigErrors {
    pub(crate) fn push(
        &mut self,
        key: impl Into<String>,
        source: Source,
        message: impl Into<String>,
    ) {
        self.errors.push(ConfigError {
            key: key.into(),
            source,
            message: message.into(),
        });
    }

    /// The problems, in the order they were found.
    #[must_use]
    pub fn errors(&self) -> &[ConfigError] {
        &self.errors
    }

    /// How many problems there are.
    #[must_use]
    pub fn len(&self) -> usize {
        self.errors.len()
    }

    /// Whether there is none.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.errors.is_empty()
    }

    /// The problem with `key`, if any.
    #[must_use]
    pub fn for_key(&self, key: &str) -> Option<&ConfigError> {
        self.errors.iter().find(|e| e.key == key)
    }

    pub(crate) fn into_result<T>(self, value: T) -> Result<T, ConfigErrors> {
        if self.errors.is_empty() {
            Ok(value)
        } else {
            Err(self)
        }
    }
}

impl From<ConfigError> for ConfigErrors {
    fn from(error: ConfigError) -> Self {
        Self {
            errors: vec![error],
        }
    }
}

impl IntoIterator for ConfigErrors {
    type Item = ConfigError;
    type IntoIter = std::vec::IntoIter<ConfigError>;

    fn into_iter(self) -> Self::IntoIter {
        self.errors.into_iter()
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.errors.len() {
            1 => write!(f, "1 configuration error:")?,
            n => write!(f, "{n} configuration errors:")?,
        }
        for e in &self.errors {
            write!(f, "\n  {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Renders a figment error without the value it complains about.
pub(crate) fn describe(kind: &figment::error::Kind) -> String {
    use figment::error::Kind;
    match kind {
        Kind::Message(m) => m.clone(),
        Kind::InvalidType(actual, expected) => {
            format!("expected {expected}, found {}", kind_of(actual))
        }
        Kind::InvalidValue(actual, expected) => {
            format!("invalid {}, expected {expected}", kind_of(actual))
        }
        Kind::InvalidLength(len, expected) => format!("{len} items, expected {expected}"),
        Kind::UnknownVariant(_, expected) => {
            format!("unknown value, expected one of: {}", expected.join(", "))
        }
        Kind::UnknownField(_, expected) => {
            format!("unknown key, expected one of: {}", expected.join(", "))
        }
        Kind::MissingField(_) => "missing".to_owned(),
        Kind::DuplicateField(_) => "given twice".to_owned(),
        Kind::ISizeOutOfRange(_) | Kind::USizeOutOfRange(_) => "number out of range".to_owned(),
        Kind::Unsupported(actual) => format!("{} is not supported here", kind_of(actual)),
        Kind::UnsupportedKey(actual, expected) => {
            format!("{} cannot be a key, expected {expected}", kind_of(actual))
        }
    }
}

fn kind_of(actual: &figment::error::Actual) -> &'static str {
    use figment::error::Actual;
    match actual {
        Actual::Bool(_) => "a boolean",
        Actual::Unsigned(_) | Actual::Signed(_) => "an integer",
        Actual::Float(_) => "a float",
        Actual::Char(_) | Actual::Str(_) => "a string",
        Actual::Bytes(_) => "bytes",
        Actual::Unit => "nothing",
        Actual::Option => "an option",
        Actual::Seq => "a list",
        Actual::Map => "a table",
        _ => "a value of another kind",
    }
}
