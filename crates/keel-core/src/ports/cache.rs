//! The cache port.

use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Error, Result};

/// A byte-oriented key-value cache with expiry.
///
/// Typed access comes from [`CacheExt`], implemented for every cache.
#[async_trait]
pub trait Cache: Send + Sync {
    /// The value under `key`, if present and not expired.
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>>;

    /// Stores `value` under `key`, expiring after `ttl` (never when `None`).
    async fn set(&self, key: &str, value: &[u8], ttl: Option<Duration>) -> Result<()>;

    /// Removes `key`; returns whether it was present.
    async fn delete(&self, key: &str) -> Result<bool>;
}

/// Typed JSON helpers over any [`Cache`].
#[async_trait]
pub trait CacheExt: Cache {
    /// Reads and deserializes a value. A value that no longer deserializes
    /// (its type changed) is removed and reported as a miss.
    async fn get_json<T: DeserializeOwned + Send>(&self, key: &str) -> Result<Option<T>> {
        match self.get(key).await? {
            None => Ok(None),
            Some(bytes) => match serde_json::from_slice(&bytes) {
                Ok(v) => Ok(Some(v)),
                Err(_) => {
                    self.delete(key).await?;
                    Ok(None)
                }
            },
        }
    }

    /// Serializes and stores a value.
    async fn set_json<T: Serialize + Sync>(
        &self,
        key: &str,
        value: &T,
        ttl: Option<Duration>,
    ) -> Result<()> {
        let bytes = serde_json::to_vec(value)
            .map_err(|e| Error::internal(format!("cannot serialize cache value for {key}"), e))?;
        self.set(key, &bytes, ttl).await
    }
}

impl<C: Cache + ?Sized> CacheExt for C {}
