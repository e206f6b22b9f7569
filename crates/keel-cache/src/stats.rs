//! Counters.

use std::sync::atomic::{AtomicU64, Ordering};

/// A snapshot of a [`CacheAside`](crate::CacheAside)'s counters, from
/// [`CacheAside::stats`](crate::CacheAside::stats). Counters only grow.
///
/// Every lookup is counted once, as exactly one of [`hits`](Self::hits),
/// [`misses`](Self::misses) or [`joined`](Self::joined): a caller that
/// waited for another caller's load of the same key (single flight) is
/// `joined`, not a miss, so `misses` counts the lookups that went on to a
/// load of their own (or found the value on a second look) and `joined`
/// how many loads single flight saved. The `keel.cache.misses` metric
/// counts `misses` and `joined` together (neither was answered by the
/// cache).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
#[non_exhaustive]
pub struct CacheStats {
    /// Lookups answered from the cache (a value or a cached "not found"),
    /// local tier included.
    pub hits: u64,
    /// Of [`hits`](Self::hits), those answered by the in-process tier.
    pub local_hits: u64,
    /// Lookups that found nothing usable (absent, undecodable, or the
    /// backend failed) and did not join another caller's load.
    pub misses: u64,
    /// Lookups through [`get_or_load`](crate::CacheAside::get_or_load) (or
    /// `get_or_load_optional`) that found nothing usable and waited for a
    /// load of the same key that another caller in this process had already
    /// started, instead of loading themselves. Counted when the caller
    /// joins; a caller whose flight ends without a value it can use (the
    /// loader was cancelled, or returned another type) then loads on its
    /// own, and stays counted here.
    pub joined: u64,
    /// Loader runs.
    pub loads: u64,
    /// Loader runs that returned an error.
    pub load_errors: u64,
    /// Backend operations that failed or timed out (the caller was served
    /// anyway, from the loader).
    pub errors: u64,
    /// Cached values that no longer decoded; each was removed and treated as
    /// a miss.
    pub invalid_values: u64,
    /// Loaded values that were not cached because their key was evicted
    /// (or rewritten, or its namespace bumped) while they loaded: the
    /// caller got the loaded value, but it was too old to keep.
    pub stale_fills: u64,
}

impl CacheStats {
    /// `hits / (hits + misses + joined)`: the share of lookups the cache
    /// answered, or `None` before the first lookup.
    #[must_use]
    pub fn hit_ratio(&self) -> Option<f64> {
        let lookups = self.hits + self.misses + self.joined;
        #[allow(clippy::cast_precision_loss)] // a ratio does not need 53 bits
        (lookups > 0).then(|| self.hits as f64 / lookups as f64)
    }
}

#[derive(Default, Debug)]
pub(crate) struct Counters {
    pub(crate) hits: AtomicU64,
    pub(crate) local_hits: AtomicU64,
    pub(crate) misses: AtomicU64,
    pub(crate) joined: AtomicU64,
    pub(crate) loads: AtomicU64,
    pub(crate) load_errors: AtomicU64,
    pub(crate) errors: AtomicU64,
    pub(crate) invalid_values: AtomicU64,
    pub(crate) stale_fills: AtomicU64,
}

pub(crate) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl Counters {
    pub(crate) fn snapshot(&self) -> CacheStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CacheStats {
            hits: get(&self.hits),
            local_hits: get(&self.local_hits),
            misses: get(&self.misses),
            joined: get(&self.joined),
            loads: get(&self.loads),
            load_errors: get(&self.load_errors),
            errors: get(&self.errors),
            invalid_values: get(&self.invalid_values),
            stale_fills: get(&self.stale_fills),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hit_ratio() {
        assert_eq!(CacheStats::default().hit_ratio(), None);
        let stats = CacheStats {
            hits: 3,
            misses: 1,
            ..CacheStats::default()
        };
        assert_eq!(stats.hit_ratio(), Some(0.75));
        let stats = CacheStats {
            hits: 2,
            misses: 1,
            joined: 1,
            ..CacheStats::default()
        };
        assert_eq!(stats.hit_ratio(), Some(0.5), "joined lookups are not hits");
    }
}
