//! Claiming a batch of outbox rows and recording what became of it.

use keel_core::{EventId, Message, Metadata};
use sqlx::PgConnection;
use tracing::debug;

use super::publish::Outcome;
use super::{Relay, RelayReport};
use crate::error::{OutboxError, Result};

#[derive(sqlx::FromRow)]
pub(super) struct Row {
    pub(super) id: i64,
    pub(super) event_id: uuid::Uuid,
    pub(super) topic: String,
    pub(super) aggregate_type: String,
    pub(super) aggregate_id: String,
    pub(super) event_type: String,
    pub(super) schema_version: i32,
    pub(super) payload: serde_json::Value,
    pub(super) metadata: serde_json::Value,
    pub(super) ordering_key: Option<String>,
}

impl Row {
    pub(super) fn to_message(&self) -> Result<Message> {
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
}

fn as_i64(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

pub(super) fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}
