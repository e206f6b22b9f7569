//! Authentication: bearer JWTs verified into a [`Principal`].

#[cfg(feature = "jwks")]
mod jwks;
mod keys;

use std::collections::BTreeSet;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::errors::ErrorKind as JwtErrorKind;
use jsonwebtoken::{Algorithm, Validation};
use serde_json::{Map, Value};

#[cfg(feature = "jwks")]
pub use jwks::{JwksConfig, JwksKeySource};
pub use keys::VerificationKey;

use crate::Principal;
use crate::error::{Result, SecurityError, truncate};

/// What a token must satisfy, besides its signature.
///
/// Issuer, audience and algorithms have no defaults on purpose: a verifier
/// that accepts any of them is the classic JWT mistake.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct JwtConfig {
    /// Accepted `iss` values; the token's must be one of them.
    pub issuers: Vec<String>,
    /// Accepted `aud` values; one of the token's must be among them.
    pub audiences: Vec<String>,
    /// The allow-list of signature algorithms. A token naming any other
    /// `alg` (including `none`) is refused before its key is looked up.
    pub algorithms: Vec<Algorithm>,
    /// Clock skew tolerated on `exp` and `nbf`. Default 60 s.
    pub leeway: Duration,
    /// The longest token accepted, in bytes; longer ones are refused before
    /// they are parsed. Default 8 KiB.
    pub max_token_bytes: usize,
    /// Which claims become the principal's tenant, roles, scopes and extras.
    pub claims: ClaimMapping,
}

impl JwtConfig {
    /// A configuration accepting tokens from `issuer` for `audience`, signed
    /// with one of `algorithms`, with the default leeway, size limit and
    /// claim mapping.
    pub fn new(
        issuer: impl Into<String>,
        audience: impl Into<String>,
        algorithms: impl IntoIterator<Item = Algorithm>,
    ) -> Self {
        Self {
            issuers: vec![issuer.into()],
            audiences: vec![audience.into()],
            algorithms: algorithms.into_iter().collect(),
            leeway: Duration::from_secs(60),
            max_token_bytes: 8 * 1024,
            claims: ClaimMapping::default(),
        }
    }

    /// Sets [`leeway`](Self::leeway).
    #[must_use]
    pub fn leeway(mut self, leeway: Duration) -> Self {
        self.leeway = leeway;
        self
    }

    /// Sets [`max_token_bytes`](Self::max_token_bytes).
    #[must_use]
    pub fn max_token_bytes(mut self, limit: usize) -> Self {
        self.max_token_bytes = limit;
        self
    }

    /// Sets [`claims`](Self::claims).
    #[must_use]
    pub fn claims(mut self, claims: ClaimMapping) -> Self {
        self.claims = claims;
        self
    }
}

/// Which token claims fill a [`Principal`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClaimMapping {
    /// The claim naming the tenant (a string), if tokens carry one.
    /// Default `"tenant"`.
    pub tenant: Option<String>,
    /// The claim listing roles (an array of strings). Default `"roles"`.
    pub roles: String,
    /// The claim listing scopes: a space-separated string (RFC 8693
    /// `scope`) or an array of strings (`scp`). Default `"scope"`.
    pub scopes: String,
    /// Further claims copied verbatim into [`Principal::claims`].
    pub keep: Vec<String>,
}

impl Default for ClaimMapping {
    fn default() -> Self {
        Self {
            tenant: Some("tenant".to_owned()),
            roles: "roles".to_owned(),
            scopes: "scope".to_owned(),
            keep: Vec::new(),
        }
    }
}

impl ClaimMapping {
    /// Sets the tenant claim (`None`: tokens carry no tenant).
    #[must_use]
    pub fn tenant(mut self, claim: Option<&str>) -> Self {
        self.tenant = claim.map(str::to_owned);
        self
    }

    /// Sets the roles claim.
    #[must_use]
    pub fn roles(mut self, claim: &str) -> Self {
        claim.clone_into(&mut self.roles);
        self
    }

    /// Sets the scopes claim.
    #[must_use]
    pub fn scopes(mut self, claim: &str) -> Self {
        claim.clone_into(&mut self.scopes);
        self
    }

    /// Adds claims to copy into [`Principal::claims`].
    #[must_use]
    pub fn keep<I: IntoIterator<Item = S>, S: Into<String>>(mut self, claims: I) -> Self {
        self.keep.extend(claims.into_iter().map(Into::into));
        self
    }
}

/// Where a verifier finds its keys.
#[derive(Debug, Clone)]
pub struct KeySource(KeySourceInner);

#[derive(Debug, Clone)]
enum KeySourceInner {
    Static(Arc<[VerificationKey]>),
    #[cfg(feature = "jwks")]
    Jwks(Arc<JwksKeySource>),
}

impl KeySource {
    /// A fixed set of keys (rotating them means building a new verifier).
    pub fn fixed(keys: impl IntoIterator<Item = VerificationKey>) -> Self {
        Self(KeySourceInner::Static(keys.into_iter().collect()))
    }

    /// A JSON Web Key Set fetched and refreshed by `source`.
    #[cfg(feature = "jwks")]
    pub fn jwks(source: Arc<JwksKeySource>) -> Self {
        Self(KeySourceInner::Jwks(source))
    }

    async fn key_for(&self, kid: Option<&str>, algorithm: Algorithm) -> Result<VerificationKey> {
        match &self.0 {
            KeySourceInner::Static(keys) => {
                keys::select(keys, kid, algorithm).cloned().ok_or_else(|| {
                    SecurityError::UnknownKey {
                        kid: kid.map(|k| truncate(k, 64)),
                    }
                })
            }
            #[cfg(feature = "jwks")]
            KeySourceInner::Jwks(source) => source.key_for(kid, algorithm).await,
        }
    }
}

/// Verifies bearer JWTs (compact JWS) and turns them into [`Principal`]s.
///
/// The checks, in order: size limit; three base64url parts with a JSON
/// header; `alg` on the allow-list; no `crit` header; a key found by `kid`
/// (or the only fitting key when the token has no `kid`) that is bound to
/// that algorithm's family; the signature; then `exp` (required), `nbf`,
/// `iss`, `aud` and `sub` (required) with the configured leeway.
///
/// Cheap to clone; share one per issuer.
#[derive(Debug, Clone)]
pub struct JwtVerifier {
    config: Arc<JwtConfig>,
    keys: KeySource,
}

impl JwtVerifier {
    /// A verifier for tokens meeting `config`, signed by a key from `keys`.
    ///
    /// # Errors
    ///
    /// [`SecurityError::Config`] if the configuration names no issuer, no
    /// audience or no algorithm.
    pub fn new(config: JwtConfig, keys: KeySource) -> Result<Self> {
        if config.issuers.is_empty() {
            return Err(SecurityError::Config("no accepted issuer".into()));
        }
        if config.audiences.is_empty() {
            return Err(SecurityError::Config("no accepted audience".into()));
        }
        if config.algorithms.is_empty() {
            return Err(SecurityError::Config("empty algorithm allow-list".into()));
        }
        Ok(Self {
            config: Arc::new(config),
            keys,
        })
    }

    /// Verifies the token in an `Authorization` header value
    /// (`Bearer <token>`, scheme case-insensitive).
    ///
    /// # Errors
    ///
    /// [`SecurityError::MissingToken`] when the value is not a bearer
    /// credential; otherwise as [`verify`](Self::verify).
    pub async fn verify_bearer(&self, authorization: &str) -> Result<Principal> {
        let (scheme, token) = authorization
            .split_once(' ')
            .ok_or(SecurityError::MissingToken)?;
        let token = token.trim();
        if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
            return Err(SecurityError::MissingToken);
        }
        self.verify(token).await
    }

    /// Verifies a compact JWS and builds the caller's [`Principal`].
    ///
    /// # Errors
    ///
    /// A token-related [`SecurityError`] (see
    /// [`SecurityError::is_unauthorized`]) when the token is refused;
    /// [`SecurityError::KeyFetch`] when the key set could not be loaded.
    pub async fn verify(&self, token: &str) -> Result<Principal> {
        let limit = self.config.max_token_bytes;
        if token.len() > limit {
            return Err(SecurityError::TokenTooLarge {
                size: token.len(),
                limit,
            });
        }
        let header = parse_header(token)?;
        let algorithm = Algorithm::from_str(&header.alg)
            .ok()
            .filter(|alg| self.config.algorithms.contains(alg))
            .ok_or_else(|| SecurityError::AlgorithmNotAllowed {
                algorithm: truncate(&header.alg, 16),
            })?;
        let key = self.keys.key_for(header.kid.as_deref(), algorithm).await?;
        if !key.can_verify(algorithm) {
            return Err(SecurityError::KeyAlgorithmMismatch {
                kid: key.kid().map(str::to_owned),
                algorithm: format!("{algorithm:?}"),
            });
        }

        let mut validation = Validation::new(algorithm);
        validation.leeway = self.config.leeway.as_secs();
        validation.validate_nbf = true;
        validation.set_issuer(&self.config.issuers);
        validation.set_audience(&self.config.audiences);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        let claims =
            jsonwebtoken::decode::<Map<String, Value>>(token, key.decoding_key(), &validation)
                .map_err(|e| present_claim_is_invalid(map_jwt_error(e), token))?
                .claims;
        principal_from(&claims, &self.config.claims)
    }
}

#[derive(serde::Deserialize)]
struct RawHeader {
    alg: String,
    kid: Option<String>,
    crit: Option<Value>,
}

/// Reads the header ourselves, so the algorithm decision never depends on
/// how a library treats names it does not know (such as `none`).
fn parse_header(token: &str) -> Result<RawHeader> {
    let mut parts = token.split('.');
    let (Some(header), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(SecurityError::MalformedToken {
            reason: "expected three dot-separated parts",
        });
    };
    let bytes = URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|_| SecurityError::MalformedToken {
            reason: "header is not base64url",
        })?;
    let header: RawHeader =
        serde_json::from_slice(&bytes).map_err(|_| SecurityError::MalformedToken {
            reason: "header is not a JSON object with an alg",
        })?;
    if header.crit.is_some() {
        // RFC 7515 §4.1.11: critical extensions we do not understand must
        // make the token invalid, and we understand none.
        return Err(SecurityError::MalformedToken {
            reason: "unsupported critical header parameters",
        });
    }
    Ok(header)
}

/// jsonwebtoken reports a time claim that is present but not a number
/// (`"exp": "tomorrow"`) as missing. The signature has been checked by then
/// (claims are validated after it), so the payload can be read to tell a
/// missing claim from an invalid one.
fn present_claim_is_invalid(err: SecurityError, token: &str) -> SecurityError {
    let SecurityError::MissingClaim { claim } = &err else {
        return err;
    };
    let present = token
        .split('.')
        .nth(1)
        .and_then(|payload| URL_SAFE_NO_PAD.decode(payload).ok())
        .and_then(|bytes| serde_json::from_slice::<Map<String, Value>>(&bytes).ok())
        .is_some_and(|claims| claims.contains_key(claim.as_str()));
    if present {
        SecurityError::InvalidClaim {
            claim: claim.clone(),
            reason: "not a number of seconds since the epoch",
        }
    } else {
        err
    }
}

fn map_jwt_error(err: jsonwebtoken::errors::Error) -> SecurityError {
    match err.into_kind() {
        JwtErrorKind::InvalidSignature => SecurityError::InvalidSignature,
        JwtErrorKind::ExpiredSignature => SecurityError::Expired,
        JwtErrorKind::ImmatureSignature => SecurityError::NotYetValid,
        JwtErrorKind::InvalidIssuer => SecurityError::WrongIssuer,
        JwtErrorKind::InvalidAudience => SecurityError::WrongAudience,
        JwtErrorKind::MissingRequiredClaim(claim) => SecurityError::MissingClaim { claim },
        JwtErrorKind::InvalidClaimFormat(claim) => SecurityError::InvalidClaim {
            claim,
            reason: "wrong type",
        },
        JwtErrorKind::InvalidAlgorithm | JwtErrorKind::MissingAlgorithm => {
            SecurityError::AlgorithmNotAllowed {
                algorithm: String::new(),
            }
        }
        JwtErrorKind::Base64(_) => SecurityError::MalformedToken {
            reason: "a part is not base64url",
        },
        JwtErrorKind::Json(_) | JwtErrorKind::Utf8(_) => SecurityError::MalformedToken {
            reason: "claims are not a JSON object",
        },
        JwtErrorKind::InvalidRsaKey(reason) => SecurityError::InvalidKey { kid: None, reason },
        JwtErrorKind::InvalidEcdsaKey
        | JwtErrorKind::InvalidEddsaKey
        | JwtErrorKind::InvalidKeyFormat => SecurityError::InvalidKey {
            kid: None,
            reason: "key unusable for this algorithm".into(),
        },
        _ => SecurityError::MalformedToken {
            reason: "token rejected",
        },
    }
}

fn principal_from(claims: &Map<String, Value>, mapping: &ClaimMapping) -> Result<Principal> {
    let subject = match claims.get("sub") {
        Some(Value::String(sub)) if !sub.is_empty() => sub.clone(),
        _ => {
            return Err(SecurityError::InvalidClaim {
                claim: "sub".into(),
                reason: "must be a non-empty string",
            });
        }
    };
    let mut principal = Principal::new(subject);
    if let Some(Value::String(iss)) = claims.get("iss") {
        principal.issuer = Some(iss.clone());
    }
    if let Some(claim) = &mapping.tenant {
        principal.tenant = match claims.get(claim) {
            None | Some(Value::Null) => None,
            Some(Value::String(tenant)) => Some(tenant.clone()),
            Some(_) => {
                return Err(SecurityError::InvalidClaim {
                    claim: claim.clone(),
                    reason: "must be a string",
                });
            }
        };
    }
    principal.roles = string_set(claims, &mapping.roles, false)?;
    principal.scopes = string_set(claims, &mapping.scopes, true)?;
    for name in &mapping.keep {
        if let Some(value) = claims.get(name) {
            principal.claims.insert(name.clone(), value.clone());
        }
    }
    Ok(principal)
}

fn string_set(
    claims: &Map<String, Value>,
    claim: &str,
    space_separated: bool,
) -> Result<BTreeSet<String>> {
    let invalid = |reason| SecurityError::InvalidClaim {
        claim: claim.to_owned(),
        reason,
    };
    match claims.get(claim) {
        None | Some(Value::Null) => Ok(BTreeSet::new()),
        Some(Value::String(s)) if space_separated => {
            Ok(s.split_whitespace().map(str::to_owned).collect())
        }
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| {
                item.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| invalid("must hold only strings"))
            })
            .collect(),
        Some(_) => Err(invalid(if space_separated {
            "must be a string or an array of strings"
        } else {
            "must be an array of strings"
        })),
    }
}
