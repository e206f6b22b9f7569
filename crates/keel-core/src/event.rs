//! Domain events, their metadata and the envelope they travel in.

use std::collections::BTreeMap;
use std::fmt::Debug;

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{Error, InvalidInput};
use crate::id::{CausationId, CorrelationId, EventId, StreamId, TenantId};
use crate::version::{Position, Version};

/// A fact that happened in the domain, in the past tense (`OrderPlaced`).
///
/// Events are serialized to JSON with serde. [`event_type`](Self::event_type)
/// is the stable name stored next to the payload: renaming a Rust type must
/// not change it. [`schema_version`](Self::schema_version) is the version of
/// the payload's shape; when it changes, register an upcaster for the old
/// shapes in the event store.
///
/// ```
/// use keel_core::DomainEvent;
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Clone, Debug, Serialize, Deserialize)]
/// enum CartEvent {
///     ItemAdded { sku: String, quantity: u32 },
///     CheckedOut,
/// }
///
/// impl DomainEvent for CartEvent {
///     fn event_type(&self) -> &'static str {
///         match self {
///             CartEvent::ItemAdded { .. } => "cart.item_added",
///             CartEvent::CheckedOut => "cart.checked_out",
///         }
///     }
/// }
/// assert_eq!(CartEvent::CheckedOut.event_type(), "cart.checked_out");
/// ```
pub trait DomainEvent:
    Serialize + DeserializeOwned + Clone + Debug + Send + Sync + 'static
{
    /// The stable name of this event's type.
    fn event_type(&self) -> &'static str;

    /// The version of this event's payload shape. Starts at 1.
    fn schema_version(&self) -> u32 {
        1
    }
}

/// W3C trace context (`traceparent` and optional `tracestate`), carried with
/// events and messages so a consumer's span continues the producer's trace.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct TraceContext {
    traceparent: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tracestate: Option<String>,
}

impl TraceContext {
    /// Validates a `traceparent` header value (`00-<32 hex>-<16 hex>-<2 hex>`,
    /// with non-zero trace and span ids).
    pub fn new(traceparent: impl Into<String>, tracestate: Option<String>) -> Result<Self, Error> {
        let traceparent = traceparent.into();
        let parts: Vec<&str> = traceparent.split('-').collect();
        let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
        let valid = parts.len() == 4
            && hex(parts[0], 2)
            && parts[0] != "ff"
            && hex(parts[1], 32)
            && parts[1].bytes().any(|b| b != b'0')
            && hex(parts[2], 16)
            && parts[2].bytes().any(|b| b != b'0')
            && hex(parts[3], 2);
        if !valid {
            return Err(Error::Invalid(InvalidInput::new(
                "traceparent",
                "is not a W3C traceparent (00-<trace id>-<span id>-<flags>)",
            )));
        }
        if tracestate.as_ref().is_some_and(|s| s.len() > 512) {
            return Err(Error::invalid_input(
                "tracestate",
                "is longer than 512 bytes",
            ));
        }
        Ok(Self {
            traceparent: traceparent.to_ascii_lowercase(),
            tracestate,
        })
    }

    /// The `traceparent` value.
    #[must_use]
    pub fn traceparent(&self) -> &str {
        &self.traceparent
    }

    /// The `tracestate` value, if any.
    #[must_use]
    pub fn tracestate(&self) -> Option<&str> {
        self.tracestate.as_deref()
    }

    /// The 32-hex-digit trace id.
    #[must_use]
    pub fn trace_id(&self) -> &str {
        &self.traceparent[3..35]
    }
}

/// What is known about why and by whom an event or message was produced.
///
/// Stored with every event and carried as attributes on every message.
#[derive(Clone, PartialEq, Eq, Debug, Default, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Metadata {
    /// The request this work belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<CorrelationId>,
    /// The command or event that directly caused this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causation_id: Option<CausationId>,
    /// The distributed trace this was produced in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_context: Option<TraceContext>,
    /// Who acted: a user or service principal's subject.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    /// The tenant the data belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<TenantId>,
    /// Free key-value pairs for anything else.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, String>,
}

impl Metadata {
    /// Empty metadata.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Metadata for work caused by `cause`: same correlation (or the cause's
    /// own id when it had none), causation = the cause's event id, same trace,
    /// actor and tenant.
    #[must_use]
    pub fn caused_by<E>(cause: &EventEnvelope<E>) -> Self {
        Self {
            correlation_id: Some(
                cause
                    .metadata
                    .correlation_id
                    .unwrap_or(CorrelationId::from_uuid(*cause.event_id.as_uuid())),
            ),
            causation_id: Some(cause.event_id.into()),
            trace_context: cause.metadata.trace_context.clone(),
            actor: cause.metadata.actor.clone(),
            tenant: cause.metadata.tenant.clone(),
            extra: BTreeMap::new(),
        }
    }

    /// Sets the correlation id.
    #[must_use]
    pub fn with_correlation_id(mut self, id: CorrelationId) -> Self {
        self.correlation_id = Some(id);
        self
    }

    /// Sets the causation id.
    #[must_use]
    pub fn with_causation_id(mut self, id: CausationId) -> Self {
        self.causation_id = Some(id);
        self
    }

    /// Sets the trace context.
    #[must_use]
    pub fn with_trace_context(mut self, tc: TraceContext) -> Self {
        self.trace_context = Some(tc);
        self
    }

    /// Sets the actor.
    #[must_use]
    pub fn with_actor(mut self, actor: impl Into<String>) -> Self {
        self.actor = Some(actor.into());
        self
    }

    /// Sets the tenant.
    #[must_use]
    pub fn with_tenant(mut self, tenant: TenantId) -> Self {
        self.tenant = Some(tenant);
        self
    }

    /// Adds a free key-value pair.
    #[must_use]
    pub fn with_extra(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.extra.insert(key.into(), value.into());
        self
    }
}

/// A stored event with everything known about it.
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
#[non_exhaustive]
pub struct EventEnvelope<E> {
    /// The event's unique id.
    pub event_id: EventId,
    /// The stream it belongs to.
    pub stream_id: StreamId,
    /// Its version within the stream (the first event is 1).
    pub version: Version,
    /// Its position in the global log.
    pub position: Position,
    /// The stable event type name.
    pub event_type: String,
    /// The payload's schema version as read (after upcasting).
    pub schema_version: u32,
    /// When the store committed it (server clock).
    pub recorded_at: DateTime<Utc>,
    /// Correlation, causation, trace, actor, tenant and free pairs.
    pub metadata: Metadata,
    /// The event itself.
    pub payload: E,
}

impl<E> EventEnvelope<E> {
    /// Builds an envelope; used by stores and test doubles.
    #[allow(clippy::too_many_arguments)] // an envelope has this many parts
    #[must_use]
    pub fn new(
        event_id: EventId,
        stream_id: StreamId,
        version: Version,
        position: Position,
        event_type: impl Into<String>,
        schema_version: u32,
        recorded_at: DateTime<Utc>,
        metadata: Metadata,
        payload: E,
    ) -> Self {
        Self {
            event_id,
            stream_id,
            version,
            position,
            event_type: event_type.into(),
            schema_version,
            recorded_at,
            metadata,
            payload,
        }
    }

    /// The same envelope around a transformed payload.
    pub fn map<F, T>(self, f: F) -> EventEnvelope<T>
    where
        F: FnOnce(E) -> T,
    {
        EventEnvelope {
            event_id: self.event_id,
            stream_id: self.stream_id,
            version: self.version,
            position: self.position,
            event_type: self.event_type,
            schema_version: self.schema_version,
            recorded_at: self.recorded_at,
            metadata: self.metadata,
            payload: f(self.payload),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_validation() {
        let ok = TraceContext::new(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            None,
        )
        .unwrap();
        assert_eq!(ok.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473z-00f067aa0ba902b7-01",
        ] {
            assert!(TraceContext::new(bad, None).is_err(), "{bad}");
        }
    }

    #[test]
    fn caused_by_chains_correlation_and_causation() {
        let root = EventEnvelope::new(
            EventId::new(),
            StreamId::new("Order-1").unwrap(),
            Version::new(1),
            Position::new(1, 10),
            "order.placed",
            1,
            Utc::now(),
            Metadata::new().with_actor("alice"),
            (),
        );
        let child = Metadata::caused_by(&root);
        assert_eq!(
            child.causation_id.unwrap().as_uuid(),
            root.event_id.as_uuid()
        );
        assert_eq!(
            child.correlation_id.unwrap().as_uuid(),
            root.event_id.as_uuid()
        );
        assert_eq!(child.actor.as_deref(), Some("alice"));
    }

    #[test]
    fn metadata_round_trips_and_omits_empty_fields() {
        assert_eq!(serde_json::to_string(&Metadata::new()).unwrap(), "{}");
        let m = Metadata::new()
            .with_correlation_id(CorrelationId::new())
            .with_tenant(TenantId::new("acme").unwrap())
            .with_extra("source", "import");
        let back: Metadata = serde_json::from_str(&serde_json::to_string(&m).unwrap()).unwrap();
        assert_eq!(back, m);
    }
}
