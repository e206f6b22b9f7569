use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{Check, Section};
use crate::duration;

/// `eventstore`: the event store's limits and the defaults of its catch-up
/// subscriptions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct EventStoreSettings {
    /// The largest event payload accepted, in bytes (default 1 MiB).
    pub max_payload_bytes: usize,
    /// Rows per read query (default 5000).
    pub read_batch_size: u32,
    /// Whether appends send a `NOTIFY` to wake subscriptions (default true).
    pub notify_on_append: bool,
    /// How long a global-log read waits for running transactions (default 5s).
    #[serde(with = "duration::required")]
    pub settle_timeout: Duration,
    /// How old a read horizon shared by the store's readers may be when a
    /// later batch of a read reuses it (default 5ms; `0s` computes one per
    /// batch). A reused horizon can only delay events, never skip one.
    #[serde(with = "duration::required")]
    pub horizon_max_age: Duration,
    /// Defaults for every catch-up subscription.
    pub subscription: StoreSubscriptionSettings,
}

/// `eventstore.subscription`: how catch-up subscriptions read and
/// checkpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct StoreSubscriptionSettings {
    /// Events fetched per read (default 500).
    pub batch_size: u64,
    /// Store the checkpoint after this many handled events (default 100).
    pub checkpoint_every_events: u64,
    /// …or after this long with unsaved progress (default 1s).
    #[serde(with = "duration::required")]
    pub checkpoint_interval: Duration,
    /// How long a caught-up subscription waits before polling (default 500ms).
    #[serde(with = "duration::required")]
    pub poll_interval: Duration,
    /// How often a follower tries to take over (default 1s).
    #[serde(with = "duration::required")]
    pub leadership_retry: Duration,
}

impl Default for EventStoreSettings {
    fn default() -> Self {
        Self {
            max_payload_bytes: 1024 * 1024,
            read_batch_size: 5000,
            notify_on_append: true,
            settle_timeout: Duration::from_secs(5),
            horizon_max_age: Duration::from_millis(5),
            subscription: StoreSubscriptionSettings::default(),
        }
    }
}

impl Default for StoreSubscriptionSettings {
    fn default() -> Self {
        Self {
            batch_size: 500,
            checkpoint_every_events: 100,
            checkpoint_interval: Duration::from_secs(1),
            poll_interval: Duration::from_millis(500),
            leadership_retry: Duration::from_secs(1),
        }
    }
}

impl Section for EventStoreSettings {
    const KEY: &'static str = "eventstore";

    fn validate(&self, check: &mut Check<'_>) {
        if self.max_payload_bytes == 0 {
            check.fail("max_payload_bytes", "must be at least 1");
        }
        if self.read_batch_size == 0 {
            check.fail("read_batch_size", "must be at least 1");
        }
        let s = &self.subscription;
        if s.batch_size == 0 {
            check.fail("subscription.batch_size", "must be at least 1");
        }
        if s.checkpoint_every_events == 0 {
            check.fail("subscription.checkpoint_every_events", "must be at least 1");
        }
        for (key, d) in [
            ("subscription.checkpoint_interval", s.checkpoint_interval),
            ("subscription.poll_interval", s.poll_interval),
            ("subscription.leadership_retry", s.leadership_retry),
        ] {
            if d.is_zero() {
                check.fail(key, "must be greater than zero");
            }
        }
    }
}

#[cfg(feature = "eventstore")]
impl EventStoreSettings {
    /// The store settings shared by the PostgreSQL and in-memory stores.
    #[must_use]
    pub fn store_config(&self) -> keel_eventstore::StoreConfig {
        keel_eventstore::StoreConfig::default()
            .max_payload_bytes(self.max_payload_bytes)
            .read_batch_size(self.read_batch_size)
            .notify_on_append(self.notify_on_append)
            .settle_timeout(self.settle_timeout)
            .horizon_max_age(self.horizon_max_age)
    }

    /// Options for the catch-up subscription `name`, with these defaults.
    #[must_use]
    pub fn subscription_options(
        &self,
        name: impl Into<String>,
    ) -> keel_eventstore::SubscriptionOptions {
        let s = &self.subscription;
        keel_eventstore::SubscriptionOptions::new(name)
            .batch_size(s.batch_size)
            .checkpoint(s.checkpoint_every_events, s.checkpoint_interval)
            .poll_interval(s.poll_interval)
            .leadership_retry(s.leadership_retry)
    }
}
