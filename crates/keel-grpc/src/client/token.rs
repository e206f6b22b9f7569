//! Where the bearer token of outgoing calls comes from.

use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use keel_security::SecretProvider;
use keel_telemetry::Secret;
use tokio::time::Instant;

/// Gives the bearer token for the next outgoing call.
///
/// The [`CallContextLayer`](super::CallContextLayer) asks for a token on
/// every call, so implementations answer from memory when they can
/// ([`RefreshingToken`] caches, [`SecretToken`] over a
/// [`CachedSecrets`](keel_security::CachedSecrets) provider does too).
/// Object-safe: a factory holds an `Arc<dyn TokenSource>`.
#[async_trait]
pub trait TokenSource: Send + Sync + Debug {
    /// The token to send as `authorization: Bearer <token>`.
    ///
    /// # Errors
    ///
    /// Whatever kept the source from having one; the call then fails with
    /// `UNAVAILABLE` when the error is retryable, `UNAUTHENTICATED`
    /// otherwise, and never reaches the server.
    async fn token(&self) -> keel_core::Result<Secret<String>>;
}

/// The same token on every call (tests, long-lived service keys).
#[derive(Clone, Debug)]
pub struct StaticToken(Secret<String>);

impl StaticToken {
    /// Wraps the token.
    pub fn new(token: impl Into<String>) -> Self {
        Self(Secret::new(token.into()))
    }
}

#[async_trait]
impl TokenSource for StaticToken {
    async fn token(&self) -> keel_core::Result<Secret<String>> {
        Ok(self.0.clone())
    }
}

/// The token kept as a secret in a keel-security [`SecretProvider`], read
/// on each call (wrap the provider in
/// [`CachedSecrets`](keel_security::CachedSecrets) to read it from memory
/// and pick up rotations when the cache expires).
#[derive(Clone, Debug)]
pub struct SecretToken {
    provider: Arc<dyn SecretProvider>,
    name: String,
}

impl SecretToken {
    /// The secret called `name` in `provider`.
    pub fn new(provider: Arc<dyn SecretProvider>, name: impl Into<String>) -> Self {
        Self {
            provider,
            name: name.into(),
        }
    }
}

#[async_trait]
impl TokenSource for SecretToken {
    async fn token(&self) -> keel_core::Result<Secret<String>> {
        Ok(self.provider.get(&self.name).await?)
    }
}

/// A token with a lifetime, as an issuer hands it out.
#[derive(Clone, Debug)]
pub struct IssuedToken {
    /// The token.
    pub token: Secret<String>,
    /// How long it stays valid from now.
    pub expires_in: Duration,
}

/// Obtains fresh tokens: an OAuth client-credentials exchange, a metadata
/// server, a token file that is rewritten by the platform.
#[async_trait]
pub trait TokenIssuer: Send + Sync + Debug {
    /// A new token and its lifetime.
    ///
    /// # Errors
    ///
    /// Whatever kept the issuer from issuing one.
    async fn issue(&self) -> keel_core::Result<IssuedToken>;
}

/// The default margin before expiry at which [`RefreshingToken`] gets a
/// new token.
pub const DEFAULT_REFRESH_MARGIN: Duration = Duration::from_secs(60);

/// A [`TokenSource`] that keeps the current token of a [`TokenIssuer`]
/// and asks for a new one shortly before it expires.
///
/// * One refresh at a time: callers arriving during a refresh wait for
///   it instead of each asking the issuer.
/// * The refresh starts `margin` before expiry (at most half the token's
///   lifetime before), so calls never carry a token about to lapse.
/// * When a refresh fails while the current token is still valid, calls
///   keep using it and the next call tries again; once it has expired the
///   error reaches the caller.
#[derive(Debug)]
pub struct RefreshingToken {
    issuer: Arc<dyn TokenIssuer>,
    margin: Duration,
    current: tokio::sync::Mutex<Option<Current>>,
}

#[derive(Debug)]
struct Current {
    token: Secret<String>,
    refresh_at: Instant,
    expires_at: Instant,
}

impl RefreshingToken {
    /// Tokens from `issuer`, refreshed [`DEFAULT_REFRESH_MARGIN`] before
    /// they expire.
    pub fn new(issuer: Arc<dyn TokenIssuer>) -> Self {
        Self {
            issuer,
            margin: DEFAULT_REFRESH_MARGIN,
            current: tokio::sync::Mutex::new(None),
        }
    }

    /// Refreshes `margin` before expiry instead.
    #[must_use]
    pub fn with_margin(mut self, margin: Duration) -> Self {
        self.margin = margin;
        self
    }
}

#[async_trait]
impl TokenSource for RefreshingToken {
    async fn token(&self) -> keel_core::Result<Secret<String>> {
        // Held across the refresh: later callers wait for it and then read
        // the new token instead of asking the issuer themselves.
        let mut current = self.current.lock().await;
        let now = Instant::now();
        if let Some(c) = current.as_ref()
            && now < c.refresh_at
        {
            return Ok(c.token.clone());
        }
        match self.issuer.issue().await {
            Ok(issued) => {
                let now = Instant::now();
                let margin = self.margin.min(issued.expires_in / 2);
                *current = Some(Current {
                    token: issued.token.clone(),
                    refresh_at: now + issued.expires_in.saturating_sub(margin),
                    expires_at: now + issued.expires_in,
                });
                Ok(issued.token)
            }
            Err(err) => match current.as_ref() {
                Some(c) if Instant::now() < c.expires_at => {
                    tracing::warn!(error = %err, "token refresh failed; the current token is still valid");
                    Ok(c.token.clone())
                }
                _ => Err(err),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    #[derive(Debug, Default)]
    struct Counting {
        issued: AtomicU32,
        failing: std::sync::atomic::AtomicBool,
    }

    #[async_trait]
    impl TokenIssuer for Counting {
        async fn issue(&self) -> keel_core::Result<IssuedToken> {
            tokio::time::sleep(Duration::from_millis(20)).await;
            if self.failing.load(Ordering::SeqCst) {
                return Err(keel_core::Error::unavailable("issuer", "down", "test"));
            }
            let n = self.issued.fetch_add(1, Ordering::SeqCst) + 1;
            Ok(IssuedToken {
                token: Secret::new(format!("token-{n}")),
                expires_in: Duration::from_secs(100),
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn refreshes_once_for_many_callers_and_before_expiry() {
        let issuer = Arc::new(Counting::default());
        let source =
            Arc::new(RefreshingToken::new(issuer.clone()).with_margin(Duration::from_secs(10)));
        let calls = (0..50).map(|_| {
            let s = source.clone();
            tokio::spawn(async move { s.token().await.unwrap().expose_secret().clone() })
        });
        for got in futures::future::join_all(calls).await {
            assert_eq!(got.unwrap(), "token-1");
        }
        assert_eq!(issuer.issued.load(Ordering::SeqCst), 1);

        tokio::time::advance(Duration::from_secs(85)).await;
        assert_eq!(source.token().await.unwrap().expose_secret(), "token-1");
        tokio::time::advance(Duration::from_secs(6)).await;
        assert_eq!(source.token().await.unwrap().expose_secret(), "token-2");
        assert_eq!(issuer.issued.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn keeps_a_valid_token_when_a_refresh_fails_and_reports_an_expired_one() {
        let issuer = Arc::new(Counting::default());
        let source = RefreshingToken::new(issuer.clone()).with_margin(Duration::from_secs(10));
        assert_eq!(source.token().await.unwrap().expose_secret(), "token-1");
        issuer.failing.store(true, Ordering::SeqCst);
        tokio::time::advance(Duration::from_secs(95)).await;
        assert_eq!(source.token().await.unwrap().expose_secret(), "token-1");
        tokio::time::advance(Duration::from_secs(10)).await;
        let err = source.token().await.unwrap_err();
        assert!(err.is_retryable(), "{err:?}");
        issuer.failing.store(false, Ordering::SeqCst);
        assert_eq!(source.token().await.unwrap().expose_secret(), "token-2");
    }

    #[tokio::test]
    async fn reads_tokens_from_a_secret_provider() {
        let dir = std::env::temp_dir().join(format!("keel-grpc-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("ordering-token"), "s3cret").unwrap();
        let provider: Arc<dyn SecretProvider> = Arc::new(keel_security::FileSecrets::new(&dir));
        let source = SecretToken::new(provider.clone(), "ordering-token");
        assert_eq!(source.token().await.unwrap().expose_secret(), "s3cret");
        let missing = SecretToken::new(provider, "nope");
        assert!(missing.token().await.is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
