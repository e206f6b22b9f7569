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

    /// Removes every key in `keys`; returns how many were present.
    ///
    /// The default deletes one key at a time; backends that can remove many
    /// keys in one round trip override it.
    async fn delete_many(&self, keys: &[&str]) -> Result<u64> {
        let mut removed = 0;
        for key in keys {
            if self.delete(key).await? {
                removed += 1;
            }
        }
        Ok(removed)
    }
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

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Mutex;

    use super::*;

    /// The smallest possible cache: no expiry, one lock.
    #[derive(Default)]
    struct MapCache(Mutex<HashMap<String, Vec<u8>>>);

    #[async_trait]
    impl Cache for MapCache {
        async fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
            Ok(self.0.lock().unwrap().get(key).cloned())
        }
        async fn set(&self, key: &str, value: &[u8], _ttl: Option<Duration>) -> Result<()> {
            self.0.lock().unwrap().insert(key.into(), value.into());
            Ok(())
        }
        async fn delete(&self, key: &str) -> Result<bool> {
            Ok(self.0.lock().unwrap().remove(key).is_some())
        }
    }

    #[tokio::test]
    async fn default_delete_many_counts_present_keys() {
        let cache = MapCache::default();
        cache.set("a", b"1", None).await.unwrap();
        cache.set("b", b"2", None).await.unwrap();
        cache.set("c", b"3", None).await.unwrap();
        assert_eq!(cache.delete_many(&["a", "b", "missing"]).await.unwrap(), 2);
        assert_eq!(cache.get("a").await.unwrap(), None);
        assert_eq!(cache.get("c").await.unwrap(), Some(b"3".to_vec()));
    }

    #[tokio::test]
    async fn undecodable_json_is_a_miss_and_is_removed() {
        let cache = MapCache::default();
        cache.set("k", b"not json", None).await.unwrap();
        let got: Option<u32> = cache.get_json("k").await.unwrap();
        assert_eq!(got, None);
        assert_eq!(cache.get("k").await.unwrap(), None);
    }
}
