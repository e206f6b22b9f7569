//! A projection's options, filter, status and rebuild report.

use std::time::Duration;

use keel_core::Position;
use keel_eventstore::{ReadAll, SubscriptionOptions};

/// How a projection subscribes, writes and reports.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ProjectionOptions {
    /// The subscription's name (its checkpoint and leadership key).
    pub name: String,
    /// Which events it reads.
    pub filter: EventFilter,
    /// How long one write may take to be applied (default 30 s).
    pub write_timeout: Duration,
    /// Retries of a write that failed for a retryable reason (engine
    /// unreachable or slow) before the projection stops (default 5).
    pub write_retries: u32,
    /// How often lag is measured and published (default 5 s).
    pub lag_interval: Duration,
    /// Readiness fails when more events than this wait (default 1000).
    pub max_ready_lag: u64,
    /// The most events applied together (default 100): the documents they
    /// touch are read once, changed in log order, and written in one
    /// upsert and one delete. 1 writes after every event.
    pub max_batch: usize,
    /// The subscription's options beyond name and filter (batch size,
    /// checkpoint cadence, polling).
    pub subscription: SubscriptionOptions,
}

impl ProjectionOptions {
    /// Options with defaults for the projection `name`.
    pub fn new(name: impl Into<String>) -> Self {
        let name = name.into();
        Self {
            subscription: SubscriptionOptions::new(name.clone()),
            name,
            filter: EventFilter::default(),
            write_timeout: Duration::from_secs(30),
            write_retries: 5,
            lag_interval: Duration::from_secs(5),
            max_ready_lag: 1000,
            max_batch: 100,
        }
    }

    /// Sets how many events are applied together (at least 1).
    #[must_use]
    pub fn max_batch(mut self, events: usize) -> Self {
        self.max_batch = events.max(1);
        self
    }

    /// Reads only events passing `filter`.
    #[must_use]
    pub fn filter(mut self, filter: EventFilter) -> Self {
        self.filter = filter;
        self
    }

    /// Sets the per-write timeout.
    #[must_use]
    pub fn write_timeout(mut self, timeout: Duration) -> Self {
        self.write_timeout = timeout;
        self
    }

    /// Sets how often lag is measured.
    #[must_use]
    pub fn lag_interval(mut self, interval: Duration) -> Self {
        self.lag_interval = interval.max(Duration::from_millis(10));
        self
    }

    /// Sets the readiness threshold.
    #[must_use]
    pub fn max_ready_lag(mut self, events: u64) -> Self {
        self.max_ready_lag = events;
        self
    }

    /// Sets the subscription's other options (its name and filter are
    /// taken from these options).
    #[must_use]
    pub fn subscription(mut self, options: SubscriptionOptions) -> Self {
        self.subscription = options;
        self
    }

    pub(super) fn subscription_for(&self, name: &str) -> SubscriptionOptions {
        let mut s = self.subscription.clone();
        s.name = name.to_owned();
        s.filter = self.filter.read_all(Position::START);
        s
    }
}

/// Which events of the log a projection reads: by stream category, stream
/// prefix and event type (all optional; an empty filter reads everything).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct EventFilter {
    /// Only streams of this category (`Category` or `Category-…`).
    pub category: Option<String>,
    /// Only streams whose id starts with this prefix.
    pub stream_prefix: Option<String>,
    /// Only these event types.
    pub event_types: Option<Vec<String>>,
}

impl EventFilter {
    /// Every event.
    #[must_use]
    pub fn all() -> Self {
        Self::default()
    }

    /// Only streams of `category`.
    #[must_use]
    pub fn category(mut self, category: impl Into<String>) -> Self {
        self.category = Some(category.into());
        self
    }

    /// Only streams whose id starts with `prefix`.
    #[must_use]
    pub fn stream_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.stream_prefix = Some(prefix.into());
        self
    }

    /// Only these event types.
    #[must_use]
    pub fn event_types<I: IntoIterator<Item = T>, T: Into<String>>(mut self, types: I) -> Self {
        self.event_types = Some(types.into_iter().map(Into::into).collect());
        self
    }

    /// The store's read options for this filter, after `position`.
    #[must_use]
    pub fn read_all(&self, position: Position) -> ReadAll {
        let mut r = ReadAll::after(position);
        if let Some(c) = &self.category {
            r = r.category(c.clone());
        }
        if let Some(p) = &self.stream_prefix {
            r = r.stream_prefix(p.clone());
        }
        if let Some(t) = &self.event_types {
            r = r.event_types(t.clone());
        }
        r
    }
}

/// What a projection reports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ProjectionStatus {
    /// The position of the last event handled (applied or skipped).
    pub position: Option<Position>,
    /// Events waiting at the last measurement.
    pub lag_events: u64,
    /// Age of the oldest waiting event at the last measurement.
    pub lag_age: Duration,
    /// Events applied to their document since start (each changed or
    /// deleted it; several in one run may share one write).
    pub applied: u64,
    /// Events skipped because their document already reflected them.
    pub skipped: u64,
    /// Whether a rebuild is running.
    pub rebuilding: bool,
    /// Why the projection stopped, if it did.
    pub failed: Option<String>,
}

/// What a rebuild did.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct RebuildReport {
    /// The position the rebuilt index reflects.
    pub position: Option<Position>,
    /// Documents in the index after the swap.
    pub documents: u64,
    /// How long it took.
    pub took: Duration,
}
