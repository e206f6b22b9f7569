//! The miss path: single flight in the process, the distributed lock
//! across processes, the loader and the fill.

use super::*;

impl CacheAside {
    /// A lookup found nothing usable: join or lead the key's flight.
    pub(super) async fn miss<T, E, F, Fut>(
        &self,
        key: &str,
        data_key: &str,
        backend_up: bool,
        accept_not_found: bool,
        load: F,
    ) -> Result<Option<T>, E>
    where
        T: Serialize + DeserializeOwned,
        E: From<CacheError> + fmt::Display,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<T>, E>>,
    {
        let inner = &self.inner;
        let mut load = Some(load);
        // Each lookup is counted once, by the role it first takes.
        let mut counted = false;
        loop {
            match inner.flights.join(data_key) {
                Role::Leader(lead) => {
                    if !counted {
                        inner.missed();
                    }
                    let Some(load) = load.take() else {
                        unreachable!("a caller leads at most once: leading ends the loop");
                    };
                    return self
                        .lead(key, data_key, backend_up, accept_not_found, lead, load)
                        .await;
                }
                Role::Follower(slot) => {
                    if !counted {
                        inner.joined();
                        counted = true;
                    }
                    match flight::wait(slot).await {
                        Some(Ok(envelope)) => match decode::<T>(&envelope) {
                            Decoded::Value(v) => return Ok(Some(v)),
                            Decoded::NotFound if accept_not_found => return Ok(None),
                            // A different type, or a "not found" this caller
                            // cannot use: go round and lead a load of our own.
                            Decoded::NotFound | Decoded::Invalid => {}
                        },
                        Some(Err(reason)) => {
                            return Err(E::from(CacheError::LoadFailed {
                                key: key.to_owned(),
                                reason: reason.to_string(),
                            }));
                        }
                        // The leader was cancelled: go round, one of us leads.
                        None => {}
                    }
                }
            }
        }
    }

    pub(super) async fn lead<T, E, F, Fut>(
        &self,
        key: &str,
        data_key: &str,
        mut backend_up: bool,
        accept_not_found: bool,
        lead: Lead<'_>,
        load: F,
    ) -> Result<Option<T>, E>
    where
        T: Serialize + DeserializeOwned,
        E: From<CacheError> + fmt::Display,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<T>, E>>,
    {
        let inner = &self.inner;
        let mut lock = None;
        if backend_up {
            match self.before_load::<T>(data_key, accept_not_found).await {
                Ok((Source::Cache(decoded, envelope), _)) => {
                    lead.finish(Ok(envelope));
                    return Ok(match decoded {
                        Decoded::Value(v) => Some(v),
                        _ => None,
                    });
                }
                Ok((Source::Loaded, held)) => lock = held,
                Err(()) => backend_up = false,
            }
        }

        // Before loading: the local epoch, then the eviction fence. An
        // eviction that moves the fence after this read makes the fill
        // below a no-op, whatever the loader read.
        let epoch = inner.local_epoch.load(Ordering::SeqCst);
        let fence = if backend_up {
            inner.open_fence(key).await.ok()
        } else {
            None
        };
        bump(&inner.counters.loads);
        let loaded = load().await;
        let result = match loaded {
            Ok(value) => {
                match encode(value.as_ref()) {
                    Ok(envelope) => {
                        let ttl = if value.is_some() {
                            Some(inner.policy.ttl)
                        } else {
                            inner.policy.negative_ttl.map(Some)
                        };
                        if let (Some(fence), Some(ttl)) = (&fence, ttl) {
                            inner
                                .fill(key, data_key, &envelope, ttl, fence, epoch)
                                .await;
                        }
                        lead.finish(Ok(Arc::from(envelope)));
                    }
                    Err(e) => {
                        tracing::warn!(namespace = %inner.namespace, key, error = %e, "cannot serialize a loaded value; not cached");
                        lead.finish(Err(Arc::from(e.to_string())));
                    }
                }
                Ok(value)
            }
            Err(e) => {
                bump(&inner.counters.load_errors);
                lead.finish(Err(Arc::from(e.to_string())));
                Err(e)
            }
        };
        if let Some((lock_key, token)) = lock {
            let _ = inner
                .call(
                    "unlock",
                    inner.backend.remove_if_equals(&lock_key, token.as_bytes()),
                )
                .await;
        }
        result
    }

    /// The leader's steps before loading: look again (a flight that just
    /// ended may have filled the cache), then take the distributed lock or
    /// wait for the process holding it. `Err`: the backend failed.
    #[allow(clippy::type_complexity)] // private plumbing
    pub(super) async fn before_load<T: DeserializeOwned>(
        &self,
        data_key: &str,
        accept_not_found: bool,
    ) -> Result<(Source<T>, Option<(String, String)>), ()> {
        let inner = &self.inner;
        if let Some(found) = self.recheck::<T>(data_key, accept_not_found).await? {
            return Ok((found, None));
        }
        let Some(lock) = &inner.policy.lock else {
            return Ok((Source::Loaded, None));
        };
        let lock_key = inner.lock_key(data_key);
        let token = uuid::Uuid::new_v4().simple().to_string();
        let acquired = inner
            .call(
                "lock",
                inner
                    .backend
                    .write_if_absent(&lock_key, token.as_bytes(), lock.ttl),
            )
            .await
            .map_err(|_| ())?;
        if acquired {
            // The previous holder may have filled the cache and unlocked
            // between our last look and our lock.
            if let Some(found) = self.recheck::<T>(data_key, accept_not_found).await? {
                let _ = inner
                    .call(
                        "unlock",
                        inner.backend.remove_if_equals(&lock_key, token.as_bytes()),
                    )
                    .await;
                return Ok((found, None));
            }
            return Ok((Source::Loaded, Some((lock_key, token))));
        }
        // Another process is loading: poll until its value appears, its lock
        // goes (it failed or gave up) or the lock's lifetime passes.
        let deadline = Instant::now() + lock.ttl;
        while Instant::now() < deadline {
            tokio::time::sleep(lock.poll).await;
            // The lock first, then the value: the holder fills the cache
            // before it unlocks, so a lock seen gone means the value (if
            // any) is there to be found by the look that follows.
            let holder = inner
                .call_read("get lock", &lock_key)
                .await
                .map_err(|_| ())?;
            if let Some(found) = self.recheck::<T>(data_key, accept_not_found).await? {
                return Ok((found, None));
            }
            if holder.is_none() {
                break;
            }
        }
        Ok((Source::Loaded, None))
    }

    pub(super) async fn recheck<T: DeserializeOwned>(
        &self,
        data_key: &str,
        accept_not_found: bool,
    ) -> Result<Option<Source<T>>, ()> {
        let inner = &self.inner;
        match inner.lookup(data_key).await {
            Lookup::Hit { envelope, .. } => match decode::<T>(&envelope) {
                Decoded::Invalid => {
                    inner.discard(data_key).await;
                    Ok(None)
                }
                Decoded::NotFound if !accept_not_found => Ok(None),
                decoded => {
                    let shared = match envelope {
                        Bytes::Shared(b) => b,
                        Bytes::Owned(b) => Arc::from(b),
                    };
                    Ok(Some(Source::Cache(decoded, shared)))
                }
            },
            Lookup::Missing => Ok(None),
            Lookup::Failed => Err(()),
        }
    }
}
