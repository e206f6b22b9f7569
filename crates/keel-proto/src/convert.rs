//! Conversions between Keel's types and the `keel.v1` wire types.
//!
//! Encoding never fails. Decoding checks what Keel's own types guarantee
//! and refuses the rest with [`keel_core::Error::Invalid`] naming the
//! field: a missing or malformed event id, an empty event type, a schema
//! version of 0, a payload that is not JSON (or is declared as something
//! else), malformed ids, trace context or tenant in the metadata.

use chrono::{DateTime, Utc};
use keel_core::{
    CausationId, CorrelationId, Error, EventEnvelope, EventId, Message, Metadata, Position,
    StreamId, TenantId, TraceContext, Version,
};

use crate::JSON_CONTENT_TYPE;
use crate::keel::v1 as pb;

impl From<&Metadata> for pb::EventMetadata {
    fn from(m: &Metadata) -> Self {
        Self {
            correlation_id: m
                .correlation_id
                .map(|id| id.to_string())
                .unwrap_or_default(),
            causation_id: m.causation_id.map(|id| id.to_string()).unwrap_or_default(),
            trace_context: m.trace_context.as_ref().map(|tc| pb::TraceContext {
                traceparent: tc.traceparent().to_owned(),
                tracestate: tc.tracestate().unwrap_or_default().to_owned(),
            }),
            actor: m.actor.clone().unwrap_or_default(),
            tenant: m
                .tenant
                .as_ref()
                .map(|t| t.as_str().to_owned())
                .unwrap_or_default(),
            extra: m
                .extra
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        }
    }
}

impl TryFrom<pb::EventMetadata> for Metadata {
    type Error = Error;

    fn try_from(m: pb::EventMetadata) -> Result<Self, Error> {
        let mut out = Metadata::new();
        if !m.correlation_id.is_empty() {
            let id: CorrelationId = m
                .correlation_id
                .parse()
                .map_err(|_| Error::invalid_input("metadata.correlation_id", "is not a UUID"))?;
            out = out.with_correlation_id(id);
        }
        if !m.causation_id.is_empty() {
            let id: CausationId = m
                .causation_id
                .parse()
                .map_err(|_| Error::invalid_input("metadata.causation_id", "is not a UUID"))?;
            out = out.with_causation_id(id);
        }
        if let Some(tc) = m.trace_context {
            let state = Some(tc.tracestate).filter(|s| !s.is_empty());
            let tc = TraceContext::new(tc.traceparent, state)
                .map_err(|e| Error::invalid_input("metadata.trace_context", e.to_string()))?;
            out = out.with_trace_context(tc);
        }
        if !m.actor.is_empty() {
            out = out.with_actor(m.actor);
        }
        if !m.tenant.is_empty() {
            let tenant = TenantId::new(m.tenant)
                .map_err(|e| Error::invalid_input("metadata.tenant", e.to_string()))?;
            out = out.with_tenant(tenant);
        }
        for (k, v) in m.extra {
            out = out.with_extra(k, v);
        }
        Ok(out)
    }
}

impl From<Position> for pb::Position {
    fn from(p: Position) -> Self {
        Self {
            commit: p.commit,
            sequence: p.sequence,
        }
    }
}

impl From<pb::Position> for Position {
    fn from(p: pb::Position) -> Self {
        Position::new(p.commit, p.sequence)
    }
}

/// A bus message as an envelope: no stream, version, position or
/// recording time (it was never stored), the JSON payload as bytes.
impl From<&Message> for pb::EventEnvelope {
    fn from(m: &Message) -> Self {
        Self {
            event_id: m.event_id.to_string(),
            event_type: m.event_type.clone(),
            schema_version: m.schema_version,
            stream_id: String::new(),
            version: None,
            position: None,
            recorded_at: None,
            metadata: Some((&m.metadata).into()),
            payload: json_bytes(&m.payload),
            payload_content_type: JSON_CONTENT_TYPE.to_owned(),
            ordering_key: m.ordering_key.clone().unwrap_or_default(),
        }
    }
}

/// A bus message from an envelope. The stream, version, position and
/// recording time, when present, are dropped: a [`Message`] has no place
/// for them.
impl TryFrom<pb::EventEnvelope> for Message {
    type Error = Error;

    fn try_from(e: pb::EventEnvelope) -> Result<Self, Error> {
        let event_id = parse_event_id(&e.event_id)?;
        check_type_and_version(&e)?;
        let payload = parse_payload(&e)?;
        let metadata = e.metadata.map(Metadata::try_from).transpose()?;
        let mut message = Message::new(e.event_type, payload)
            .with_event_id(event_id)
            .with_metadata(metadata.unwrap_or_default());
        message.schema_version = e.schema_version;
        if !e.ordering_key.is_empty() {
            message = message.with_ordering_key(e.ordering_key);
        }
        Ok(message)
    }
}

/// A stored event as an envelope, with its stream, version, position and
/// recording time. The ordering key is the stream id, which keeps one
/// stream's events in order.
impl From<&EventEnvelope<serde_json::Value>> for pb::EventEnvelope {
    fn from(e: &EventEnvelope<serde_json::Value>) -> Self {
        Self {
            event_id: e.event_id.to_string(),
            event_type: e.event_type.clone(),
            schema_version: e.schema_version,
            stream_id: e.stream_id.as_str().to_owned(),
            version: Some(e.version.get()),
            position: Some(e.position.into()),
            recorded_at: Some(timestamp(e.recorded_at)),
            metadata: Some((&e.metadata).into()),
            payload: json_bytes(&e.payload),
            payload_content_type: JSON_CONTENT_TYPE.to_owned(),
            ordering_key: e.stream_id.as_str().to_owned(),
        }
    }
}

/// A stored event from an envelope; the stream, version, position and
/// recording time must all be present.
impl TryFrom<pb::EventEnvelope> for EventEnvelope<serde_json::Value> {
    type Error = Error;

    fn try_from(e: pb::EventEnvelope) -> Result<Self, Error> {
        let event_id = parse_event_id(&e.event_id)?;
        check_type_and_version(&e)?;
        let payload = parse_payload(&e)?;
        let stream_id = StreamId::new(e.stream_id.clone())
            .map_err(|err| Error::invalid_input("stream_id", err.to_string()))?;
        let version = e
            .version
            .filter(|v| *v > 0)
            .ok_or_else(|| Error::invalid_input("version", "is missing or 0"))?;
        let position = e
            .position
            .ok_or_else(|| Error::invalid_input("position", "is missing"))?;
        let recorded_at = e
            .recorded_at
            .ok_or_else(|| Error::invalid_input("recorded_at", "is missing"))
            .and_then(datetime)?;
        let metadata = e.metadata.map(Metadata::try_from).transpose()?;
        Ok(EventEnvelope::new(
            event_id,
            stream_id,
            Version::new(version),
            position.into(),
            e.event_type,
            e.schema_version,
            recorded_at,
            metadata.unwrap_or_default(),
            payload,
        ))
    }
}

fn json_bytes(value: &serde_json::Value) -> Vec<u8> {
    // A `Value` always serializes: its map keys are strings.
    serde_json::to_vec(value).unwrap_or_else(|_| b"null".to_vec())
}

fn parse_event_id(text: &str) -> Result<EventId, Error> {
    if text.is_empty() {
        return Err(Error::invalid_input("event_id", "is missing"));
    }
    text.parse()
        .map_err(|_| Error::invalid_input("event_id", "is not a UUID"))
}

fn check_type_and_version(e: &pb::EventEnvelope) -> Result<(), Error> {
    if e.event_type.is_empty() {
        return Err(Error::invalid_input("event_type", "is empty"));
    }
    if e.schema_version == 0 {
        return Err(Error::invalid_input("schema_version", "must be 1 or more"));
    }
    Ok(())
}

fn parse_payload(e: &pb::EventEnvelope) -> Result<serde_json::Value, Error> {
    // The media type may carry parameters (`application/json; charset=utf-8`).
    let essence = e
        .payload_content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim();
    if !essence.eq_ignore_ascii_case(JSON_CONTENT_TYPE) {
        return Err(Error::invalid_input(
            "payload_content_type",
            format!(
                "{:?} is not {JSON_CONTENT_TYPE}, the only payload type Keel's messages hold",
                e.payload_content_type
            ),
        ));
    }
    serde_json::from_slice(&e.payload)
        .map_err(|err| Error::invalid_input("payload", format!("is not JSON: {err}")))
}

fn timestamp(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        // Always below 2e9, so it fits.
        nanos: i32::try_from(t.timestamp_subsec_nanos()).unwrap_or(i32::MAX),
    }
}

fn datetime(t: prost_types::Timestamp) -> Result<DateTime<Utc>, Error> {
    u32::try_from(t.nanos)
        .ok()
        .and_then(|nanos| DateTime::from_timestamp(t.seconds, nanos))
        .ok_or_else(|| Error::invalid_input("recorded_at", "is not a valid timestamp"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;
    use serde_json::json;

    fn full_metadata() -> Metadata {
        Metadata::new()
            .with_correlation_id(CorrelationId::new())
            .with_causation_id(CausationId::new())
            .with_trace_context(
                TraceContext::new(
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                    Some("vendor=1".into()),
                )
                .unwrap(),
            )
            .with_actor("user:alice")
            .with_tenant(TenantId::new("acme").unwrap())
            .with_extra("source", "import")
    }

    #[test]
    fn messages_round_trip_through_bytes() {
        let mut m = Message::new("order.placed", json!({"id": 7, "lines": ["a", "b"]}))
            .with_metadata(full_metadata())
            .with_ordering_key("Order-7");
        m.schema_version = 3;
        let bytes = pb::EventEnvelope::from(&m).encode_to_vec();
        let back = Message::try_from(pb::EventEnvelope::decode(bytes.as_slice()).unwrap()).unwrap();
        assert_eq!(back, m);

        let bare = Message::new("t", json!(null));
        let back = Message::try_from(pb::EventEnvelope::from(&bare)).unwrap();
        assert_eq!(back, bare);
    }

    #[test]
    fn stored_events_round_trip_with_stream_version_and_position() {
        let recorded = DateTime::from_timestamp(1_700_000_000, 123_456_789).unwrap();
        let stored = EventEnvelope::new(
            EventId::new(),
            StreamId::new("Order-7").unwrap(),
            Version::new(4),
            Position::new(10, 42),
            "order.paid",
            2,
            recorded,
            full_metadata(),
            json!({"amount": 1200}),
        );
        let wire = pb::EventEnvelope::from(&stored);
        assert_eq!(wire.stream_id, "Order-7");
        assert_eq!(wire.version, Some(4));
        assert_eq!(wire.ordering_key, "Order-7");
        let back = EventEnvelope::<serde_json::Value>::try_from(wire.clone()).unwrap();
        assert_eq!(back, stored);

        // A stored event's envelope is also a valid bus message.
        let message = Message::try_from(wire).unwrap();
        assert_eq!(message.event_id, stored.event_id);
        assert_eq!(message.ordering_key.as_deref(), Some("Order-7"));
    }

    #[test]
    fn refuses_malformed_envelopes_naming_the_field() {
        let good = pb::EventEnvelope::from(
            &Message::new("t", json!({"a": 1})).with_metadata(full_metadata()),
        );
        type Spoil = Box<dyn Fn(&mut pb::EventEnvelope)>;
        let cases: Vec<(&str, Spoil)> = vec![
            ("event_id", Box::new(|e| e.event_id.clear())),
            ("event_id", Box::new(|e| e.event_id = "nope".into())),
            ("event_type", Box::new(|e| e.event_type.clear())),
            ("schema_version", Box::new(|e| e.schema_version = 0)),
            ("payload", Box::new(|e| e.payload = b"{not json".to_vec())),
            (
                "payload_content_type",
                Box::new(|e| e.payload_content_type = "application/xml".into()),
            ),
            (
                "payload_content_type",
                Box::new(|e| e.payload_content_type.clear()),
            ),
            (
                "metadata.correlation_id",
                Box::new(|e| e.metadata.as_mut().unwrap().correlation_id = "x".into()),
            ),
            (
                "metadata.trace_context",
                Box::new(|e| {
                    e.metadata.as_mut().unwrap().trace_context = Some(pb::TraceContext {
                        traceparent: "00-zz".into(),
                        tracestate: String::new(),
                    });
                }),
            ),
            (
                "metadata.tenant",
                Box::new(|e| e.metadata.as_mut().unwrap().tenant = " ".repeat(300)),
            ),
        ];
        for (field, spoil) in cases {
            let mut bad = good.clone();
            spoil(&mut bad);
            let err = Message::try_from(bad).unwrap_err();
            assert!(
                matches!(&err, Error::Invalid(v) if v.field == field),
                "{field}: {err:?}"
            );
        }
        // A JSON payload type with parameters is still JSON.
        let mut with_charset = good.clone();
        with_charset.payload_content_type = "application/json; charset=utf-8".into();
        assert!(Message::try_from(with_charset).is_ok());

        // A bus message is not a stored event.
        let err = EventEnvelope::<serde_json::Value>::try_from(good).unwrap_err();
        assert!(matches!(err, Error::Invalid(_)), "{err:?}");
    }

    #[test]
    fn descriptor_set_holds_every_file_and_its_imports() {
        let set = prost_types::FileDescriptorSet::decode(crate::FILE_DESCRIPTOR_SET).unwrap();
        let names: Vec<_> = set.file.iter().map(|f| f.name()).collect();
        for name in [
            "keel/v1/envelope.proto",
            "examples/ordering/v1/ordering.proto",
            "examples/shipping/v1/shipping.proto",
            "google/protobuf/timestamp.proto",
        ] {
            assert!(names.contains(&name), "{name} missing from {names:?}");
        }
    }
}
