//! The Redis backend.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::{broadcast, watch};
use tokio::task::AbortHandle;

use crate::backend::{Backend, Limits, Notice, Subscription, check_ttl, impl_cache_port};
use crate::error::{CacheError, Result};

/// Deletes a key only while it still holds the caller's token, so a lock
/// holder whose lock already expired cannot release the next holder's lock.
static REMOVE_IF_EQUALS: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"if redis.call('GET', KEYS[1]) == ARGV[1] then
              return redis.call('DEL', KEYS[1])
          end
          return 0",
    )
});

/// Returns the value under `KEYS[1]`, storing `ARGV[1]` there first when
/// absent; either way the key then lives at least `ARGV[2]` ms (a key
/// without expiry keeps none).
static READ_OR_INSERT: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"local value = redis.call('GET', KEYS[1])
          if not value then
              redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
              return ARGV[1]
          end
          local left = redis.call('PTTL', KEYS[1])
          if left >= 0 and left < tonumber(ARGV[2]) then
              redis.call('PEXPIRE', KEYS[1], ARGV[2])
          end
          return value",
    )
});

/// Sets `KEYS[1]` to `ARGV[1]` (expiring after `ARGV[2]` ms, or never when
/// `0`) only if each further key `KEYS[i]` holds what `ARGV[i + 1]` says:
/// absent when it is empty, else the rest of it after a one-byte marker.
/// Returns 1 when it stored, 0 when a guard failed.
static WRITE_GUARDED: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"for i = 2, #KEYS do
              local current = redis.call('GET', KEYS[i])
              local expected = ARGV[i + 1]
              if expected == '' then
                  if current then return 0 end
              elseif current ~= string.sub(expected, 2) then
                  return 0
              end
          end
          if ARGV[2] == '0' then
              redis.call('SET', KEYS[1], ARGV[1])
          else
              redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
          end
          return 1",
    )
});

/// How to reach Redis and what to accept, for [`RedisCache`].
///
/// ```
/// use std::time::Duration;
/// use keel_cache::RedisConfig;
///
/// let config = RedisConfig::new("redis://127.0.0.1:6379")
///     .key_prefix("orders-svc:")
///     .response_timeout(Duration::from_millis(250));
/// # let _ = config;
/// ```
#[derive(Clone)]
pub struct RedisConfig {
    url: String,
    key_prefix: String,
    connect_timeout: Duration,
    response_timeout: Duration,
    reconnect_attempts: usize,
    limits: Limits,
    #[cfg(feature = "tls")]
    root_certificate: Option<Vec<u8>>,
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The URL may carry a password.
        f.debug_struct("RedisConfig")
            .field("url", &redact_url(&self.url))
            .field("key_prefix", &self.key_prefix)
            .field("connect_timeout", &self.connect_timeout)
            .field("response_timeout", &self.response_timeout)
            .field("reconnect_attempts", &self.reconnect_attempts)
            .field("limits", &self.limits)
            .finish()
    }
}

/// `redis://user:secret@host` becomes `redis://***@host`.
fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

impl RedisConfig {
    /// A configuration for the server at `url` (`redis://host:port/db`,
    /// with optional `user:password@`), with no key prefix, a 1 s connect
    /// timeout, a 1 s response timeout and 3 reconnect attempts per request.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            key_prefix: String::new(),
            connect_timeout: Duration::from_secs(1),
            response_timeout: Duration::from_secs(1),
            reconnect_attempts: 3,
            limits: Limits::default(),
            #[cfg(feature = "tls")]
            root_certificate: None,
        }
    }

    /// Trusts only this CA (PEM) for `rediss://` connections, instead of the
    /// system's trust store; for private CAs. (Feature `tls`.)
    #[cfg(feature = "tls")]
    #[must_use]
    pub fn root_certificate_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.root_certificate = Some(pem.into());
        self
    }

    /// Puts `prefix` before every key (e.g. `orders-svc:`), so services
    /// sharing a Redis never see each other's keys. The pub/sub channel used
    /// for invalidations is derived from it too.
    #[must_use]
    pub fn key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.key_prefix = prefix.into();
        self
    }

    /// How long one connection attempt may take.
    #[must_use]
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long Redis may take to answer one command.
    #[must_use]
    pub fn response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = timeout;
        self
    }

    /// How many times a dropped connection is retried (with exponential
    /// backoff) before a request fails; later requests try again.
    ///
    /// With `0`, every read ends within `connect_timeout + response_timeout`
    /// ([`Backend::read_time_limit`]); a [`CacheAside`](crate::CacheAside)
    /// whose timeout is at least that then sets no timer of its own on
    /// reads, which makes cache hits cheaper under load.
    #[must_use]
    pub fn reconnect_attempts(mut self, attempts: usize) -> Self {
        self.reconnect_attempts = attempts;
        self
    }

    /// The longest key accepted, prefix included (default
    /// [`DEFAULT_MAX_KEY_BYTES`](crate::DEFAULT_MAX_KEY_BYTES)).
    #[must_use]
    pub fn max_key_bytes(mut self, bytes: usize) -> Self {
        self.limits.max_key_bytes = bytes;
        self
    }

    /// The largest value accepted (default
    /// [`DEFAULT_MAX_VALUE_BYTES`](crate::DEFAULT_MAX_VALUE_BYTES)).
    #[must_use]
    pub fn max_value_bytes(mut self, bytes: usize) -> Self {
        self.limits.max_value_bytes = bytes;
        self
    }
}

/// A [`Backend`] (and keel-core [`Cache`](keel_core::Cache)) on Redis 7.
///
/// Commands go over one multiplexed [`ConnectionManager`]: cheap to clone,
/// pipelining concurrent requests, and reconnecting by itself after Redis
/// restarts. Pub/sub (for cross-process invalidation) uses one more
/// connection per key prefix, opened on the first
/// [`subscribe`](Backend::subscribe) and re-established, with a
/// [`Notice::Lost`], whenever it drops.
///
/// ```no_run
/// # #[tokio::main]
/// # async fn main() -> keel_core::Result<()> {
/// use keel_core::Cache;
/// use keel_cache::{RedisCache, RedisConfig};
///
/// let redis = RedisCache::connect(RedisConfig::new("redis://127.0.0.1:6379").key_prefix("svc:")).await?;
/// redis.set("greeting", b"hello", None).await?;
/// assert_eq!(redis.get("greeting").await?, Some(b"hello".to_vec()));
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct RedisCache {
    conn: ConnectionManager,
    shared: Arc<Shared>,
    prefix: Arc<str>,
}

struct Shared {
    client: redis::Client,
    config: RedisConfig,
    /// `host:port` (or the socket path) of the server, for error messages;
    /// never the credentials.
    address: String,
    listeners: Mutex<HashMap<String, Listener>>,
}

struct Listener {
    notices: broadcast::Sender<Notice>,
    ready: watch::Receiver<bool>,
    task: AbortHandle,
}

impl Drop for Shared {
    fn drop(&mut self) {
        let listeners = self.listeners.get_mut().unwrap_or_else(|p| p.into_inner());
        for listener in listeners.values() {
            listener.task.abort();
        }
    }
}

impl fmt::Debug for RedisCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisCache")
            .field("prefix", &self.prefix)
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

impl RedisCache {
    /// Connects, failing if Redis does not answer a `PING` within the
    /// connect and response timeouts.
    ///
    /// A server that cannot be reached (refused, unreachable, too slow) is
    /// a [`CacheError::Backend`] whose message names its address
    /// (`host:port`, never the credentials from the URL).
    pub async fn connect(config: RedisConfig) -> Result<Self> {
        let cache = Self::connect_lazy(config)?;
        cache.ping().await.map_err(|e| cache.connect_failed(e))?;
        Ok(cache)
    }

    /// Rewords a failed first `PING` as a connection failure naming the
    /// server (a [`CacheError::Timeout`] has no room for the address).
    fn connect_failed(&self, e: CacheError) -> CacheError {
        let address = &self.shared.address;
        match e {
            CacheError::Timeout { after, .. } => CacheError::Backend {
                backend: "redis",
                message: format!(
                    "cannot connect to Redis at {address}: no answer within {after:?}"
                ),
                source: None,
            },
            CacheError::Backend { source, .. } => {
                let cause = source
                    .as_ref()
                    .map_or_else(|| "unknown error".to_owned(), ToString::to_string);
                CacheError::Backend {
                    backend: "redis",
                    message: format!("cannot connect to Redis at {address}: {cause}"),
                    source,
                }
            }
            other => other,
        }
    }

    /// Prepares a connection without opening it: the first command connects.
    /// Use it when the service must start while Redis is down (reads through
    /// [`CacheAside`](crate::CacheAside) then fall back to their loaders).
    ///
    /// Fails only on a malformed URL. Must be called within a Tokio runtime.
    pub fn connect_lazy(config: RedisConfig) -> Result<Self> {
        let client = open_client(&config).map_err(|e| {
            CacheError::Config(format!(
                "invalid Redis URL {}: {e}",
                redact_url(&config.url)
            ))
        })?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.connect_timeout))
            .set_response_timeout(Some(config.response_timeout))
            .set_number_of_retries(config.reconnect_attempts)
            .set_max_delay(Duration::from_secs(1));
        let address = client.get_connection_info().addr().to_string();
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), manager_config)
            .map_err(|e| redis_error("connect", &address, e, config.connect_timeout))?;
        let prefix = Arc::from(config.key_prefix.as_str());
        Ok(Self {
            conn,
            shared: Arc::new(Shared {
                client,
                config,
                address,
                listeners: Mutex::new(HashMap::new()),
            }),
            prefix,
        })
    }

    /// A handle on the same connection that puts `prefix` before every key
    /// instead of the configured one (with its own invalidation channel).
    #[must_use]
    pub fn with_prefix(&self, prefix: impl Into<String>) -> Self {
        Self {
            prefix: Arc::from(prefix.into()),
            ..self.clone()
        }
    }

    /// The key prefix in use.
    #[must_use]
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Sends a `PING`; for health checks.
    pub async fn ping(&self) -> Result<()> {
        let mut conn = self.conn.clone();
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .map_err(|e| self.error("ping", e))?;
        Ok(())
    }

    /// The underlying connection, for commands keel-cache does not wrap.
    /// Keys used through it get no prefix.
    #[must_use]
    pub fn connection(&self) -> ConnectionManager {
        self.conn.clone()
    }

    fn key<'a>(&'a self, key: &'a str) -> Result<Prefixed<'a>> {
        self.shared
            .config
            .limits
            .check_key(key, self.prefix.len())?;
        Ok(Prefixed {
            prefix: &self.prefix,
            key,
        })
    }

    fn channel(&self) -> String {
        format!("{}keel-cache:events", self.prefix)
    }

    fn error(&self, operation: &'static str, e: redis::RedisError) -> CacheError {
        redis_error(
            operation,
            &self.shared.address,
            e,
            self.shared.config.response_timeout,
        )
    }
}

/// A key with the backend's prefix, written into a command as one argument
/// straight from its two parts (no prefixed copy is built first).
#[derive(Clone, Copy)]
struct Prefixed<'a> {
    prefix: &'a str,
    key: &'a str,
}

impl Prefixed<'_> {
    fn len(self) -> usize {
        self.prefix.len() + self.key.len()
    }
}

impl redis::ToRedisArgs for Prefixed<'_> {
    fn write_redis_args<W: ?Sized + redis::RedisWrite>(&self, out: &mut W) {
        use std::io::Write as _;
        let mut arg = out.writer_for_next_arg();
        // The writer appends to the command's buffer: it cannot fail.
        let _ = arg.write_all(self.prefix.as_bytes());
        let _ = arg.write_all(self.key.as_bytes());
    }
}

impl redis::ToSingleRedisArg for Prefixed<'_> {}

/// A command `name key`, its buffers sized up front (`extra`: bytes of
/// further arguments) so that building it allocates twice, not on every
/// argument.
fn keyed(name: &str, key: Prefixed<'_>, args: usize, extra: usize) -> redis::Cmd {
    let mut cmd = redis::Cmd::with_capacity(2 + args, name.len() + key.len() + extra);
    cmd.arg(name).arg(key);
    cmd
}

fn open_client(config: &RedisConfig) -> redis::RedisResult<redis::Client> {
    #[cfg(feature = "tls")]
    if let Some(root) = &config.root_certificate {
        return redis::Client::build_with_tls(
            config.url.as_str(),
            redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(root.clone()),
            },
        );
    }
    redis::Client::open(config.url.as_str())
}

fn redis_error(
    operation: &'static str,
    address: &str,
    e: redis::RedisError,
    after: Duration,
) -> CacheError {
    if e.is_timeout() {
        return CacheError::Timeout { operation, after };
    }
    CacheError::Backend {
        backend: "redis",
        message: format!("{operation} on {address} failed: {e}"),
        source: Some(Box::new(e)),
    }
}

fn millis(ttl: Duration) -> u64 {
    // Redis refuses 0; round sub-millisecond TTLs up.
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1)
}

#[async_trait]
impl Backend for RedisCache {
    fn name(&self) -> &'static str {
        "redis"
    }

    fn read_time_limit(&self) -> Option<Duration> {
        let config = &self.shared.config;
        // A GET waits for the connection (at most one attempt of
        // `connect_timeout` when retries are off; with retries, backoff
        // delays come on top and there is no simple bound), then for the
        // answer (`response_timeout`, sending included).
        (config.reconnect_attempts == 0).then(|| config.connect_timeout + config.response_timeout)
    }

    async fn read(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let key = self.key(key)?;
        let mut conn = self.conn.clone();
        keyed("GET", key, 0, 0)
            .query_async(&mut conn)
            .await
            .map_err(|e| self.error("get", e))
    }

    async fn write(&self, key: &str, value: &[u8], ttl: Option<Duration>) -> Result<()> {
        let key = self.key(key)?;
        self.shared.config.limits.check_value(value)?;
        check_ttl(ttl)?;
        let mut cmd = keyed("SET", key, 3, value.len() + 24);
        cmd.arg(value);
        if let Some(ttl) = ttl {
            cmd.arg("PX").arg(millis(ttl));
        }
        let mut conn = self.conn.clone();
        cmd.query_async::<()>(&mut conn)
            .await
            .map_err(|e| self.error("set", e))
    }

    async fn remove(&self, keys: &[&str]) -> Result<u64> {
        if keys.is_empty() {
            return Ok(0);
        }
        let mut cmd = redis::cmd("DEL");
        for key in keys {
            cmd.arg(self.key(key)?);
        }
        let mut conn = self.conn.clone();
        cmd.query_async(&mut conn)
            .await
            .map_err(|e| self.error("delete", e))
    }

    async fn write_if_absent(&self, key: &str, value: &[u8], ttl: Duration) -> Result<bool> {
        let key = self.key(key)?;
        self.shared.config.limits.check_value(value)?;
        check_ttl(Some(ttl))?;
        let mut conn = self.conn.clone();
        let set: Option<String> = keyed("SET", key, 4, value.len() + 26)
            .arg(value)
            .arg("NX")
            .arg("PX")
            .arg(millis(ttl))
            .query_async(&mut conn)
            .await
            .map_err(|e| self.error("set if absent", e))?;
        Ok(set.is_some())
    }

    async fn remove_if_equals(&self, key: &str, expected: &[u8]) -> Result<bool> {
        let key = self.key(key)?;
        let mut conn = self.conn.clone();
        let removed: i64 = REMOVE_IF_EQUALS
            .key(key)
            .arg(expected)
            .invoke_async(&mut conn)
            .await
            .map_err(|e| self.error("delete if equals", e))?;
        Ok(removed > 0)
    }

    async fn read_or_insert(&self, key: &str, value: &[u8], ttl: Duration) -> Result<Vec<u8>> {
        let key = self.key(key)?;
        self.shared.config.limits.check_value(value)?;
        check_ttl(Some(ttl))?;
        let mut conn = self.conn.clone();
        READ_OR_INSERT
            .key(key)
            .arg(value)
            .arg(millis(ttl))
            .invoke_async(&mut conn)
            .await
            .map_err(|e| self.error("read or insert", e))
    }

    async fn write_guarded(
        &self,
        key: &str,
        value: &[u8],
        ttl: Option<Duration>,
        guards: &[(&str, Option<&[u8]>)],
    ) -> Result<bool> {
        let key = self.key(key)?;
        self.shared.config.limits.check_value(value)?;
        check_ttl(ttl)?;
        let mut invocation = WRITE_GUARDED.key(key);
        invocation.arg(value).arg(ttl.map_or(0, millis));
        for (guard, expected) in guards {
            invocation.key(self.key(guard)?);
            match expected {
                None => invocation.arg(&b""[..]),
                Some(expected) => {
                    let mut marked = Vec::with_capacity(expected.len() + 1);
                    marked.push(b'=');
                    marked.extend_from_slice(expected);
                    invocation.arg(marked)
                }
            };
        }
        let mut conn = self.conn.clone();
        let stored: i64 = invocation
            .invoke_async(&mut conn)
            .await
            .map_err(|e| self.error("guarded set", e))?;
        Ok(stored > 0)
    }

    async fn write_batch(
        &self,
        writes: &[(&str, &[u8], Option<Duration>)],
        removes: &[&str],
    ) -> Result<()> {
        let mut pipe = redis::pipe();
        pipe.atomic();
        for (key, value, ttl) in writes {
            self.shared.config.limits.check_value(value)?;
            check_ttl(*ttl)?;
            let set = pipe.cmd("SET").arg(self.key(key)?).arg(*value);
            if let Some(ttl) = ttl {
                set.arg("PX").arg(millis(*ttl));
            }
            set.ignore();
        }
        if !removes.is_empty() {
            let del = pipe.cmd("DEL");
            for key in removes {
                del.arg(self.key(key)?);
            }
            del.ignore();
        }
        let mut conn = self.conn.clone();
        pipe.query_async::<()>(&mut conn)
            .await
            .map_err(|e| self.error("batch", e))
    }

    async fn publish(&self, message: &[u8]) -> Result<()> {
        let mut conn = self.conn.clone();
        redis::cmd("PUBLISH")
            .arg(self.channel())
            .arg(message)
            .query_async::<i64>(&mut conn)
            .await
            .map_err(|e| self.error("publish", e))?;
        Ok(())
    }

    fn subscribe(&self) -> Result<Subscription> {
        let channel = self.channel();
        let mut listeners = self
            .shared
            .listeners
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let listener = listeners.entry(channel.clone()).or_insert_with(|| {
            let (notices, _) = broadcast::channel(1024);
            let (ready_tx, ready) = watch::channel(false);
            let task = tokio::spawn(listen(
                self.shared.client.clone(),
                channel,
                notices.clone(),
                ready_tx,
                self.shared.config.connect_timeout,
            ))
            .abort_handle();
            Listener {
                notices,
                ready,
                task,
            }
        });
        Ok(Subscription::new(
            listener.notices.subscribe(),
            listener.ready.clone(),
        ))
    }
}

impl_cache_port!(RedisCache);

/// Keeps one pub/sub connection subscribed to `channel`, forwarding messages
/// and reporting every (re)subscription and every drop.
async fn listen(
    client: redis::Client,
    channel: String,
    notices: broadcast::Sender<Notice>,
    ready: watch::Sender<bool>,
    connect_timeout: Duration,
) {
    const MIN_DELAY: Duration = Duration::from_millis(50);
    const MAX_DELAY: Duration = Duration::from_secs(2);
    let mut delay = MIN_DELAY;
    loop {
        let subscribed = tokio::time::timeout(connect_timeout, async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            Ok::<_, redis::RedisError>(pubsub)
        })
        .await;
        match subscribed {
            Ok(Ok(mut pubsub)) => {
                delay = MIN_DELAY;
                ready.send_replace(true);
                let _ = notices.send(Notice::Subscribed);
                tracing::debug!(channel, "subscribed to cache invalidations");
                let mut messages = pubsub.on_message();
                while let Some(message) = messages.next().await {
                    let _ = notices.send(Notice::Message(Arc::from(message.get_payload_bytes())));
                }
                ready.send_replace(false);
                let _ = notices.send(Notice::Lost);
                tracing::warn!(channel, "Redis subscription dropped; reconnecting");
            }
            Ok(Err(e)) => {
                tracing::warn!(channel, error = %e, "cannot subscribe to cache invalidations");
            }
            Err(_) => {
                tracing::warn!(
                    channel,
                    ?connect_timeout,
                    "subscribing to cache invalidations timed out"
                );
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(MAX_DELAY);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_redacted_in_debug_output() {
        let config = RedisConfig::new("redis://app:hunter2@cache.internal:6379/0");
        let shown = format!("{config:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(
            shown.contains("redis://***@cache.internal:6379/0"),
            "{shown}"
        );
        assert_eq!(redact_url("redis://127.0.0.1"), "redis://127.0.0.1");
    }

    #[test]
    fn ttls_round_up_to_a_millisecond() {
        assert_eq!(millis(Duration::from_micros(10)), 1);
        assert_eq!(millis(Duration::from_millis(1500)), 1500);
    }
}
