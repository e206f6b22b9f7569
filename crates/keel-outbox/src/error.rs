//! The one error type of this crate.

use std::borrow::Cow;
use std::time::Duration;

use keel_core::EventId;

/// `Result` with [`OutboxError`] as the default error type.
pub type Result<T, E = OutboxError> = std::result::Result<T, E>;

/// Everything that can go wrong in the outbox, the relay and the inbox.
///
/// Input errors ([`Invalid`](Self::Invalid),
/// [`PayloadTooLarge`](Self::PayloadTooLarge),
/// [`DuplicateEvent`](Self::DuplicateEvent)) are raised before the outbox
/// table is touched, except a duplicate event id already committed by an
/// earlier transaction: PostgreSQL reports that one, which aborts the caller's
/// transaction (roll it back; nothing of it is kept).
///
/// Converts into [`keel_core::Error`] with `?` wherever a port is implemented.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OutboxError {
    /// An outbox message, an inbox consumer name or a setting was refused
    /// before anything was written.
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// The refused field, e.g. `topic` or `batch_size`.
        field: Cow<'static, str>,
        /// Why it was refused.
        reason: String,
    },

    /// A payload is larger than the writer's limit.
    #[error("the payload of event {event_id} is {size} bytes, over the limit of {limit} bytes")]
    PayloadTooLarge {
        /// The event whose payload is too large.
        event_id: EventId,
        /// The payload's size as serialized JSON.
        size: usize,
        /// The writer's limit.
        limit: usize,
    },

    /// The event id is already in the outbox (detected by the
    /// `outbox_event_id_key` constraint, or within one batch).
    #[error("event {event_id} is already in the outbox")]
    DuplicateEvent {
        /// The event id written twice.
        event_id: EventId,
    },

    /// An outbox row could not be turned back into a message (someone edited
    /// the table by hand). The relay keeps retrying the row with backoff.
    #[error("outbox row {id} cannot be read: {reason}")]
    CorruptRow {
        /// The row's id.
        id: i64,
        /// What is wrong with it.
        reason: String,
    },

    /// The bus refused or failed a publish. Some of the messages may have
    /// been published anyway; they are published again later.
    #[error("publishing to topic {topic} failed")]
    Publish {
        /// The topic.
        topic: String,
        /// The bus adapter's error.
        #[source]
        source: keel_core::Error,
    },

    /// The bus did not answer a publish in time.
    #[error("publishing to topic {topic} timed out after {after:?}")]
    PublishTimeout {
        /// The topic.
        topic: String,
        /// The configured publish timeout.
        after: Duration,
    },

    /// The event-store relay failed: an event could not be read or turned
    /// into a message, or the store failed.
    #[error("the event-store relay failed")]
    EventStore(#[source] keel_core::Error),

    /// PostgreSQL failed or could not be reached.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

impl OutboxError {
    pub(crate) fn invalid(field: impl Into<Cow<'static, str>>, reason: impl Into<String>) -> Self {
        OutboxError::Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// Whether repeating the operation unchanged may succeed: the database or
    /// the bus was down, slow, or aborted the transaction (deadlock,
    /// serialization failure; see `keel_database::is_retryable`).
    #[must_use]
    pub fn is_retryable(&self) -> bool {
        match self {
            OutboxError::Publish { source, .. } | OutboxError::EventStore(source) => {
                source.is_retryable()
            }
            OutboxError::PublishTimeout { .. } => true,
            OutboxError::Database(e) => keel_database::is_retryable(e),
            _ => false,
        }
    }
}

impl From<OutboxError> for keel_core::Error {
    fn from(e: OutboxError) -> Self {
        match e {
            OutboxError::Invalid { field, reason } => {
                keel_core::Error::invalid_input(field, reason)
            }
            e @ OutboxError::PayloadTooLarge { .. } => {
                keel_core::Error::invalid_input("payload", e.to_string())
            }
            OutboxError::DuplicateEvent { event_id } => keel_core::Error::AlreadyExists {
                subject: format!("outbox event {event_id}"),
            },
            OutboxError::Publish { source, .. } | OutboxError::EventStore(source) => source,
            OutboxError::PublishTimeout { after, .. } => keel_core::Error::Timeout {
                operation: "outbox publish".into(),
                after,
            },
            e @ OutboxError::CorruptRow { .. } => keel_core::Error::internal_msg(e.to_string()),
            // The one SQLSTATE classifier is keel-database's: conflicts,
            // timeouts, lost connections and refused values are typed the
            // same as everywhere else in Keel.
            OutboxError::Database(db) => keel_database::to_keel(db),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_core::ErrorKind;

    #[test]
    fn converts_into_the_core_taxonomy() {
        let e: keel_core::Error = OutboxError::invalid("topic", "must not be empty").into();
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
        assert_eq!(e.to_string(), "invalid topic: must not be empty");

        let id = EventId::new();
        let e: keel_core::Error = OutboxError::PayloadTooLarge {
            event_id: id,
            size: 10,
            limit: 5,
        }
        .into();
        assert_eq!(e.kind(), ErrorKind::InvalidInput);

        let e: keel_core::Error = OutboxError::DuplicateEvent { event_id: id }.into();
        assert_eq!(e.kind(), ErrorKind::Conflict);
        assert_eq!(e.code(), "keel.conflict.already_exists");

        let down = OutboxError::Database(sqlx::Error::PoolClosed);
        assert!(down.is_retryable());
        let e: keel_core::Error = down.into();
        assert_eq!(e.kind(), ErrorKind::Unavailable);

        let slow = OutboxError::Database(sqlx::Error::PoolTimedOut);
        assert!(slow.is_retryable());
        assert_eq!(keel_core::Error::from(slow).kind(), ErrorKind::Timeout);

        let bug = OutboxError::Database(sqlx::Error::Protocol("garbled".into()));
        assert!(!bug.is_retryable());
        assert_eq!(keel_core::Error::from(bug).kind(), ErrorKind::Internal);

        let e = OutboxError::PublishTimeout {
            topic: "orders".into(),
            after: Duration::from_secs(3),
        };
        assert!(e.is_retryable());
        assert_eq!(keel_core::Error::from(e).kind(), ErrorKind::Timeout);
    }
}
