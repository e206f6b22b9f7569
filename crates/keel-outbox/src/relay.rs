//! The relay: publishes committed outbox rows to the bus.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use keel_core::{EventId, EventPublisher, Message, Metadata};
use keel_telemetry::KeelMetrics;
use sqlx::postgres::PgListener;
use sqlx::{PgConnection, PgPool};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::error::{OutboxError, Result};
use crate::writer::NOTIFY_CHANNEL;

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
        let (pending, retrying, age): (i64, i64, Option<f64>) = sqlx::query_as(
            "SELECT count(*), count(*) FILTER (WHERE attempts > 0), \
                    extract(epoch FROM now() - min(created_at))::float8 \
             FROM keel.outbox WHERE published_at IS NULL",
        )
        .fetch_one(pool)
        .await?;
        Ok(Self {
            pending: u64::try_from(pending).unwrap_or(0),
            retrying: u64::try_from(retrying).unwrap_or(0),
            oldest_pending_age: age.map(|secs| Duration::from_secs_f64(secs.max(0.0))),
        })
    }
}

/// Publishes committed outbox rows to the bus, oldest first, one aggregate's
/// rows in commit order.
///
/// Any number of relays (in one process or many) can share an outbox; see
/// the crate documentation for how they divide the work and what happens on
/// failure. Each running relay holds two pooled connections: one listening
/// for notifications, one for the batch in flight.
pub struct Relay {
    pool: PgPool,
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

#[derive(sqlx::FromRow)]
struct Row {
    id: i64,
    event_id: uuid::Uuid,
    topic: String,
    aggregate_type: String,
    aggregate_id: String,
    event_type: String,
    schema_version: i32,
    payload: serde_json::Value,
    metadata: serde_json::Value,
    ordering_key: Option<String>,
}

impl Row {
    fn to_message(&self) -> Result<Message> {
        let metadata: Metadata =
            serde_json::from_value(self.metadata.clone()).map_err(|e| OutboxError::CorruptRow {
                id: self.id,
                reason: format!("metadata: {e}"),
            })?;
        let schema_version =
            u32::try_from(self.schema_version).map_err(|_| OutboxError::CorruptRow {
                id: self.id,
                reason: "negative schema_version".to_owned(),
            })?;
        let mut message = Message::new(self.event_type.clone(), self.payload.clone())
            .with_event_id(EventId::from_uuid(self.event_id))
            .with_metadata(metadata);
        message.schema_version = schema_version;
        message.ordering_key = Some(
            self.ordering_key
                .clone()
                .unwrap_or_else(|| format!("{}-{}", self.aggregate_type, self.aggregate_id)),
        );
        Ok(message)
    }
}

// Claims work for one batch. An aggregate's head is its oldest unpublished
// row; a relay works on an aggregate only while it holds the head's row lock
// (`FOR UPDATE SKIP LOCKED`), and a row is only a head if no older row of its
// aggregate is unpublished, so two relays never work on one aggregate at the
// same time. Aggregates waiting to retry a failed publish are left out, and
// so are aggregate types the relay is not configured for ($3, NULL for all).
// The claimed aggregates' following rows ride along in id order, sharing the
// batch; they need no lock of their own: every other relay sees the held
// head as unpublished, so none of them can treat a later row as a head.
const CLAIM: &str = "\
WITH candidates AS (
    SELECT o.id, o.aggregate_type, o.aggregate_id
    FROM keel.outbox o
    WHERE o.published_at IS NULL
      AND ($3::text[] IS NULL OR o.aggregate_type = ANY($3::text[]))
      AND NOT EXISTS (
          SELECT 1 FROM keel.outbox b
          WHERE b.aggregate_type = o.aggregate_type
            AND b.aggregate_id = o.aggregate_id
            AND b.published_at IS NULL
            AND b.retry_at IS NOT NULL
            AND b.retry_at > now())
    ORDER BY o.id
    LIMIT $2
), heads AS (
    SELECT o.id, o.aggregate_type, o.aggregate_id
    FROM keel.outbox o
    WHERE o.id IN (
            SELECT DISTINCT ON (c.aggregate_type, c.aggregate_id) c.id
            FROM candidates c
            ORDER BY c.aggregate_type, c.aggregate_id, c.id)
      AND o.published_at IS NULL
      -- Re-checked on the row's latest version when it is locked: another
      -- relay may just have recorded a failed attempt on it.
      AND (o.retry_at IS NULL OR o.retry_at <= now())
      AND NOT EXISTS (
          SELECT 1 FROM keel.outbox p
          WHERE p.aggregate_type = o.aggregate_type
            AND p.aggregate_id = o.aggregate_id
            AND p.published_at IS NULL
            AND p.id < o.id)
    ORDER BY o.id
    LIMIT $1
    FOR UPDATE SKIP LOCKED
), claimed AS (
    SELECT r.*, row_number() OVER (PARTITION BY h.id ORDER BY r.id) AS rank
    FROM heads h
    CROSS JOIN LATERAL (
        SELECT o.id, o.event_id, o.topic, o.aggregate_type, o.aggregate_id, o.event_type,
               o.schema_version, o.payload, o.metadata, o.ordering_key
        FROM keel.outbox o
        WHERE o.aggregate_type = h.aggregate_type
          AND o.aggregate_id = h.aggregate_id
          AND o.published_at IS NULL
          AND o.id >= h.id
        ORDER BY o.id
        LIMIT (($1 + (SELECT count(*) FROM heads) - 1) / (SELECT count(*) FROM heads))
    ) r
)
SELECT id, event_id, topic, aggregate_type, aggregate_id, event_type, schema_version,
       payload, metadata, ordering_key
FROM claimed
ORDER BY rank, id
LIMIT $1";

impl Relay {
    /// A relay publishing `pool`'s outbox rows through `publisher`.
    ///
    /// # Errors
    ///
    /// [`OutboxError::Invalid`] when `config` is out of range.
    pub fn new(
        pool: PgPool,
        publisher: Arc<dyn EventPublisher>,
        config: RelayConfig,
    ) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            pool,
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

    /// Reads the backlog ([`OutboxStats::load`]) and records it as
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
        let stats = OutboxStats::load(&self.pool).await?;
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

    /// Claims one batch, publishes it and marks what was published, in one
    /// transaction that holds the claimed aggregates' head rows locked until
    /// the marks commit.
    ///
    /// A failed publish is recorded on its aggregate's first unpublished row
    /// (attempts, last error, next retry time); that aggregate's later rows
    /// wait for it, other aggregates carry on. If the relay dies after
    /// publishing and before committing, the locks go with its connection and
    /// another relay publishes the rows again: at-least-once.
    ///
    /// # Errors
    ///
    /// [`OutboxError::Database`] when PostgreSQL fails; publish failures are
    /// not errors here, they are counted in [`RelayReport::failed`].
    pub async fn relay_once(&self) -> Result<RelayReport> {
        let mut tx = self.pool.begin().await?;
        let rows: Vec<Row> = sqlx::query_as(CLAIM)
            .bind(as_i64(self.config.batch_size))
            .bind(as_i64(self.config.scan_window))
            .bind(&self.config.aggregate_types)
            .fetch_all(&mut *tx)
            .await?;
        if rows.is_empty() {
            tx.commit().await?;
            return Ok(RelayReport::default());
        }

        let outcome = self.publish(&rows).await;
        self.mark(&mut tx, &outcome).await?;
        tx.commit().await?;

        let report = RelayReport {
            claimed: rows.len(),
            published: outcome.published.len(),
            failed: outcome.failures.len(),
        };
        debug!(relay = %self.config.name, ?report, "outbox batch done");
        Ok(report)
    }

    async fn publish(&self, rows: &[Row]) -> Outcome {
        // The first failed row of each aggregate: it and everything after it
        // in that aggregate stay unpublished, so order holds on retry.
        let mut failed_from: HashMap<(&str, &str), i64> = HashMap::new();
        let mut failures: Vec<(i64, String)> = Vec::new();
        let mut messages: Vec<Option<Message>> = Vec::with_capacity(rows.len());
        for row in rows {
            match row.to_message() {
                Ok(m) => messages.push(Some(m)),
                Err(e) => {
                    warn!(relay = %self.config.name, error = %e, "unreadable outbox row");
                    failed_from
                        .entry((&row.aggregate_type, &row.aggregate_id))
                        .or_insert(row.id);
                    failures.push((row.id, e.to_string()));
                    messages.push(None);
                }
            }
        }

        // One publish call per topic, in id order within it; topics in order
        // of their first row.
        let mut topics: Vec<(&str, Vec<usize>)> = Vec::new();
        for (i, row) in rows.iter().enumerate() {
            match topics.iter_mut().find(|(t, _)| *t == row.topic) {
                Some((_, idx)) => idx.push(i),
                None => topics.push((&row.topic, vec![i])),
            }
        }

        for (topic, indices) in topics {
            let send: Vec<usize> = indices
                .into_iter()
                .filter(|&i| {
                    let row = &rows[i];
                    messages[i].is_some()
                        && failed_from
                            .get(&(row.aggregate_type.as_str(), row.aggregate_id.as_str()))
                            .is_none_or(|&f| row.id < f)
                })
                .collect();
            if send.is_empty() {
                continue;
            }
            let batch: Vec<Message> = send.iter().filter_map(|&i| messages[i].clone()).collect();
            let result = tokio::time::timeout(
                self.config.publish_timeout,
                self.publisher.publish(topic, &batch),
            )
            .await;
            let error = match result {
                Ok(Ok(())) => continue,
                Ok(Err(source)) => OutboxError::Publish {
                    topic: topic.to_owned(),
                    source,
                },
                Err(_) => OutboxError::PublishTimeout {
                    topic: topic.to_owned(),
                    after: self.config.publish_timeout,
                },
            };
            warn!(relay = %self.config.name, %topic, messages = batch.len(), error = %error,
                  source = ?std::error::Error::source(&error), "outbox publish failed; will retry");
            let reason = match std::error::Error::source(&error) {
                Some(source) => format!("{error}: {source}"),
                None => error.to_string(),
            };
            for i in send {
                let row = &rows[i];
                let first = failed_from
                    .entry((&row.aggregate_type, &row.aggregate_id))
                    .or_insert(row.id);
                *first = (*first).min(row.id);
                failures.push((row.id, reason.clone()));
            }
        }

        let published = rows
            .iter()
            .zip(&messages)
            .filter(|(row, m)| {
                m.is_some()
                    && failed_from
                        .get(&(row.aggregate_type.as_str(), row.aggregate_id.as_str()))
                        .is_none_or(|&f| row.id < f)
            })
            .map(|(row, _)| row.id)
            .collect();
        // Only each aggregate's first failure carries the retry schedule.
        let heads: Vec<i64> = failed_from.values().copied().collect();
        failures.retain(|(id, _)| heads.contains(id));
        Outcome {
            published,
            failures,
        }
    }

    async fn mark(&self, conn: &mut PgConnection, outcome: &Outcome) -> Result<()> {
        if !outcome.published.is_empty() {
            if self.config.retention.is_zero() {
                sqlx::query("DELETE FROM keel.outbox WHERE id = ANY($1)")
                    .bind(&outcome.published)
                    .execute(&mut *conn)
                    .await?;
            } else {
                sqlx::query("UPDATE keel.outbox SET published_at = now() WHERE id = ANY($1)")
                    .bind(&outcome.published)
                    .execute(&mut *conn)
                    .await?;
            }
        }
        if !outcome.failures.is_empty() {
            let ids: Vec<i64> = outcome.failures.iter().map(|(id, _)| *id).collect();
            let errors: Vec<String> = outcome
                .failures
                .iter()
                .map(|(_, e)| truncate(e, 2000))
                .collect();
            sqlx::query(
                "UPDATE keel.outbox AS o \
                 SET attempts = o.attempts + 1, \
                     last_error = f.error, \
                     retry_at = now() + least($3::float8, \
                                              $2::float8 * power(2::float8, least(o.attempts, 40))) \
                                        * (0.75 + random() * 0.5) * interval '1 millisecond' \
                 FROM unnest($1::int8[], $4::text[]) AS f(id, error) \
                 WHERE o.id = f.id",
            )
            .bind(&ids)
            .bind(self.config.retry_min.as_secs_f64() * 1000.0)
            .bind(self.config.retry_max.as_secs_f64() * 1000.0)
            .bind(&errors)
            .execute(&mut *conn)
            .await?;
        }
        Ok(())
    }

    /// Deletes published rows older than the retention period, in chunks;
    /// returns how many it deleted.
    ///
    /// # Errors
    ///
    /// [`OutboxError::Database`] when PostgreSQL fails.
    pub async fn prune(&self) -> Result<u64> {
        let retention = i64::try_from(self.config.retention.as_micros()).unwrap_or(i64::MAX);
        let mut total = 0;
        loop {
            let deleted = sqlx::query(
                "DELETE FROM keel.outbox WHERE id IN ( \
                     SELECT id FROM keel.outbox \
                     WHERE published_at IS NOT NULL \
                       AND published_at < now() - $1 * interval '1 microsecond' \
                     LIMIT 10000 \
                     FOR UPDATE SKIP LOCKED)",
            )
            .bind(retention)
            .execute(&self.pool)
            .await?
            .rows_affected();
            total += deleted;
            if deleted < 10_000 {
                return Ok(total);
            }
        }
    }

    /// Runs until `shutdown` completes: publishes whatever is pending, then
    /// waits for a notification (or the poll interval), and prunes every
    /// [`prune_interval`](RelayConfig::prune_interval).
    ///
    /// Database and bus failures are logged and retried with backoff; they
    /// never end the loop. On shutdown the batch in flight is finished and
    /// committed first, so stopping never causes a duplicate.
    pub async fn run<F>(self, shutdown: F)
    where
        F: Future<Output = ()> + Send,
    {
        let wake = Arc::new(Notify::new());
        let listener = tokio::spawn(listen(
            self.pool.clone(),
            wake.clone(),
            self.config.name.clone(),
        ));
        let mut shutdown = std::pin::pin!(shutdown);
        let mut next_prune = Instant::now();
        let mut next_sample = Instant::now();
        let mut errors: u32 = 0;
        info!(relay = %self.config.name, "outbox relay started");

        loop {
            if now_or_never(shutdown.as_mut()) {
                break;
            }
            if Instant::now() >= next_prune {
                match self.prune().await {
                    Ok(0) => {}
                    Ok(n) => debug!(relay = %self.config.name, pruned = n, "pruned outbox"),
                    Err(e) => {
                        warn!(relay = %self.config.name, error = %e, "pruning the outbox failed");
                    }
                }
                next_prune = Instant::now() + self.config.prune_interval;
            }
            if Instant::now() >= next_sample {
                if let Err(e) = self.record_metrics().await {
                    debug!(relay = %self.config.name, error = %e, "sampling the outbox backlog failed");
                }
                next_sample = Instant::now() + self.config.metrics_interval;
            }

            let pause = match self.relay_once().await {
                Ok(report) => {
                    errors = 0;
                    if report.claimed >= self.config.batch_size {
                        // There is probably more: go on at once.
                        continue;
                    }
                    None
                }
                Err(e) => {
                    errors = errors.saturating_add(1);
                    let delay = backoff(
                        self.config.retry_min,
                        self.config.retry_max,
                        errors.saturating_sub(1),
                    );
                    warn!(relay = %self.config.name, error = %e, ?delay, "outbox relay batch failed");
                    Some(delay)
                }
            };

            let wait = pause.unwrap_or(self.config.poll_interval);
            tokio::select! {
                () = &mut shutdown => break,
                () = wake.notified(), if pause.is_none() => {}
                () = tokio::time::sleep(wait) => {}
            }
        }
        listener.abort();
        info!(relay = %self.config.name, "outbox relay stopped");
    }

    /// Spawns [`run`](Self::run) on the current Tokio runtime.
    #[must_use]
    pub fn spawn(self) -> RelayHandle {
        let (stop, mut stopped) = watch::channel(false);
        let task = tokio::spawn(self.run(async move {
            // An error means the handle is gone: stop too.
            let _ = stopped.wait_for(|s| *s).await;
        }));
        RelayHandle { stop, task }
    }
}

/// A relay running in the background, from [`Relay::spawn`].
///
/// Dropping the handle stops the relay after its batch in flight.
#[derive(Debug)]
pub struct RelayHandle {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl RelayHandle {
    /// Stops the relay gracefully: the batch in flight is finished and
    /// committed, then the task ends.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        if let Err(e) = self.task.await
            && e.is_panic()
        {
            std::panic::resume_unwind(e.into_panic());
        }
    }

    /// Kills the relay at once, like a crash: a batch in flight is not
    /// marked, its rows are unlocked when the connection is rolled back, and
    /// another relay publishes them again.
    pub fn abort(&self) {
        self.task.abort();
    }

    /// Whether the relay has stopped.
    #[must_use]
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }
}

struct Outcome {
    published: Vec<i64>,
    failures: Vec<(i64, String)>,
}

/// Turns notifications on [`NOTIFY_CHANNEL`] into wake-ups, reconnecting
/// after failures. Notifications lost meanwhile are covered by polling.
async fn listen(pool: PgPool, wake: Arc<Notify>, name: String) {
    let mut failures: u32 = 0;
    loop {
        let result = async {
            let mut listener = PgListener::connect_with(&pool).await?;
            listener.listen(NOTIFY_CHANNEL).await?;
            // Anything committed while (re)connecting went unnoticed.
            wake.notify_one();
            loop {
                listener.recv().await?;
                wake.notify_one();
            }
            #[allow(unreachable_code)] // gives the async block its type
            Ok::<(), sqlx::Error>(())
        }
        .await;
        if let Err(e) = result {
            failures = failures.saturating_add(1);
            let delay = backoff(
                Duration::from_millis(200),
                Duration::from_secs(30),
                failures.min(20) - 1,
            );
            warn!(relay = %name, error = %e, ?delay, "outbox listener failed; polling meanwhile");
            tokio::time::sleep(delay).await;
        }
    }
}

fn backoff(min: Duration, max: Duration, attempt: u32) -> Duration {
    min.saturating_mul(1u32 << attempt.min(20)).min(max)
}

fn now_or_never<F: Future<Output = ()>>(f: std::pin::Pin<&mut F>) -> bool {
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    f.poll(&mut cx).is_ready()
}

fn as_i64(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

#[cfg(test)]
mod tests {
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
