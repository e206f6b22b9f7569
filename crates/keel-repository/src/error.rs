//! The repository's error type.

use keel_core::{InvalidInput, VersionConflict};

/// `Result` with [`RepositoryError`] as the default error type.
pub type Result<T, E = RepositoryError> = std::result::Result<T, E>;

/// Everything a repository can refuse or fail with.
///
/// Converts into [`keel_core::Error`] (the port's error) with `?`: version
/// conflicts stay structured, duplicates become `AlreadyExists`, bad queries
/// and cursors become `Invalid`, connection trouble becomes the retryable
/// `Unavailable`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RepositoryError {
    /// The entity's declared mapping is unusable (a bad identifier, a
    /// duplicate column, a sortable nullable column, a row the mapping did
    /// not fill in…). A bug in the service, found when the repository is
    /// built or the first time the mapping writes a row.
    #[error("invalid mapping for {entity}: {reason}")]
    Mapping {
        /// The entity's name.
        entity: &'static str,
        /// What is wrong.
        reason: String,
    },

    /// A stored row could not be turned back into the entity.
    #[error("cannot read {entity} column `{column}`: {reason}")]
    Decode {
        /// The entity's name.
        entity: &'static str,
        /// The column that could not be read.
        column: String,
        /// Why.
        reason: String,
    },

    /// A filter or sort key names a field the mapping does not declare for
    /// that use.
    #[error("unknown {usage} field `{field}`; allowed: {allowed}")]
    UnknownField {
        /// `filter` or `sort`.
        usage: &'static str,
        /// The field the caller named.
        field: String,
        /// The fields that may be used, comma-separated.
        allowed: String,
    },

    /// A filter's value does not fit its field (wrong type, unparsable UUID
    /// or timestamp, a prefix on a non-text field, an inverted range…).
    #[error("invalid filter on `{field}`: {reason}")]
    InvalidFilter {
        /// The field filtered on.
        field: String,
        /// Why the filter was refused.
        reason: String,
    },

    /// The sort order is unusable (a field named twice).
    #[error("invalid sort: {reason}")]
    InvalidSort {
        /// Why.
        reason: String,
    },

    /// The page request is out of bounds (size 0 or above the maximum, page
    /// 0, an offset too large).
    #[error("invalid page: {reason}")]
    InvalidPage {
        /// Why.
        reason: String,
    },

    /// The cursor is not one this repository produced: bad encoding, bad
    /// structure, or values that do not fit the sort order.
    #[error("malformed cursor: {reason}")]
    MalformedCursor {
        /// Why.
        reason: String,
    },

    /// The cursor's signature does not match its content: it was altered, or
    /// it was signed with another secret.
    #[error("tampered cursor: the signature does not match")]
    TamperedCursor,

    /// The cursor is genuine but was issued for a different query (other
    /// filters, sort order, deleted scope or entity).
    #[error("cursor was issued for a different query; start again from the first page")]
    CursorMismatch,

    /// An optimistic-locking check failed; nothing was written.
    #[error(transparent)]
    Conflict(#[from] VersionConflict),

    /// The id (or another unique key) is taken; nothing was written.
    #[error("{subject} already exists{}", constraint.as_ref().map(|c| format!(" (unique constraint `{c}`)")).unwrap_or_default())]
    AlreadyExists {
        /// What already exists, e.g. `customer 42`.
        subject: String,
        /// The violated constraint, when the database named it.
        constraint: Option<String>,
    },

    /// The entity does not exist, or is soft-deleted where a live one is
    /// required.
    #[error("{subject} was not found")]
    NotFound {
        /// What was looked for.
        subject: String,
    },

    /// `restore` was called on an entity that is not soft-deleted.
    #[error("{subject} is not deleted")]
    NotDeleted {
        /// The entity.
        subject: String,
    },

    /// The stored data refused the entity (a `CHECK`, `NOT NULL` or foreign
    /// key constraint of the service's table, a value too long…), detected
    /// by SQLSTATE class 22 or 23.
    #[error("{entity} refused by the database ({sqlstate}): {message}")]
    Rejected {
        /// The entity's name.
        entity: &'static str,
        /// The SQLSTATE code, e.g. `23514`.
        sqlstate: String,
        /// The database's message.
        message: String,
        /// The violated constraint, when the database named it.
        constraint: Option<String>,
    },

    /// The database failed or could not be reached.
    #[cfg(feature = "postgres")]
    #[error("database error: {0}")]
    Database(#[source] sqlx::Error),
}

impl RepositoryError {
    pub(crate) fn mapping(entity: &'static str, reason: impl Into<String>) -> Self {
        RepositoryError::Mapping {
            entity,
            reason: reason.into(),
        }
    }

    pub(crate) fn filter(field: &str, reason: impl Into<String>) -> Self {
        RepositoryError::InvalidFilter {
            field: field.to_owned(),
            reason: reason.into(),
        }
    }

    pub(crate) fn page(reason: impl Into<String>) -> Self {
        RepositoryError::InvalidPage {
            reason: reason.into(),
        }
    }

    pub(crate) fn malformed(reason: impl Into<String>) -> Self {
        RepositoryError::MalformedCursor {
            reason: reason.into(),
        }
    }

    /// The structured conflict, when this is a version conflict.
    #[must_use]
    pub fn as_conflict(&self) -> Option<&VersionConflict> {
        match self {
            RepositoryError::Conflict(c) => Some(c),
            _ => None,
        }
    }
}

#[cfg(feature = "postgres")]
impl From<sqlx::Error> for RepositoryError {
    fn from(e: sqlx::Error) -> Self {
        RepositoryError::Database(e)
    }
}

impl From<RepositoryError> for keel_core::Error {
    fn from(e: RepositoryError) -> Self {
        use keel_core::Error;
        let message = e.to_string();
        let invalid =
            |field: &'static str| Error::Invalid(InvalidInput::new(field, message.clone()));
        match e {
            RepositoryError::Conflict(c) => Error::Conflict(c),
            RepositoryError::AlreadyExists {
                subject,
                constraint,
            } => Error::AlreadyExists {
                subject: match constraint {
                    Some(c) => format!("{subject} (unique constraint `{c}`)"),
                    None => subject,
                },
            },
            RepositoryError::NotFound { subject } => Error::NotFound { subject },
            RepositoryError::UnknownField { usage, .. } => invalid(usage),
            RepositoryError::InvalidFilter { .. } => invalid("filter"),
            RepositoryError::InvalidSort { .. } => invalid("sort"),
            RepositoryError::InvalidPage { .. } => invalid("page"),
            RepositoryError::MalformedCursor { .. }
            | RepositoryError::TamperedCursor
            | RepositoryError::CursorMismatch => invalid("cursor"),
            RepositoryError::NotDeleted { .. } => invalid("id"),
            RepositoryError::Rejected { entity, .. } => invalid(entity),
            RepositoryError::Mapping { .. } | RepositoryError::Decode { .. } => {
                Error::internal_msg(message)
            }
            #[cfg(feature = "postgres")]
            RepositoryError::Database(db) => crate::postgres::classify(db),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_core::{ErrorKind, ExpectedVersion, Version};

    #[test]
    fn converts_into_the_port_error() {
        let conflict: keel_core::Error = RepositoryError::Conflict(VersionConflict {
            subject: "gadget a".into(),
            expected: ExpectedVersion::Exact(Version::new(1)),
            actual: Version::new(2),
        })
        .into();
        assert_eq!(conflict.as_conflict().unwrap().actual, Version::new(2));

        let dup: keel_core::Error = RepositoryError::AlreadyExists {
            subject: "gadget a".into(),
            constraint: Some("gadgets_pkey".into()),
        }
        .into();
        assert_eq!(dup.kind(), ErrorKind::Conflict);
        assert_eq!(
            dup.to_string(),
            "gadget a (unique constraint `gadgets_pkey`) already exists"
        );

        let cursor: keel_core::Error = RepositoryError::TamperedCursor.into();
        assert_eq!(cursor.kind(), ErrorKind::InvalidInput);
        assert!(matches!(&cursor, keel_core::Error::Invalid(i) if i.field == "cursor"));

        let mapping: keel_core::Error = RepositoryError::mapping("gadget", "bad").into();
        assert_eq!(mapping.kind(), ErrorKind::Internal);
    }
}
