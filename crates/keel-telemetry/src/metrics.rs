//! Keel's standard metrics: stable names, units and attributes, recorded
//! through one [`KeelMetrics`] handle.
//!
//! Names follow the OpenTelemetry conventions (dotted, lower case, unit in
//! the instrument, not the name); durations are in seconds. The table in
//! `docs/telemetry.md` lists each instrument with its attributes. Names are
//! part of the public API: dashboards and alerts depend on them.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Gauge, Histogram, Meter};

/// The instrumentation scope under which Keel records spans and metrics.
pub const INSTRUMENTATION_SCOPE: &str = "keel";

/// Instrument names, attribute keys and values.
pub mod names {
    /// Counter: events appended to the event store (`{event}`).
    pub const EVENTSTORE_APPENDED_EVENTS: &str = "keel.eventstore.append.events";
    /// Counter: appends refused by an optimistic-concurrency conflict.
    pub const EVENTSTORE_APPEND_CONFLICTS: &str = "keel.eventstore.append.conflicts";
    /// Histogram: time an append call took, whatever its outcome (`s`).
    pub const EVENTSTORE_APPEND_DURATION: &str = "keel.eventstore.append.duration";
    /// Counter: messages published, by topic and outcome (`{message}`).
    pub const BUS_PUBLISHED_MESSAGES: &str = "keel.bus.publish.messages";
    /// Histogram: time a publish call took (`s`).
    pub const BUS_PUBLISH_DURATION: &str = "keel.bus.publish.duration";
    /// Counter: deliveries acknowledged after the handler succeeded.
    pub const BUS_ACKS: &str = "keel.bus.acks";
    /// Counter: deliveries negatively acknowledged for redelivery.
    pub const BUS_NACKS: &str = "keel.bus.nacks";
    /// Counter: messages sent to the dead-letter topic.
    pub const BUS_DEAD_LETTERS: &str = "keel.bus.dead_letters";
    /// Histogram: time a handler took for one delivery (`s`).
    pub const BUS_HANDLER_DURATION: &str = "keel.bus.handler.duration";
    /// Counter: cache lookups answered from the cache.
    pub const CACHE_HITS: &str = "keel.cache.hits";
    /// Counter: cache lookups that fell through to the loader.
    pub const CACHE_MISSES: &str = "keel.cache.misses";
    /// Gauge: connections in a pool, busy or idle (`{connection}`).
    pub const POOL_SIZE: &str = "keel.db.pool.size";
    /// Gauge: idle connections in a pool (`{connection}`).
    pub const POOL_IDLE: &str = "keel.db.pool.idle";
    /// Histogram: time spent waiting to acquire a connection (`s`).
    pub const POOL_WAIT_DURATION: &str = "keel.db.pool.wait.duration";
    /// Gauge: age of the oldest outbox entry not yet published (`s`).
    pub const OUTBOX_LAG: &str = "keel.outbox.lag";
    /// Gauge: outbox entries not yet published (`{message}`).
    pub const OUTBOX_PENDING: &str = "keel.outbox.pending";
    /// Gauge (s): age of the oldest event a projection or subscription has
    /// not handled yet (zero when caught up).
    pub const EVENTSTORE_PROJECTION_LAG: &str = "keel.eventstore.projection.lag";
    /// Gauge: events a projection or subscription has not handled yet.
    pub const EVENTSTORE_PROJECTION_LAG_EVENTS: &str = "keel.eventstore.projection.lag.events";
    /// Gauge: events a projection has parked.
    pub const EVENTSTORE_PROJECTION_PARKED: &str = "keel.eventstore.projection.parked";
    /// Histogram: time a command took through the command pipeline, by
    /// command type and outcome (`s`).
    pub const COMMAND_DURATION: &str = "keel.command.duration";
    /// Counter: audit records the command pipeline could not append
    /// (`{record}`).
    pub const AUDIT_APPEND_FAILURES: &str = "keel.audit.append.failures";
    /// Gauge: how far an event-store subscription is behind (`s`): the age
    /// of the last event it handled while more were waiting, zero once it
    /// has caught up.
    pub const EVENTSTORE_SUBSCRIPTION_LAG: &str = "keel.eventstore.subscription.lag";
    /// Counter: events handled by an event-store subscription (`{event}`).
    pub const EVENTSTORE_SUBSCRIPTION_EVENTS: &str = "keel.eventstore.subscription.events";
    /// Counter: event-store subscriptions stopped by a handler error
    /// (`{failure}`).
    pub const EVENTSTORE_SUBSCRIPTION_FAILURES: &str = "keel.eventstore.subscription.failures";

    /// Attribute: the stream category (the aggregate type, e.g. `Order`).
    pub const ATTR_STREAM_CATEGORY: &str = "keel.stream.category";
    /// Attribute: how an operation ended; see the `OUTCOME_*` values.
    pub const ATTR_OUTCOME: &str = "keel.outcome";
    /// Attribute: the topic published to.
    pub const ATTR_TOPIC: &str = "messaging.destination.name";
    /// Attribute: the subscription consumed from.
    pub const ATTR_SUBSCRIPTION: &str = "messaging.destination.subscription.name";
    /// Attribute: why a message was dead-lettered; see the `REASON_*` values.
    pub const ATTR_REASON: &str = "keel.reason";
    /// Attribute: the cache's name.
    pub const ATTR_CACHE: &str = "keel.cache.name";
    /// Attribute: the cache tier (`local` or `remote`).
    pub const ATTR_CACHE_TIER: &str = "keel.cache.tier";
    /// Attribute: the pool's name.
    pub const ATTR_POOL: &str = "db.client.connection.pool.name";
    /// Attribute: the outbox relay's name.
    pub const ATTR_RELAY: &str = "keel.outbox.relay";
    /// Attribute: the projection or subscription (`projection:name@v2`,
    /// `subscription:name`).
    pub const ATTR_PROJECTION: &str = "keel.projection";
    /// Attribute: a command's type name (e.g. `order.place`).
    pub const ATTR_COMMAND_TYPE: &str = "keel.command.type";
    /// Attribute: an event-store subscription's name (its checkpoint key).
    pub const ATTR_EVENTSTORE_SUBSCRIPTION: &str = "keel.subscription.name";

    /// Outcome: the operation succeeded (the delivery was acked).
    pub const OUTCOME_OK: &str = "ok";
    /// Outcome: an optimistic-concurrency conflict.
    pub const OUTCOME_CONFLICT: &str = "conflict";
    /// Outcome: any other failure.
    pub const OUTCOME_ERROR: &str = "error";
    /// Outcome: the handler asked for redelivery.
    pub const OUTCOME_RETRY: &str = "retry";
    /// Outcome: the handler rejected the message as unprocessable.
    pub const OUTCOME_REJECT: &str = "reject";
    /// Command outcome: handled and committed.
    pub const OUTCOME_ACCEPTED: &str = "accepted";
    /// Command outcome: refused by a business rule.
    pub const OUTCOME_REJECTED: &str = "rejected";
    /// Command outcome: the caller could not be authenticated.
    pub const OUTCOME_UNAUTHORIZED: &str = "unauthorized";
    /// Command outcome: the caller was not allowed to run it.
    pub const OUTCOME_FORBIDDEN: &str = "forbidden";
    /// Dead-letter reason: the handler rejected the message.
    pub const REASON_REJECTED: &str = "rejected";
    /// Dead-letter reason: the subscription's delivery attempts ran out.
    pub const REASON_ATTEMPTS_EXHAUSTED: &str = "attempts_exhausted";
}

use names::*;

/// Histogram buckets for operation durations in seconds: 1 ms to 10 s.
pub const DURATION_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// How an event-store append ended.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub enum AppendOutcome {
    /// The events were stored (or were already stored: an idempotent retry).
    Ok,
    /// The expected version did not match.
    Conflict,
    /// Any other failure.
    Error,
}

/// How a handler's delivery ended.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub enum HandleOutcome {
    /// Handled and acknowledged.
    Ack,
    /// Failed; nacked for redelivery.
    Retry,
    /// Rejected as unprocessable; bound for the dead-letter topic.
    Reject,
    /// Failed on its last allowed attempt: neither acked nor nacked but
    /// bound for the dead-letter topic (record the dead letter with
    /// [`DeadLetterReason::AttemptsExhausted`]). The duration is recorded
    /// with outcome `retry`.
    RetriesExhausted,
}

/// Why a message went to the dead-letter topic.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub enum DeadLetterReason {
    /// The handler rejected it.
    Rejected,
    /// The subscription's delivery attempts ran out.
    AttemptsExhausted,
}

/// How a command ended in the command pipeline.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub enum CommandOutcome {
    /// Handled and committed.
    Accepted,
    /// Refused by a business rule (a domain error).
    Rejected,
    /// The caller could not be authenticated.
    Unauthorized,
    /// The caller was authenticated but not allowed.
    Forbidden,
    /// Infrastructure failed.
    Error,
}

impl CommandOutcome {
    /// The outcome of a pipeline result.
    #[must_use]
    pub fn of<T>(result: &Result<T, keel_core::PipelineError>) -> Self {
        use keel_core::{CommandError, ErrorKind};
        match result {
            Ok(_) => CommandOutcome::Accepted,
            Err(CommandError::Rejected(_)) => CommandOutcome::Rejected,
            Err(CommandError::Infrastructure(e)) => match e.kind() {
                ErrorKind::Unauthorized => CommandOutcome::Unauthorized,
                ErrorKind::Forbidden => CommandOutcome::Forbidden,
                _ => CommandOutcome::Error,
            },
        }
    }

    /// The `keel.outcome` attribute value: `accepted`, `rejected`,
    /// `unauthorized`, `forbidden` or `error`.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            CommandOutcome::Accepted => OUTCOME_ACCEPTED,
            CommandOutcome::Rejected => OUTCOME_REJECTED,
            CommandOutcome::Unauthorized => OUTCOME_UNAUTHORIZED,
            CommandOutcome::Forbidden => OUTCOME_FORBIDDEN,
            CommandOutcome::Error => OUTCOME_ERROR,
        }
    }
}

/// Which cache tier answered.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub enum CacheTier {
    /// The in-process tier.
    Local,
    /// The shared tier (Redis).
    Remote,
}

impl CacheTier {
    fn as_str(self) -> &'static str {
        match self {
            CacheTier::Local => "local",
            CacheTier::Remote => "remote",
        }
    }
}

/// Keel's standard instruments, cheap to clone and share.
///
/// Adapters record through it; names and attributes are in [`names`]. Get
/// one from [`TelemetryGuard::metrics`](crate::TelemetryGuard::metrics),
/// [`KeelMetrics::global`] (after [`init`](crate::init)), or
/// [`KeelMetrics::new`] with any meter.
///
/// ```
/// use std::time::Duration;
/// use keel_telemetry::metrics::{AppendOutcome, KeelMetrics};
///
/// let metrics = KeelMetrics::global();
/// metrics.record_append("Order", 2, Duration::from_millis(3), AppendOutcome::Ok);
/// metrics.record_cache_hit("orders", keel_telemetry::metrics::CacheTier::Local);
/// ```
#[derive(Clone)]
pub struct KeelMetrics {
    appended_events: Counter<u64>,
    append_conflicts: Counter<u64>,
    append_duration: Histogram<f64>,
    published_messages: Counter<u64>,
    publish_duration: Histogram<f64>,
    acks: Counter<u64>,
    nacks: Counter<u64>,
    dead_letters: Counter<u64>,
    handler_duration: Histogram<f64>,
    cache_hits: Counter<u64>,
    cache_misses: Counter<u64>,
    pool_size: Gauge<u64>,
    pool_idle: Gauge<u64>,
    pool_wait: Histogram<f64>,
    outbox_lag: Gauge<f64>,
    outbox_pending: Gauge<u64>,
    projection_lag: Gauge<f64>,
    projection_lag_events: Gauge<u64>,
    projection_parked: Gauge<u64>,
    command_duration: Histogram<f64>,
    audit_append_failures: Counter<u64>,
    subscription_lag: Gauge<f64>,
    subscription_events: Counter<u64>,
    subscription_failures: Counter<u64>,
}

impl fmt::Debug for KeelMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeelMetrics").finish_non_exhaustive()
    }
}

impl KeelMetrics {
    /// Creates the instruments on `meter`.
    #[must_use]
    pub fn new(meter: &Meter) -> Self {
        let counter = |name: &'static str, unit: &'static str, description: &'static str| {
            meter
                .u64_counter(name)
                .with_unit(unit)
                .with_description(description)
                .build()
        };
        let seconds = |name: &'static str, description: &'static str| {
            meter
                .f64_histogram(name)
                .with_unit("s")
                .with_description(description)
                .with_boundaries(DURATION_BUCKETS.to_vec())
                .build()
        };
        let gauge = |name: &'static str, unit: &'static str, description: &'static str| {
            meter
                .u64_gauge(name)
                .with_unit(unit)
                .with_description(description)
                .build()
        };
        Self {
            appended_events: counter(
                EVENTSTORE_APPENDED_EVENTS,
                "{event}",
                "Events appended to the event store",
            ),
            append_conflicts: counter(
                EVENTSTORE_APPEND_CONFLICTS,
                "{conflict}",
                "Appends refused by an optimistic-concurrency conflict",
            ),
            append_duration: seconds(
                EVENTSTORE_APPEND_DURATION,
                "Duration of event-store appends",
            ),
            published_messages: counter(
                BUS_PUBLISHED_MESSAGES,
                "{message}",
                "Messages published to the bus",
            ),
            publish_duration: seconds(BUS_PUBLISH_DURATION, "Duration of bus publish calls"),
            acks: counter(BUS_ACKS, "{message}", "Deliveries acknowledged"),
            nacks: counter(BUS_NACKS, "{message}", "Deliveries nacked for redelivery"),
            dead_letters: counter(
                BUS_DEAD_LETTERS,
                "{message}",
                "Messages sent to the dead-letter topic",
            ),
            handler_duration: seconds(BUS_HANDLER_DURATION, "Duration of message handlers"),
            cache_hits: counter(
                CACHE_HITS,
                "{lookup}",
                "Cache lookups answered by the cache",
            ),
            cache_misses: counter(CACHE_MISSES, "{lookup}", "Cache lookups that missed"),
            pool_size: gauge(POOL_SIZE, "{connection}", "Connections in the pool"),
            pool_idle: gauge(POOL_IDLE, "{connection}", "Idle connections in the pool"),
            pool_wait: seconds(POOL_WAIT_DURATION, "Time spent waiting for a connection"),
            outbox_lag: meter
                .f64_gauge(OUTBOX_LAG)
                .with_unit("s")
                .with_description("Age of the oldest unpublished outbox entry")
                .build(),
            outbox_pending: gauge(
                OUTBOX_PENDING,
                "{message}",
                "Outbox entries not yet published",
            ),
            projection_lag: meter
                .f64_gauge(EVENTSTORE_PROJECTION_LAG)
                .with_unit("s")
                .with_description("Age of the oldest event a projection has not handled")
                .build(),
            projection_lag_events: gauge(
                EVENTSTORE_PROJECTION_LAG_EVENTS,
                "{event}",
                "Events a projection has not handled yet",
            ),
            projection_parked: gauge(
                EVENTSTORE_PROJECTION_PARKED,
                "{event}",
                "Events a projection parked after its handler kept failing",
            ),
            command_duration: seconds(
                COMMAND_DURATION,
                "Duration of commands through the command pipeline",
            ),
            audit_append_failures: counter(
                AUDIT_APPEND_FAILURES,
                "{record}",
                "Audit records that could not be appended",
            ),
            subscription_lag: meter
                .f64_gauge(EVENTSTORE_SUBSCRIPTION_LAG)
                .with_unit("s")
                .with_description("How far an event-store subscription is behind the log")
                .build(),
            subscription_events: counter(
                EVENTSTORE_SUBSCRIPTION_EVENTS,
                "{event}",
                "Events handled by event-store subscriptions",
            ),
            subscription_failures: counter(
                EVENTSTORE_SUBSCRIPTION_FAILURES,
                "{failure}",
                "Event-store subscriptions stopped by a handler error",
            ),
        }
    }

    /// The instruments on the global meter provider. Call it after
    /// [`init`](crate::init): instruments made earlier record nothing.
    #[must_use]
    pub fn global() -> Self {
        Self::new(&opentelemetry::global::meter_provider().meter(INSTRUMENTATION_SCOPE))
    }

    /// The cache instruments bound to the cache named `cache`, with their
    /// attributes built once: recording through the handle allocates
    /// nothing, which keeps a cache hit cheap.
    #[must_use]
    pub fn cache(&self, cache: &str) -> CacheMetrics {
        let name = KeyValue::new(ATTR_CACHE, Arc::<str>::from(cache));
        let tier = |tier: CacheTier| {
            Arc::from([name.clone(), KeyValue::new(ATTR_CACHE_TIER, tier.as_str())])
        };
        CacheMetrics {
            hits: self.cache_hits.clone(),
            misses: self.cache_misses.clone(),
            local_hit: tier(CacheTier::Local),
            remote_hit: tier(CacheTier::Remote),
            miss: Arc::from([name]),
        }
    }

    /// Records one append call: `events` stored on success, a conflict, or
    /// an error; and its duration.
    pub fn record_append(
        &self,
        category: &str,
        events: u64,
        duration: Duration,
        outcome: AppendOutcome,
    ) {
        let category = KeyValue::new(ATTR_STREAM_CATEGORY, category.to_owned());
        let outcome_value = match outcome {
            AppendOutcome::Ok => OUTCOME_OK,
            AppendOutcome::Conflict => OUTCOME_CONFLICT,
            AppendOutcome::Error => OUTCOME_ERROR,
        };
        match outcome {
            AppendOutcome::Ok => self
                .appended_events
                .add(events, std::slice::from_ref(&category)),
            AppendOutcome::Conflict => self
                .append_conflicts
                .add(1, std::slice::from_ref(&category)),
            AppendOutcome::Error => {}
        }
        self.append_duration.record(
            duration.as_secs_f64(),
            &[category, KeyValue::new(ATTR_OUTCOME, outcome_value)],
        );
    }

    /// Records one publish call of `messages` messages to `topic`.
    pub fn record_publish(&self, topic: &str, messages: u64, duration: Duration, ok: bool) {
        let attrs = [
            KeyValue::new(ATTR_TOPIC, topic.to_owned()),
            KeyValue::new(ATTR_OUTCOME, if ok { OUTCOME_OK } else { OUTCOME_ERROR }),
        ];
        self.published_messages.add(messages, &attrs);
        self.publish_duration.record(duration.as_secs_f64(), &attrs);
    }

    /// Records one handled delivery: ack or nack counter, and the handler's
    /// duration by outcome. A rejection is neither acked nor nacked here:
    /// record the dead letter with [`record_dead_letter`](Self::record_dead_letter).
    pub fn record_handled(&self, subscription: &str, duration: Duration, outcome: HandleOutcome) {
        let sub = KeyValue::new(ATTR_SUBSCRIPTION, subscription.to_owned());
        let outcome_value = match outcome {
            HandleOutcome::Ack => {
                self.acks.add(1, std::slice::from_ref(&sub));
                OUTCOME_OK
            }
            HandleOutcome::Retry => {
                self.nacks.add(1, std::slice::from_ref(&sub));
                OUTCOME_RETRY
            }
            HandleOutcome::Reject => OUTCOME_REJECT,
            HandleOutcome::RetriesExhausted => OUTCOME_RETRY,
        };
        self.handler_duration.record(
            duration.as_secs_f64(),
            &[sub, KeyValue::new(ATTR_OUTCOME, outcome_value)],
        );
    }

    /// Records a message sent to the dead-letter topic.
    pub fn record_dead_letter(&self, subscription: &str, reason: DeadLetterReason) {
        let reason = match reason {
            DeadLetterReason::Rejected => REASON_REJECTED,
            DeadLetterReason::AttemptsExhausted => REASON_ATTEMPTS_EXHAUSTED,
        };
        self.dead_letters.add(
            1,
            &[
                KeyValue::new(ATTR_SUBSCRIPTION, subscription.to_owned()),
                KeyValue::new(ATTR_REASON, reason),
            ],
        );
    }

    /// Records a cache hit in `tier` of the cache named `cache`.
    pub fn record_cache_hit(&self, cache: &str, tier: CacheTier) {
        self.cache_hits.add(
            1,
            &[
                KeyValue::new(ATTR_CACHE, cache.to_owned()),
                KeyValue::new(ATTR_CACHE_TIER, tier.as_str()),
            ],
        );
    }

    /// Records a cache miss (the loader ran or will run).
    pub fn record_cache_miss(&self, cache: &str) {
        self.cache_misses
            .add(1, &[KeyValue::new(ATTR_CACHE, cache.to_owned())]);
    }

    /// Records a pool's current size and idle connections.
    pub fn record_pool(&self, pool: &str, size: u64, idle: u64) {
        let attrs = [KeyValue::new(ATTR_POOL, pool.to_owned())];
        self.pool_size.record(size, &attrs);
        self.pool_idle.record(idle, &attrs);
    }

    /// Records how long acquiring a connection from `pool` waited.
    pub fn record_pool_wait(&self, pool: &str, waited: Duration) {
        self.pool_wait.record(
            waited.as_secs_f64(),
            &[KeyValue::new(ATTR_POOL, pool.to_owned())],
        );
    }

    /// Records an outbox relay's lag (age of its oldest unpublished entry,
    /// zero when none) and how many entries wait.
    pub fn record_outbox(&self, relay: &str, lag: Duration, pending: u64) {
        let attrs = [KeyValue::new(ATTR_RELAY, relay.to_owned())];
        self.outbox_lag.record(lag.as_secs_f64(), &attrs);
        self.outbox_pending.record(pending, &attrs);
    }

    /// Records a projection's (or subscription's) lag in time and in
    /// events, and its parked events.
    pub fn record_projection(&self, projection: &str, lag: Duration, lag_events: u64, parked: u64) {
        let attrs = [KeyValue::new(ATTR_PROJECTION, projection.to_owned())];
        self.projection_lag.record(lag.as_secs_f64(), &attrs);
        self.projection_lag_events.record(lag_events, &attrs);
        self.projection_parked.record(parked, &attrs);
    }

    /// Records one command through the pipeline: its duration by command
    /// type and outcome.
    pub fn record_command(&self, command_type: &str, duration: Duration, outcome: CommandOutcome) {
        self.command_duration.record(
            duration.as_secs_f64(),
            &[
                KeyValue::new(ATTR_COMMAND_TYPE, command_type.to_owned()),
                KeyValue::new(ATTR_OUTCOME, outcome.as_str()),
            ],
        );
    }

    /// Records a batch handled by the event-store subscription `name`:
    /// `events` handled, and its lag (the age of the last of them while
    /// more wait, zero once caught up).
    pub fn record_subscription(&self, name: &str, events: u64, lag: Duration) {
        let attrs = [KeyValue::new(ATTR_EVENTSTORE_SUBSCRIPTION, name.to_owned())];
        if events > 0 {
            self.subscription_events.add(events, &attrs);
        }
        self.subscription_lag.record(lag.as_secs_f64(), &attrs);
    }

    /// Records that the event-store subscription `name` stopped because its
    /// handler failed.
    pub fn record_subscription_failure(&self, name: &str) {
        self.subscription_failures.add(
            1,
            &[KeyValue::new(ATTR_EVENTSTORE_SUBSCRIPTION, name.to_owned())],
        );
    }

    /// Records an audit record for a command of `command_type` that could
    /// not be appended.
    pub fn record_audit_failure(&self, command_type: &str) {
        self.audit_append_failures.add(
            1,
            &[KeyValue::new(ATTR_COMMAND_TYPE, command_type.to_owned())],
        );
    }
}

/// The cache counters bound to one cache's attributes (from
/// [`KeelMetrics::cache`]). Cheap to clone; recording allocates nothing.
#[derive(Clone)]
pub struct CacheMetrics {
    hits: Counter<u64>,
    misses: Counter<u64>,
    local_hit: Arc<[KeyValue]>,
    remote_hit: Arc<[KeyValue]>,
    miss: Arc<[KeyValue]>,
}

impl fmt::Debug for CacheMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CacheMetrics")
            .field("attributes", &self.miss)
            .finish_non_exhaustive()
    }
}

impl CacheMetrics {
    /// Records a hit in `tier` (`keel.cache.hits`).
    pub fn hit(&self, tier: CacheTier) {
        let attrs = match tier {
            CacheTier::Local => &self.local_hit,
            CacheTier::Remote => &self.remote_hit,
        };
        self.hits.add(1, attrs);
    }

    /// Records a miss (`keel.cache.misses`).
    pub fn miss(&self) {
        self.misses.add(1, &self.miss);
    }
}
