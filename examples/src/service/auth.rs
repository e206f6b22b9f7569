//! Who may call the services: the token verifier built from the
//! configuration, the scope policy, and a small token minter for tests and
//! manual calls (an identity provider's job in production).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use keel_config::KeelConfig;
use keel_core::Principal;
use keel_security::{
    Algorithm, Decision, JwksConfig, JwksKeySource, JwtConfig, JwtVerifier, KeySource, Policy,
    Resource, Secret, VerificationKey,
};
use serde::Deserialize;

/// The `auth` section: where the token verification key comes from when it
/// is not a JWKS.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthSettings {
    /// A shared HS256 key (at least 32 bytes). Write it as a secret
    /// reference (`secret://name`) outside tests.
    pub hs256_key: Option<Secret<String>>,
}

/// The verifier for the configured issuers and audiences, with the HS256
/// key of `auth` or the JWKS of `security.jwt.jwks_url`.
///
/// # Errors
///
/// No issuer or audience configured, neither a key nor a JWKS URL, or a
/// key that is too short.
pub fn verifier(config: &KeelConfig, auth: &AuthSettings) -> crate::Result<JwtVerifier> {
    let jwt = config.security.jwt_config()?.ok_or(
        "the services need security.jwt.issuers and security.jwt.audiences \
         (KEEL_SECURITY__JWT__ISSUERS=[..], KEEL_SECURITY__JWT__AUDIENCES=[..])",
    )?;
    let (jwt, keys) = match (&auth.hs256_key, &config.security.jwt.jwks_url) {
        (Some(key), _) => {
            let key =
                VerificationKey::hmac(None, &Secret::new(key.expose_secret().as_bytes().to_vec()))?;
            // A shared key verifies HS256 only, whatever the list says.
            let mut hs = JwtConfig::new(
                jwt.issuers.first().cloned().unwrap_or_default(),
                jwt.audiences.first().cloned().unwrap_or_default(),
                [Algorithm::HS256],
            )
            .leeway(config.security.jwt.leeway)
            .max_token_bytes(config.security.jwt.max_token_bytes);
            hs.issuers = jwt.issuers.clone();
            hs.audiences = jwt.audiences.clone();
            (hs, KeySource::fixed([key]))
        }
        (None, Some(url)) => (
            jwt,
            KeySource::jwks(Arc::new(JwksKeySource::new(JwksConfig::new(url.clone()))?)),
        ),
        (None, None) => {
            return Err(
                "no token key: set auth.hs256_key (KEEL_AUTH__HS256_KEY) or \
                 security.jwt.jwks_url (KEEL_SECURITY__JWT__JWKS_URL)"
                    .into(),
            );
        }
    };
    Ok(JwtVerifier::new(jwt, keys)?)
}

/// Allows an action when the principal holds the scope the action needs.
///
/// Actions are command types (`order.place`) or gRPC methods
/// (`/examples.ordering.v1.OrderingService/GetOrder`); the table maps each
/// to its scope, and an action missing from it is refused.
#[derive(Clone)]
pub struct ScopePolicy {
    scopes: Arc<BTreeMap<String, String>>,
}

impl fmt::Debug for ScopePolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.scopes.iter()).finish()
    }
}

impl ScopePolicy {
    /// A policy requiring `scope` for each `(action, scope)` pair.
    #[must_use]
    pub fn new<'a>(rules: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        Self {
            scopes: Arc::new(
                rules
                    .into_iter()
                    .map(|(a, s)| (a.to_owned(), s.to_owned()))
                    .collect(),
            ),
        }
    }

    /// The scope `action` needs, if the policy knows it.
    #[must_use]
    pub fn scope_for(&self, action: &str) -> Option<&str> {
        self.scopes.get(action).map(String::as_str)
    }

    /// The decision for `principal` doing `action`.
    #[must_use]
    pub fn decide_sync(&self, principal: &Principal, action: &str) -> Decision {
        match self.scope_for(action) {
            Some(scope) if principal.has_scope(scope) => Decision::Allow {
                reason: format!("scope {scope}"),
            },
            Some(scope) => Decision::Deny {
                reason: format!("{action} needs the scope {scope}"),
            },
            None => Decision::Deny {
                reason: format!("{action} is not allowed to anyone"),
            },
        }
    }

    /// The edge authorizer: methods in the table need their scope, other
    /// methods pass (the command pipeline decides them).
    #[must_use]
    pub fn edge(self) -> impl Fn(&Principal, &str) -> Result<(), keel_core::Error> + Send + Sync {
        move |principal, method| {
            if self.scope_for(method).is_none() {
                return Ok(());
            }
            match self.decide_sync(principal, method) {
                Decision::Allow { .. } => Ok(()),
                Decision::Deny { reason } => Err(keel_core::Error::Forbidden { reason }),
            }
        }
    }
}

#[async_trait]
impl Policy for ScopePolicy {
    async fn decide(&self, principal: &Principal, action: &str, _: &Resource) -> Decision {
        self.decide_sync(principal, action)
    }
}

/// The claims of a token [`mint_token`] signs.
#[derive(Clone, Debug)]
pub struct TokenRequest {
    issuer: String,
    audience: String,
    subject: String,
    scopes: Vec<String>,
    lifetime: Duration,
}

impl TokenRequest {
    /// A token for `subject`, from `issuer` to `audience`, valid one hour,
    /// with no scope.
    #[must_use]
    pub fn new(issuer: &str, audience: &str, subject: &str) -> Self {
        Self {
            issuer: issuer.to_owned(),
            audience: audience.to_owned(),
            subject: subject.to_owned(),
            scopes: Vec::new(),
            lifetime: Duration::from_secs(3600),
        }
    }

    /// Grants these scopes (the `scope` claim, space-separated).
    #[must_use]
    pub fn scopes<S: Into<String>>(mut self, scopes: impl IntoIterator<Item = S>) -> Self {
        self.scopes = scopes.into_iter().map(Into::into).collect();
        self
    }

    /// Sets how long the token is valid.
    #[must_use]
    pub fn lifetime(mut self, lifetime: Duration) -> Self {
        self.lifetime = lifetime;
        self
    }
}

/// Signs `request` with the HS256 `key`.
///
/// # Errors
///
/// A key the JWT library refuses, or a clock before 1970.
pub fn mint_token(key: &[u8], request: &TokenRequest) -> crate::Result<String> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let claims = serde_json::json!({
        "iss": request.issuer,
        "aud": request.audience,
        "sub": request.subject,
        "scope": request.scopes.join(" "),
        "iat": now,
        "exp": now + request.lifetime.as_secs(),
    });
    Ok(jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(key),
    )?)
}
