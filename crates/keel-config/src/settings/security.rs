use std::time::Duration;

use keel_security::Secret;
use serde::{Deserialize, Serialize};

use super::{Check, Section};
use crate::{Environment, duration};

/// `security`: bearer-token verification and the audit log's key.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct SecuritySettings {
    /// How bearer tokens are verified.
    pub jwt: JwtSettings,
    /// The audit log's HMAC key.
    pub audit: AuditSettings,
}

/// `security.jwt`: who may issue tokens for this service, and how they
/// are checked.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct JwtSettings {
    /// Accepted `iss` values; empty means no verifier is configured.
    pub issuers: Vec<String>,
    /// Accepted `aud` values.
    pub audiences: Vec<String>,
    /// Accepted algorithms, e.g. `["RS256", "ES256"]` (default RS256).
    pub algorithms: Vec<String>,
    /// The identity provider's JSON Web Key Set URL.
    pub jwks_url: Option<String>,
    /// Clock skew allowed on `exp` and `nbf` (default 60s).
    #[serde(with = "duration::required")]
    pub leeway: Duration,
    /// The largest token accepted, in bytes (default 8192).
    pub max_token_bytes: usize,
}

impl Default for JwtSettings {
    fn default() -> Self {
        Self {
            issuers: Vec::new(),
            audiences: Vec::new(),
            algorithms: vec!["RS256".to_owned()],
            jwks_url: None,
            leeway: Duration::from_secs(60),
            max_token_bytes: 8 * 1024,
        }
    }
}

/// `security.audit`: the key that seals audit records (HMAC-SHA256).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct AuditSettings {
    /// The current key, at least 32 bytes; usually a secret reference.
    /// Required outside the development environment unless
    /// `security.audit.unkeyed` is true.
    pub key: Option<Secret<String>>,
    /// The key's id, stored with every record it seals (default `k1`);
    /// change it when the key changes.
    pub key_id: String,
    /// Accept an audit log without a key (a hash chain anyone with write
    /// access to the tables can recompute). Default false.
    pub unkeyed: bool,
}

impl Default for AuditSettings {
    fn default() -> Self {
        Self {
            key: None,
            key_id: "k1".to_owned(),
            unkeyed: false,
        }
    }
}

impl Section for SecuritySettings {
    const KEY: &'static str = "security";

    fn validate(&self, check: &mut Check<'_>) {
        let jwt = &self.jwt;
        for (i, alg) in jwt.algorithms.iter().enumerate() {
            if alg.parse::<keel_security::Algorithm>().is_err() {
                check.fail(
                    "jwt.algorithms",
                    format!(
                        "item {i} is an unknown algorithm; expected e.g. RS256, ES256, EdDSA or HS256"
                    ),
                );
            }
        }
        if !jwt.issuers.is_empty() && jwt.audiences.is_empty() {
            check.fail("jwt.audiences", "required when jwt.issuers is set");
        }
        if let Some(url) = &jwt.jwks_url
            && !(url.starts_with("https://") || url.starts_with("http://"))
        {
            check.fail("jwt.jwks_url", "expected an https:// URL");
        }
        let audit = &self.audit;
        match &audit.key {
            Some(key) if key.expose_secret().len() < keel_security::audit::MIN_KEY_BYTES => check
                .fail(
                    "audit.key",
                    format!(
                        "must be at least {} bytes",
                        keel_security::audit::MIN_KEY_BYTES
                    ),
                ),
            Some(key) => {
                if let Err(e) = keel_security::audit::AuditKey::new(
                    audit.key_id.clone(),
                    key.clone().map(String::into_bytes),
                ) {
                    check.fail("audit.key_id", e.to_string());
                }
            }
            None if !audit.unkeyed && check.environment != Environment::Development => check.fail(
                "audit.key",
                format!(
                    "required in the {} environment: set security.audit.key (e.g. {{ secret = \
                     \"audit-key\" }}), or security.audit.unkeyed = true to accept an audit log \
                     that anyone with write access to its tables can rewrite",
                    check.environment
                ),
            ),
            None => {}
        }
    }
}

impl SecuritySettings {
    /// The token verifier's settings, or `None` when `jwt.issuers` is empty.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`](crate::ConfigError) for an unknown algorithm
    /// (already reported when the configuration loaded).
    pub fn jwt_config(&self) -> Result<Option<keel_security::JwtConfig>, crate::ConfigError> {
        let jwt = &self.jwt;
        let (Some(issuer), Some(audience)) = (jwt.issuers.first(), jwt.audiences.first()) else {
            return Ok(None);
        };
        let algorithms = jwt
            .algorithms
            .iter()
            .map(|a| {
                a.parse::<keel_security::Algorithm>()
                    .map_err(|_| crate::ConfigError {
                        key: "security.jwt.algorithms".to_owned(),
                        source: crate::Source::Unset,
                        message: "unknown algorithm".to_owned(),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut config =
            keel_security::JwtConfig::new(issuer.clone(), audience.clone(), algorithms)
                .leeway(jwt.leeway)
                .max_token_bytes(jwt.max_token_bytes);
        config.issuers = jwt.issuers.clone();
        config.audiences = jwt.audiences.clone();
        Ok(Some(config))
    }

    /// The audit log's keyring: `None` when no key is set (allowed in
    /// development, or with `security.audit.unkeyed`).
    ///
    /// # Errors
    ///
    /// A [`ConfigError`](crate::ConfigError) for a short key or an unusable
    /// key id (already reported when the configuration loaded).
    pub fn audit_keys(
        &self,
    ) -> Result<Option<keel_security::audit::AuditKeys>, crate::ConfigError> {
        let Some(key) = &self.audit.key else {
            return Ok(None);
        };
        let key = keel_security::audit::AuditKey::new(
            self.audit.key_id.clone(),
            key.clone().map(String::into_bytes),
        )
        .map_err(|e| crate::ConfigError {
            key: "security.audit.key".to_owned(),
            source: crate::Source::Unset,
            message: e.to_string(),
        })?;
        Ok(Some(keel_security::audit::AuditKeys::single(key)))
    }
}
