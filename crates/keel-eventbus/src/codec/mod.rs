//! How a [`Message`] travels on the wire: data plus attributes.
//!
//! The data is written in the topic's [`WireFormat`]:
//!
//! * [`WireFormat::Json`] (the default): the payload itself, as JSON.
//! * [`WireFormat::Protobuf`]: the whole message as a protobuf
//!   `keel.v1.EventEnvelope` (see `proto/keel/v1/envelope.proto` and
//!   [`keel_proto`]), the JSON payload inside it as bytes. Consumers in any
//!   language can read it with the generated types.
//!
//! A [`WireFormats`] value given to the bus chooses the format per topic.
//! The `content-type` attribute says which one a message uses, so every
//! consumer reads both, whatever its own topics publish. Messages without a
//! `content-type` (published by older producers) are read as JSON.
//!
//! In both formats everything but the payload is also an attribute, so a
//! consumer can route, deduplicate and trace without parsing the data (for
//! protobuf messages the envelope is the source of truth, and an event id
//! attribute that contradicts it makes the message malformed):
//!
//! | attribute | value |
//! |---|---|
//! | `keel-event-id` | the event id (UUID); consumers deduplicate on it |
//! | `keel-event-type` | the stable event type name |
//! | `keel-schema-version` | the payload's schema version (1 or more) |
//! | `keel-correlation-id`, `keel-causation-id` | UUIDs, when set |
//! | `traceparent`, `tracestate` | W3C trace context, when set |
//! | `keel-actor`, `keel-tenant` | when set |
//! | `keel-x-{key}` | each free metadata pair |
//! | `content-type` | `application/json`, or [`PROTOBUF_CONTENT_TYPE`] |
//!
//! Dead-lettered copies also carry [`DEAD_LETTER_REASON`],
//! [`DEAD_LETTER_ATTEMPTS`] and [`DEAD_LETTER_SUBSCRIPTION`].

use std::collections::BTreeMap;

use keel_core::{CausationId, CorrelationId, EventId, Message, Metadata, TenantId, TraceContext};
use prost::Message as _;

use crate::error::{EventBusError, Result};

/// Attribute holding Keel's event id.
pub const EVENT_ID: &str = "keel-event-id";
/// Attribute holding the event type name.
pub const EVENT_TYPE: &str = "keel-event-type";
/// Attribute holding the payload's schema version.
pub const SCHEMA_VERSION: &str = "keel-schema-version";
/// Attribute holding the correlation id.
pub const CORRELATION_ID: &str = "keel-correlation-id";
/// Attribute holding the causation id.
pub const CAUSATION_ID: &str = "keel-causation-id";
/// Attribute holding the W3C `traceparent`.
pub const TRACEPARENT: &str = "traceparent";
/// Attribute holding the W3C `tracestate`.
pub const TRACESTATE: &str = "tracestate";
/// Attribute holding the actor.
pub const ACTOR: &str = "keel-actor";
/// Attribute holding the tenant id.
pub const TENANT: &str = "keel-tenant";
/// Prefix of the attributes holding free metadata pairs.
pub const EXTRA_PREFIX: &str = "keel-x-";
/// Attribute holding the content type.
pub const CONTENT_TYPE: &str = "content-type";
/// Why a message was dead-lettered (set on the dead-letter copy).
pub const DEAD_LETTER_REASON: &str = "keel-dead-letter-reason";
/// How many deliveries were attempted before dead-lettering.
pub const DEAD_LETTER_ATTEMPTS: &str = "keel-dead-letter-attempts";
/// The subscription the message was dead-lettered from.
pub const DEAD_LETTER_SUBSCRIPTION: &str = "keel-dead-letter-subscription";
/// Set by Pub/Sub itself when it forwards a message to a dead-letter topic.
pub(crate) const PUBSUB_DELIVERY_COUNT: &str = "CloudPubSubDeadLetterSourceDeliveryCount";

const JSON: &str = "application/json";
/// The `content-type` of messages whose data is a protobuf
/// `keel.v1.EventEnvelope`.
pub const PROTOBUF_CONTENT_TYPE: &str = keel_proto::ENVELOPE_CONTENT_TYPE;

/// How a topic's messages are written. Consumers read every format.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
#[non_exhaustive]
pub enum WireFormat {
    /// The payload as JSON data (the default, and the format of every
    /// message published before formats existed).
    #[default]
    Json,
    /// The message as a protobuf `keel.v1.EventEnvelope`.
    Protobuf,
}

impl WireFormat {
    /// The `content-type` attribute of messages in this format.
    #[must_use]
    pub fn content_type(self) -> &'static str {
        match self {
            WireFormat::Json => JSON,
            WireFormat::Protobuf => PROTOBUF_CONTENT_TYPE,
        }
    }
}

/// Which [`WireFormat`] each topic is published in: a default (JSON unless
/// changed) and overrides by logical topic name.
///
/// ```
/// use keel_eventbus::codec::{WireFormat, WireFormats};
///
/// let formats = WireFormats::new().with_topic("orders", WireFormat::Protobuf);
/// assert_eq!(formats.for_topic("orders"), WireFormat::Protobuf);
/// assert_eq!(formats.for_topic("billing"), WireFormat::Json);
/// ```
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct WireFormats {
    default: WireFormat,
    topics: BTreeMap<String, WireFormat>,
}

impl WireFormats {
    /// JSON everywhere.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Topics without an override use `format`.
    #[must_use]
    pub fn with_default(mut self, format: WireFormat) -> Self {
        self.default = format;
        self
    }

    /// `topic` (its logical name, as given to `publish`) uses `format`.
    #[must_use]
    pub fn with_topic(mut self, topic: impl Into<String>, format: WireFormat) -> Self {
        self.topics.insert(topic.into(), format);
        self
    }

    /// The format `topic` is published in.
    #[must_use]
    pub fn for_topic(&self, topic: &str) -> WireFormat {
        self.topics.get(topic).copied().unwrap_or(self.default)
    }
}
/// Pub/Sub's limits, enforced here so the in-memory bus refuses the same
/// messages the real one would.
const MAX_ATTRIBUTE_KEY: usize = 256;
const MAX_ATTRIBUTE_VALUE: usize = 1024;
const MAX_ATTRIBUTES: usize = 100;
const MAX_ORDERING_KEY: usize = 1024;

/// A received message that is not a valid Keel message.
///
/// The subscriber dead-letters such messages with this reason; they never
/// reach a handler and never stop the subscriber.
#[derive(Clone, PartialEq, Eq, Debug, thiserror::Error)]
#[error("malformed message: {reason}")]
pub struct MalformedMessage {
    /// What is wrong with it.
    pub reason: String,
}

impl MalformedMessage {
    /// Builds the error.
    pub fn new(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
        }
    }
}

/// A message as the broker sees it: bytes, attributes, an ordering key.
///
/// Use it to publish messages that did not come from Keel (or, in tests,
/// deliberately broken ones) with [`EventBus::publish_raw`](crate::EventBus::publish_raw).
#[derive(Clone, PartialEq, Eq, Debug, Default)]
#[non_exhaustive]
pub struct RawMessage {
    /// The message data.
    pub data: Vec<u8>,
    /// The attributes.
    pub attributes: BTreeMap<String, String>,
    /// The ordering key, if any.
    pub ordering_key: Option<String>,
}

impl RawMessage {
    /// Builds a raw message from data and attributes.
    pub fn new(data: impl Into<Vec<u8>>, attributes: BTreeMap<String, String>) -> Self {
        Self {
            data: data.into(),
            attributes,
            ordering_key: None,
        }
    }

    /// Sets the ordering key.
    #[must_use]
    pub fn with_ordering_key(mut self, key: impl Into<String>) -> Self {
        self.ordering_key = Some(key.into());
        self
    }

    /// Sets the trace-context attributes.
    fn set_trace_context(&mut self, tc: &TraceContext) {
        self.attributes
            .insert(TRACEPARENT.to_owned(), tc.traceparent().to_owned());
        if let Some(state) = tc.tracestate() {
            self.attributes
                .insert(TRACESTATE.to_owned(), state.to_owned());
        }
    }

    /// Encodes a Keel message as JSON ([`WireFormat::Json`]).
    ///
    /// # Errors
    ///
    /// [`EventBusError::Encode`] for a message Pub/Sub would refuse (an
    /// empty event type, schema version 0, too many or too long
    /// attributes, an empty or too long ordering key).
    pub fn encode(message: &Message) -> Result<Self> {
        Self::encode_as(message, WireFormat::Json)
    }

    /// Encodes a Keel message in `format`.
    ///
    /// # Errors
    ///
    /// As [`encode`](Self::encode).
    pub fn encode_as(message: &Message, format: WireFormat) -> Result<Self> {
        let bad = |reason: String| EventBusError::Encode {
            event_id: message.event_id,
            reason,
        };
        let data = match format {
            WireFormat::Json => {
                serde_json::to_vec(&message.payload).map_err(|e| bad(e.to_string()))?
            }
            WireFormat::Protobuf => {
                keel_proto::keel::v1::EventEnvelope::from(message).encode_to_vec()
            }
        };
        let mut attributes = BTreeMap::new();
        attributes.insert(EVENT_ID.to_owned(), message.event_id.to_string());
        attributes.insert(EVENT_TYPE.to_owned(), message.event_type.clone());
        attributes.insert(
            SCHEMA_VERSION.to_owned(),
            message.schema_version.to_string(),
        );
        attributes.insert(CONTENT_TYPE.to_owned(), format.content_type().to_owned());
        let m = &message.metadata;
        if let Some(id) = m.correlation_id {
            attributes.insert(CORRELATION_ID.to_owned(), id.to_string());
        }
        if let Some(id) = m.causation_id {
            attributes.insert(CAUSATION_ID.to_owned(), id.to_string());
        }
        if let Some(tc) = &m.trace_context {
            attributes.insert(TRACEPARENT.to_owned(), tc.traceparent().to_owned());
            if let Some(state) = tc.tracestate() {
                attributes.insert(TRACESTATE.to_owned(), state.to_owned());
            }
        }
        if let Some(actor) = &m.actor {
            attributes.insert(ACTOR.to_owned(), actor.clone());
        }
        if let Some(tenant) = &m.tenant {
            attributes.insert(TENANT.to_owned(), tenant.as_str().to_owned());
        }
        for (k, v) in &m.extra {
            attributes.insert(format!("{EXTRA_PREFIX}{k}"), v.clone());
        }
        if message.event_type.is_empty() {
            return Err(bad("the event type is empty".into()));
        }
        if message.schema_version == 0 {
            return Err(bad("the schema version must be 1 or more".into()));
        }
        if attributes.len() > MAX_ATTRIBUTES {
            return Err(bad(format!(
                "{} attributes; Pub/Sub allows {MAX_ATTRIBUTES}",
                attributes.len()
            )));
        }
        for (k, v) in &attributes {
            if k.len() > MAX_ATTRIBUTE_KEY || k.starts_with("goog") {
                return Err(bad(format!(
                    "attribute key {k:?} is longer than {MAX_ATTRIBUTE_KEY} bytes or starts with \"goog\""
                )));
            }
            if v.len() > MAX_ATTRIBUTE_VALUE {
                return Err(bad(format!(
                    "attribute {k:?} is {} bytes long; Pub/Sub allows {MAX_ATTRIBUTE_VALUE}",
                    v.len()
                )));
            }
        }
        let ordering_key = match &message.ordering_key {
            Some(k) if k.is_empty() => return Err(bad("the ordering key is empty".into())),
            Some(k) if k.len() > MAX_ORDERING_KEY => {
                return Err(bad(format!(
                    "the ordering key is longer than {MAX_ORDERING_KEY} bytes"
                )));
            }
            other => other.clone(),
        };
        Ok(Self {
            data,
            attributes,
            ordering_key,
        })
    }

    /// Decodes a Keel message in either format (by its `content-type`),
    /// refusing anything that is not one.
    ///
    /// # Errors
    ///
    /// [`MalformedMessage`] saying what is wrong: a missing or invalid
    /// attribute, data that is not JSON or not an envelope, an unknown
    /// content type.
    pub fn decode(&self) -> Result<Message, MalformedMessage> {
        match self.attributes.get(CONTENT_TYPE).map(String::as_str) {
            None => self.decode_json(),
            Some(ct) if ct == JSON => self.decode_json(),
            Some(ct) if ct == PROTOBUF_CONTENT_TYPE => self.decode_protobuf(),
            Some(ct) => Err(MalformedMessage::new(format!(
                "content type {ct:?} is neither {JSON} nor {PROTOBUF_CONTENT_TYPE}"
            ))),
        }
    }

    fn decode_protobuf(&self) -> Result<Message, MalformedMessage> {
        let envelope =
            keel_proto::keel::v1::EventEnvelope::decode(self.data.as_slice()).map_err(|e| {
                MalformedMessage::new(format!("the data is not a keel.v1.EventEnvelope: {e}"))
            })?;
        let mut message = Message::try_from(envelope)
            .map_err(|e| MalformedMessage::new(format!("invalid envelope: {e}")))?;
        if let Some(id) = self.attributes.get(EVENT_ID)
            && *id != message.event_id.to_string()
        {
            return Err(MalformedMessage::new(format!(
                "{EVENT_ID} {id:?} contradicts the envelope's event id {}",
                message.event_id
            )));
        }
        if let Some(key) = self.ordering_key.as_ref().filter(|k| !k.is_empty()) {
            message = message.with_ordering_key(key.clone());
        }
        Ok(message)
    }

    fn decode_json(&self) -> Result<Message, MalformedMessage> {
        let attr = |name: &str| self.attributes.get(name).map(String::as_str);
        let required = |name: &str| {
            attr(name)
                .filter(|v| !v.is_empty())
                .ok_or_else(|| MalformedMessage::new(format!("the {name} attribute is missing")))
        };
        let event_id: EventId = required(EVENT_ID)?
            .parse()
            .map_err(|_| MalformedMessage::new(format!("{EVENT_ID} is not a UUID")))?;
        let event_type = required(EVENT_TYPE)?.to_owned();
        let schema_version: u32 = required(SCHEMA_VERSION)?
            .parse()
            .ok()
            .filter(|v| *v > 0)
            .ok_or_else(|| {
                MalformedMessage::new(format!("{SCHEMA_VERSION} is not a positive integer"))
            })?;
        let payload: serde_json::Value = serde_json::from_slice(&self.data)
            .map_err(|e| MalformedMessage::new(format!("the data is not JSON: {e}")))?;

        let mut metadata = Metadata::new();
        if let Some(v) = attr(CORRELATION_ID) {
            let id: CorrelationId = v
                .parse()
                .map_err(|_| MalformedMessage::new(format!("{CORRELATION_ID} is not a UUID")))?;
            metadata = metadata.with_correlation_id(id);
        }
        if let Some(v) = attr(CAUSATION_ID) {
            let id: CausationId = v
                .parse()
                .map_err(|_| MalformedMessage::new(format!("{CAUSATION_ID} is not a UUID")))?;
            metadata = metadata.with_causation_id(id);
        }
        if let Some(tp) = attr(TRACEPARENT) {
            let tc = TraceContext::new(tp, attr(TRACESTATE).map(str::to_owned))
                .map_err(|e| MalformedMessage::new(e.to_string()))?;
            metadata = metadata.with_trace_context(tc);
        }
        if let Some(actor) = attr(ACTOR) {
            metadata = metadata.with_actor(actor);
        }
        if let Some(t) = attr(TENANT) {
            let tenant = TenantId::new(t).map_err(|e| MalformedMessage::new(e.to_string()))?;
            metadata = metadata.with_tenant(tenant);
        }
        for (k, v) in &self.attributes {
            if let Some(key) = k.strip_prefix(EXTRA_PREFIX) {
                metadata = metadata.with_extra(key, v.clone());
            }
        }
        let mut message = Message::new(event_type, payload)
            .with_event_id(event_id)
            .with_metadata(metadata);
        message.schema_version = schema_version;
        if let Some(key) = self.ordering_key.as_ref().filter(|k| !k.is_empty()) {
            message = message.with_ordering_key(key.clone());
        }
        Ok(message)
    }

    /// The event id attribute, if present and valid (also on malformed
    /// messages, when only something else is wrong).
    #[must_use]
    pub fn event_id(&self) -> Option<EventId> {
        self.attributes.get(EVENT_ID)?.parse().ok()
    }

    /// A copy without the dead-letter bookkeeping attributes, as it was
    /// originally published.
    #[must_use]
    pub(crate) fn without_dead_letter_attributes(&self) -> Self {
        let mut copy = self.clone();
        copy.attributes.retain(|k, _| {
            !k.starts_with("keel-dead-letter-") && !k.starts_with("CloudPubSubDeadLetter")
        });
        copy
    }

    /// A dead-letter copy recording why and after how many attempts.
    pub(crate) fn dead_letter_copy(&self, reason: &str, attempts: u32, subscription: &str) -> Self {
        let mut copy = self.without_dead_letter_attributes();
        // Attribute values are capped by Pub/Sub; keep the start of the reason.
        let mut reason = reason.to_owned();
        if reason.len() > MAX_ATTRIBUTE_VALUE {
            let mut cut = MAX_ATTRIBUTE_VALUE;
            while !reason.is_char_boundary(cut) {
                cut -= 1;
            }
            reason.truncate(cut);
        }
        copy.attributes
            .insert(DEAD_LETTER_REASON.to_owned(), reason);
        copy.attributes
            .insert(DEAD_LETTER_ATTEMPTS.to_owned(), attempts.to_string());
        copy.attributes
            .insert(DEAD_LETTER_SUBSCRIPTION.to_owned(), subscription.to_owned());
        copy
    }
}

/// Encodes a batch for publishing in `format`. A message without a trace
/// context gets the current span's (looked up once per batch, and only when
/// needed), so the consumer's span continues the producer's trace without
/// the caller writing it. Messages that carry one (relayed from an outbox)
/// keep it.
pub(crate) fn encode_batch(messages: &[Message], format: WireFormat) -> Result<Vec<RawMessage>> {
    let mut current: Option<Option<TraceContext>> = None;
    messages
        .iter()
        .map(|m| {
            if m.metadata.trace_context.is_some() {
                return RawMessage::encode_as(m, format);
            }
            let tc = current.get_or_insert_with(keel_telemetry::propagation::current_trace_context);
            match (tc, format) {
                (None, _) => RawMessage::encode_as(m, format),
                (Some(tc), WireFormat::Json) => {
                    let mut raw = RawMessage::encode(m)?;
                    raw.set_trace_context(tc);
                    Ok(raw)
                }
                // The envelope carries the metadata too: put it in there.
                (Some(tc), _) => {
                    let mut m = m.clone();
                    m.metadata.trace_context = Some(tc.clone());
                    RawMessage::encode_as(&m, format)
                }
            }
        })
        .collect()
}

#[cfg(test)]
mod tests;
