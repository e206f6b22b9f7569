//! A JSON Web Key Set fetched over HTTP(S), cached and refreshed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use jsonwebtoken::Algorithm;
use jsonwebtoken::jwk::Jwk;
use tokio::sync::{Mutex, RwLock};

use super::keys::{VerificationKey, select};
use crate::error::{Result, SecurityError};

/// Where and how often to load a JSON Web Key Set.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct JwksConfig {
    /// The key set's URL, e.g. `https://issuer.example/.well-known/jwks.json`.
    pub url: String,
    /// The shortest time between two fetches caused by a token whose `kid`
    /// is unknown, or by a failed fetch. This is what keeps a flood of
    /// forged `kid`s from hammering the identity provider. Default 60 s.
    pub min_refetch_interval: Duration,
    /// How long a loaded key set is trusted before it is loaded again on the
    /// next verification (keys removed by the provider stop working after at
    /// most this long). Default 15 min.
    pub max_age: Duration,
    /// Time limit for one fetch, connection included. Default 5 s.
    pub timeout: Duration,
    /// The largest key set accepted, in bytes. Default 256 KiB.
    pub max_body_bytes: usize,
    /// Refuse plain-HTTP URLs (default `true`; tests against a local server
    /// turn it off).
    pub require_https: bool,
}

impl JwksConfig {
    /// The defaults for a key set at `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            min_refetch_interval: Duration::from_secs(60),
            max_age: Duration::from_secs(15 * 60),
            timeout: Duration::from_secs(5),
            max_body_bytes: 256 * 1024,
            require_https: true,
        }
    }

    /// Sets [`min_refetch_interval`](Self::min_refetch_interval).
    #[must_use]
    pub fn min_refetch_interval(mut self, interval: Duration) -> Self {
        self.min_refetch_interval = interval;
        self
    }

    /// Sets [`max_age`](Self::max_age).
    #[must_use]
    pub fn max_age(mut self, max_age: Duration) -> Self {
        self.max_age = max_age;
        self
    }

    /// Sets [`timeout`](Self::timeout).
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sets [`require_https`](Self::require_https).
    #[must_use]
    pub fn require_https(mut self, require: bool) -> Self {
        self.require_https = require;
        self
    }
}

#[derive(Debug, Default)]
struct Cached {
    keys: Vec<VerificationKey>,
    loaded_at: Option<Instant>,
}

impl Cached {
    fn is_fresh(&self, max_age: Duration, now: Instant) -> bool {
        self.loaded_at
            .is_some_and(|at| now.saturating_duration_since(at) < max_age)
    }
}

/// A cached JSON Web Key Set.
///
/// Verifications read the cached keys without waiting. The set is loaded
/// on first use, again once it is older than
/// [`max_age`](JwksConfig::max_age), and again when a token names a `kid`
/// the set lacks (key rotation) — but never more often than once per
/// [`min_refetch_interval`](JwksConfig::min_refetch_interval) for that
/// reason or after a failure. Concurrent verifications that need a fetch
/// share one request. When a refresh fails, the previous keys keep working.
#[derive(Debug)]
pub struct JwksKeySource {
    config: JwksConfig,
    client: reqwest::Client,
    cached: RwLock<Arc<Cached>>,
    /// Held while deciding on and running a fetch; holds the time of the
    /// last fetch attempt.
    last_attempt: Mutex<Option<Instant>>,
}

impl JwksKeySource {
    /// A key source with its own HTTP client: rustls with the ring provider
    /// and the webpki root certificates, no redirects.
    ///
    /// # Errors
    ///
    /// [`SecurityError::Config`] if the URL is not HTTPS while
    /// [`require_https`](JwksConfig::require_https) is set, or if the client
    /// cannot be built.
    pub fn new(config: JwksConfig) -> Result<Self> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| SecurityError::Config(format!("TLS: {e}")))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let client = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .https_only(config.require_https)
            .redirect(reqwest::redirect::Policy::none())
            .timeout(config.timeout)
            .build()
            .map_err(|e| SecurityError::Config(format!("HTTP client: {e}")))?;
        Self::with_client(config, client)
    }

    /// A key source using `client` (for a proxy or private CA roots). The
    /// client's own timeout applies.
    ///
    /// # Errors
    ///
    /// [`SecurityError::Config`] if the URL is not HTTPS while
    /// [`require_https`](JwksConfig::require_https) is set.
    pub fn with_client(config: JwksConfig, client: reqwest::Client) -> Result<Self> {
        if config.require_https && !config.url.starts_with("https://") {
            return Err(SecurityError::Config(format!(
                "JWKS URL {} is not HTTPS",
                config.url
            )));
        }
        Ok(Self {
            config,
            client,
            cached: RwLock::new(Arc::new(Cached::default())),
            last_attempt: Mutex::new(None),
        })
    }

    /// Loads the key set now, regardless of the intervals, and returns how
    /// many usable keys it holds. Call it at startup to fail fast.
    ///
    /// # Errors
    ///
    /// [`SecurityError::KeyFetch`] if the set cannot be fetched or holds no
    /// usable key; the previously loaded keys stay in use.
    pub async fn refresh(&self) -> Result<usize> {
        let mut last_attempt = self.last_attempt.lock().await;
        *last_attempt = Some(Instant::now());
        let keys = self.fetch().await?;
        let count = keys.len();
        self.store(keys).await;
        Ok(count)
    }

    /// The key for a token's `kid` and `alg`, fetching the set if needed.
    pub(crate) async fn key_for(
        &self,
        kid: Option<&str>,
        algorithm: Algorithm,
    ) -> Result<VerificationKey> {
        let cached = self.cached.read().await.clone();
        if cached.is_fresh(self.config.max_age, Instant::now())
            && let Some(key) = select(&cached.keys, kid, algorithm)
        {
            return Ok(key.clone());
        }

        let mut last_attempt = self.last_attempt.lock().await;
        // Another verification may have refreshed while this one waited.
        let cached = self.cached.read().await.clone();
        let now = Instant::now();
        let found = select(&cached.keys, kid, algorithm).cloned();
        let stale = !cached.is_fresh(self.config.max_age, now);
        let may_fetch = last_attempt
            .is_none_or(|at| now.saturating_duration_since(at) >= self.config.min_refetch_interval);
        if !may_fetch || (found.is_some() && !stale) {
            return found.ok_or_else(|| match cached.loaded_at {
                Some(_) => unknown_key(kid),
                None => SecurityError::key_fetch(
                    &self.config.url,
                    "key set not loaded yet; waiting before the next attempt",
                    None,
                ),
            });
        }

        *last_attempt = Some(now);
        match self.fetch().await {
            Ok(keys) => {
                let found = select(&keys, kid, algorithm).cloned();
                self.store(keys).await;
                found.ok_or_else(|| unknown_key(kid))
            }
            Err(err) => match found {
                Some(key) => {
                    tracing::warn!(url = %self.config.url, error = %err, "JWKS refresh failed; using the keys loaded before");
                    Ok(key)
                }
                None => Err(err),
            },
        }
    }

    async fn store(&self, keys: Vec<VerificationKey>) {
        *self.cached.write().await = Arc::new(Cached {
            keys,
            loaded_at: Some(Instant::now()),
        });
    }

    async fn fetch(&self) -> Result<Vec<VerificationKey>> {
        let url = self.config.url.as_str();
        tracing::debug!(url, "fetching JWKS");
        let mut response = self
            .client
            .get(url)
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(|e| SecurityError::key_fetch(url, "request failed", Some(Box::new(e))))?;
        let status = response.status();
        if !status.is_success() {
            return Err(SecurityError::key_fetch(
                url,
                format!("HTTP status {status}"),
                None,
            ));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| {
            SecurityError::key_fetch(url, "reading the body failed", Some(Box::new(e)))
        })? {
            if body.len() + chunk.len() > self.config.max_body_bytes {
                return Err(SecurityError::key_fetch(
                    url,
                    format!("key set larger than {} bytes", self.config.max_body_bytes),
                    None,
                ));
            }
            body.extend_from_slice(&chunk);
        }
        parse_key_set(url, &body)
    }
}

/// Parses a JWKS document, keeping the keys this crate can use and skipping
/// (with a warning) the others, so one exotic key does not disable the set.
fn parse_key_set(url: &str, body: &[u8]) -> Result<Vec<VerificationKey>> {
    #[derive(serde::Deserialize)]
    struct RawSet {
        keys: Vec<serde_json::Value>,
    }
    let set: RawSet = serde_json::from_slice(body)
        .map_err(|e| SecurityError::key_fetch(url, "not a JWKS document", Some(Box::new(e))))?;
    let mut keys = Vec::with_capacity(set.keys.len());
    for raw in set.keys {
        let parsed = serde_json::from_value::<Jwk>(raw)
            .map_err(|e| e.to_string())
            .and_then(|jwk| VerificationKey::from_jwk(&jwk).map_err(|e| e.to_string()));
        match parsed {
            Ok(key) => keys.push(key),
            Err(reason) => tracing::warn!(url, %reason, "skipping an unusable JWKS key"),
        }
    }
    if keys.is_empty() {
        return Err(SecurityError::key_fetch(
            url,
            "the key set holds no usable key",
            None,
        ));
    }
    Ok(keys)
}

fn unknown_key(kid: Option<&str>) -> SecurityError {
    SecurityError::UnknownKey {
        kid: kid.map(|k| crate::error::truncate(k, 64)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unusable_keys_are_skipped_and_an_empty_set_is_an_error() {
        let jwk: serde_json::Value =
            serde_json::from_str(include_str!("../../tests/fixtures/key1.jwk.json")).unwrap();
        let body = serde_json::json!({
            "keys": [
                {"kty": "oct", "k": "c2VjcmV0", "kid": "shared"},
                {"kty": "RSA", "kid": "enc", "use": "enc", "n": jwk["n"], "e": "AQAB"},
                {"kty": "weird"},
                jwk,
            ]
        });
        let keys = parse_key_set("test", body.to_string().as_bytes()).unwrap();
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].kid(), Some("key1"));
        assert!(keys[0].can_verify(Algorithm::RS256));
        assert!(
            !keys[0].can_verify(Algorithm::RS512),
            "pinned by the JWK's alg"
        );

        let err = parse_key_set("test", br#"{"keys":[{"kty":"oct","k":"c2VjcmV0"}]}"#).unwrap_err();
        assert!(matches!(err, SecurityError::KeyFetch { .. }), "{err:?}");
        let err = parse_key_set("test", b"<html>").unwrap_err();
        assert!(matches!(err, SecurityError::KeyFetch { .. }), "{err:?}");
    }

    #[test]
    fn plain_http_is_refused_unless_allowed() {
        let err = JwksKeySource::new(JwksConfig::new("http://idp.example/jwks")).unwrap_err();
        assert!(matches!(err, SecurityError::Config(_)), "{err:?}");
        JwksKeySource::new(JwksConfig::new("http://127.0.0.1:1/jwks").require_https(false))
            .unwrap();
        JwksKeySource::new(JwksConfig::new("https://idp.example/jwks")).unwrap();
    }
}
