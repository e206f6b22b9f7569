//! Unit tests of the wire codec: round trips in both formats, malformed and
//! oversized messages, per-topic formats and dead-letter copies.

use super::*;
use serde_json::json;

fn full_message() -> Message {
    let metadata = Metadata::new()
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
        .with_extra("source", "import");
    let mut m = Message::new("order.placed", json!({"id": 7, "lines": ["a", "b"]}))
        .with_metadata(metadata)
        .with_ordering_key("Order-7");
    m.schema_version = 3;
    m
}

#[test]
fn round_trips_every_field() {
    let m = full_message();
    let raw = RawMessage::encode(&m).unwrap();
    assert_eq!(raw.attributes[EVENT_TYPE], "order.placed");
    assert_eq!(raw.attributes[SCHEMA_VERSION], "3");
    assert_eq!(raw.attributes["keel-x-source"], "import");
    assert_eq!(raw.ordering_key.as_deref(), Some("Order-7"));
    assert_eq!(raw.decode().unwrap(), m);
    assert_eq!(raw.event_id(), Some(m.event_id));
}

#[test]
fn refuses_malformed_messages_with_reasons() {
    let good = RawMessage::encode(&full_message()).unwrap();
    let mut not_json = good.clone();
    not_json.data = b"{not json".to_vec();
    assert!(not_json.decode().unwrap_err().reason.contains("not JSON"));

    for (attr, expect) in [
        (EVENT_ID, "keel-event-id attribute is missing"),
        (EVENT_TYPE, "keel-event-type attribute is missing"),
        (SCHEMA_VERSION, "keel-schema-version attribute is missing"),
    ] {
        let mut m = good.clone();
        m.attributes.remove(attr);
        assert!(m.decode().unwrap_err().reason.contains(expect), "{attr}");
    }
    for (attr, value) in [
        (EVENT_ID, "nope"),
        (SCHEMA_VERSION, "0"),
        (SCHEMA_VERSION, "v2"),
        (CORRELATION_ID, "x"),
        (TRACEPARENT, "00-zz"),
        (CONTENT_TYPE, "text/plain"),
    ] {
        let mut m = good.clone();
        m.attributes.insert(attr.to_owned(), value.to_owned());
        assert!(m.decode().is_err(), "{attr}={value}");
    }
}

#[test]
fn protobuf_round_trips_every_field_and_keeps_the_attributes() {
    let m = full_message();
    let raw = RawMessage::encode_as(&m, WireFormat::Protobuf).unwrap();
    assert_eq!(raw.attributes[CONTENT_TYPE], PROTOBUF_CONTENT_TYPE);
    assert_eq!(raw.attributes[EVENT_TYPE], "order.placed");
    assert_eq!(raw.attributes["keel-x-source"], "import");
    assert_eq!(raw.event_id(), Some(m.event_id));
    let envelope = keel_proto::keel::v1::EventEnvelope::decode(raw.data.as_slice()).unwrap();
    assert_eq!(envelope.event_type, "order.placed");
    assert_eq!(raw.decode().unwrap(), m);

    // Both formats decode to the same message.
    let json = RawMessage::encode(&m).unwrap();
    assert_eq!(json.attributes[CONTENT_TYPE], JSON);
    assert_eq!(json.decode().unwrap(), raw.decode().unwrap());
}

#[test]
fn json_without_a_content_type_is_still_read() {
    let m = full_message();
    let mut raw = RawMessage::encode(&m).unwrap();
    raw.attributes.remove(CONTENT_TYPE);
    assert_eq!(raw.decode().unwrap(), m);
}

#[test]
fn refuses_broken_protobuf_messages() {
    let good = RawMessage::encode_as(&full_message(), WireFormat::Protobuf).unwrap();

    let mut garbage = good.clone();
    garbage.data = vec![0xff; 7];
    let reason = garbage.decode().unwrap_err().reason;
    assert!(reason.contains("not a keel.v1.EventEnvelope"), "{reason}");

    let mut truncated = good.clone();
    truncated.data.truncate(truncated.data.len() / 2);
    assert!(truncated.decode().is_err());

    let mut liar = good.clone();
    liar.attributes
        .insert(EVENT_ID.to_owned(), EventId::new().to_string());
    assert!(liar.decode().unwrap_err().reason.contains("contradicts"));

    // A valid envelope with an invalid content: named in the reason.
    let mut envelope = keel_proto::keel::v1::EventEnvelope::from(&full_message());
    envelope.payload_content_type = "text/plain".into();
    let mut wrong_payload = good.clone();
    wrong_payload.data = envelope.encode_to_vec();
    let reason = wrong_payload.decode().unwrap_err().reason;
    assert!(reason.contains("payload_content_type"), "{reason}");

    // JSON data labelled as protobuf, and an unknown content type.
    let mut mislabelled = RawMessage::encode(&full_message()).unwrap();
    mislabelled
        .attributes
        .insert(CONTENT_TYPE.to_owned(), PROTOBUF_CONTENT_TYPE.to_owned());
    assert!(mislabelled.decode().is_err());
    let mut unknown = good;
    unknown
        .attributes
        .insert(CONTENT_TYPE.to_owned(), "application/avro".to_owned());
    assert!(unknown.decode().unwrap_err().reason.contains("neither"));
}

#[test]
fn formats_are_chosen_per_topic() {
    let formats = WireFormats::new()
        .with_default(WireFormat::Protobuf)
        .with_topic("legacy", WireFormat::Json);
    assert_eq!(formats.for_topic("legacy"), WireFormat::Json);
    assert_eq!(formats.for_topic("orders"), WireFormat::Protobuf);
    assert_eq!(WireFormats::new().for_topic("orders"), WireFormat::Json);
}

#[test]
fn refuses_messages_pubsub_would_refuse() {
    let mut m = full_message();
    m.metadata = m.metadata.clone().with_extra("big", "x".repeat(2000));
    assert!(matches!(
        RawMessage::encode(&m),
        Err(EventBusError::Encode { .. })
    ));
    let m = Message::new("t", json!(null)).with_ordering_key("");
    assert!(RawMessage::encode(&m).is_err());
    let mut m = Message::new("t", json!(null));
    m.schema_version = 0;
    assert!(RawMessage::encode(&m).is_err());
}

#[test]
fn dead_letter_copies_strip_back_to_the_original() {
    let raw = RawMessage::encode(&full_message()).unwrap();
    let dl = raw.dead_letter_copy(&"r".repeat(5000), 5, "orders.billing");
    assert_eq!(dl.attributes[DEAD_LETTER_ATTEMPTS], "5");
    assert_eq!(dl.attributes[DEAD_LETTER_REASON].len(), 1024);
    assert_eq!(dl.without_dead_letter_attributes(), raw);
}
