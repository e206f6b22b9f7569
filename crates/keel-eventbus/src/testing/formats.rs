//! Wire formats: a consumer reads JSON and protobuf messages alike.

use std::collections::BTreeMap;

use keel_core::HandlerError;
use prost::Message as _;

use super::*;
use crate::codec::{CONTENT_TYPE, EVENT_ID, PROTOBUF_CONTENT_TYPE, WireFormat};

fn full(n: u64) -> Message {
    let metadata = Metadata::new()
        .with_correlation_id(CorrelationId::new())
        .with_causation_id(CausationId::new())
        .with_trace_context(
            TraceContext::new(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                Some("keel=1".into()),
            )
            .unwrap(),
        )
        .with_actor("user:alice")
        .with_tenant(TenantId::new("acme").unwrap())
        .with_extra("source", "formats");
    let mut m = Message::new("order.placed", json!({ "order": n, "note": "ünïcode" }))
        .with_metadata(metadata)
        .with_ordering_key(format!("Order-{n}"));
    m.schema_version = 2;
    m
}

/// One topic, two producers: one publishing JSON (the default), one
/// configured to publish protobuf envelopes. A single consumer handles
/// both, every field intact; the messages really travelled in their formats
/// (seen on the dead-letter copies of a second consumer that rejects
/// everything); a protobuf message whose data is not an envelope, or whose
/// event id attribute contradicts the envelope, is dead-lettered as
/// malformed.
pub async fn both_wire_formats_are_read<B: TestBus>(bus: B) {
    let topic = unique("formats");
    let reader = Recorder::accepting();
    let reader_config = fast_config("reader");
    let sub = bus
        .subscribe(&topic, &reader_config, reader.clone())
        .await
        .unwrap();
    let keeper = Recorder::new(|_| Err(HandlerError::reject("kept for inspection")));
    let keeper_sub = bus
        .subscribe(&topic, &fast_config("keeper"), keeper.clone())
        .await
        .unwrap();

    let json_bus = bus.with_formats(WireFormats::new());
    let proto_bus = bus.with_formats(WireFormats::new().with_topic(&topic, WireFormat::Protobuf));
    let (as_json, as_proto) = (full(1), full(2));
    json_bus
        .publish(&topic, std::slice::from_ref(&as_json))
        .await
        .unwrap();
    proto_bus
        .publish(&topic, std::slice::from_ref(&as_proto))
        .await
        .unwrap();

    wait_until("both formats handled", || reader.handled().len() == 2).await;
    for sent in [&as_json, &as_proto] {
        let got = reader
            .handled()
            .into_iter()
            .find(|d| d.message.event_id == sent.event_id)
            .expect("the message arrived");
        assert_eq!(&got.message, sent);
    }

    let dead = dead_letters_settled(&bus, &topic, "keeper", 2).await;
    assert_eq!(dead.len(), 2);
    let raw_of = |id: EventId| {
        dead.iter()
            .find(|d| d.event_id() == Some(id))
            .map(|d| d.raw.clone())
            .expect("the dead letter is there")
    };
    let json_raw = raw_of(as_json.event_id);
    assert_eq!(json_raw.attributes[CONTENT_TYPE], "application/json");
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&json_raw.data).unwrap(),
        as_json.payload
    );
    let proto_raw = raw_of(as_proto.event_id);
    assert_eq!(proto_raw.attributes[CONTENT_TYPE], PROTOBUF_CONTENT_TYPE);
    let envelope = keel_proto::keel::v1::EventEnvelope::decode(proto_raw.data.as_slice()).unwrap();
    assert_eq!(envelope.event_id, as_proto.event_id.to_string());
    assert_eq!(envelope.ordering_key, "Order-2");

    // Broken protobuf messages never reach the handler.
    let mut not_an_envelope = BTreeMap::new();
    let garbage_id = EventId::new();
    not_an_envelope.insert(EVENT_ID.to_owned(), garbage_id.to_string());
    not_an_envelope.insert(CONTENT_TYPE.to_owned(), PROTOBUF_CONTENT_TYPE.to_owned());
    let garbage = RawMessage::new(vec![0xff, 0xff, 0xff, 0x01], not_an_envelope);
    let mut contradicting = RawMessage::encode_as(&full(3), WireFormat::Protobuf).unwrap();
    let liar_id = EventId::new();
    contradicting
        .attributes
        .insert(EVENT_ID.to_owned(), liar_id.to_string());
    bus.publish_raw(&topic, &[garbage, contradicting])
        .await
        .unwrap();
    let dead = dead_letters_settled(&bus, &topic, "reader", 2).await;
    assert_eq!(dead.len(), 2, "{dead:?}");
    for id in [garbage_id, liar_id] {
        let d = dead
            .iter()
            .find(|d| d.event_id() == Some(id))
            .expect("dead-lettered");
        let reason = d.reason.clone().unwrap_or_default();
        assert!(reason.contains("malformed"), "{reason}");
    }
    assert_eq!(reader.handled().len(), 2);
    sub.shutdown().await;
    keeper_sub.shutdown().await;
}
