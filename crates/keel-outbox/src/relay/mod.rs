//! The relay: publishes committed outbox rows to the bus.

//!
//! * `source`: what a relay needs from an outbox backend;
//! * `claim`: the PostgreSQL backend (claiming rows under row locks,
//!   recording the outcome, pruning, `LISTEN`); the in-memory one is in
//!   `crate::memory`;
//! * `publish`: sending a batch to the bus, one call per topic;
//! * `run`: the loop, the background task and its handle.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use keel_core::EventPublisher;
use keel_telemetry::KeelMetrics;
use sqlx::PgPool;
use tracing::debug;

use crate::error::{OutboxError, Result};
use source::Source;

mod claim;
pub(crate) mod publish;
mod run;
pub(crate) mod source;

pub use run::RelayHandle;

/// How a [`Relay`] claims, publishes, retries and prunes.
///
/// Build it from [`RelayConfig::default`] and the `with_*` methods;
/// [`Relay::new`] checks it.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct RelayConfig {
    /// A name for logs, e.g. the host name.
    pub name: String,
    /// Most rows claimed and published per batch. Default 100.
    pub batch_size: usize,
    /// How many of the oldest unpublished rows a claim looks at to find
    /// aggregates to work on. Larger spreads work over more aggregates when a
    /// few aggregates have long backlogs; it bounds the cost of a claim.
    /// Default 1000.
    pub scan_window: usize,
    /// How often to look for rows when no notification arrives: the
    /// fallback for lost notifications and for retries that fall due.
    /// Default 1 s.
    pub poll_interval: Duration,
    /// How long one publish call may take before it counts as failed.
    /// Default 30 s.
    pub publish_timeout: Duration,
    /// The first retry delay after a failed publish; it doubles per attempt
    /// (with ±25 % jitter). Default 1 s.
    pub retry_min: Duration,
    /// The longest retry delay. Default 5 min.
    pub retry_max: Duration,
    /// How long published rows are kept before pruning. `Duration::ZERO`
    /// deletes rows as soon as they are published. Default 7 days.
    pub retention: Duration,
    /// How often a running relay prunes. Default 1 min.
    pub prune_interval: Duration,
    /// How often a running relay samples the backlog into
    /// `keel.outbox.lag` and `keel.outbox.pending` (one aggregate query
    /// over the unpublished rows). Default 15 s.
    pub metrics_interval: Duration,
    /// Only rows of these aggregate types are claimed; `None` (the default)
    /// claims every row. Relays given disjoint sets split the outbox
    /// between them, say one per busy aggregate type; every type needs a
    /// relay. An aggregate's rows all share its type, so its order is kept
    /// whichever relay has it.
    pub aggregate_types: Option<Vec<String>>,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            name: "outbox-relay".to_owned(),
            batch_size: 100,
            scan_window: 1000,
            poll_interval: Duration::from_secs(1),
            publish_timeout: Duration::from_secs(30),
            retry_min: Duration::from_secs(1),
            retry_max: Duration::from_secs(300),
            retention: Duration::from_secs(7 * 24 * 3600),
            prune_interval: Duration::from_secs(60),
            metrics_interval: Duration::from_secs(15),
            aggregate_types: None,
        }
    }
}

impl RelayConfig {
    /// Sets [`name`](Self::name).
    #[must_use]
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Sets [`batch_size`](Self::batch_size).
    #[must_use]
    pub fn with_batch_size(mut self, n: usize) -> Self {
        self.batch_size = n;
        self
    }

    /// Sets [`scan_window`](Self::scan_window).
    #[must_use]
    pub fn with_scan_window(mut self, n: usize) -> Self {
        self.scan_window = n;
        self
    }

    /// Sets [`poll_interval`](Self::poll_interval).
    #[must_use]
    pub fn with_poll_interval(mut self, d: Duration) -> Self {
        self.poll_interval = d;
        self
    }

    /// Sets [`publish_timeout`](Self::publish_timeout).
    #[must_use]
    pub fn with_publish_timeout(mut self, d: Duration) -> Self {
        self.publish_timeout = d;
        self
    }

    /// Sets [`retry_min`](Self::retry_min) and [`retry_max`](Self::retry_max).
    #[must_use]
    pub fn with_retry_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.retry_min = min;
        self.retry_max = max;
        self
    }

    /// Sets [`retention`](Self::retention).
    #[must_use]
    pub fn with_retention(mut self, d: Duration) -> Self {
        self.retention = d;
        self
    }

    /// Sets [`prune_interval`](Self::prune_interval).
    #[must_use]
    pub fn with_prune_interval(mut self, d: Duration) -> Self {
        self.prune_interval = d;
        self
    }

    /// Sets [`metrics_interval`](Self::metrics_interval).
    #[must_use]
    pub fn with_metrics_interval(mut self, d: Duration) -> Self {
        self.metrics_interval = d;
        self
    }

    /// Sets [`aggregate_types`](Self::aggregate_types): this relay claims
    /// only rows of these aggregate types.
    #[must_use]
    pub fn with_aggregate_types<I, T>(mut self, types: I) -> Self
    where
        I: IntoIterator<Item = T>,
        T: Into<String>,
    {
        self.aggregate_types = Some(types.into_iter().map(Into::into).collect());
        self
    }

    fn validate(&self) -> Result<()> {
        let bad = |field: &'static str, reason: &str| Err(OutboxError::invalid(field, reason));
        if !(1..=10_000).contains(&self.batch_size) {
            return bad("batch_size", "must be between 1 and 10000");
        }
        if self.scan_window < self.batch_size || self.scan_window > 1_000_000 {
            return bad("scan_window", "must be between batch_size and 1000000");
        }
        if self.poll_interval.is_zero() {
            return bad("poll_interval", "must be positive");
        }
        if self.publish_timeout.is_zero() {
            return bad("publish_timeout", "must be positive");
        }
        if self.retry_min.is_zero() || self.retry_max < self.retry_min {
            return bad("retry_min", "must be positive and at most retry_max");
        }
        if self.prune_interval.is_zero() {
            return bad("prune_interval", "must be positive");
        }
        if self.metrics_interval.is_zero() {
            return bad("metrics_interval", "must be positive");
        }
        if i64::try_from(self.retention.as_micros()).is_err() {
            return bad("retention", "is too long");
        }
        if self.aggregate_types.as_ref().is_some_and(Vec::is_empty) {
            return bad(
                "aggregate_types",
                "must name at least one type (leave it unset to relay every row)",
            );
        }
        Ok(())
    }
}

/// What one [`Relay::relay_once`] call did.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
#[non_exhaustive]
pub struct RelayReport {
    /// Rows claimed.
    pub claimed: usize,
    /// Rows published and marked (or deleted).
    pub published: usize,
    /// Rows whose publish failed (or that could not be read); they are
    /// retried after a backoff, and their aggregates' later rows wait.
    pub failed: usize,
}

/// A snapshot of the outbox's backlog, for health checks and metrics.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
#[non_exhaustive]
pub struct OutboxStats {
    /// Rows committed and not yet published.
    pub pending: u64,
    /// Unpublished rows whose last publish failed: each holds back its
    /// aggregate until a retry succeeds. Non-zero for long means a poison
    /// row or a broken topic (see `last_error` in `keel.outbox`).
    pub retrying: u64,
    /// How long the oldest unpublished row has waited: the relay's lag.
    pub oldest_pending_age: Option<Duration>,
}

impl OutboxStats {
    /// Reads the current figures.
    ///
    /// # Errors
    ///
    /// [`OutboxError::Database`] when PostgreSQL fails.
    pub async fn load(pool: &PgPool) -> Result<Self> {
        let row = sqlx::query!(
            r#"SELECT count(*) AS "pending!", count(*) FILTER (WHERE attempts > 0) AS "retrying!",
                      extract(epoch FROM now() - min(created_at))::float8 AS age
               FROM keel.outbox WHERE published_at IS NULL"#,
        )
        .fetch_one(pool)
        .await?;
        Ok(Self {
            pending: u64::try_from(row.pending).unwrap_or(0),
            retrying: u64::try_from(row.retrying).unwrap_or(0),
            oldest_pending_age: row.age.map(|secs| Duration::from_secs_f64(secs.max(0.0))),
        })
    }
}

/// Publishes committed outbox rows to the bus, oldest first, one aggregate's
/// rows in commit order.
///
/// One type for both backends: [`Relay::new`] for the PostgreSQL outbox
/// ([`PgOutbox`](crate::PgOutbox)), [`Relay::in_memory`] for an
/// [`InMemoryOutbox`](crate::InMemoryOutbox). The guarantees are the same:
/// rows committed are published at least once, rows rolled back never,
/// each aggregate's rows in commit order; a failed publish is retried with
/// backoff and holds back only its own aggregate.
///
/// Any number of relays (in one process or many) can share an outbox; see
/// the crate documentation for how they divide the work and what happens on
/// failure. A running PostgreSQL relay holds two pooled connections: one
/// listening for notifications, one for the batch in flight.
pub struct Relay {
    source: Arc<dyn Source>,
    publisher: Arc<dyn EventPublisher>,
    config: RelayConfig,
    metrics: KeelMetrics,
}

impl fmt::Debug for Relay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Relay")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Relay {
    /// A relay publishing the rows of `pool`'s `keel.outbox` through
    /// `publisher`.
    ///
    /// # Errors
    ///
    /// [`OutboxError::Invalid`] when `config` is out of range.
    pub fn new(
        pool: PgPool,
        publisher: Arc<dyn EventPublisher>,
        config: RelayConfig,
    ) -> Result<Self> {
        Self::with_source(Arc::new(claim::PgSource { pool }), publisher, config)
    }

    /// A relay publishing the rows of an in-memory outbox through
    /// `publisher`.
    ///
    /// # Errors
    ///
    /// [`OutboxError::Invalid`] when `config` is out of range.
    pub fn in_memory(
        outbox: &crate::InMemoryOutbox,
        publisher: Arc<dyn EventPublisher>,
        config: RelayConfig,
    ) -> Result<Self> {
        Self::with_source(outbox.source(), publisher, config)
    }

    fn with_source(
        source: Arc<dyn Source>,
        publisher: Arc<dyn EventPublisher>,
        config: RelayConfig,
    ) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            source,
            publisher,
            config,
            metrics: KeelMetrics::global(),
        })
    }

    /// Records `keel.outbox.lag` and `keel.outbox.pending` through
    /// `metrics` instead of the global meter provider's instruments taken
    /// in [`new`](Self::new).
    #[must_use]
    pub fn with_metrics(mut self, metrics: KeelMetrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// The outbox's backlog.
    ///
    /// # Errors
    ///
    /// [`OutboxError::Database`] when PostgreSQL fails.
    pub async fn stats(&self) -> Result<OutboxStats> {
        self.source.stats().await
    }

    /// Reads the backlog ([`stats`](Self::stats)) and records it as
    /// `keel.outbox.lag` (age of the oldest unpublished row, zero when there
    /// is none) and `keel.outbox.pending`, under this relay's name. A
    /// running relay does this every
    /// [`metrics_interval`](RelayConfig::metrics_interval); relays sharing
    /// an outbox all report the same backlog.
    ///
    /// # Errors
    ///
    /// [`OutboxError::Database`] when PostgreSQL fails.
    pub async fn record_metrics(&self) -> Result<OutboxStats> {
        let stats = self.stats().await?;
        self.metrics.record_outbox(
            &self.config.name,
            stats.oldest_pending_age.unwrap_or_default(),
            stats.pending,
        );
        Ok(stats)
    }

    /// The relay's configuration.
    #[must_use]
    pub fn config(&self) -> &RelayConfig {
        &self.config
    }

    /// Claims one batch, publishes it and marks what was published. On
    /// PostgreSQL all in one transaction that holds the claimed aggregates'
    /// head rows locked until the marks commit; in memory under a lease on
    /// the claimed aggregates.
    ///
    /// A failed publish is recorded on its aggregate's first unpublished row
    /// (attempts, last error, next retry time); that aggregate's later rows
    /// wait for it, other aggregates carry on. If the relay dies after
    /// publishing and before marking, its claim goes with it and a relay
    /// publishes the rows again: at-least-once.
    ///
    /// # Errors
    ///
    /// [`OutboxError::Database`] when PostgreSQL fails; publish failures are
    /// not errors here, they are counted in [`RelayReport::failed`].
    pub async fn relay_once(&self) -> Result<RelayReport> {
        let Some(batch) = self.source.claim(&self.config).await? else {
            return Ok(RelayReport::default());
        };
        let outcome = self.publish(&batch.rows).await;
        batch.lease.settle(&outcome, &self.config).await?;
        let report = RelayReport {
            claimed: batch.rows.len(),
            published: outcome.published.len(),
            failed: outcome.failures.len(),
        };
        debug!(relay = %self.config.name, ?report, "outbox batch done");
        Ok(report)
    }

    /// Deletes published rows older than the
    /// [`retention`](RelayConfig::retention) period; returns how many it
    /// deleted.
    ///
    /// # Errors
    ///
    /// [`OutboxError::Database`] when PostgreSQL fails.
    pub async fn prune(&self) -> Result<u64> {
        self.source.prune(self.config.retention).await
    }
}

#[cfg(test)]
mod tests {
    use super::run::backoff;
    use super::source::truncate;
    use super::*;

    #[test]
    fn config_is_checked() {
        assert!(RelayConfig::default().validate().is_ok());
        let cases = [
            (RelayConfig::default().with_batch_size(0), "batch_size"),
            (RelayConfig::default().with_scan_window(10), "scan_window"),
            (
                RelayConfig::default().with_poll_interval(Duration::ZERO),
                "poll_interval",
            ),
            (
                RelayConfig::default()
                    .with_retry_backoff(Duration::from_secs(2), Duration::from_secs(1)),
                "retry_min",
            ),
            (
                RelayConfig::default().with_aggregate_types(Vec::<String>::new()),
                "aggregate_types",
            ),
        ];
        for (config, field) in cases {
            match config.validate() {
                Err(OutboxError::Invalid { field: f, .. }) => assert_eq!(f, field),
                other => panic!("expected invalid {field}, got {other:?}"),
            }
        }
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(1));
        assert_eq!(backoff(min, max, 0), min);
        assert_eq!(backoff(min, max, 2), Duration::from_millis(400));
        assert_eq!(backoff(min, max, 30), max);
    }

    #[test]
    fn truncation_respects_char_boundaries() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("abc", 10), "abc");
    }
}
