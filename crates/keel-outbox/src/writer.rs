//! Writing integration events to the outbox inside the caller's transaction.

use std::collections::HashSet;

use keel_core::{Aggregate, Message, TraceContext};
use sqlx::PgConnection;

use crate::error::{OutboxError, Result};

/// The channel writers notify and relays listen on.
pub const NOTIFY_CHANNEL: &str = "keel_outbox";

/// The first key of the advisory locks writers take per aggregate
/// (`'keel'` in ASCII). The two-key lock space never overlaps the one-key
/// space applications usually use.
pub(crate) const AGGREGATE_LOCK_CLASS: i32 = 0x6B65_656C;

const MAX_NAME_LEN: usize = 255;

/// An integration event bound for the bus, with where it goes and which
/// aggregate it belongs to.
///
/// The aggregate (type and id) decides ordering: the relay publishes one
/// aggregate's messages in the order they were committed, and uses
/// `"{aggregate_type}-{aggregate_id}"` as the bus ordering key unless the
/// message sets its own.
#[derive(Clone, PartialEq, Debug)]
pub struct OutboxMessage {
    topic: String,
    aggregate_type: String,
    aggregate_id: String,
    message: Message,
}

impl OutboxMessage {
    /// An outbox message for `topic`, belonging to aggregate
    /// `aggregate_type`/`aggregate_id`.
    pub fn new(
        topic: impl Into<String>,
        aggregate_type: impl Into<String>,
        aggregate_id: impl Into<String>,
        message: Message,
    ) -> Self {
        Self {
            topic: topic.into(),
            aggregate_type: aggregate_type.into(),
            aggregate_id: aggregate_id.into(),
            message,
        }
    }

    /// An outbox message belonging to aggregate `A` with id `id`
    /// (aggregate type = `A::TYPE`).
    pub fn for_aggregate<A: Aggregate>(
        topic: impl Into<String>,
        id: &A::Id,
        message: Message,
    ) -> Self {
        Self::new(topic, A::TYPE, id.to_string(), message)
    }

    /// The topic the message is published to.
    #[must_use]
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The aggregate type, e.g. `Order`.
    #[must_use]
    pub fn aggregate_type(&self) -> &str {
        &self.aggregate_type
    }

    /// The aggregate id.
    #[must_use]
    pub fn aggregate_id(&self) -> &str {
        &self.aggregate_id
    }

    /// The message itself.
    #[must_use]
    pub fn message(&self) -> &Message {
        &self.message
    }

    /// The ordering key the message is published with.
    #[must_use]
    pub fn ordering_key(&self) -> String {
        self.message
            .ordering_key
            .clone()
            .unwrap_or_else(|| format!("{}-{}", self.aggregate_type, self.aggregate_id))
    }
}

/// Writes [`OutboxMessage`]s into `keel.outbox` on the caller's connection,
/// so they commit or roll back with the business change made in the same
/// transaction.
///
/// Cheap to clone; build one at start-up and share it.
///
/// Each write also
/// * takes a transaction-scoped advisory lock per aggregate (sorted, so one
///   call never deadlocks with another), which makes an aggregate's outbox
///   rows commit in id order even when the caller's own locking does not
///   serialize them; see [`lock_aggregates`](Self::lock_aggregates);
/// * sends a `NOTIFY` on [`NOTIFY_CHANNEL`], delivered at commit, which wakes
///   the relays at once.
#[derive(Clone, Debug)]
pub struct OutboxWriter {
    max_payload_bytes: usize,
    lock_aggregates: bool,
}

impl Default for OutboxWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl OutboxWriter {
    /// The default payload limit: 1 MiB of serialized JSON, well under
    /// Pub/Sub's 10 MB message limit.
    pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 1024 * 1024;

    /// A writer with the default payload limit and per-aggregate locking on.
    #[must_use]
    pub fn new() -> Self {
        Self {
            max_payload_bytes: Self::DEFAULT_MAX_PAYLOAD_BYTES,
            lock_aggregates: true,
        }
    }

    /// Sets the largest payload accepted, in bytes of serialized JSON.
    #[must_use]
    pub fn max_payload_bytes(mut self, limit: usize) -> Self {
        self.max_payload_bytes = limit;
        self
    }

    /// Whether to take the per-aggregate advisory lock (default: yes).
    ///
    /// Turn it off only when every transaction that writes an aggregate's
    /// outbox rows already holds a lock on that aggregate (e.g. it updated
    /// the aggregate's row first): then rows commit in id order anyway. With
    /// the lock off and no such discipline, two transactions writing the same
    /// aggregate may commit out of id order, and the relay may publish them
    /// in id order instead of commit order.
    #[must_use]
    pub fn lock_aggregates(mut self, on: bool) -> Self {
        self.lock_aggregates = on;
        self
    }

    /// Writes one message. See [`write_all`](Self::write_all).
    pub async fn write(&self, conn: &mut PgConnection, message: &OutboxMessage) -> Result<()> {
        self.write_all(conn, std::slice::from_ref(message)).await
    }

    /// Writes messages in order, in one round trip for the rows (plus one for
    /// the locks and the notification).
    ///
    /// Call it inside a transaction (`pool.begin()`, a unit of work): outside
    /// one, each call commits on its own.
    ///
    /// # Errors
    ///
    /// * [`OutboxError::Invalid`], [`OutboxError::PayloadTooLarge`],
    ///   [`OutboxError::DuplicateEvent`] (within `messages`): nothing was
    ///   written and the transaction is still usable.
    /// * [`OutboxError::DuplicateEvent`] for an id an earlier transaction
    ///   wrote, or [`OutboxError::Database`]: PostgreSQL refused the insert
    ///   and the caller's transaction is aborted; roll it back.
    pub async fn write_all(
        &self,
        conn: &mut PgConnection,
        messages: &[OutboxMessage],
    ) -> Result<()> {
        if messages.is_empty() {
            return Ok(());
        }
        let rows = self.prepare(messages)?;

        if self.lock_aggregates {
            // Sorted by lock key so that concurrent writers of overlapping
            // aggregate sets take their locks in the same order. The
            // notification rides along; PostgreSQL delivers it at commit.
            sqlx::query(
                "SELECT pg_notify($3, ''), \
                        (SELECT count(pg_advisory_xact_lock($2, k)) \
                         FROM (SELECT DISTINCT hashtext(a) AS k FROM unnest($1::text[]) a ORDER BY 1) s)",
            )
            .bind(&rows.lock_keys)
            .bind(AGGREGATE_LOCK_CLASS)
            .bind(NOTIFY_CHANNEL)
            .execute(&mut *conn)
            .await?;
        } else {
            sqlx::query("SELECT pg_notify($1, '')")
                .bind(NOTIFY_CHANNEL)
                .execute(&mut *conn)
                .await?;
        }

        let inserted = sqlx::query(
            "INSERT INTO keel.outbox (event_id, topic, aggregate_type, aggregate_id, event_type, \
                                      schema_version, payload, metadata, ordering_key) \
             SELECT e, t, at, ai, et, sv, p::jsonb, m::jsonb, k \
             FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], \
                         $6::int4[], $7::text[], $8::text[], $9::text[]) \
                  WITH ORDINALITY AS r(e, t, at, ai, et, sv, p, m, k, n) \
             ORDER BY n",
        )
        .bind(&rows.event_ids)
        .bind(&rows.topics)
        .bind(&rows.aggregate_types)
        .bind(&rows.aggregate_ids)
        .bind(&rows.event_types)
        .bind(&rows.schema_versions)
        .bind(&rows.payloads)
        .bind(&rows.metadata)
        .bind(&rows.ordering_keys)
        .execute(&mut *conn)
        .await;

        match inserted {
            Ok(_) => Ok(()),
            Err(sqlx::Error::Database(db))
                if db.is_unique_violation() && db.constraint() == Some("outbox_event_id_key") =>
            {
                // Classified by constraint name above. Which id collided is
                // only in the error's detail (the transaction is aborted, so
                // it cannot be asked); with one message it is that one.
                let event_id = messages[0].message.event_id;
                let event_id = if messages.len() == 1 {
                    event_id
                } else {
                    duplicate_from_detail(db.as_ref(), messages).unwrap_or(event_id)
                };
                Err(OutboxError::DuplicateEvent { event_id })
            }
            Err(e) => Err(e.into()),
        }
    }

    fn prepare(&self, messages: &[OutboxMessage]) -> Result<Rows> {
        let mut rows = Rows::with_capacity(messages.len());
        let mut seen = HashSet::with_capacity(messages.len());
        // The current span's trace context, looked up once and only if a
        // message lacks one: the relay publishes it with the message, so the
        // consumer continues the trace of the request that wrote it.
        let mut current: Option<Option<TraceContext>> = None;
        for m in messages {
            check_name("topic", &m.topic)?;
            check_name("aggregate_type", &m.aggregate_type)?;
            check_name("aggregate_id", &m.aggregate_id)?;
            check_name("event_type", &m.message.event_type)?;
            let schema_version = i32::try_from(m.message.schema_version)
                .map_err(|_| OutboxError::invalid("schema_version", "is larger than 2147483647"))?;
            let event_id = m.message.event_id;
            if !seen.insert(event_id) {
                return Err(OutboxError::DuplicateEvent { event_id });
            }
            let payload = serde_json::to_string(&m.message.payload)
                .map_err(|e| OutboxError::invalid("payload", e.to_string()))?;
            if payload.len() > self.max_payload_bytes {
                return Err(OutboxError::PayloadTooLarge {
                    event_id,
                    size: payload.len(),
                    limit: self.max_payload_bytes,
                });
            }
            if payload.contains("\\u0000") {
                // jsonb cannot store NUL characters; refuse it here with a
                // clear error instead of an aborted transaction.
                return Err(OutboxError::invalid(
                    "payload",
                    "contains a NUL character (\\u0000), which PostgreSQL jsonb cannot store",
                ));
            }
            let traced = match &m.message.metadata.trace_context {
                Some(_) => None,
                None => current
                    .get_or_insert_with(keel_telemetry::propagation::current_trace_context)
                    .clone()
                    .map(|tc| m.message.metadata.clone().with_trace_context(tc)),
            };
            let metadata = serde_json::to_string(traced.as_ref().unwrap_or(&m.message.metadata))
                .map_err(|e| OutboxError::invalid("metadata", e.to_string()))?;
            if metadata.contains("\\u0000") {
                return Err(OutboxError::invalid(
                    "metadata",
                    "contains a NUL character (\\u0000), which PostgreSQL jsonb cannot store",
                ));
            }
            let ordering_key = m.ordering_key();
            if ordering_key.len() > 1024 {
                return Err(OutboxError::invalid(
                    "ordering_key",
                    "is longer than 1024 bytes (the Pub/Sub limit)",
                ));
            }
            rows.lock_keys
                .push(format!("{}\u{1f}{}", m.aggregate_type, m.aggregate_id));
            rows.event_ids.push(*event_id.as_uuid());
            rows.topics.push(m.topic.clone());
            rows.aggregate_types.push(m.aggregate_type.clone());
            rows.aggregate_ids.push(m.aggregate_id.clone());
            rows.event_types.push(m.message.event_type.clone());
            rows.schema_versions.push(schema_version);
            rows.payloads.push(payload);
            rows.metadata.push(metadata);
            rows.ordering_keys.push(ordering_key);
        }
        Ok(rows)
    }
}

fn check_name(field: &'static str, value: &str) -> Result<()> {
    if value.is_empty() {
        return Err(OutboxError::invalid(field, "must not be empty"));
    }
    if value.len() > MAX_NAME_LEN {
        return Err(OutboxError::invalid(
            field,
            format!("is {} bytes, over the limit of {MAX_NAME_LEN}", value.len()),
        ));
    }
    if value.contains('\0') {
        return Err(OutboxError::invalid(field, "contains a NUL character"));
    }
    Ok(())
}

/// PostgreSQL's detail for a unique violation is `Key (event_id)=(<uuid>)
/// already exists.`; the uuid is data, not message text, so matching it
/// against the batch's own ids is safe. Falls back to the first id.
fn duplicate_from_detail(
    db: &dyn sqlx::error::DatabaseError,
    messages: &[OutboxMessage],
) -> Option<keel_core::EventId> {
    let detail = db
        .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()?
        .detail()?;
    messages
        .iter()
        .map(|m| m.message.event_id)
        .find(|id| detail.contains(&id.to_string()))
}

struct Rows {
    lock_keys: Vec<String>,
    event_ids: Vec<uuid::Uuid>,
    topics: Vec<String>,
    aggregate_types: Vec<String>,
    aggregate_ids: Vec<String>,
    event_types: Vec<String>,
    schema_versions: Vec<i32>,
    payloads: Vec<String>,
    metadata: Vec<String>,
    ordering_keys: Vec<String>,
}

impl Rows {
    fn with_capacity(n: usize) -> Self {
        Self {
            lock_keys: Vec::with_capacity(n),
            event_ids: Vec::with_capacity(n),
            topics: Vec::with_capacity(n),
            aggregate_types: Vec::with_capacity(n),
            aggregate_ids: Vec::with_capacity(n),
            event_types: Vec::with_capacity(n),
            schema_versions: Vec::with_capacity(n),
            payloads: Vec::with_capacity(n),
            metadata: Vec::with_capacity(n),
            ordering_keys: Vec::with_capacity(n),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn msg(topic: &str, agg: &str, id: &str) -> OutboxMessage {
        OutboxMessage::new(
            topic,
            agg,
            id,
            Message::new("order.placed", json!({"n": 1})),
        )
    }

    #[test]
    fn refuses_bad_input_before_writing() {
        let w = OutboxWriter::new().max_payload_bytes(16);
        for (m, field) in [
            (msg("", "Order", "1"), "topic"),
            (msg("t", "", "1"), "aggregate_type"),
            (msg("t", "Order", ""), "aggregate_id"),
            (msg("t", "Order", &"x".repeat(256)), "aggregate_id"),
            (
                OutboxMessage::new("t", "Order", "1", Message::new("", json!(1))),
                "event_type",
            ),
            (
                OutboxMessage::new("t", "Order", "1", Message::new("e", json!("a\u{0}b"))),
                "payload",
            ),
        ] {
            match w.prepare(std::slice::from_ref(&m)) {
                Err(OutboxError::Invalid { field: f, .. }) => assert_eq!(f, field),
                other => panic!("expected invalid {field}, got {:?}", other.err()),
            }
        }

        let big = OutboxMessage::new("t", "Order", "1", Message::new("e", json!("x".repeat(20))));
        match w.prepare(std::slice::from_ref(&big)) {
            Err(OutboxError::PayloadTooLarge {
                size,
                limit,
                event_id,
            }) => {
                assert_eq!((size, limit), (22, 16));
                assert_eq!(event_id, big.message().event_id);
            }
            other => panic!("expected PayloadTooLarge, got {:?}", other.err()),
        }

        let a = msg("t", "Order", "1");
        match w.prepare(&[a.clone(), a.clone()]) {
            Err(OutboxError::DuplicateEvent { event_id }) => {
                assert_eq!(event_id, a.message().event_id);
            }
            other => panic!("expected DuplicateEvent, got {:?}", other.err()),
        }
    }

    #[test]
    fn ordering_key_defaults_to_the_aggregate() {
        assert_eq!(msg("t", "Order", "42").ordering_key(), "Order-42");
        let own = OutboxMessage::new(
            "t",
            "Order",
            "42",
            Message::new("e", json!(null)).with_ordering_key("tenant-7"),
        );
        assert_eq!(own.ordering_key(), "tenant-7");
    }
}
