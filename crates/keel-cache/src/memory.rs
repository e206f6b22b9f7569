//! The in-memory backend.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use moka::ops::compute::Op;
use tokio::sync::{broadcast, watch};

use crate::backend::{Backend, Limits, Notice, Subscription, check_ttl, impl_cache_port};
use crate::error::Result;

/// The default capacity of a [`MemoryCache`]: 256 MiB of keys and values.
pub const DEFAULT_MEMORY_CAPACITY_BYTES: u64 = 256 * 1024 * 1024;

#[derive(Clone)]
struct Entry {
    value: Arc<[u8]>,
    ttl: Option<Duration>,
    /// When it was written: its life ends `ttl` after.
    written: Instant,
}

impl Entry {
    fn new(value: Arc<[u8]>, ttl: Option<Duration>) -> Self {
        Self {
            value,
            ttl,
            written: Instant::now(),
        }
    }

    /// Whether it expires within `ttl` from now.
    fn expires_within(&self, ttl: Duration) -> bool {
        self.ttl
            .is_some_and(|life| life.saturating_sub(self.written.elapsed()) < ttl)
    }
}

/// Per-entry expiry: each entry lives for the TTL it was written with.
struct PerEntryTtl;

impl moka::Expiry<Arc<str>, Entry> for PerEntryTtl {
    fn expire_after_create(&self, _: &Arc<str>, entry: &Entry, _: Instant) -> Option<Duration> {
        entry.ttl
    }

    fn expire_after_update(
        &self,
        _: &Arc<str>,
        entry: &Entry,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        entry.ttl
    }
}

/// An in-process [`Backend`] (and keel-core [`Cache`](keel_core::Cache)) with
/// per-entry TTLs, bounded by total size (least-frequently-used entries go
/// first, via `moka`).
///
/// Clones share the same entries and the same publish/subscribe channel, so
/// two [`CacheAside`](crate::CacheAside)s built on clones of one
/// `MemoryCache` behave like two processes sharing one Redis. That makes it
/// the test double for [`RedisCache`](crate::RedisCache): the same contract
/// suite runs against both.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> keel_core::Result<()> {
/// use keel_core::Cache;
/// use keel_cache::MemoryCache;
///
/// let cache = MemoryCache::new();
/// cache.set("greeting", b"hello", None).await?;
/// assert_eq!(cache.get("greeting").await?, Some(b"hello".to_vec()));
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct MemoryCache {
    entries: moka::sync::Cache<Arc<str>, Entry>,
    prefix: Arc<str>,
    limits: Limits,
    /// One publish/subscribe channel per key prefix, like Redis.
    channels: Arc<Mutex<HashMap<Arc<str>, broadcast::Sender<Notice>>>>,
    ready: watch::Sender<bool>,
    /// Held through every multi-key step (`read_or_insert`,
    /// `write_guarded`, `write_batch`), which makes each one atomic with
    /// respect to the others, like a Lua script or `MULTI` on Redis. Shared
    /// by clones (they share entries).
    atomic: Arc<Mutex<()>>,
}

impl fmt::Debug for MemoryCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryCache")
            .field("prefix", &self.prefix)
            .field("entries", &self.entries.entry_count())
            .field("limits", &self.limits)
            .finish()
    }
}

impl Default for MemoryCache {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryCache {
    /// An empty cache holding up to [`DEFAULT_MEMORY_CAPACITY_BYTES`].
    #[must_use]
    pub fn new() -> Self {
        Self::with_capacity_bytes(DEFAULT_MEMORY_CAPACITY_BYTES)
    }

    /// An empty cache holding up to `bytes` of keys and values; beyond that,
    /// the least valuable entries are evicted.
    #[must_use]
    pub fn with_capacity_bytes(bytes: u64) -> Self {
        let entries = moka::sync::Cache::builder()
            .max_capacity(bytes)
            .weigher(|key: &Arc<str>, entry: &Entry| {
                u32::try_from(key.len() + entry.value.len()).unwrap_or(u32::MAX)
            })
            .expire_after(PerEntryTtl)
            .build();
        let (ready, _) = watch::channel(true);
        Self {
            entries,
            prefix: Arc::from(""),
            limits: Limits::default(),
            channels: Arc::default(),
            ready,
            atomic: Arc::default(),
        }
    }

    /// A handle on the same entries that puts `prefix` before every key, so
    /// several users can share one store without seeing each other's keys.
    /// The publish/subscribe channel stays shared.
    #[must_use]
    pub fn with_prefix(&self, prefix: impl Into<String>) -> Self {
        Self {
            prefix: Arc::from(prefix.into()),
            ..self.clone()
        }
    }

    /// Sets the longest key accepted, prefix included (default
    /// [`DEFAULT_MAX_KEY_BYTES`](crate::DEFAULT_MAX_KEY_BYTES)).
    #[must_use]
    pub fn max_key_bytes(mut self, bytes: usize) -> Self {
        self.limits.max_key_bytes = bytes;
        self
    }

    /// Sets the largest value accepted (default
    /// [`DEFAULT_MAX_VALUE_BYTES`](crate::DEFAULT_MAX_VALUE_BYTES)).
    #[must_use]
    pub fn max_value_bytes(mut self, bytes: usize) -> Self {
        self.limits.max_value_bytes = bytes;
        self
    }

    fn channel(&self) -> broadcast::Sender<Notice> {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        channels
            .entry(self.prefix.clone())
            .or_insert_with(|| broadcast::channel(1024).0)
            .clone()
    }

    fn full_key(&self, key: &str) -> Result<Arc<str>> {
        self.limits.check_key(key, self.prefix.len())?;
        Ok(if self.prefix.is_empty() {
            Arc::from(key)
        } else {
            Arc::from(format!("{}{key}", self.prefix))
        })
    }
}

#[async_trait]
impl Backend for MemoryCache {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn read_time_limit(&self) -> Option<Duration> {
        // A read never waits: it looks in a map.
        Some(Duration::ZERO)
    }

    async fn read(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let key = self.full_key(key)?;
        Ok(self.entries.get(&key).map(|e| e.value.to_vec()))
    }

    async fn write(&self, key: &str, value: &[u8], ttl: Option<Duration>) -> Result<()> {
        let key = self.full_key(key)?;
        self.limits.check_value(value)?;
        check_ttl(ttl)?;
        self.entries.insert(key, Entry::new(Arc::from(value), ttl));
        Ok(())
    }

    async fn remove(&self, keys: &[&str]) -> Result<u64> {
        let keys = keys
            .iter()
            .map(|k| self.full_key(k))
            .collect::<Result<Vec<_>>>()?;
        let mut removed = 0;
        for key in keys {
            if self.entries.remove(&key).is_some() {
                removed += 1;
            }
        }
        Ok(removed)
    }

    async fn write_if_absent(&self, key: &str, value: &[u8], ttl: Duration) -> Result<bool> {
        let key = self.full_key(key)?;
        self.limits.check_value(value)?;
        check_ttl(Some(ttl))?;
        let entry = self
            .entries
            .entry(key)
            .or_insert_with(|| Entry::new(Arc::from(value), Some(ttl)));
        Ok(entry.is_fresh())
    }

    async fn remove_if_equals(&self, key: &str, expected: &[u8]) -> Result<bool> {
        let key = self.full_key(key)?;
        let result = self
            .entries
            .entry(key)
            .and_compute_with(|current| match current {
                Some(e) if *e.value().value == *expected => Op::Remove,
                _ => Op::Nop,
            });
        Ok(matches!(result, moka::ops::compute::CompResult::Removed(_)))
    }

    async fn read_or_insert(&self, key: &str, value: &[u8], ttl: Duration) -> Result<Vec<u8>> {
        let key = self.full_key(key)?;
        self.limits.check_value(value)?;
        check_ttl(Some(ttl))?;
        let _atomic = self.atomic.lock().unwrap_or_else(|p| p.into_inner());
        let entry = match self.entries.get(&key) {
            Some(e) if !e.expires_within(ttl) => return Ok(e.value.to_vec()),
            // Re-written to live `ttl` from now.
            Some(e) => Entry::new(e.value, Some(ttl)),
            None => Entry::new(Arc::from(value), Some(ttl)),
        };
        let found = entry.value.to_vec();
        self.entries.insert(key, entry);
        Ok(found)
    }

    async fn write_guarded(
        &self,
        key: &str,
        value: &[u8],
        ttl: Option<Duration>,
        guards: &[(&str, Option<&[u8]>)],
    ) -> Result<bool> {
        let key = self.full_key(key)?;
        self.limits.check_value(value)?;
        check_ttl(ttl)?;
        let guards = guards
            .iter()
            .map(|(k, expected)| Ok((self.full_key(k)?, *expected)))
            .collect::<Result<Vec<_>>>()?;
        let _atomic = self.atomic.lock().unwrap_or_else(|p| p.into_inner());
        let holds = guards.iter().all(|(k, expected)| {
            let current = self.entries.get(k);
            current.as_ref().map(|e| &*e.value) == *expected
        });
        if holds {
            self.entries.insert(key, Entry::new(Arc::from(value), ttl));
        }
        Ok(holds)
    }

    async fn write_batch(
        &self,
        writes: &[(&str, &[u8], Option<Duration>)],
        removes: &[&str],
    ) -> Result<()> {
        let mut entries = Vec::with_capacity(writes.len());
        for (key, value, ttl) in writes {
            self.limits.check_value(value)?;
            check_ttl(*ttl)?;
            entries.push((self.full_key(key)?, Entry::new(Arc::from(*value), *ttl)));
        }
        let removes = removes
            .iter()
            .map(|k| self.full_key(k))
            .collect::<Result<Vec<_>>>()?;
        let _atomic = self.atomic.lock().unwrap_or_else(|p| p.into_inner());
        for (key, entry) in entries {
            self.entries.insert(key, entry);
        }
        for key in removes {
            self.entries.remove(&key);
        }
        Ok(())
    }

    async fn publish(&self, message: &[u8]) -> Result<()> {
        // No receivers is not an error: nobody is listening.
        let _ = self.channel().send(Notice::Message(Arc::from(message)));
        Ok(())
    }

    fn subscribe(&self) -> Result<Subscription> {
        Ok(Subscription::new(
            self.channel().subscribe(),
            self.ready.subscribe(),
        ))
    }
}

impl_cache_port!(MemoryCache);
