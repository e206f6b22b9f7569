//! The event store's error type.

use keel_core::{BoxError, EventId, InvalidInput, StreamId, Version, VersionConflict};

/// `Result` with [`EventStoreError`] as the default error type.
pub type Result<T, E = EventStoreError> = std::result::Result<T, E>;

/// Everything that can go wrong in the event store.
///
/// Converts into [`keel_core::Error`] (with the matching kind and code) for
/// callers that work with ports only.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EventStoreError {
    /// The stream was not at the expected version; nothing was written.
    #[error(transparent)]
    Conflict(#[from] VersionConflict),

    /// An event id in the batch is already stored as a different event (other
    /// content, another stream, another version, or only part of the batch was
    /// stored before). Nothing was written.
    #[error(
        "event id {event_id} is already stored as a different event (appending to {stream_id})"
    )]
    EventIdReused {
        /// The reused id.
        event_id: EventId,
        /// The stream the refused append was aimed at.
        stream_id: StreamId,
    },

    /// The input was refused before anything was written.
    #[error(transparent)]
    Invalid(#[from] InvalidInput),

    /// A payload is larger than the configured limit; nothing was written.
    #[error("payload of event type {event_type:?} is {size} bytes; the limit is {limit}")]
    PayloadTooLarge {
        /// The event type whose payload is too large.
        event_type: String,
        /// The payload's size in bytes.
        size: usize,
        /// The configured limit in bytes.
        limit: usize,
    },

    /// A payload given as raw bytes is not JSON.
    #[error("payload of event type {event_type:?} is not valid JSON")]
    NotJson {
        /// The event type the payload was given for.
        event_type: String,
        /// The parser's complaint.
        #[source]
        source: serde_json::Error,
    },

    /// An event could not be serialized to JSON.
    #[error("cannot serialize an event of type {event_type:?}")]
    Serialize {
        /// The event type.
        event_type: String,
        /// The serializer's complaint.
        #[source]
        source: serde_json::Error,
    },

    /// A stored event's type is not one the reader knows.
    #[error("unknown event type {event_type:?} at {stream_id} version {version}")]
    UnknownEventType {
        /// The stored event type.
        event_type: String,
        /// The stream holding the event.
        stream_id: StreamId,
        /// The event's version in its stream.
        version: Version,
    },

    /// A stored payload could not be decoded into the requested type.
    #[error(
        "cannot decode event type {event_type:?} (schema version {schema_version}) at {stream_id} version {version}"
    )]
    Decode {
        /// The stored event type.
        event_type: String,
        /// The payload's schema version after upcasting.
        schema_version: u32,
        /// The stream holding the event.
        stream_id: StreamId,
        /// The event's version in its stream.
        version: Version,
        /// The deserializer's complaint.
        #[source]
        source: serde_json::Error,
    },

    /// A payload is at a schema version that no upcaster chain leads from.
    #[error("no upcaster for event type {event_type:?} from schema version {from} to {to}")]
    MissingUpcaster {
        /// The event type.
        event_type: String,
        /// The schema version the missing step starts at.
        from: u32,
        /// The schema version the missing step should produce.
        to: u32,
    },

    /// A payload is at a newer schema version than this reader understands.
    #[error(
        "event type {event_type:?} is stored at schema version {stored}, newer than the current {current}"
    )]
    FutureSchemaVersion {
        /// The event type.
        event_type: String,
        /// The stored schema version.
        stored: u32,
        /// The newest schema version this reader knows.
        current: u32,
    },

    /// An upcaster failed on a stored payload.
    #[error("upcasting event type {event_type:?} from schema version {from} failed")]
    Upcast {
        /// The event type.
        event_type: String,
        /// The schema version the failing step starts at.
        from: u32,
        /// The upcaster's complaint.
        #[source]
        source: BoxError,
    },

    /// A subscription's handler failed; the checkpoint stays before the event.
    #[error("subscription {subscription:?}: the handler failed at {position}")]
    Handler {
        /// The subscription's name.
        subscription: String,
        /// The position of the event the handler failed on.
        position: keel_core::Position,
        /// The handler's error.
        #[source]
        source: BoxError,
    },

    /// A projection's handler kept failing on an event: it was parked and,
    /// under [`PoisonAction::Halt`](crate::PoisonAction::Halt), the runner
    /// stopped with the checkpoint before it.
    #[error(
        "projection {projection}: the event at {position} was parked after {attempts} attempts"
    )]
    Parked {
        /// The projection (`name@vN`).
        projection: String,
        /// The parked event's position.
        position: keel_core::Position,
        /// Attempts made in this run.
        attempts: u32,
        /// The handler's last error.
        #[source]
        source: BoxError,
    },

    /// The database could not be reached or dropped the connection; retrying
    /// later may succeed.
    #[cfg(feature = "postgres")]
    #[error("the event store database is unavailable")]
    Unavailable(#[source] sqlx::Error),

    /// The database refused or failed an operation.
    #[cfg(feature = "postgres")]
    #[error("event store database error")]
    Database(#[source] sqlx::Error),

    /// A failure reported by keel-core: a unit of work that could not be
    /// joined (a transaction of another backend) or that a failed statement
    /// aborted. Converts back into the same [`keel_core::Error`].
    #[error(transparent)]
    Core(keel_core::Error),

    /// Reading or writing a snapshot export failed (see
    /// [`export_ndjson`](crate::export_ndjson) and
    /// [`import_ndjson`](crate::import_ndjson)).
    #[error("{context}: {source}")]
    Io {
        /// What the store was doing.
        context: &'static str,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },

    /// Stored data breaks an invariant of the store (a bug or tampering).
    #[error("corrupt event store data: {0}")]
    Corrupt(String),
}

impl EventStoreError {
    /// Shorthand for [`EventStoreError::Invalid`].
    pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::Invalid(InvalidInput::new(field, reason))
    }

    /// Shorthand for [`EventStoreError::Io`].
    pub(crate) fn io(context: &'static str, source: std::io::Error) -> Self {
        Self::Io { context, source }
    }

    /// Whether retrying the same operation unchanged may succeed: the
    /// database was unreachable, or the transaction was chosen as a deadlock
    /// victim or failed serialization.
    #[must_use]
    pub fn is_retryable(&self) -> bool {
        match self {
            #[cfg(feature = "postgres")]
            Self::Unavailable(_) => true,
            // serialization failure, deadlock: the transaction may succeed
            // when run again
            #[cfg(feature = "postgres")]
            Self::Database(e) => keel_database::is_transaction_conflict(e),
            Self::Core(e) => e.is_retryable(),
            _ => false,
        }
    }

    /// The structured conflict, when this is a version conflict.
    #[must_use]
    pub fn as_conflict(&self) -> Option<&VersionConflict> {
        match self {
            Self::Conflict(c) => Some(c),
            _ => None,
        }
    }
}

impl From<keel_core::Error> for EventStoreError {
    fn from(e: keel_core::Error) -> Self {
        match e {
            keel_core::Error::Invalid(inv) => Self::Invalid(inv),
            keel_core::Error::Conflict(c) => Self::Conflict(c),
            other => Self::Core(other),
        }
    }
}

#[cfg(feature = "postgres")]
impl From<sqlx::Error> for EventStoreError {
    fn from(e: sqlx::Error) -> Self {
        // keel-database is the one place that reads SQLSTATE codes.
        if keel_database::is_connection_error(&e) || keel_database::is_pool_timeout(&e) {
            Self::Unavailable(e)
        } else {
            Self::Database(e)
        }
    }
}

impl From<EventStoreError> for keel_core::Error {
    fn from(e: EventStoreError) -> Self {
        match e {
            EventStoreError::Conflict(c) => keel_core::Error::Conflict(c),
            EventStoreError::Invalid(inv) => keel_core::Error::Invalid(inv),
            EventStoreError::EventIdReused { .. } => keel_core::Error::AlreadyExists {
                subject: e.to_string(),
            },
            EventStoreError::PayloadTooLarge { .. } | EventStoreError::NotJson { .. } => {
                let reason = e.to_string();
                keel_core::Error::Invalid(InvalidInput::new("payload", reason))
            }
            #[cfg(feature = "postgres")]
            EventStoreError::Unavailable(_) => {
                keel_core::Error::unavailable("postgres", "event store database unavailable", e)
            }
            // Classified by keel-database: a serialization failure or
            // deadlock becomes a retryable TransactionConflict, and so on.
            #[cfg(feature = "postgres")]
            EventStoreError::Database(e) => keel_database::to_keel(e),
            EventStoreError::Core(e) => e,
            other => keel_core::Error::internal(other.to_string(), other),
        }
    }
}
