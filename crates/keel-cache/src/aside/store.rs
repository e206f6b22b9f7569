//! Keys, stored envelopes and the calls to the backend, with their
//! counters and logs.

use super::*;

/// A cross-process message on the backend's channel.
#[derive(Serialize, Deserialize)]
pub(super) struct Broadcast {
    pub(super) origin: String,
    pub(super) namespace: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(super) keys: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) version: Option<String>,
}

/// Stored bytes, shared (local tier, flights) or owned (fresh from the
/// backend), without copying either way.
pub(super) enum Bytes {
    Shared(Arc<[u8]>),
    Owned(Vec<u8>),
}

impl Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Shared(b) => b,
            Bytes::Owned(b) => b,
        }
    }
}

pub(super) enum Lookup {
    Hit {
        envelope: Bytes,
        local: bool,
    },
    Missing,
    /// The backend failed or was too slow.
    Failed,
}

pub(super) enum Decoded<T> {
    Value(T),
    NotFound,
    Invalid,
}

/// Decodes an envelope without side effects.
pub(super) fn decode<T: DeserializeOwned>(envelope: &[u8]) -> Decoded<T> {
    match envelope.split_first() {
        Some((&TAG_VALUE, json)) => match serde_json::from_slice(json) {
            Ok(v) => Decoded::Value(v),
            Err(_) => Decoded::Invalid,
        },
        Some((&TAG_NOT_FOUND, [])) => Decoded::NotFound,
        _ => Decoded::Invalid,
    }
}

pub(super) fn encode<T: Serialize + ?Sized>(value: Option<&T>) -> Result<Vec<u8>> {
    match value {
        None => Ok(vec![TAG_NOT_FOUND]),
        Some(value) => {
            let mut envelope = vec![TAG_VALUE];
            serde_json::to_writer(&mut envelope, value).map_err(CacheError::Serialize)?;
            Ok(envelope)
        }
    }
}

/// `ttl` shortened by a random fraction of at most `jitter`.
pub(super) fn jittered(ttl: Duration, jitter: f64) -> Duration {
    if jitter <= 0.0 {
        return ttl;
    }
    let factor = rand::rng().random_range((1.0 - jitter)..=1.0);
    ttl.mul_f64(factor).max(Duration::from_millis(1))
}
impl Inner {
    pub(super) fn check_key(&self, key: &str) -> Result<()> {
        if key.is_empty() {
            return Err(CacheError::EmptyKey);
        }
        if key.len() > self.policy.max_key_len {
            return Err(CacheError::KeyTooLong {
                len: key.len(),
                max: self.policy.max_key_len,
            });
        }
        Ok(())
    }

    pub(super) fn data_key(&self, token: &str, key: &str) -> String {
        // On every hit: plain pushes are cheaper than `format!`.
        let mut data_key =
            String::with_capacity(self.namespace.len() + token.len() + key.len() + 3);
        data_key.push_str(&self.namespace);
        data_key.push_str(":v");
        data_key.push_str(token);
        data_key.push(':');
        data_key.push_str(key);
        data_key
    }

    pub(super) fn lock_key(&self, data_key: &str) -> String {
        // `{ns}:v…` becomes `{ns}:_lock:v…`: never a data key.
        format!(
            "{}:_lock{}",
            self.namespace,
            &data_key[self.namespace.len()..]
        )
    }

    /// The key's eviction fence: `{ns}:_fence:{key}`, never a data, lock or
    /// version key, and the same under every namespace version.
    pub(super) fn fence_key(&self, key: &str) -> String {
        let mut fence_key = String::with_capacity(self.namespace.len() + key.len() + 8);
        fence_key.push_str(&self.namespace);
        fence_key.push_str(":_fence:");
        fence_key.push_str(key);
        fence_key
    }

    /// The namespace version token inside `data_key` (the key of `key`).
    pub(super) fn token_of<'a>(&self, data_key: &'a str, key: &str) -> &'a str {
        &data_key[self.namespace.len() + 2..data_key.len() - key.len() - 1]
    }

    /// What the version key holds while `token` is current: nothing for the
    /// initial version `0`, else the token.
    pub(super) fn version_guard(token: &str) -> Option<&[u8]> {
        (token != "0").then_some(token.as_bytes())
    }

    /// A fresh value for fences: never used before.
    pub(super) fn new_fence() -> String {
        uuid::Uuid::new_v4().simple().to_string()
    }

    /// Reads the key's eviction fence before a load (creating it when
    /// absent). `Err`: the backend failed, so the load must not be cached.
    pub(super) async fn open_fence(&self, key: &str) -> Result<Vec<u8>> {
        let fence_key = self.fence_key(key);
        let fresh = Self::new_fence();
        self.call(
            "read fence",
            self.backend
                .read_or_insert(&fence_key, fresh.as_bytes(), self.policy.max_load_time),
        )
        .await
    }

    /// Invalidates this process's local copies of `data_keys` after the
    /// backend changed: first bumps the local epoch, so a copy read before
    /// the change and stored locally meanwhile is dropped by its reader.
    pub(super) fn evict_local(&self, data_keys: &[String]) {
        self.local_epoch.fetch_add(1, Ordering::SeqCst);
        if let Some(local) = &self.local {
            for key in data_keys {
                local.invalidate(key);
            }
        }
    }

    /// Keeps a local copy of what the backend returned, unless an eviction
    /// (`local_epoch` moved from `epoch`) may have made it stale since the
    /// read began.
    pub(super) fn keep_local(&self, epoch: u64, data_key: &str, envelope: Arc<[u8]>) {
        let Some(local) = &self.local else {
            return;
        };
        local.insert(data_key.to_owned(), envelope);
        // Checked after the insert: an eviction bumps the epoch before it
        // invalidates local copies, so either it sees our copy or we see
        // its bump.
        if self.local_epoch.load(Ordering::SeqCst) != epoch {
            local.invalidate(data_key);
        }
    }

    /// Counts a hit, in the stats and in `keel.cache.hits`.
    pub(super) fn hit(&self, local: bool) {
        bump(&self.counters.hits);
        if local {
            bump(&self.counters.local_hits);
            self.metrics.hit(CacheTier::Local);
        } else {
            self.metrics.hit(CacheTier::Remote);
        }
    }

    /// Counts a miss, in the stats and in `keel.cache.misses`.
    pub(super) fn missed(&self) {
        bump(&self.counters.misses);
        self.metrics.miss();
    }

    /// Counts a lookup that joined another caller's load: `joined` in the
    /// stats, a miss in `keel.cache.misses` (the cache did not answer it).
    pub(super) fn joined(&self) {
        bump(&self.counters.joined);
        self.metrics.miss();
    }

    pub(super) fn backend_ok(&self) {
        if self.failing.load(Ordering::Relaxed) && self.failing.swap(false, Ordering::Relaxed) {
            tracing::info!(namespace = %self.namespace, backend = self.backend.name(), "cache backend recovered");
        }
    }

    pub(super) fn backend_failed(&self, operation: &'static str, error: &CacheError) {
        bump(&self.counters.errors);
        if self.failing.swap(true, Ordering::Relaxed) {
            tracing::debug!(namespace = %self.namespace, operation, %error, "cache backend still failing");
        } else {
            tracing::warn!(
                namespace = %self.namespace,
                backend = self.backend.name(),
                operation,
                %error,
                "cache backend failing; reads fall back to loaders"
            );
        }
    }

    /// Runs a backend operation within the timeout, recording the outcome.
    pub(super) async fn call<T>(
        &self,
        operation: &'static str,
        op: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        let result = match tokio::time::timeout(self.policy.timeout, op).await {
            Ok(result) => result,
            Err(_) => Err(CacheError::Timeout {
                operation,
                after: self.policy.timeout,
            }),
        };
        self.record(operation, &result);
        result
    }

    /// Runs a backend read within the timeout, recording the outcome. When
    /// the backend bounds its reads by itself, within the timeout
    /// ([`Backend::read_time_limit`]), no timer of our own is set: one
    /// fewer timer per hit.
    pub(super) async fn call_read(
        &self,
        operation: &'static str,
        key: &str,
    ) -> Result<Option<Vec<u8>>> {
        if !self.read_bounded {
            return self.call(operation, self.backend.read(key)).await;
        }
        let result = self.backend.read(key).await;
        self.record(operation, &result);
        result
    }

    pub(super) fn record<T>(&self, operation: &'static str, result: &Result<T>) {
        match result {
            Ok(_) => self.backend_ok(),
            Err(e) if e.is_backend_failure() => self.backend_failed(operation, e),
            Err(_) => {}
        }
    }
}

impl Inner {
    pub(super) async fn lookup(&self, data_key: &str) -> Lookup {
        if let Some(local) = &self.local
            && let Some(envelope) = local.get(data_key)
        {
            return Lookup::Hit {
                envelope: Bytes::Shared(envelope),
                local: true,
            };
        }
        let epoch = self.local_epoch.load(Ordering::SeqCst);
        match self.call_read("get", data_key).await {
            Ok(Some(bytes)) => {
                let envelope = if self.local.is_some() {
                    let shared: Arc<[u8]> = Arc::from(bytes);
                    self.keep_local(epoch, data_key, shared.clone());
                    Bytes::Shared(shared)
                } else {
                    Bytes::Owned(bytes)
                };
                Lookup::Hit {
                    envelope,
                    local: false,
                }
            }
            Ok(None) => Lookup::Missing,
            Err(_) => Lookup::Failed,
        }
    }

    /// Removes an entry that no longer decodes.
    pub(super) async fn discard(&self, data_key: &str) {
        bump(&self.counters.invalid_values);
        tracing::warn!(namespace = %self.namespace, key = data_key, "removing a cached value that no longer decodes");
        if let Some(local) = &self.local {
            local.invalidate(data_key);
        }
        let _ = self.call("delete", self.backend.remove(&[data_key])).await;
    }

    /// Writes a loaded envelope to the backend (and the local tier), with
    /// the policy's TTL, unless the key's eviction fence no longer holds
    /// `fence` (read before the load) or the namespace version moved: then
    /// the key was evicted, written or bumped during the load, and the
    /// value may predate that. `epoch`: the local epoch before the load.
    /// Failures are counted and logged, never returned.
    pub(super) async fn fill(
        &self,
        key: &str,
        data_key: &str,
        envelope: &[u8],
        ttl: Option<Duration>,
        fence: &[u8],
        epoch: u64,
    ) {
        if envelope.len() > self.policy.max_value_len {
            tracing::warn!(
                namespace = %self.namespace,
                key = data_key,
                len = envelope.len(),
                max = self.policy.max_value_len,
                "loaded value is over the size limit; not cached"
            );
            return;
        }
        let ttl = ttl.map(|t| jittered(t, self.policy.jitter));
        let fence_key = self.fence_key(key);
        let token = self.token_of(data_key, key);
        let guards = [
            (fence_key.as_str(), Some(fence)),
            (self.version_key.as_str(), Self::version_guard(token)),
        ];
        match self
            .call(
                "set",
                self.backend.write_guarded(data_key, envelope, ttl, &guards),
            )
            .await
        {
            Ok(true) => self.keep_local(epoch, data_key, Arc::from(envelope)),
            Ok(false) => {
                bump(&self.counters.stale_fills);
                tracing::debug!(
                    namespace = %self.namespace,
                    key = data_key,
                    "the key was evicted or rewritten during the load; not cached"
                );
            }
            Err(_) => {}
        }
    }
}
