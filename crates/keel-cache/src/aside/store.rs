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
        match self.call_read("get", data_key).await {
            Ok(Some(bytes)) => {
                let envelope = match &self.local {
                    Some(local) => {
                        let shared: Arc<[u8]> = Arc::from(bytes);
                        local.insert(data_key.to_owned(), shared.clone());
                        Bytes::Shared(shared)
                    }
                    None => Bytes::Owned(bytes),
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

    /// Writes an envelope to the backend (and the local tier), with the
    /// policy's TTL. Failures are counted and logged, never returned.
    pub(super) async fn fill(&self, data_key: &str, envelope: &[u8], ttl: Option<Duration>) {
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
        if self
            .call("set", self.backend.write(data_key, envelope, ttl))
            .await
            .is_ok()
            && let Some(local) = &self.local
        {
            local.insert(data_key.to_owned(), Arc::from(envelope));
        }
    }
}
