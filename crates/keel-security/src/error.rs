//! The one error type of keel-security.

use keel_core::BoxError;

/// A `Result` whose error defaults to [`SecurityError`].
pub type Result<T, E = SecurityError> = std::result::Result<T, E>;

/// Everything that can go wrong in keel-security: authenticating a caller,
/// loading keys, authorizing an action, reading secrets.
///
/// Messages never contain the token or any key material: they are safe to
/// log and, for the token variants, to show the caller. Token variants map
/// to [`keel_core::Error::Unauthorized`]; a key endpoint that cannot be
/// reached maps to [`keel_core::Error::Unavailable`] (retryable); a policy
/// denial maps to [`keel_core::Error::Forbidden`]; bad configuration and
/// invalid secrets map to [`keel_core::Error::Internal`].
///
/// Secret failures keep their kind (and so their stable
/// [code](keel_core::Error::code)): a missing secret, or a version that is
/// disabled or destroyed, is `NotFound` (`keel.not_found`); a denied read is
/// `Forbidden` (`keel.forbidden`); a backend that did not answer in time is
/// `Timeout` (`keel.timeout`, retryable); a failing backend is `Unavailable`
/// (`keel.unavailable`, retryable). Their messages name the secret, never
/// its value.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SecurityError {
    /// The request carried no bearer token, or not in the `Bearer` scheme.
    #[error("no bearer token")]
    MissingToken,

    /// The token is longer than the configured limit; it was not parsed.
    #[error("token of {size} bytes exceeds the limit of {limit} bytes")]
    TokenTooLarge {
        /// The token's length in bytes.
        size: usize,
        /// The configured limit.
        limit: usize,
    },

    /// The token is not a well-formed compact JWS (three base64url parts, a
    /// JSON header and a JSON object as claims).
    #[error("malformed token: {reason}")]
    MalformedToken {
        /// What was wrong with it.
        reason: &'static str,
    },

    /// The token's `alg` is not on the allow-list (this includes `none`).
    #[error("token algorithm {algorithm:?} is not allowed")]
    AlgorithmNotAllowed {
        /// The algorithm named in the token header, truncated to 16 characters.
        algorithm: String,
    },

    /// The key selected for the token is bound to a different algorithm
    /// than the token's `alg` (for example an RSA key and an HS256 token).
    #[error("key ({}) cannot verify {algorithm} tokens", key_name(kid.as_deref()))]
    KeyAlgorithmMismatch {
        /// The key id, if the key has one.
        kid: Option<String>,
        /// The algorithm named in the token header.
        algorithm: String,
    },

    /// No key matches the token's `kid`, even after refreshing the key set
    /// (when a refresh was allowed).
    #[error("no key for {}", match kid { Some(_) => key_name(kid.as_deref()), None => "a token with no kid".to_owned() })]
    UnknownKey {
        /// The key id from the token header, truncated to 64 characters.
        kid: Option<String>,
    },

    /// The signature does not match the header and claims.
    #[error("invalid token signature")]
    InvalidSignature,

    /// The token's `exp` has passed (beyond the leeway).
    #[error("token expired")]
    Expired,

    /// The token's `nbf` is still in the future (beyond the leeway).
    #[error("token not yet valid")]
    NotYetValid,

    /// The token's `iss` is not one of the accepted issuers.
    #[error("token issuer not accepted")]
    WrongIssuer,

    /// None of the token's `aud` values is an accepted audience.
    #[error("token audience not accepted")]
    WrongAudience,

    /// A claim the verifier requires is absent.
    #[error("token lacks required claim {claim:?}")]
    MissingClaim {
        /// The claim's name.
        claim: String,
    },

    /// A claim is present but has the wrong shape (e.g. `roles` not an
    /// array of strings).
    #[error("token claim {claim:?} is invalid: {reason}")]
    InvalidClaim {
        /// The claim's name.
        claim: String,
        /// What was wrong with it.
        reason: &'static str,
    },

    /// Fetching or reading the JSON Web Key Set failed. Retryable.
    #[error("could not load the key set from {url}: {message}")]
    KeyFetch {
        /// Where the key set was fetched from.
        url: String,
        /// What failed.
        message: String,
        /// The underlying error, if any.
        #[source]
        source: Option<BoxError>,
    },

    /// A key given to the verifier could not be used (bad PEM, unsupported
    /// JWK). A configuration error.
    #[error("invalid key ({}): {reason}", key_name(kid.as_deref()))]
    InvalidKey {
        /// The key id, if the key has one.
        kid: Option<String>,
        /// Why it was refused.
        reason: String,
    },

    /// A configuration is unusable: the verifier's, or a secret provider's
    /// (a bad project id, a client that cannot be built).
    #[error("invalid security configuration: {0}")]
    Config(String),

    /// The policy refused the action; the reason comes from the
    /// [`Decision`](crate::Decision).
    #[error("forbidden: {reason}")]
    Forbidden {
        /// Why the action was refused.
        reason: String,
    },

    /// The secret provider has no secret of this name.
    #[error("secret {name:?} not found")]
    SecretNotFound {
        /// The secret's name (never its value).
        name: String,
    },

    /// The secret's name or value cannot be used.
    #[error("secret {name:?} is invalid: {reason}")]
    SecretInvalid {
        /// The secret's name, truncated to 64 characters.
        name: String,
        /// What is wrong (never the value).
        reason: &'static str,
    },

    /// The secret backend failed (I/O error, secret manager down).
    /// Retryable.
    #[error("secret {name:?} could not be read")]
    SecretUnavailable {
        /// The secret's name.
        name: String,
        /// The underlying error.
        #[source]
        source: BoxError,
    },

    /// The backend refused to give this service the secret: its identity
    /// lacks the permission (e.g. `secretmanager.versions.access`) or its
    /// credentials were rejected. Not retryable as such: fix the grant.
    #[error("permission to read secret {name:?} was denied")]
    SecretPermissionDenied {
        /// The secret's name.
        name: String,
    },

    /// The secret exists but the requested version cannot be read because
    /// it was disabled or destroyed (Secret Manager's `FAILED_PRECONDITION`).
    /// Not retryable: enable the version or point at another one.
    #[error("secret {name:?} version {version} is disabled or destroyed")]
    SecretVersionDisabled {
        /// The secret's name.
        name: String,
        /// The version asked for (`latest`, a number or an alias).
        version: String,
    },

    /// The backend did not answer within the time limit. Retryable.
    #[error("reading secret {name:?} timed out after {after:?}")]
    SecretTimeout {
        /// The secret's name.
        name: String,
        /// The time limit that was exceeded.
        after: std::time::Duration,
    },
}

/// A key id as messages show it: `kid key-1` (control characters escaped,
/// as the kid may come from a token) or `no kid`.
fn key_name(kid: Option<&str>) -> String {
    match kid {
        Some(kid) => format!("kid {}", kid.escape_debug()),
        None => "no kid".to_owned(),
    }
}

impl SecurityError {
    /// Whether this error says the caller failed to authenticate (as
    /// opposed to being authenticated but refused, or a dependency or
    /// configuration failure on our side).
    #[must_use]
    pub fn is_unauthorized(&self) -> bool {
        !matches!(
            self,
            SecurityError::KeyFetch { .. }
                | SecurityError::InvalidKey { .. }
                | SecurityError::Config(_)
                | SecurityError::Forbidden { .. }
                | SecurityError::SecretNotFound { .. }
                | SecurityError::SecretInvalid { .. }
                | SecurityError::SecretUnavailable { .. }
                | SecurityError::SecretPermissionDenied { .. }
                | SecurityError::SecretVersionDisabled { .. }
                | SecurityError::SecretTimeout { .. }
        )
    }

    /// Whether this is a secret backend failure that may pass on its own
    /// (the backend was down or slow), as opposed to an answer (not found,
    /// denied, disabled, invalid) that repeating the read will not change.
    /// [`CachedSecrets`](crate::CachedSecrets) keeps serving a previous
    /// value only through transient failures.
    #[must_use]
    pub fn is_transient_secret_failure(&self) -> bool {
        matches!(
            self,
            SecurityError::SecretUnavailable { .. } | SecurityError::SecretTimeout { .. }
        )
    }

    #[cfg_attr(
        not(any(feature = "jwks", test)),
        expect(dead_code, reason = "only the JWKS source fetches keys")
    )]
    pub(crate) fn key_fetch(
        url: &str,
        message: impl Into<String>,
        source: Option<BoxError>,
    ) -> Self {
        SecurityError::KeyFetch {
            url: url.to_owned(),
            message: message.into(),
            source,
        }
    }
}

impl From<SecurityError> for keel_core::Error {
    fn from(err: SecurityError) -> Self {
        if err.is_unauthorized() {
            return keel_core::Error::Unauthorized {
                reason: err.to_string(),
            };
        }
        match err {
            SecurityError::Forbidden { reason } => keel_core::Error::Forbidden { reason },
            SecurityError::SecretUnavailable { .. } => keel_core::Error::Unavailable {
                service: "secrets".into(),
                message: err.to_string(),
                source: Some(Box::new(err)),
            },
            SecurityError::SecretNotFound { name } => keel_core::Error::NotFound {
                subject: format!("secret {name:?}"),
            },
            SecurityError::SecretVersionDisabled { name, version } => keel_core::Error::NotFound {
                subject: format!("an enabled version {version} of secret {name:?}"),
            },
            SecurityError::SecretPermissionDenied { .. } => keel_core::Error::Forbidden {
                reason: err.to_string(),
            },
            SecurityError::SecretTimeout { name, after } => keel_core::Error::Timeout {
                operation: format!("reading secret {name:?}").into(),
                after,
            },
            SecurityError::KeyFetch { .. } => keel_core::Error::Unavailable {
                service: "jwks".into(),
                message: err.to_string(),
                source: Some(Box::new(err)),
            },
            other => keel_core::Error::internal(other.to_string(), other),
        }
    }
}

/// Cuts an attacker-controlled string to a size fit for an error message.
pub(crate) fn truncate(value: &str, max_chars: usize) -> String {
    value.chars().take(max_chars).collect()
}

#[cfg(test)]
mod tests {
    use keel_core::ErrorKind;

    use super::*;

    #[test]
    fn token_failures_are_unauthorized_and_dependencies_are_not() {
        let cases = [
            (SecurityError::Expired, ErrorKind::Unauthorized),
            (
                SecurityError::AlgorithmNotAllowed {
                    algorithm: "none".into(),
                },
                ErrorKind::Unauthorized,
            ),
            (
                SecurityError::UnknownKey { kid: None },
                ErrorKind::Unauthorized,
            ),
            (
                SecurityError::key_fetch("https://idp.example/jwks", "HTTP status 503", None),
                ErrorKind::Unavailable,
            ),
            (
                SecurityError::Config("no accepted audience".into()),
                ErrorKind::Internal,
            ),
        ];
        for (err, kind) in cases {
            let text = err.to_string();
            let core = keel_core::Error::from(err);
            assert_eq!(core.kind(), kind, "{text}");
            assert!(
                core.to_string().contains(&text),
                "{core} should explain {text}"
            );
        }
    }

    #[test]
    fn secret_failures_keep_their_kind_and_code() {
        let name = || "db-password".to_owned();
        let cases = [
            (
                SecurityError::SecretNotFound { name: name() },
                "keel.not_found",
                false,
            ),
            (
                SecurityError::SecretVersionDisabled {
                    name: name(),
                    version: "7".into(),
                },
                "keel.not_found",
                false,
            ),
            (
                SecurityError::SecretPermissionDenied { name: name() },
                "keel.forbidden",
                false,
            ),
            (
                SecurityError::SecretTimeout {
                    name: name(),
                    after: std::time::Duration::from_secs(10),
                },
                "keel.timeout",
                true,
            ),
            (
                SecurityError::SecretUnavailable {
                    name: name(),
                    source: "connection refused".into(),
                },
                "keel.unavailable",
                true,
            ),
            (
                SecurityError::SecretInvalid {
                    name: name(),
                    reason: "the value is not UTF-8",
                },
                "keel.internal",
                false,
            ),
        ];
        for (err, code, transient) in cases {
            assert_eq!(err.is_transient_secret_failure(), transient, "{err}");
            assert!(!err.is_unauthorized(), "{err}");
            let core = keel_core::Error::from(err);
            assert_eq!(core.code(), code, "{core}");
            assert_eq!(core.is_retryable(), transient, "{core}");
            assert!(core.to_string().contains("db-password"), "{core}");
        }
    }

    #[test]
    fn attacker_strings_are_truncated_by_characters() {
        assert_eq!(truncate("ééééé", 3), "ééé");
        assert_eq!(truncate("ab", 16), "ab");
    }
}
