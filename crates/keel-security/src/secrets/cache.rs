//! A caching decorator for any secret provider.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use super::SecretProvider;
use crate::Secret;
use crate::error::{Result, SecurityError};

/// The longest a failed refresh is waited out before the next read tries
/// the backend again, unless the TTL is shorter.
const DEFAULT_FAILURE_BACKOFF: Duration = Duration::from_secs(5);

/// Caches another provider's values for a time to live, so hot paths do not
/// hit a secret manager (or the file system) on every request.
///
/// - **Rotation.** A value is served from memory until its TTL has passed;
///   the next read then asks the inner provider again, which is how a
///   rotated secret reaches a running service, at most one TTL late.
/// - **Coalescing.** Concurrent reads of one name that miss the cache wait
///   for a single read of the inner provider and share its result (value or
///   error), so a cold start or an expiry under load costs one backend call
///   per name, not one per caller. Different names load in parallel.
/// - **Rejected values.** When a consumer finds that a value no longer
///   works (a database refused the password, an API the key),
///   [`invalidate`](Self::invalidate) drops it and the next read fetches it
///   again, without waiting for the TTL. A read that was already under way
///   when the value was invalidated still answers its callers but is not
///   cached.
/// - **Outages.** If a refresh fails with a *transient* error (the backend
///   is down or slow: [`SecurityError::is_transient_secret_failure`]), the
///   last good value keeps being served (a secret manager outage should not
///   take the service down with it), the failure is logged by name only,
///   and the backend is asked again after a short back-off
///   ([`with_failure_backoff`](Self::with_failure_backoff)). Any other
///   failure (not found, permission denied, a disabled version, an invalid
///   value) is an answer, often a revocation: the cached value is dropped
///   and the error returned.
///
/// A secret that was never read successfully returns the inner provider's
/// error.
pub struct CachedSecrets {
    inner: Arc<dyn SecretProvider>,
    ttl: Duration,
    failure_backoff: Duration,
    slots: Mutex<HashMap<String, Arc<Slot>>>,
}

/// One cached name: its state, and the lock that makes one caller the
/// loader while the others wait.
#[derive(Default)]
struct Slot {
    state: Mutex<SlotState>,
    loading: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct SlotState {
    value: Option<Secret<String>>,
    /// Until when `value` is served without asking the inner provider.
    fresh_until: Option<Instant>,
    /// Bumped by `invalidate`; a load that started under an older
    /// generation is not cached.
    generation: u64,
    /// How many loads have finished, so a caller that waited for one can
    /// tell that it happened and use its outcome.
    loads: u64,
    /// The error of the last load, when it left nothing to serve.
    last_error: Option<Arc<SecurityError>>,
}

impl SlotState {
    fn fresh_value(&self, now: Instant) -> Option<Secret<String>> {
        match (&self.value, self.fresh_until) {
            (Some(value), Some(until)) if now < until => Some(value.clone()),
            _ => None,
        }
    }
}

impl fmt::Debug for CachedSecrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CachedSecrets")
            .field("inner", &self.inner)
            .field("ttl", &self.ttl)
            .field("failure_backoff", &self.failure_backoff)
            .field("names", &self.lock_slots().len())
            .finish()
    }
}

impl CachedSecrets {
    /// Caches `inner`'s values for `ttl` (zero: every read goes to `inner`,
    /// concurrent ones still coalesce).
    pub fn new(inner: Arc<dyn SecretProvider>, ttl: Duration) -> Self {
        Self {
            inner,
            ttl,
            failure_backoff: ttl.min(DEFAULT_FAILURE_BACKOFF),
            slots: Mutex::new(HashMap::new()),
        }
    }

    /// How long a previous value is served without asking the backend after
    /// a refresh failed transiently (default: the TTL, at most 5 s). Keeps a
    /// down backend from being asked on every read.
    #[must_use]
    pub fn with_failure_backoff(mut self, backoff: Duration) -> Self {
        self.failure_backoff = backoff;
        self
    }

    /// The time to live of cached values.
    #[must_use]
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Forgets one cached value, so the next read goes to the inner
    /// provider: call it when the value was refused (a rotated password, a
    /// revoked key). Also reachable through
    /// [`SecretProvider::invalidate`] on an `Arc<dyn SecretProvider>`.
    pub async fn invalidate(&self, name: &str) {
        let slot = self.lock_slots().get(name).cloned();
        if let Some(slot) = slot {
            let mut state = lock(&slot.state);
            state.value = None;
            state.fresh_until = None;
            state.last_error = None;
            state.generation += 1;
        }
    }

    /// Reads every cached secret again from the inner provider now,
    /// returning how many refreshed. A transient failure keeps the previous
    /// value; any other drops it (as a read would). Call it from a timer to
    /// refresh ahead of the TTL.
    pub async fn refresh_all(&self) -> usize {
        let slots: Vec<(String, Arc<Slot>)> = self
            .lock_slots()
            .iter()
            .filter(|(_, slot)| lock(&slot.state).value.is_some())
            .map(|(name, slot)| (name.clone(), Arc::clone(slot)))
            .collect();
        let mut refreshed = 0;
        for (name, slot) in slots {
            let _loading = slot.loading.lock().await;
            let generation = lock(&slot.state).generation;
            if let Ok(Loaded::Fetched(_)) = self.load(&name, &slot, generation).await {
                refreshed += 1;
            }
        }
        refreshed
    }

    fn lock_slots(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Slot>>> {
        lock(&self.slots)
    }

    fn slot(&self, name: &str) -> Arc<Slot> {
        let mut slots = self.lock_slots();
        if let Some(slot) = slots.get(name) {
            return Arc::clone(slot);
        }
        let slot = Arc::new(Slot::default());
        slots.insert(name.to_owned(), Arc::clone(&slot));
        slot
    }

    /// Reads `name` from the inner provider and records the outcome; the
    /// caller holds `slot.loading`.
    async fn load(&self, name: &str, slot: &Slot, generation: u64) -> Result<Loaded> {
        let result = self.inner.get(name).await;
        let now = Instant::now();
        let mut state = lock(&slot.state);
        state.loads += 1;
        let current = state.generation == generation;
        match result {
            Ok(value) => {
                if current {
                    if state
                        .value
                        .as_ref()
                        .is_some_and(|old| old.expose_secret() != value.expose_secret())
                    {
                        tracing::info!(secret = name, "secret value changed on refresh");
                    }
                    state.value = Some(value.clone());
                    state.fresh_until = Some(now + self.ttl);
                    state.last_error = None;
                }
                Ok(Loaded::Fetched(value))
            }
            Err(error) if error.is_transient_secret_failure() && current => {
                if let Some(previous) = state.value.clone() {
                    tracing::warn!(
                        secret = name,
                        %error,
                        "secret refresh failed; serving the previous value"
                    );
                    state.fresh_until = Some(now + self.failure_backoff);
                    state.last_error = None;
                    return Ok(Loaded::Stale(previous));
                }
                Err(record_failure(&mut state, name, error))
            }
            Err(error) if current => {
                if state.value.take().is_some() {
                    tracing::warn!(
                        secret = name,
                        %error,
                        "secret refresh refused; the cached value is dropped"
                    );
                }
                state.fresh_until = None;
                Err(record_failure(&mut state, name, error))
            }
            // Invalidated while loading: answer, but leave the slot alone.
            Err(error) => Err(error),
        }
    }
}

/// What a load produced.
enum Loaded {
    /// A value the inner provider just returned.
    Fetched(Secret<String>),
    /// The previous value, served through a transient failure.
    Stale(Secret<String>),
}

impl Loaded {
    fn into_value(self) -> Secret<String> {
        match self {
            Loaded::Fetched(value) | Loaded::Stale(value) => value,
        }
    }
}

/// Keeps `error` for the callers that waited on this load and returns a
/// copy for the loader.
fn record_failure(state: &mut SlotState, name: &str, error: SecurityError) -> SecurityError {
    let error = Arc::new(error);
    state.last_error = Some(Arc::clone(&error));
    share(&error, name)
}

/// A copy of a secret error for one more caller, with the same variant
/// (and so the same kind and code).
fn share(error: &Arc<SecurityError>, name: &str) -> SecurityError {
    match &**error {
        SecurityError::SecretNotFound { name } => {
            SecurityError::SecretNotFound { name: name.clone() }
        }
        SecurityError::SecretInvalid { name, reason } => SecurityError::SecretInvalid {
            name: name.clone(),
            reason,
        },
        SecurityError::SecretPermissionDenied { name } => {
            SecurityError::SecretPermissionDenied { name: name.clone() }
        }
        SecurityError::SecretVersionDisabled { name, version } => {
            SecurityError::SecretVersionDisabled {
                name: name.clone(),
                version: version.clone(),
            }
        }
        SecurityError::SecretTimeout { name, after } => SecurityError::SecretTimeout {
            name: name.clone(),
            after: *after,
        },
        SecurityError::SecretUnavailable { name, .. } => SecurityError::SecretUnavailable {
            name: name.clone(),
            source: Box::new(SharedCause(Arc::clone(error))),
        },
        // Providers only return secret errors; anything else is passed on
        // as a backend failure caused by it.
        _ => SecurityError::SecretUnavailable {
            name: name.to_owned(),
            source: Box::new(SharedCause(Arc::clone(error))),
        },
    }
}

/// The cause of a shared [`SecurityError::SecretUnavailable`]: shows and
/// chains to the original error's own cause.
struct SharedCause(Arc<SecurityError>);

impl SharedCause {
    fn cause(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&*self.0)
    }
}

impl fmt::Debug for SharedCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.cause() {
            Some(cause) => fmt::Debug::fmt(cause, f),
            None => fmt::Debug::fmt(&*self.0, f),
        }
    }
}

impl fmt::Display for SharedCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.cause() {
            Some(cause) => fmt::Display::fmt(cause, f),
            None => fmt::Display::fmt(&*self.0, f),
        }
    }
}

impl std::error::Error for SharedCause {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.cause().and_then(std::error::Error::source)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The guarded maps and states are updated in single assignments, so a
    // panic elsewhere cannot leave them half-written.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[async_trait]
impl SecretProvider for CachedSecrets {
    async fn get(&self, name: &str) -> Result<Secret<String>> {
        let slot = self.slot(name);
        let loads_seen = {
            let state = lock(&slot.state);
            if let Some(value) = state.fresh_value(Instant::now()) {
                return Ok(value);
            }
            state.loads
        };
        let _loading = slot.loading.lock().await;
        let generation = {
            let state = lock(&slot.state);
            if let Some(value) = state.fresh_value(Instant::now()) {
                return Ok(value);
            }
            // A load finished while this caller waited and left an error:
            // that is this caller's answer too.
            if state.loads != loads_seen
                && let Some(error) = &state.last_error
            {
                return Err(share(error, name));
            }
            state.generation
        };
        self.load(name, &slot, generation)
            .await
            .map(Loaded::into_value)
    }

    async fn invalidate(&self, name: &str) {
        CachedSecrets::invalidate(self, name).await;
    }
}
