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

    /// A value the caller handed in cannot be stored or compared: a NUL
    /// character in text or JSON, text, JSON or an id above its documented
    /// size limit (see [`MAX_ID_BYTES`](crate::MAX_ID_BYTES) and its
    /// siblings), a timestamp outside PostgreSQL's range. Refused before the
    /// database sees it, the same by every repository.
    #[error("invalid value for `{field}`: {reason}")]
    InvalidValue {
        /// The column, field or parameter (`id`, `cursor`) refused.
        field: String,
        /// Why.
        reason: String,
    },

    /// The sort order is unusable (a field named twice, too many keys).
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

    /// The database failed or could not be reached, as classified by
    /// keel-database (SQLSTATE codes are read there, nowhere else).
    #[cfg(feature = "postgres")]
    #[error("{0}")]
    Database(#[source] keel_database::DatabaseError),
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
            field: shown(field),
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
        RepositoryError::Database(e.into())
    }
}

/// How caller-supplied text appears in an error message: at most
/// [`SHOWN_CHARS`] characters (then `…`), control characters escaped, so
/// a message stays one bounded line whatever the input.
pub(crate) fn shown(s: &str) -> String {
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i == SHOWN_CHARS {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// How many characters of caller-supplied text an error message shows.
pub(crate) const SHOWN_CHARS: usize = 64;

impl From<RepositoryError> for keel_core::Error {
    fn from(e: RepositoryError) -> Self {
        use keel_core::Error;
        // `InvalidInput` prints "invalid {field}: {reason}", so the reason
        // is the message without the variant's own "invalid …" prefix.
        let invalid =
            |field: String, reason: String| Error::Invalid(InvalidInput::new(field, reason));
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
            RepositoryError::UnknownField {
                usage,
                field,
                allowed,
            } => invalid(
                usage.to_owned(),
                format!("unknown field `{field}`; allowed: {allowed}"),
            ),
            RepositoryError::InvalidFilter { field, reason } => {
                invalid("filter".into(), format!("`{field}`: {reason}"))
            }
            RepositoryError::InvalidValue { field, reason } => invalid(field, reason),
            RepositoryError::InvalidSort { reason } => invalid("sort".into(), reason),
            RepositoryError::InvalidPage { reason } => invalid("page".into(), reason),
            RepositoryError::MalformedCursor { reason } => {
                invalid("cursor".into(), format!("malformed: {reason}"))
            }
            RepositoryError::TamperedCursor => {
                invalid("cursor".into(), "the signature does not match".into())
            }
            RepositoryError::CursorMismatch => invalid(
                "cursor".into(),
                "it was issued for a different query; start again from the first page".into(),
            ),
            RepositoryError::NotDeleted { subject } => {
                invalid("id".into(), format!("{subject} is not deleted"))
            }
            RepositoryError::Rejected {
                entity,
                sqlstate,
                message,
                ..
            } => invalid(
                entity.to_owned(),
                format!("refused by the database ({sqlstate}): {message}"),
            ),
            e @ (RepositoryError::Mapping { .. } | RepositoryError::Decode { .. }) => {
                Error::internal_msg(e.to_string())
            }
            #[cfg(feature = "postgres")]
            RepositoryError::Database(db) => db.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_core::{ErrorKind, ExpectedVersion, Version};

    #[test]
    fn caller_text_is_bounded_and_escaped() {
        assert_eq!(shown("a\nb\0"), "a\\nb\\u{0}");
        let long = shown(&"x".repeat(1_000));
        assert_eq!(long.chars().count(), SHOWN_CHARS + 1);
        assert!(long.ends_with('…'));
    }

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

        let page: keel_core::Error = RepositoryError::page("size must be 1 to 10").into();
        assert_eq!(page.to_string(), "invalid page: size must be 1 to 10");

        let cursor: keel_core::Error = RepositoryError::TamperedCursor.into();
        assert_eq!(cursor.kind(), ErrorKind::InvalidInput);
        assert!(matches!(&cursor, keel_core::Error::Invalid(i) if i.field == "cursor"));

        let mapping: keel_core::Error = RepositoryError::mapping("gadget", "bad").into();
        assert_eq!(mapping.kind(), ErrorKind::Internal);
    }
}
