//! Verification keys, each bound to the algorithms it may verify.

use std::fmt;

use jsonwebtoken::jwk::{AlgorithmParameters, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use keel_telemetry::Secret;

use crate::error::{Result, SecurityError};

/// A public key (or shared secret) that can verify tokens, with the one
/// algorithm family it belongs to and, optionally, the one algorithm it is
/// pinned to.
///
/// Binding keys to algorithms is what defeats algorithm confusion: an RSA
/// key never verifies an HMAC token, whatever the token's header says.
#[derive(Clone)]
pub struct VerificationKey {
    kid: Option<String>,
    /// When set, the only algorithm this key verifies; otherwise any
    /// allowed algorithm of the key's family.
    pinned: Option<Algorithm>,
    key: DecodingKey,
}

impl fmt::Debug for VerificationKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The key material stays out: HMAC keys are secrets.
        f.debug_struct("VerificationKey")
            .field("kid", &self.kid)
            .field("pinned", &self.pinned)
            .field("family", &self.key.family())
            .finish_non_exhaustive()
    }
}

impl VerificationKey {
    /// An RSA public key in PEM (`BEGIN PUBLIC KEY` or `BEGIN RSA PUBLIC
    /// KEY`), verifying the RS* and PS* algorithms that are allowed.
    pub fn rsa_pem(kid: Option<&str>, pem: &[u8]) -> Result<Self> {
        let key = DecodingKey::from_rsa_pem(pem).map_err(|e| invalid(kid, e.to_string()))?;
        Ok(Self::new(kid, None, key))
    }

    /// An EC public key in PEM (P-256 or P-384), verifying ES256/ES384.
    pub fn ec_pem(kid: Option<&str>, pem: &[u8]) -> Result<Self> {
        let key = DecodingKey::from_ec_pem(pem).map_err(|e| invalid(kid, e.to_string()))?;
        Ok(Self::new(kid, None, key))
    }

    /// An Ed25519 public key in PEM, verifying EdDSA.
    pub fn ed_pem(kid: Option<&str>, pem: &[u8]) -> Result<Self> {
        let key = DecodingKey::from_ed_pem(pem).map_err(|e| invalid(kid, e.to_string()))?;
        Ok(Self::new(kid, None, key))
    }

    /// A shared HMAC secret, verifying the HS* algorithms that are allowed.
    ///
    /// Secrets shorter than 32 bytes are refused: they can be brute-forced
    /// offline from any token.
    pub fn hmac(kid: Option<&str>, secret: &Secret<Vec<u8>>) -> Result<Self> {
        if secret.expose_secret().len() < 32 {
            return Err(invalid(
                kid,
                "HMAC secrets must be at least 32 bytes".into(),
            ));
        }
        Ok(Self::new(
            kid,
            None,
            DecodingKey::from_secret(secret.expose_secret()),
        ))
    }

    /// A public key from a JWK. A JWK with an `alg` is pinned to it; one with
    /// `use` other than `sig` is refused, as are symmetric (`oct`) keys,
    /// which have no place in a published key set.
    pub fn from_jwk(jwk: &Jwk) -> Result<Self> {
        let kid = jwk.common.key_id.as_deref();
        if let Some(usage) = &jwk.common.public_key_use
            && *usage != PublicKeyUse::Signature
        {
            return Err(invalid(kid, "key is not for signatures".into()));
        }
        if matches!(jwk.algorithm, AlgorithmParameters::OctetKey(_)) {
            return Err(invalid(
                kid,
                "symmetric keys are not accepted from a JWK".into(),
            ));
        }
        let pinned = match jwk.common.key_algorithm {
            None => None,
            Some(alg) => Some(
                signing_algorithm(alg)
                    .ok_or_else(|| invalid(kid, format!("{alg:?} is not a signature algorithm")))?,
            ),
        };
        let key = DecodingKey::from_jwk(jwk).map_err(|e| invalid(kid, e.to_string()))?;
        let key = Self::new(kid, pinned, key);
        if let Some(alg) = pinned
            && alg.family() != key.key.family()
        {
            return Err(invalid(
                kid,
                format!("alg {alg:?} does not fit the key type"),
            ));
        }
        Ok(key)
    }

    /// Pins the key to a single algorithm (recommended when you know it).
    ///
    /// # Errors
    ///
    /// [`SecurityError::InvalidKey`] if the algorithm is of another family
    /// than the key.
    pub fn pinned_to(mut self, algorithm: Algorithm) -> Result<Self> {
        if algorithm.family() != self.key.family() {
            return Err(invalid(
                self.kid.as_deref(),
                format!("{algorithm:?} does not fit the key type"),
            ));
        }
        self.pinned = Some(algorithm);
        Ok(self)
    }

    fn new(kid: Option<&str>, pinned: Option<Algorithm>, key: DecodingKey) -> Self {
        Self {
            kid: kid.map(str::to_owned),
            pinned,
            key,
        }
    }

    /// The key id, if any.
    #[must_use]
    pub fn kid(&self) -> Option<&str> {
        self.kid.as_deref()
    }

    /// Whether this key may verify a token signed with `algorithm`.
    #[must_use]
    pub fn can_verify(&self, algorithm: Algorithm) -> bool {
        match self.pinned {
            Some(pinned) => pinned == algorithm,
            None => algorithm.family() == self.key.family(),
        }
    }

    pub(crate) fn decoding_key(&self) -> &DecodingKey {
        &self.key
    }
}

fn invalid(kid: Option<&str>, reason: String) -> SecurityError {
    SecurityError::InvalidKey {
        kid: kid.map(str::to_owned),
        reason,
    }
}

fn signing_algorithm(alg: KeyAlgorithm) -> Option<Algorithm> {
    Some(match alg {
        KeyAlgorithm::HS256 => Algorithm::HS256,
        KeyAlgorithm::HS384 => Algorithm::HS384,
        KeyAlgorithm::HS512 => Algorithm::HS512,
        KeyAlgorithm::ES256 => Algorithm::ES256,
        KeyAlgorithm::ES384 => Algorithm::ES384,
        KeyAlgorithm::RS256 => Algorithm::RS256,
        KeyAlgorithm::RS384 => Algorithm::RS384,
        KeyAlgorithm::RS512 => Algorithm::RS512,
        KeyAlgorithm::PS256 => Algorithm::PS256,
        KeyAlgorithm::PS384 => Algorithm::PS384,
        KeyAlgorithm::PS512 => Algorithm::PS512,
        KeyAlgorithm::EdDSA => Algorithm::EdDSA,
        _ => return None,
    })
}

/// Picks the key for a token: by `kid` when the token has one, otherwise
/// the only key that can verify the algorithm (ambiguity is refused rather
/// than tried key by key).
pub(crate) fn select<'a>(
    keys: &'a [VerificationKey],
    kid: Option<&str>,
    algorithm: Algorithm,
) -> Option<&'a VerificationKey> {
    match kid {
        Some(kid) => keys.iter().find(|k| k.kid.as_deref() == Some(kid)),
        None => {
            let mut fitting = keys.iter().filter(|k| k.can_verify(algorithm));
            let first = fitting.next()?;
            fitting.next().is_none().then_some(first)
        }
    }
}
