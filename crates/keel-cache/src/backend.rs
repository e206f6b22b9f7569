//! What a cache backend must offer beyond keel-core's [`Cache`](keel_core::Cache)
//! port, so [`CacheAside`](crate::CacheAside) can build single flight across
//! processes, namespace versions and cross-process invalidation on it.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{broadcast, watch};

use crate::error::{CacheError, Result};

/// The default longest key a backend accepts, in bytes (prefix included).
pub const DEFAULT_MAX_KEY_BYTES: usize = 1024;

/// The default largest value a backend accepts, in bytes.
pub const DEFAULT_MAX_VALUE_BYTES: usize = 16 * 1024 * 1024;

/// A shared key-value store that [`CacheAside`](crate::CacheAside) runs on:
/// [`RedisCache`](crate::RedisCache) or [`MemoryCache`](crate::MemoryCache).
///
/// Clones of one backend value (and, for Redis, separate connections with the
/// same key prefix) see the same keys. Keys are given without the backend's
/// key prefix; the backend adds it.
///
/// The method names differ from keel-core's [`Cache`](keel_core::Cache) port
/// (which both backends also implement) so both traits can be in scope.
#[async_trait]
pub trait Backend: Send + Sync + fmt::Debug + 'static {
    /// A short name for logs and errors, e.g. `redis`.
    fn name(&self) -> &'static str;

    /// The value under `key`, if present and not expired.
    async fn read(&self, key: &str) -> Result<Option<Vec<u8>>>;

    /// Stores `value` under `key`, replacing any value and expiry; expires
    /// after `ttl`, or never when `None`.
    async fn write(&self, key: &str, value: &[u8], ttl: Option<Duration>) -> Result<()>;

    /// An upper bound on how long one [`read`](Self::read) takes to finish
    /// (with a value or an error), whatever the server does; `None` (the
    /// default) when there is none.
    ///
    /// [`CacheAside`](crate::CacheAside) sets no timer of its own on reads
    /// when this is at most its timeout. Return `Some` only when the bound
    /// really holds (connecting and reconnecting included).
    fn read_time_limit(&self) -> Option<Duration> {
        None
    }

    /// Removes the keys; returns how many were present.
    async fn remove(&self, keys: &[&str]) -> Result<u64>;

    /// Stores `value` only when `key` is absent (atomically); returns whether
    /// it was stored. Used for short-lived locks.
    async fn write_if_absent(&self, key: &str, value: &[u8], ttl: Duration) -> Result<bool>;

    /// Removes `key` only when it holds `expected` (atomically); returns
    /// whether it was removed. Releases a lock without touching a newer
    /// holder's.
    async fn remove_if_equals(&self, key: &str, expected: &[u8]) -> Result<bool>;

    /// The value under `key`; when `key` is absent, stores `value` there
    /// (expiring after `ttl`) and returns it, in one atomic step. Either way
    /// the key then lives at least `ttl` from now: a shorter remaining life
    /// is extended, a key without expiry keeps none.
    ///
    /// [`CacheAside`](crate::CacheAside) reads a key's eviction fence with
    /// it before each load.
    async fn read_or_insert(&self, key: &str, value: &[u8], ttl: Duration) -> Result<Vec<u8>>;

    /// Stores `value` under `key` with `ttl` (as [`write`](Self::write)
    /// does) only if every guard `(guard_key, expected)` holds: the guard
    /// key holds exactly `expected`, or is absent when `expected` is
    /// `None`. The checks and the write are one atomic step: no
    /// [`write_batch`](Self::write_batch) (nor other write) falls between
    /// them. Returns whether it stored.
    ///
    /// [`CacheAside`](crate::CacheAside) fills the cache with it, guarded by
    /// the key's eviction fence and the namespace version.
    async fn write_guarded(
        &self,
        key: &str,
        value: &[u8],
        ttl: Option<Duration>,
        guards: &[(&str, Option<&[u8]>)],
    ) -> Result<bool>;

    /// Applies `writes` (`(key, value, ttl)`, as [`write`](Self::write))
    /// and then removes `removes`, as one atomic step: a
    /// [`write_guarded`](Self::write_guarded) sees all of it or none.
    ///
    /// [`CacheAside`](crate::CacheAside) evicts and writes through with it,
    /// moving the key's eviction fence in the same step.
    async fn write_batch(
        &self,
        writes: &[(&str, &[u8], Option<Duration>)],
        removes: &[&str],
    ) -> Result<()>;

    /// Sends `message` to every [`subscribe`](Self::subscribe)r of this
    /// backend's key space (fire-and-forget: a subscriber that is
    /// disconnected misses it, and learns so through [`Notice::Lost`]).
    async fn publish(&self, message: &[u8]) -> Result<()>;

    /// Receives what is [`publish`](Self::publish)ed in this backend's key
    /// space, by any process.
    fn subscribe(&self) -> Result<Subscription>;
}

/// One event on a [`Subscription`].
#[derive(Clone, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub enum Notice {
    /// A published message.
    Message(Arc<[u8]>),
    /// Messages may have been lost (the connection dropped, or this receiver
    /// fell behind). Anything derived from them must be dropped.
    Lost,
    /// The subscription was (re-)established: messages published from now on
    /// arrive.
    Subscribed,
}

/// A stream of [`Notice`]s, from [`Backend::subscribe`].
#[derive(Debug)]
pub struct Subscription {
    notices: broadcast::Receiver<Notice>,
    ready: watch::Receiver<bool>,
}

impl Subscription {
    /// Builds a subscription from a broadcast receiver and a readiness flag
    /// (true while the backend's subscription is established).
    pub fn new(notices: broadcast::Receiver<Notice>, ready: watch::Receiver<bool>) -> Self {
        Self { notices, ready }
    }

    /// The next notice; `None` once the backend is gone. Falling behind is
    /// reported as [`Notice::Lost`].
    pub async fn recv(&mut self) -> Option<Notice> {
        match self.notices.recv().await {
            Ok(notice) => Some(notice),
            Err(broadcast::error::RecvError::Lagged(_)) => Some(Notice::Lost),
            Err(broadcast::error::RecvError::Closed) => None,
        }
    }

    /// Waits until the subscription is established, at most `timeout`;
    /// returns whether it is.
    pub async fn wait_ready(&mut self, timeout: Duration) -> bool {
        tokio::time::timeout(timeout, self.ready.wait_for(|ready| *ready))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

/// Key and value size limits a backend enforces.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    pub(crate) max_key_bytes: usize,
    pub(crate) max_value_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_key_bytes: DEFAULT_MAX_KEY_BYTES,
            max_value_bytes: DEFAULT_MAX_VALUE_BYTES,
        }
    }
}

impl Limits {
    /// Checks a key (without the prefix, which `prefix_len` accounts for).
    pub(crate) fn check_key(&self, key: &str, prefix_len: usize) -> Result<()> {
        if key.is_empty() {
            return Err(CacheError::EmptyKey);
        }
        let len = key.len() + prefix_len;
        if len > self.max_key_bytes {
            return Err(CacheError::KeyTooLong {
                len,
                max: self.max_key_bytes,
            });
        }
        Ok(())
    }

    pub(crate) fn check_value(&self, value: &[u8]) -> Result<()> {
        if value.len() > self.max_value_bytes {
            return Err(CacheError::ValueTooLarge {
                len: value.len(),
                max: self.max_value_bytes,
            });
        }
        Ok(())
    }
}

/// Refuses a zero TTL: "expire immediately" is almost certainly a
/// configuration mistake, and Redis refuses it too.
pub(crate) fn check_ttl(ttl: Option<Duration>) -> Result<()> {
    if ttl.is_some_and(|t| t.is_zero()) {
        return Err(CacheError::InvalidArgument {
            field: "ttl",
            reason: "must be longer than zero (use None for no expiry)".into(),
        });
    }
    Ok(())
}

/// Implements keel-core's [`Cache`](keel_core::Cache) port by delegating to
/// [`Backend`].
macro_rules! impl_cache_port {
    ($ty:ty) => {
        #[async_trait::async_trait]
        impl keel_core::Cache for $ty {
            async fn get(&self, key: &str) -> keel_core::Result<Option<Vec<u8>>> {
                Ok($crate::Backend::read(self, key).await?)
            }

            async fn set(
                &self,
                key: &str,
                value: &[u8],
                ttl: Option<std::time::Duration>,
            ) -> keel_core::Result<()> {
                Ok($crate::Backend::write(self, key, value, ttl).await?)
            }

            async fn delete(&self, key: &str) -> keel_core::Result<bool> {
                Ok($crate::Backend::remove(self, &[key]).await? > 0)
            }

            async fn delete_many(&self, keys: &[&str]) -> keel_core::Result<u64> {
                Ok($crate::Backend::remove(self, keys).await?)
            }
        }
    };
}
pub(crate) use impl_cache_port;
