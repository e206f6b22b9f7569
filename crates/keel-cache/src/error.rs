//! The crate's error type.

use std::time::Duration;

use keel_core::BoxError;

/// `Result` with [`CacheError`] as the default error type.
pub type Result<T, E = CacheError> = std::result::Result<T, E>;

/// Everything that can go wrong in `keel-cache`.
///
/// Bad input ([`EmptyKey`](Self::EmptyKey), [`KeyTooLong`](Self::KeyTooLong),
/// [`ValueTooLarge`](Self::ValueTooLarge), [`InvalidArgument`](Self::InvalidArgument))
/// is refused before anything is sent to the backend. A failing backend is
/// [`Backend`](Self::Backend) or [`Timeout`](Self::Timeout); reads through
/// [`CacheAside`](crate::CacheAside) never surface those, they fall back to
/// the loader instead.
///
/// Converts into [`keel_core::Error`] with the matching kind.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CacheError {
    /// The key is empty.
    #[error("cache key is empty")]
    EmptyKey,

    /// The key is longer than the configured limit.
    #[error("cache key is {len} bytes long, over the limit of {max}")]
    KeyTooLong {
        /// The key's length in bytes.
        len: usize,
        /// The limit in bytes.
        max: usize,
    },

    /// The (serialized) value is larger than the configured limit.
    #[error("cache value is {len} bytes, over the limit of {max}")]
    ValueTooLarge {
        /// The value's size in bytes.
        len: usize,
        /// The limit in bytes.
        max: usize,
    },

    /// Another argument was refused (a zero TTL, a malformed namespace).
    #[error("invalid {field}: {reason}")]
    InvalidArgument {
        /// The argument that was refused.
        field: &'static str,
        /// Why it was refused.
        reason: String,
    },

    /// The backend (Redis) failed or could not be reached.
    #[error("cache backend {backend} failed: {message}")]
    Backend {
        /// Which backend, e.g. `redis`.
        backend: &'static str,
        /// What happened, free of secrets.
        message: String,
        /// The underlying error.
        #[source]
        source: Option<BoxError>,
    },

    /// A backend operation did not finish within its time limit.
    #[error("cache {operation} timed out after {after:?}")]
    Timeout {
        /// The operation, e.g. `get`.
        operation: &'static str,
        /// The time limit.
        after: Duration,
    },

    /// A value could not be serialized for storage.
    #[error("cannot serialize the cache value")]
    Serialize(#[source] serde_json::Error),

    /// This call waited for another caller's load of the same key (single
    /// flight), and that load failed. The loader's own error went to the
    /// caller that ran it; this one carries its message.
    #[error("the load of cache key {key:?} failed: {reason}")]
    LoadFailed {
        /// The key that was being loaded.
        key: String,
        /// The loader's error, as text.
        reason: String,
    },

    /// The cache was configured inconsistently.
    #[error("invalid cache configuration: {0}")]
    Config(String),
}

impl CacheError {
    /// Whether this error reports a failing or slow backend (as opposed to
    /// refused input or a bug). Retrying later may succeed.
    #[must_use]
    pub fn is_backend_failure(&self) -> bool {
        matches!(
            self,
            CacheError::Backend { .. } | CacheError::Timeout { .. }
        )
    }
}

impl From<CacheError> for keel_core::Error {
    fn from(e: CacheError) -> Self {
        use keel_core::Error;
        match e {
            CacheError::EmptyKey | CacheError::KeyTooLong { .. } => {
                Error::invalid_input("key", e.to_string())
            }
            CacheError::ValueTooLarge { .. } => Error::invalid_input("value", e.to_string()),
            CacheError::InvalidArgument { field, reason } => Error::invalid_input(field, reason),
            CacheError::Backend {
                backend,
                message,
                source,
            } => Error::Unavailable {
                service: backend.into(),
                message,
                source,
            },
            CacheError::Timeout { operation, after } => Error::Timeout {
                operation: format!("cache {operation}").into(),
                after,
            },
            CacheError::Serialize(source) => {
                Error::internal("cannot serialize the cache value", source)
            }
            CacheError::LoadFailed { .. } => Error::Unavailable {
                service: "cache loader".into(),
                message: e.to_string(),
                source: None,
            },
            CacheError::Config(message) => Error::internal_msg(message),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use keel_core::ErrorKind;

    use super::*;

    #[test]
    fn maps_onto_keel_core_kinds() {
        let cases: Vec<(CacheError, ErrorKind, bool)> = vec![
            (CacheError::EmptyKey, ErrorKind::InvalidInput, false),
            (
                CacheError::KeyTooLong { len: 600, max: 512 },
                ErrorKind::InvalidInput,
                false,
            ),
            (
                CacheError::ValueTooLarge { len: 9, max: 8 },
                ErrorKind::InvalidInput,
                false,
            ),
            (
                CacheError::Backend {
                    backend: "redis",
                    message: "connection refused".into(),
                    source: None,
                },
                ErrorKind::Unavailable,
                true,
            ),
            (
                CacheError::Timeout {
                    operation: "get",
                    after: Duration::from_millis(50),
                },
                ErrorKind::Timeout,
                true,
            ),
            (
                CacheError::LoadFailed {
                    key: "k".into(),
                    reason: "db down".into(),
                },
                ErrorKind::Unavailable,
                false,
            ),
            (CacheError::Config("x".into()), ErrorKind::Internal, false),
        ];
        for (e, kind, backend_failure) in cases {
            assert_eq!(e.is_backend_failure(), backend_failure, "{e}");
            let core: keel_core::Error = e.into();
            assert_eq!(core.kind(), kind, "{core}");
        }
    }

    #[test]
    fn invalid_input_names_the_field() {
        let core: keel_core::Error = CacheError::KeyTooLong { len: 600, max: 512 }.into();
        let keel_core::Error::Invalid(invalid) = core else {
            panic!("expected invalid input");
        };
        assert_eq!(invalid.field, "key");
        assert!(invalid.reason.contains("600"), "{}", invalid.reason);
    }
}
