//! A caching decorator for any secret provider.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::RwLock;

use super::SecretProvider;
use crate::Secret;
use crate::error::Result;

/// Caches another provider's values for a time to live, so hot paths do not
/// hit a secret manager (or the file system) on every request.
///
/// After the TTL the next read asks the inner provider again, which is how
/// rotated secrets reach a running service. If that refresh fails, the last
/// good value keeps being served (a secret manager outage should not take
/// the service down with it) and the failure is logged by name only; the
/// next read tries again. A secret that was never read successfully
/// returns the inner provider's error.
#[derive(Debug)]
pub struct CachedSecrets {
    inner: Arc<dyn SecretProvider>,
    ttl: Duration,
    entries: RwLock<HashMap<String, Entry>>,
}

#[derive(Debug, Clone)]
struct Entry {
    value: Secret<String>,
    read_at: Instant,
}

impl CachedSecrets {
    /// Caches `inner`'s values for `ttl`.
    pub fn new(inner: Arc<dyn SecretProvider>, ttl: Duration) -> Self {
        Self {
            inner,
            ttl,
            entries: RwLock::new(HashMap::new()),
        }
    }

    /// Forgets one cached value, so the next read goes to the inner
    /// provider (e.g. after a credential was refused).
    pub async fn invalidate(&self, name: &str) {
        self.entries.write().await.remove(name);
    }

    /// Reads every cached secret again from the inner provider now,
    /// returning how many refreshed; failures keep the previous value.
    /// Call it from a timer to refresh ahead of the TTL.
    pub async fn refresh_all(&self) -> usize {
        let names: Vec<String> = self.entries.read().await.keys().cloned().collect();
        let mut refreshed = 0;
        for name in names {
            if self.load(&name).await.is_ok() {
                refreshed += 1;
            }
        }
        refreshed
    }

    async fn load(&self, name: &str) -> Result<Secret<String>> {
        let value = self.inner.get(name).await?;
        self.entries.write().await.insert(
            name.to_owned(),
            Entry {
                value: value.clone(),
                read_at: Instant::now(),
            },
        );
        Ok(value)
    }
}

#[async_trait]
impl SecretProvider for CachedSecrets {
    async fn get(&self, name: &str) -> Result<Secret<String>> {
        let cached = self.entries.read().await.get(name).cloned();
        match cached {
            Some(entry) if entry.read_at.elapsed() < self.ttl => Ok(entry.value),
            Some(entry) => match self.load(name).await {
                Ok(value) => Ok(value),
                Err(error) => {
                    tracing::warn!(secret = name, %error, "secret refresh failed; serving the previous value");
                    Ok(entry.value)
                }
            },
            None => self.load(name).await,
        }
    }
}
