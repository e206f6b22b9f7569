//! Namespace versions: the token that prefixes every key, how it is read,
//! refreshed, bumped and pushed to other processes.

use super::*;

/// Clears `refreshing` however the refresh ends (even if cancelled).
pub(super) struct RefreshGuard<'a>(&'a AtomicBool);

impl Drop for RefreshGuard<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl Inner {
    pub(super) async fn current_token(&self) -> Arc<str> {
        {
            let version = self.version.read().unwrap_or_else(|p| p.into_inner());
            if self.version_fresh.load(Ordering::Acquire)
                || version
                    .checked_at
                    .is_some_and(|at| at.elapsed() < self.policy.version_refresh)
            {
                return version.token.clone();
            }
        }
        self.refresh_version().await;
        self.version
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .token
            .clone()
    }

    /// Records that the version was just read (or set): it may be used
    /// without a clock read until the next tick.
    pub(super) fn mark_checked(&self, version: &mut NamespaceVersion) {
        version.checked_at = Some(Instant::now());
        if self.ticking.load(Ordering::Acquire) {
            self.version_fresh.store(true, Ordering::Release);
        }
    }

    /// Reads the namespace version from the backend; one caller at a time,
    /// the others go on with the token they have.
    pub(super) async fn refresh_version(&self) {
        if self.refreshing.swap(true, Ordering::AcqRel) {
            return;
        }
        let _guard = RefreshGuard(&self.refreshing);
        let generation = self
            .version
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .generation;
        let read = self.call_read("get version", &self.version_key).await;
        let mut version = self.version.write().unwrap_or_else(|p| p.into_inner());
        if version.generation != generation {
            // Pub/sub changed the version meanwhile: a newer token is set
            // (and marked checked), or a re-read was asked for (resync).
            return;
        }
        // Retry a failed read only after the refresh interval, not per call.
        self.mark_checked(&mut version);
        let token: Arc<str> = match read {
            Ok(Some(bytes)) => Arc::from(String::from_utf8_lossy(&bytes).as_ref()),
            Ok(None) => Arc::from("0"),
            Err(_) => return,
        };
        if token != version.token {
            version.token = token;
            self.local_epoch.fetch_add(1, Ordering::SeqCst);
            if let Some(local) = &self.local {
                local.invalidate_all();
            }
        }
    }

    pub(super) fn set_token(&self, token: &str) {
        let mut version = self.version.write().unwrap_or_else(|p| p.into_inner());
        version.generation += 1;
        self.mark_checked(&mut version);
        if *version.token != *token {
            version.token = Arc::from(token);
        }
        self.local_epoch.fetch_add(1, Ordering::SeqCst);
        if let Some(local) = &self.local {
            local.invalidate_all();
        }
    }

    /// Drops everything derived from messages that may have been missed.
    pub(super) fn resync(&self) {
        self.local_epoch.fetch_add(1, Ordering::SeqCst);
        if let Some(local) = &self.local {
            local.invalidate_all();
        }
        let mut version = self.version.write().unwrap_or_else(|p| p.into_inner());
        version.generation += 1;
        version.checked_at = None;
        self.version_fresh.store(false, Ordering::Release);
    }

    pub(super) fn apply(&self, message: &[u8]) {
        let Ok(message) = serde_json::from_slice::<Broadcast>(message) else {
            tracing::debug!(namespace = %self.namespace, "ignoring an unreadable cache broadcast");
            return;
        };
        if message.origin == self.origin || message.namespace != self.namespace {
            return;
        }
        if let Some(token) = &message.version {
            self.set_token(token);
        }
        if !message.keys.is_empty() {
            let token = self
                .version
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .token
                .clone();
            let data_keys: Vec<String> = message
                .keys
                .iter()
                .map(|key| self.data_key(&token, key))
                .collect();
            // Best effort, like the local tier: callers that arrive after
            // the message start a load of their own.
            for key in &data_keys {
                self.flights.detach(key);
            }
            self.evict_local(&data_keys);
        }
    }

    pub(super) async fn broadcast(&self, keys: Vec<String>, version: Option<String>) {
        let message = Broadcast {
            origin: self.origin.clone(),
            namespace: self.namespace.clone(),
            keys,
            version,
        };
        let Ok(bytes) = serde_json::to_vec(&message) else {
            return;
        };
        // Best effort: other processes' local copies expire by their TTL and
        // versions are re-read every `version_refresh` anyway.
        let _ = self.call("publish", self.backend.publish(&bytes)).await;
    }
}

/// Ends the clock-free version checks when the ticker stops: aborted with
/// its cache (then there is nothing left to do) or dropped with its
/// runtime (then lookups must look at the clock again).
pub(super) struct TickerGuard(Weak<Inner>);

impl Drop for TickerGuard {
    fn drop(&mut self) {
        if let Some(inner) = self.0.upgrade() {
            inner.ticking.store(false, Ordering::Release);
            inner.version_fresh.store(false, Ordering::Release);
        }
    }
}

/// Marks the namespace version stale every `every`, so the next lookup
/// reads it again, until the cache is dropped.
pub(super) async fn tick(inner: Weak<Inner>, every: Duration) {
    let _guard = TickerGuard(inner.clone());
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        inner.version_fresh.store(false, Ordering::Release);
    }
}

/// Applies what other processes broadcast, until the cache is dropped.
pub(super) async fn listen(inner: Weak<Inner>, mut subscription: Subscription) {
    while let Some(notice) = subscription.recv().await {
        let Some(inner) = inner.upgrade() else {
            return;
        };
        match notice {
            Notice::Message(message) => inner.apply(&message),
            Notice::Lost | Notice::Subscribed => inner.resync(),
        }
    }
}
