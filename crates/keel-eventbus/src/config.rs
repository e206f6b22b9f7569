//! Subscription settings: retries, dead-lettering, ordering, concurrency.

use std::time::Duration;

use crate::error::{EventBusError, Result};

/// Pub/Sub accepts 5 to 100 delivery attempts before dead-lettering.
pub const DELIVERY_ATTEMPTS: std::ops::RangeInclusive<u32> = 5..=100;
/// Pub/Sub's longest retry backoff.
pub const MAX_BACKOFF: Duration = Duration::from_secs(600);
/// Pub/Sub's ack deadline range (also how far a lease is extended at a time).
pub const ACK_DEADLINE: std::ops::RangeInclusive<Duration> =
    Duration::from_secs(10)..=Duration::from_secs(600);

/// How one consumer subscribes to a topic.
///
/// Every subscription has a dead-letter topic: a message whose handler keeps
/// failing is forwarded there after [`max_delivery_attempts`](Self::max_delivery_attempts),
/// and a rejected or malformed message at once. Redeliveries wait an
/// exponential backoff within [`backoff`](Self::backoff).
///
/// Each setting has one name: `with_<name>(value)` sets it and `<name>()`
/// reads it (`with_max_delivery_attempts(10)`, `max_delivery_attempts()`).
/// Setters do not validate; [`validate`](Self::validate) does, and every bus
/// calls it before touching the broker.
///
/// ```
/// use std::time::Duration;
/// use keel_eventbus::SubscriptionConfig;
///
/// let config = SubscriptionConfig::new("billing")
///     .with_max_delivery_attempts(10)
///     .with_backoff(Duration::from_secs(1), Duration::from_secs(60))
///     .with_ordered(true)
///     .with_max_concurrent_handlers(8);
/// config.validate().unwrap();
/// assert!(SubscriptionConfig::new("billing").with_max_delivery_attempts(3).validate().is_err());
/// ```
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct SubscriptionConfig {
    consumer: String,
    max_delivery_attempts: u32,
    min_backoff: Duration,
    max_backoff: Duration,
    ordered: bool,
    max_concurrent_handlers: usize,
    max_outstanding_messages: usize,
    ack_deadline: Duration,
    max_lease: Duration,
    handler_timeout: Option<Duration>,
    shutdown_timeout: Duration,
}

impl SubscriptionConfig {
    /// Settings for `consumer` (the subscribing service or component; it names
    /// the subscription) with production defaults: 5 attempts, backoff 10 s to
    /// 600 s, unordered, 16 concurrent handlers, 1000 outstanding messages,
    /// ack deadline 60 s, leases extended up to 1 h, 30 s to finish in-flight
    /// handlers on shutdown.
    pub fn new(consumer: impl Into<String>) -> Self {
        Self {
            consumer: consumer.into(),
            max_delivery_attempts: 5,
            min_backoff: Duration::from_secs(10),
            max_backoff: MAX_BACKOFF,
            ordered: false,
            max_concurrent_handlers: 16,
            max_outstanding_messages: 1000,
            ack_deadline: Duration::from_secs(60),
            max_lease: Duration::from_secs(3600),
            handler_timeout: None,
            shutdown_timeout: Duration::from_secs(30),
        }
    }

    /// Deliveries before a failing message is dead-lettered (5 to 100).
    #[must_use]
    pub fn with_max_delivery_attempts(mut self, attempts: u32) -> Self {
        self.max_delivery_attempts = attempts;
        self
    }

    /// The redelivery backoff range (Pub/Sub's retry policy; at most 600 s).
    #[must_use]
    pub fn with_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.min_backoff = min;
        self.max_backoff = max;
        self
    }

    /// Deliver messages with the same ordering key one at a time, in publish
    /// order. Fixed when the subscription is created.
    ///
    /// A failing message holds back the later messages of its key until it
    /// succeeds or is dead-lettered. On Pub/Sub it is retried by the
    /// subscriber while it keeps the lease (after the same backoff), so the
    /// messages behind it are neither redelivered nor charged attempts; if
    /// the subscriber dies, Pub/Sub redelivers from the failed message on.
    #[must_use]
    pub fn with_ordered(mut self, ordered: bool) -> Self {
        self.ordered = ordered;
        self
    }

    /// How many handlers run at once in one [`Subscription`](crate::Subscription).
    #[must_use]
    pub fn with_max_concurrent_handlers(mut self, n: usize) -> Self {
        self.max_concurrent_handlers = n;
        self
    }

    /// Flow control: how many messages the broker hands out to one
    /// subscriber before it acks some (Pub/Sub only; at least the number of
    /// concurrent handlers).
    #[must_use]
    pub fn with_max_outstanding_messages(mut self, n: usize) -> Self {
        self.max_outstanding_messages = n;
        self
    }

    /// The subscription's ack deadline, 10 s to 600 s: how long a message
    /// stays leased after a subscriber crashed before it is redelivered. Live
    /// subscribers extend leases of slow handlers automatically.
    #[must_use]
    pub fn with_ack_deadline(mut self, d: Duration) -> Self {
        self.ack_deadline = d;
        self
    }

    /// The longest a subscriber keeps extending one message's lease.
    #[must_use]
    pub fn with_max_lease(mut self, d: Duration) -> Self {
        self.max_lease = d;
        self
    }

    /// Treat a handler that runs longer than `d` as failed (retried).
    #[must_use]
    pub fn with_handler_timeout(mut self, d: Duration) -> Self {
        self.handler_timeout = Some(d);
        self
    }

    /// How long [`Subscription::shutdown`](crate::Subscription::shutdown)
    /// waits for running handlers before releasing their messages.
    #[must_use]
    pub fn with_shutdown_timeout(mut self, d: Duration) -> Self {
        self.shutdown_timeout = d;
        self
    }

    /// The consumer name.
    #[must_use]
    pub fn consumer(&self) -> &str {
        &self.consumer
    }

    /// Deliveries before dead-lettering
    /// ([`with_max_delivery_attempts`](Self::with_max_delivery_attempts)).
    #[must_use]
    pub fn max_delivery_attempts(&self) -> u32 {
        self.max_delivery_attempts
    }

    /// The redelivery backoff range, `(min, max)`
    /// ([`with_backoff`](Self::with_backoff)).
    #[must_use]
    pub fn backoff(&self) -> (Duration, Duration) {
        (self.min_backoff, self.max_backoff)
    }

    /// Whether per-key ordering is on ([`with_ordered`](Self::with_ordered)).
    #[must_use]
    pub fn ordered(&self) -> bool {
        self.ordered
    }

    /// The concurrent handler limit
    /// ([`with_max_concurrent_handlers`](Self::with_max_concurrent_handlers)).
    #[must_use]
    pub fn max_concurrent_handlers(&self) -> usize {
        self.max_concurrent_handlers
    }

    /// The flow-control limit
    /// ([`with_max_outstanding_messages`](Self::with_max_outstanding_messages)).
    #[must_use]
    pub fn max_outstanding_messages(&self) -> usize {
        self.max_outstanding_messages
    }

    /// The ack deadline ([`with_ack_deadline`](Self::with_ack_deadline)).
    #[must_use]
    pub fn ack_deadline(&self) -> Duration {
        self.ack_deadline
    }

    /// The longest lease ([`with_max_lease`](Self::with_max_lease)).
    #[must_use]
    pub fn max_lease(&self) -> Duration {
        self.max_lease
    }

    /// The handler timeout, if any
    /// ([`with_handler_timeout`](Self::with_handler_timeout)).
    #[must_use]
    pub fn handler_timeout(&self) -> Option<Duration> {
        self.handler_timeout
    }

    /// The shutdown grace period
    /// ([`with_shutdown_timeout`](Self::with_shutdown_timeout)).
    #[must_use]
    pub fn shutdown_timeout(&self) -> Duration {
        self.shutdown_timeout
    }

    /// The backoff before delivery number `attempt + 1`, after `attempt`
    /// failed: `min_backoff * 2^(attempt - 1)`, capped at `max_backoff`.
    #[must_use]
    pub fn backoff_after(&self, attempt: u32) -> Duration {
        let factor = 2u32.saturating_pow(attempt.saturating_sub(1).min(20));
        self.min_backoff
            .checked_mul(factor)
            .unwrap_or(self.max_backoff)
            .min(self.max_backoff)
    }

    /// Checks every setting against the broker's limits.
    pub fn validate(&self) -> Result<()> {
        crate::naming::Naming::new().subscription("topic", &self.consumer)?;
        if !DELIVERY_ATTEMPTS.contains(&self.max_delivery_attempts) {
            return Err(EventBusError::invalid_config(
                "max_delivery_attempts",
                format!(
                    "{} is outside Pub/Sub's range of 5 to 100",
                    self.max_delivery_attempts
                ),
            ));
        }
        if self.max_backoff > MAX_BACKOFF {
            return Err(EventBusError::invalid_config(
                "max_backoff",
                format!("{:?} is longer than 600 s", self.max_backoff),
            ));
        }
        if self.min_backoff > self.max_backoff {
            return Err(EventBusError::invalid_config(
                "min_backoff",
                format!(
                    "{:?} is longer than max_backoff {:?}",
                    self.min_backoff, self.max_backoff
                ),
            ));
        }
        if self.max_concurrent_handlers == 0 {
            return Err(EventBusError::invalid_config(
                "max_concurrent_handlers",
                "must be at least 1",
            ));
        }
        if self.max_outstanding_messages < self.max_concurrent_handlers {
            return Err(EventBusError::invalid_config(
                "max_outstanding_messages",
                format!(
                    "{} is less than max_concurrent_handlers {}",
                    self.max_outstanding_messages, self.max_concurrent_handlers
                ),
            ));
        }
        if !ACK_DEADLINE.contains(&self.ack_deadline) {
            return Err(EventBusError::invalid_config(
                "ack_deadline",
                format!("{:?} is outside 10 s to 600 s", self.ack_deadline),
            ));
        }
        if self.max_lease < self.ack_deadline {
            return Err(EventBusError::invalid_config(
                "max_lease",
                "must be at least the ack deadline",
            ));
        }
        if self.handler_timeout == Some(Duration::ZERO) {
            return Err(EventBusError::invalid_config(
                "handler_timeout",
                "must be longer than zero",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        SubscriptionConfig::new("billing").validate().unwrap();
    }

    #[test]
    fn delivery_attempts_must_be_in_pubsub_range() {
        for n in [0, 4, 101, 1000] {
            let err = SubscriptionConfig::new("c")
                .with_max_delivery_attempts(n)
                .validate()
                .unwrap_err();
            assert!(
                matches!(
                    err,
                    EventBusError::InvalidConfig {
                        field: "max_delivery_attempts",
                        ..
                    }
                ),
                "{n}"
            );
        }
        for n in [5, 100] {
            SubscriptionConfig::new("c")
                .with_max_delivery_attempts(n)
                .validate()
                .unwrap();
        }
    }

    #[test]
    fn other_limits() {
        let s = |d: u64| Duration::from_secs(d);
        let bad = [
            SubscriptionConfig::new("c").with_backoff(s(5), s(1)),
            SubscriptionConfig::new("c").with_backoff(s(1), s(601)),
            SubscriptionConfig::new("c").with_max_concurrent_handlers(0),
            SubscriptionConfig::new("c").with_max_outstanding_messages(2),
            SubscriptionConfig::new("c").with_ack_deadline(s(5)),
            SubscriptionConfig::new("c").with_max_lease(s(1)),
            SubscriptionConfig::new("c").with_handler_timeout(Duration::ZERO),
            SubscriptionConfig::new("no spaces"),
        ];
        for c in bad {
            assert!(c.validate().is_err(), "{c:?}");
        }
    }

    #[test]
    fn exponential_backoff_is_capped() {
        let c = SubscriptionConfig::new("c")
            .with_backoff(Duration::from_millis(100), Duration::from_millis(500));
        let got: Vec<u128> = (1..=5).map(|a| c.backoff_after(a).as_millis()).collect();
        assert_eq!(got, [100, 200, 400, 500, 500]);
        assert_eq!(c.backoff_after(u32::MAX), Duration::from_millis(500));
    }
}
