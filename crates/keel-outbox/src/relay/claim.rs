//! The PostgreSQL relay source: claiming a batch of `keel.outbox` rows
//! under row locks, recording what became of it, pruning and listening.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use keel_core::{EventId, Message, Metadata};
use sqlx::postgres::PgListener;
use sqlx::{PgPool, Postgres};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tracing::warn;

use super::publish::Outcome;
use super::source::{Batch, Claimed, Lease, Source, truncate};
use super::{OutboxStats, RelayConfig};
use crate::error::{OutboxError, Result};
use crate::writer::NOTIFY_CHANNEL;

/// A claimed row, as the claim query returns it.
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

/// The outbox in `keel.outbox`, as relays see it.
#[derive(Debug)]
pub(crate) struct PgSource {
    pub(crate) pool: PgPool,
}

#[async_trait]
impl Source for PgSource {
    async fn claim(&self, config: &RelayConfig) -> Result<Option<Batch>> {
        let mut tx = self.pool.begin().await?;
        // Claims work for one batch. An aggregate's head is its oldest unpublished
        // row; a relay works on an aggregate only while it holds the head's row lock
        // (`FOR UPDATE SKIP LOCKED`), and a row is only a head if no older row of
        // its aggregate is unpublished, so two relays never work on one aggregate at
        // the same time. Aggregates waiting to retry a failed publish are left out,
        // and so are aggregate types the relay is not configured for ($3, NULL for
        // all). The claimed aggregates' following rows ride along in id order,
        // sharing the batch; they need no lock of their own: every other relay sees
        // the held head as unpublished, so none of them can treat a later row as a
        // head.
        //
        // The `"col!"` aliases tell sqlx what the table says (these columns
        // are NOT NULL), which it cannot see through the CTEs. The optional
        // filter is a parameter, not SQL built at run time, so the text is
        // fixed: the scan stays on `outbox_pending_idx` in id order with the
        // filter applied per row (checked with EXPLAIN, generic plan too).
        let rows: Vec<Row> = sqlx::query_as!(
            Row,
            r#"WITH candidates AS (
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
SELECT id AS "id!", event_id AS "event_id!", topic AS "topic!",
       aggregate_type AS "aggregate_type!", aggregate_id AS "aggregate_id!",
       event_type AS "event_type!", schema_version AS "schema_version!",
       payload AS "payload!", metadata AS "metadata!", ordering_key
FROM claimed
ORDER BY rank, id
LIMIT $1"#,
            as_i64(config.batch_size),
            as_i64(config.scan_window),
            config.aggregate_types.as_deref(),
        )
        .fetch_all(&mut *tx)
        .await?;
        if rows.is_empty() {
            tx.commit().await?;
            return Ok(None);
        }
        let rows = rows
            .into_iter()
            .map(|row| Claimed {
                id: row.id,
                message: row.to_message(),
                topic: row.topic,
                aggregate_type: row.aggregate_type,
                aggregate_id: row.aggregate_id,
            })
            .collect();
        Ok(Some(Batch {
            rows,
            lease: Box::new(PgLease { tx }),
        }))
    }

    async fn prune(&self, retention: Duration) -> Result<u64> {
        let retention = i64::try_from(retention.as_micros()).unwrap_or(i64::MAX);
        let mut total = 0;
        loop {
            let deleted = sqlx::query!(
                "DELETE FROM keel.outbox WHERE id IN ( \
                     SELECT id FROM keel.outbox \
                     WHERE published_at IS NOT NULL \
                       AND published_at < now() - $1::int8 * interval '1 microsecond' \
                     LIMIT 10000 \
                     FOR UPDATE SKIP LOCKED)",
                retention,
            )
            .execute(&self.pool)
            .await?
            .rows_affected();
            total += deleted;
            if deleted < 10_000 {
                return Ok(total);
            }
        }
    }

    async fn stats(&self) -> Result<OutboxStats> {
        OutboxStats::load(&self.pool).await
    }

    fn wake_on_commit(&self, wake: Arc<Notify>, relay: String) -> JoinHandle<()> {
        tokio::spawn(listen(self.pool.clone(), wake, relay))
    }
}

/// The claim's transaction: it holds the claimed aggregates' head rows
/// locked until the marks commit. Dropped, it rolls back and the locks go.
struct PgLease {
    tx: sqlx::Transaction<'static, Postgres>,
}

#[async_trait]
impl Lease for PgLease {
    async fn settle(self: Box<Self>, outcome: &Outcome, config: &RelayConfig) -> Result<()> {
        let mut tx = self.tx;
        if !outcome.published.is_empty() {
            if config.retention.is_zero() {
                sqlx::query!(
                    "DELETE FROM keel.outbox WHERE id = ANY($1)",
                    &outcome.published[..],
                )
                .execute(&mut *tx)
                .await?;
            } else {
                sqlx::query!(
                    "UPDATE keel.outbox SET published_at = now() WHERE id = ANY($1)",
                    &outcome.published[..],
                )
                .execute(&mut *tx)
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
            sqlx::query!(
                "UPDATE keel.outbox AS o \
                 SET attempts = o.attempts + 1, \
                     last_error = f.error, \
                     retry_at = now() + least($3::float8, \
                                              $2::float8 * power(2::float8, least(o.attempts, 40))) \
                                        * (0.75 + random() * 0.5) * interval '1 millisecond' \
                 FROM unnest($1::int8[], $4::text[]) AS f(id, error) \
                 WHERE o.id = f.id",
                &ids[..],
                config.retry_min.as_secs_f64() * 1000.0,
                config.retry_max.as_secs_f64() * 1000.0,
                &errors[..],
            )
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

fn as_i64(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
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
            let delay = super::run::backoff(
                Duration::from_millis(200),
                Duration::from_secs(30),
                failures.min(20) - 1,
            );
            warn!(relay = %name, error = %e, ?delay, "outbox listener failed; polling meanwhile");
            tokio::time::sleep(delay).await;
        }
    }
}
