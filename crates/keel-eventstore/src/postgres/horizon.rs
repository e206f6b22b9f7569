//! One read horizon shared by all global reads of a store.
//!
//! Computing the horizon (`keel.commit_horizon()`) scans the server's lock
//! table: about half a millisecond. Every batch of every global read needs
//! one, so N subscriptions polling the same store paid N scans per round.
//! They can share one value instead, because a horizon stays true: every
//! event below it had ended (committed or rolled back) when it was computed,
//! nothing can be stored below it later, and a commit that had ended then is
//! visible to every snapshot taken afterwards. So a value computed before a
//! batch starts its statement (by this reader or another, a moment ago) is a
//! safe bound for that batch; it is merely lower than a fresh one might be.
//!
//! The cache only ever moves up (it keeps the largest value seen), only holds
//! values the server computed, and hands out a value only once the query
//! that computed it has returned, which is before the caller's batch
//! statement takes its snapshot.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use sqlx::PgPool;

use crate::error::Result;

/// The shared horizon of one store and its clones.
#[derive(Debug, Default)]
pub(super) struct HorizonCache {
    /// The largest horizon seen, and when the query that computed the
    /// latest refresh was sent.
    state: Mutex<State>,
    /// Held while one reader refreshes: the others wait for its answer
    /// rather than scanning too (single flight).
    refresh: tokio::sync::Mutex<()>,
    /// Horizon computations this store asked the server for.
    scans: AtomicU64,
}

#[derive(Debug, Default, Clone, Copy)]
struct State {
    value: Option<i64>,
    sent_at: Option<Instant>,
}

impl HorizonCache {
    /// A horizon computed by a query sent no earlier than `since`, from the
    /// cache if it holds one, else by asking the server (one reader at a
    /// time; those waiting meanwhile take its answer if it is recent
    /// enough for them). `None` while the server has never given a known
    /// horizon (a writer publishing its key at that very moment).
    pub(super) async fn at_least_since(
        &self,
        pool: &PgPool,
        since: Instant,
    ) -> Result<Option<i64>> {
        if let Some(value) = self.fresh(since) {
            return Ok(value);
        }
        let _turn = self.refresh.lock().await;
        if let Some(value) = self.fresh(since) {
            return Ok(value);
        }
        let sent_at = Instant::now();
        self.scans.fetch_add(1, Ordering::Relaxed);
        let computed = sqlx::query_scalar!("SELECT keel.commit_horizon()")
            .fetch_one(pool)
            .await?;
        Ok(self.offer(computed, sent_at))
    }

    /// A horizon no older than `max_age`.
    pub(super) async fn within(&self, pool: &PgPool, max_age: Duration) -> Result<Option<i64>> {
        let now = Instant::now();
        let since = now.checked_sub(max_age).unwrap_or(now);
        self.at_least_since(pool, since).await
    }

    /// Counts a horizon computed elsewhere (inside a batch's own
    /// transaction, when the cache is off).
    pub(super) fn count_scan(&self) {
        self.scans.fetch_add(1, Ordering::Relaxed);
    }

    /// How many horizon computations went to the server so far.
    pub(super) fn scans(&self) -> u64 {
        self.scans.load(Ordering::Relaxed)
    }

    fn fresh(&self, since: Instant) -> Option<Option<i64>> {
        let state = *self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.sent_at.filter(|t| *t >= since).map(|_| state.value)
    }

    /// Records a horizon the server computed for a query sent at `sent_at`;
    /// returns the cache's value afterwards. An unknown one (NULL) changes
    /// no value: the previous one is still true.
    fn offer(&self, computed: Option<i64>, sent_at: Instant) -> Option<i64> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.value = state.value.max(computed);
        state.sent_at = state.sent_at.max(Some(sent_at));
        state.value
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cached_horizon_only_moves_up() {
        let cache = HorizonCache::default();
        let t0 = Instant::now();
        assert_eq!(cache.fresh(t0), None);
        assert_eq!(cache.offer(Some(10), t0), Some(10));
        assert_eq!(cache.offer(None, t0), Some(10), "unknown keeps the value");
        assert_eq!(cache.offer(Some(7), t0), Some(10), "never moves down");
        assert_eq!(cache.offer(Some(12), t0), Some(12));
        assert_eq!(cache.fresh(t0), Some(Some(12)));
        let later = t0 + Duration::from_millis(1);
        assert_eq!(cache.fresh(later), None, "too old for a later reader");
    }
}
