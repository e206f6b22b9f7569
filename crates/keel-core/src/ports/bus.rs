//! The event bus ports: publishing integration events and handling them.

use std::fmt;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::error::{BoxError, Error, Result};
use crate::event::{DomainEvent, Metadata};
use crate::id::EventId;

/// An integration event on its way to, or coming from, the bus.
///
/// The payload is JSON; the rest travels as message attributes so a consumer
/// can route, deduplicate (by `event_id`) and trace without parsing it.
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Message {
    /// Keel's event id; consumers deduplicate on it (the broker's own message
    /// id changes, e.g. when a message is dead-lettered).
    pub event_id: EventId,
    /// The stable event type name.
    pub event_type: String,
    /// The payload's schema version.
    pub schema_version: u32,
    /// The JSON payload.
    pub payload: serde_json::Value,
    /// Correlation, causation, trace context, actor, tenant.
    pub metadata: Metadata,
    /// Messages with the same key are delivered in publish order (usually the
    /// stream id); `None` means no ordering.
    pub ordering_key: Option<String>,
}

impl Message {
    /// Builds a message from raw parts.
    pub fn new(event_type: impl Into<String>, payload: serde_json::Value) -> Self {
        Self {
            event_id: EventId::new(),
            event_type: event_type.into(),
            schema_version: 1,
            payload,
            metadata: Metadata::default(),
            ordering_key: None,
        }
    }

    /// Serializes a domain event into a message.
    pub fn from_event<E: DomainEvent>(event: &E) -> Result<Self> {
        let payload = serde_json::to_value(event)
            .map_err(|e| Error::internal(format!("cannot serialize {}", event.event_type()), e))?;
        Ok(Self {
            event_id: EventId::new(),
            event_type: event.event_type().to_owned(),
            schema_version: event.schema_version(),
            payload,
            metadata: Metadata::default(),
            ordering_key: None,
        })
    }

    /// Sets the event id (e.g. to the stored event's id, for deduplication).
    #[must_use]
    pub fn with_event_id(mut self, id: EventId) -> Self {
        self.event_id = id;
        self
    }

    /// Sets the metadata.
    #[must_use]
    pub fn with_metadata(mut self, metadata: Metadata) -> Self {
        self.metadata = metadata;
        self
    }

    /// Sets the ordering key.
    #[must_use]
    pub fn with_ordering_key(mut self, key: impl Into<String>) -> Self {
        self.ordering_key = Some(key.into());
        self
    }

    /// Deserializes the payload into a typed event.
    pub fn decode<E: DomainEvent>(&self) -> Result<E> {
        serde_json::from_value(self.payload.clone()).map_err(|e| {
            Error::invalid_input(
                "payload",
                format!(
                    "cannot decode {} v{}: {e}",
                    self.event_type, self.schema_version
                ),
            )
        })
    }
}

/// A message as delivered to a handler, with delivery facts.
#[derive(Clone, PartialEq, Debug)]
#[non_exhaustive]
pub struct Delivery {
    /// The message.
    pub message: Message,
    /// Which delivery this is, starting at 1. Above 1 means a redelivery.
    pub attempt: u32,
    /// The subscription it arrived on.
    pub subscription: String,
}

impl Delivery {
    /// Builds a delivery; used by bus adapters.
    pub fn new(message: Message, attempt: u32, subscription: impl Into<String>) -> Self {
        Self {
            message,
            attempt,
            subscription: subscription.into(),
        }
    }
}

/// Why a handler did not handle a message.
#[derive(Debug)]
#[non_exhaustive]
pub enum HandlerError {
    /// Try again later: the message is nacked and redelivered with backoff
    /// until the subscription's attempts run out, then dead-lettered.
    Retry(BoxError),
    /// The message can never be handled (malformed, unknown type): send it to
    /// the dead-letter topic without further attempts.
    Reject(BoxError),
}

impl HandlerError {
    /// A transient failure.
    pub fn retry(e: impl Into<BoxError>) -> Self {
        HandlerError::Retry(e.into())
    }

    /// A permanent failure.
    pub fn reject(e: impl Into<BoxError>) -> Self {
        HandlerError::Reject(e.into())
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HandlerError::Retry(e) => write!(f, "handler failed (will retry): {e}"),
            HandlerError::Reject(e) => write!(f, "handler rejected the message: {e}"),
        }
    }
}

impl std::error::Error for HandlerError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            HandlerError::Retry(e) | HandlerError::Reject(e) => Some(e.as_ref()),
        }
    }
}

impl From<Error> for HandlerError {
    fn from(e: Error) -> Self {
        match e.kind() {
            crate::ErrorKind::InvalidInput => HandlerError::Reject(Box::new(e)),
            _ => HandlerError::Retry(Box::new(e)),
        }
    }
}

/// Publishes integration events to a topic.
#[async_trait]
pub trait EventPublisher: Send + Sync {
    /// Publishes messages to `topic`, returning once the broker has accepted
    /// all of them. On error, some may have been published: publishing is
    /// at-least-once, and consumers deduplicate by event id.
    async fn publish(&self, topic: &str, messages: &[Message]) -> Result<()>;
}

/// Handles messages delivered from a subscription.
///
/// Returning `Ok` acknowledges the message. Handlers must be idempotent (or
/// use an inbox): delivery is at-least-once.
#[async_trait]
pub trait EventHandler: Send + Sync {
    /// Handles one delivery.
    async fn handle(&self, delivery: &Delivery) -> std::result::Result<(), HandlerError>;
}
