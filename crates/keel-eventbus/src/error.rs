//! The crate's error type.

use std::time::Duration;

use keel_core::{BoxError, EventId};

use crate::codec::MalformedMessage;

/// `Result` with [`EventBusError`] as the default error type.
pub type Result<T, E = EventBusError> = std::result::Result<T, E>;

/// Everything that can go wrong on the event bus.
///
/// Configuration and naming mistakes are reported before anything touches the
/// broker; broker failures keep their cause as the error source.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EventBusError {
    /// A subscription or bus setting is out of range.
    #[error("invalid {field}: {reason}")]
    InvalidConfig {
        /// The setting, e.g. `max_delivery_attempts`.
        field: &'static str,
        /// Why it was refused.
        reason: String,
    },

    /// A topic, subscription, consumer or prefix name breaks the naming rules.
    #[error("invalid {kind} name {name:?}: {reason}")]
    InvalidName {
        /// What was being named: `topic`, `consumer`, `prefix`, `project`.
        kind: &'static str,
        /// The refused name.
        name: String,
        /// Which rule it breaks.
        reason: String,
    },

    /// The topic does not exist and auto-creation is off.
    #[error("topic {topic} does not exist (auto-creation is off)")]
    TopicNotFound {
        /// The broker-side topic name.
        topic: String,
    },

    /// The subscription does not exist and auto-creation is off.
    #[error("subscription {subscription} does not exist (auto-creation is off)")]
    SubscriptionNotFound {
        /// The broker-side subscription name.
        subscription: String,
    },

    /// A received message is not a Keel message (not JSON, missing or invalid
    /// attributes).
    #[error(transparent)]
    Malformed(#[from] MalformedMessage),

    /// A message cannot be turned into a broker message (an attribute too
    /// long, a payload that does not serialize).
    #[error("cannot encode message {event_id}: {reason}")]
    Encode {
        /// The message's event id.
        event_id: EventId,
        /// What is wrong with it.
        reason: String,
    },

    /// The broker refused or failed a publish. Some messages of the batch may
    /// have been published: publishing is at-least-once.
    #[error("publishing to {topic} failed: {message}")]
    Publish {
        /// The broker-side topic name.
        topic: String,
        /// What happened.
        message: String,
        /// The underlying error.
        #[source]
        source: Option<BoxError>,
    },

    /// An administrative or data-plane call to the broker failed.
    #[error("{operation} failed: {message}")]
    Broker {
        /// The call, e.g. `create subscription orders.billing`.
        operation: String,
        /// What happened.
        message: String,
        /// Whether trying again later may help.
        retryable: bool,
        /// The underlying error.
        #[source]
        source: Option<BoxError>,
    },

    /// The broker did not answer within the connect timeout (nothing
    /// listening at the endpoint, a wrong host, a firewall): the bus gives up
    /// at startup instead of retrying in the background.
    #[error("no answer from the broker at {endpoint} within {waited:?}")]
    Unreachable {
        /// The endpoint tried, e.g. `http://127.0.0.1:8085`.
        endpoint: String,
        /// How long the bus waited.
        waited: Duration,
        /// The last error seen, when the client reported one in time.
        #[source]
        source: Option<BoxError>,
    },
    /// The bus could not be set up (credentials, endpoint, TLS).
    #[error("cannot connect to the broker: {message}")]
    Connect {
        /// What happened.
        message: String,
        /// The underlying error.
        #[source]
        source: Option<BoxError>,
    },
}

impl EventBusError {
    pub(crate) fn invalid_config(field: &'static str, reason: impl Into<String>) -> Self {
        EventBusError::InvalidConfig {
            field,
            reason: reason.into(),
        }
    }

    /// Whether trying the same call again later may succeed.
    #[must_use]
    pub fn is_retryable(&self) -> bool {
        match self {
            EventBusError::Publish { .. }
            | EventBusError::Connect { .. }
            | EventBusError::Unreachable { .. } => true,
            EventBusError::Broker { retryable, .. } => *retryable,
            _ => false,
        }
    }
}

impl From<EventBusError> for keel_core::Error {
    fn from(e: EventBusError) -> Self {
        use keel_core::{Error, InvalidInput};
        match e {
            EventBusError::InvalidConfig { field, reason } => {
                Error::Invalid(InvalidInput::new(field, reason))
            }
            EventBusError::InvalidName { kind, name, reason } => {
                Error::Invalid(InvalidInput::new(kind, format!("{name:?}: {reason}")))
            }
            EventBusError::Malformed(m) => Error::Invalid(InvalidInput::new("message", m.reason)),
            EventBusError::Encode { event_id, reason } => Error::Invalid(InvalidInput::new(
                "message",
                format!("event {event_id}: {reason}"),
            )),
            EventBusError::TopicNotFound { topic } => Error::not_found(format!("topic {topic}")),
            EventBusError::SubscriptionNotFound { subscription } => {
                Error::not_found(format!("subscription {subscription}"))
            }
            e @ (EventBusError::Publish { .. }
            | EventBusError::Connect { .. }
            | EventBusError::Unreachable { .. }) => Error::unavailable("pubsub", e.to_string(), e),
            EventBusError::Broker {
                operation,
                message,
                retryable,
                source,
            } => {
                let message = format!("{operation} failed: {message}");
                if retryable {
                    Error::Unavailable {
                        service: "pubsub".into(),
                        message,
                        source,
                    }
                } else {
                    Error::Internal { message, source }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_core::ErrorKind;

    #[test]
    fn maps_to_core_error_kinds() {
        let cases: Vec<(EventBusError, ErrorKind)> = vec![
            (
                EventBusError::invalid_config("max_delivery_attempts", "must be 5 to 100"),
                ErrorKind::InvalidInput,
            ),
            (
                EventBusError::TopicNotFound {
                    topic: "orders".into(),
                },
                ErrorKind::NotFound,
            ),
            (
                EventBusError::Publish {
                    topic: "orders".into(),
                    message: "deadline exceeded".into(),
                    source: None,
                },
                ErrorKind::Unavailable,
            ),
            (
                EventBusError::Broker {
                    operation: "create topic".into(),
                    message: "permission denied".into(),
                    retryable: false,
                    source: None,
                },
                ErrorKind::Internal,
            ),
            (
                MalformedMessage::new("data is not JSON").into(),
                ErrorKind::InvalidInput,
            ),
            (
                EventBusError::Unreachable {
                    endpoint: "http://127.0.0.1:1".into(),
                    waited: Duration::from_secs(5),
                    source: None,
                },
                ErrorKind::Unavailable,
            ),
        ];
        for (e, kind) in cases {
            let text = e.to_string();
            let core: keel_core::Error = e.into();
            assert_eq!(core.kind(), kind, "{text}");
        }
    }

    #[test]
    fn retryability() {
        assert!(
            EventBusError::Publish {
                topic: "t".into(),
                message: "m".into(),
                source: None
            }
            .is_retryable()
        );
        assert!(!EventBusError::invalid_config("x", "y").is_retryable());
    }
}
