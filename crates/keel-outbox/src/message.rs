//! Outbox messages and the checks every outbox runs before writing one.

use std::collections::HashSet;

use keel_core::{Aggregate, EventId, Message, TraceContext};

use crate::error::{OutboxError, Result};

/// Longest topic, aggregate type, aggregate id and event type, in bytes.
pub const MAX_NAME_BYTES: usize = 255;

/// Longest ordering key, in bytes (the Pub/Sub limit).
pub const MAX_ORDERING_KEY_BYTES: usize = 1024;

/// The default payload limit: 1 MiB of serialized JSON, well under
/// Pub/Sub's 10 MB message limit.
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 1024 * 1024;

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

/// A message that passed the checks, in the forms the outboxes store.
#[derive(Clone, Debug)]
pub(crate) struct Prepared {
    pub(crate) topic: String,
    pub(crate) aggregate_type: String,
    pub(crate) aggregate_id: String,
    /// The message as the relay will publish it: the caller's trace
    /// context filled in, the ordering key set.
    pub(crate) message: Message,
    pub(crate) schema_version: i32,
    pub(crate) payload_json: String,
    pub(crate) metadata_json: String,
    pub(crate) ordering_key: String,
}

impl Prepared {
    /// The key of the aggregate's advisory lock and of the in-memory
    /// relay's lease.
    pub(crate) fn aggregate_key(&self) -> String {
        format!("{}\u{1f}{}", self.aggregate_type, self.aggregate_id)
    }

    pub(crate) fn event_id(&self) -> EventId {
        self.message.event_id
    }
}

/// Checks `messages` and turns them into [`Prepared`] rows, or refuses the
/// whole batch before anything is written. The same checks run in every
/// outbox, so every variant refuses the same input with the same error.
pub(crate) fn prepare(
    messages: &[OutboxMessage],
    max_payload_bytes: usize,
) -> Result<Vec<Prepared>> {
    let mut rows = Vec::with_capacity(messages.len());
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
        let payload_json = serde_json::to_string(&m.message.payload)
            .map_err(|e| OutboxError::invalid("payload", e.to_string()))?;
        if payload_json.len() > max_payload_bytes {
            return Err(OutboxError::PayloadTooLarge {
                event_id,
                size: payload_json.len(),
                limit: max_payload_bytes,
            });
        }
        if payload_json.contains("\\u0000") {
            // jsonb cannot store NUL characters; every outbox refuses them
            // here with a clear error instead of an aborted transaction.
            return Err(OutboxError::invalid(
                "payload",
                "contains a NUL character (\\u0000), which PostgreSQL jsonb cannot store",
            ));
        }
        let mut message = m.message.clone();
        if message.metadata.trace_context.is_none()
            && let Some(tc) = current
                .get_or_insert_with(keel_telemetry::propagation::current_trace_context)
                .clone()
        {
            message.metadata = message.metadata.with_trace_context(tc);
        }
        let metadata_json = serde_json::to_string(&message.metadata)
            .map_err(|e| OutboxError::invalid("metadata", e.to_string()))?;
        if metadata_json.contains("\\u0000") {
            return Err(OutboxError::invalid(
                "metadata",
                "contains a NUL character (\\u0000), which PostgreSQL jsonb cannot store",
            ));
        }
        let ordering_key = m.ordering_key();
        if ordering_key.len() > MAX_ORDERING_KEY_BYTES {
            return Err(OutboxError::invalid(
                "ordering_key",
                format!("is longer than {MAX_ORDERING_KEY_BYTES} bytes (the Pub/Sub limit)"),
            ));
        }
        if ordering_key.contains('\0') {
            return Err(OutboxError::invalid(
                "ordering_key",
                "contains a NUL character",
            ));
        }
        message.ordering_key = Some(ordering_key.clone());
        rows.push(Prepared {
            topic: m.topic.clone(),
            aggregate_type: m.aggregate_type.clone(),
            aggregate_id: m.aggregate_id.clone(),
            message,
            schema_version,
            payload_json,
            metadata_json,
            ordering_key,
        });
    }
    Ok(rows)
}

fn check_name(field: &'static str, value: &str) -> Result<()> {
    if value.is_empty() {
        return Err(OutboxError::invalid(field, "must not be empty"));
    }
    if value.len() > MAX_NAME_BYTES {
        return Err(OutboxError::invalid(
            field,
            format!(
                "is {} bytes, over the limit of {MAX_NAME_BYTES}",
                value.len()
            ),
        ));
    }
    if value.contains('\0') {
        return Err(OutboxError::invalid(field, "contains a NUL character"));
    }
    Ok(())
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
        let w = 16;
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
            match prepare(std::slice::from_ref(&m), w) {
                Err(OutboxError::Invalid { field: f, .. }) => assert_eq!(f, field),
                other => panic!("expected invalid {field}, got {:?}", other.err()),
            }
        }

        let big = OutboxMessage::new("t", "Order", "1", Message::new("e", json!("x".repeat(20))));
        match prepare(std::slice::from_ref(&big), w) {
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
        match prepare(&[a.clone(), a.clone()], w) {
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
