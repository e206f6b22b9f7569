//! The crate's error type.

use std::time::Duration;

use keel_core::BoxError;

/// `Result` with [`SearchError`] as the default error type.
pub type Result<T, E = SearchError> = std::result::Result<T, E>;

/// Everything that can go wrong in `keel-search`.
///
/// Bad input ([`InvalidIndexName`](Self::InvalidIndexName),
/// [`InvalidDocumentId`](Self::InvalidDocumentId),
/// [`DocumentTooLarge`](Self::DocumentTooLarge),
/// [`BatchTooLarge`](Self::BatchTooLarge), [`InvalidField`](Self::InvalidField),
/// [`InvalidArgument`](Self::InvalidArgument)) is refused before anything is
/// sent to the engine, by every engine alike. What the engine itself refuses
/// (a filter on an attribute that is not filterable, a failed indexing task)
/// is [`Rejected`](Self::Rejected), carrying the engine's error code, which
/// the in-memory engine reproduces for the cases it checks.
///
/// Converts into [`keel_core::Error`] with the matching kind.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SearchError {
    /// An index name is empty, too long or has characters outside
    /// `[A-Za-z0-9_-]`.
    #[error("invalid index name {name:?}: {reason}")]
    InvalidIndexName {
        /// The refused name (cut to 64 characters).
        name: String,
        /// Why it was refused.
        reason: &'static str,
    },

    /// A document id is missing, empty, too long, of the wrong JSON type or
    /// has characters outside `[A-Za-z0-9_-]`.
    #[error("invalid document id {id:?}: {reason}")]
    InvalidDocumentId {
        /// The refused id as text (cut to 64 characters).
        id: String,
        /// Why it was refused.
        reason: String,
    },

    /// One document of a write is larger than the limit; nothing was
    /// written.
    #[error("document {position} of the batch is {bytes} bytes, over the limit of {max}")]
    DocumentTooLarge {
        /// Its position in the batch (0 for a single document).
        position: usize,
        /// Its size as JSON.
        bytes: usize,
        /// The limit.
        max: usize,
    },

    /// A batch has too many documents or too many bytes; nothing was
    /// written.
    #[error("the batch has {actual} {unit}, over the limit of {max}")]
    BatchTooLarge {
        /// What was counted: `documents` or `bytes`.
        unit: &'static str,
        /// How many the batch has.
        actual: usize,
        /// The limit.
        max: usize,
    },

    /// An attribute name (in a filter, a sort, facets, settings) is empty or
    /// has characters a filter expression cannot hold safely.
    #[error("invalid attribute name {field:?}: {reason}")]
    InvalidField {
        /// The refused name (cut to 64 characters).
        field: String,
        /// Why it was refused.
        reason: &'static str,
    },

    /// Another argument was refused (a zero page, a limit over the maximum,
    /// a document that is not a JSON object).
    #[error("invalid {field}: {reason}")]
    InvalidArgument {
        /// The argument.
        field: &'static str,
        /// Why it was refused.
        reason: String,
    },

    /// The index does not exist.
    #[error("search index {index} does not exist")]
    IndexNotFound {
        /// The index name.
        index: String,
    },

    /// An index with this name exists already.
    #[error("search index {index} already exists")]
    IndexAlreadyExists {
        /// The index name.
        index: String,
    },

    /// The engine refused a request or an asynchronous task failed. `code`
    /// is the engine's stable error code (for Meilisearch, e.g.
    /// `invalid_search_filter`, `invalid_document_id`; see
    /// <https://www.meilisearch.com/docs/reference/errors/error_codes>).
    #[error("search engine refused the request ({code}): {message}")]
    Rejected {
        /// The engine's error code.
        code: String,
        /// The engine's error type: `invalid_request`, `auth`, `internal`,
        /// `system`.
        error_type: String,
        /// The engine's message.
        message: String,
        /// The asynchronous task that failed, when it was one.
        task: Option<u64>,
    },

    /// Waiting for a task (or another call) ran out of time. The task may
    /// still complete later.
    #[error("search {operation} timed out after {after:?}")]
    Timeout {
        /// What timed out, e.g. `task 42`.
        operation: String,
        /// The time limit.
        after: Duration,
    },

    /// The engine could not be reached or answered something unexpected.
    #[error("search engine unavailable: {message}")]
    Unavailable {
        /// What happened, free of secrets.
        message: String,
        /// The underlying error.
        #[source]
        source: Option<BoxError>,
    },

    /// A document could not be converted to or from JSON.
    #[error("cannot convert a search document: {0}")]
    Serde(#[source] serde_json::Error),

    /// The engine or a helper was configured inconsistently (a missing
    /// secret, a malformed URL).
    #[error("invalid search configuration: {0}")]
    Config(String),
}

impl SearchError {
    /// The engine's error code for [`Rejected`](Self::Rejected), if this is
    /// one.
    #[must_use]
    pub fn code(&self) -> Option<&str> {
        match self {
            SearchError::Rejected { code, .. } => Some(code),
            _ => None,
        }
    }

    /// Whether retrying the same call later may succeed (the engine was
    /// unreachable or slow).
    #[must_use]
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            SearchError::Unavailable { .. } | SearchError::Timeout { .. }
        ) || matches!(self, SearchError::Rejected { error_type, .. } if error_type == "system")
    }

    pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        SearchError::InvalidArgument {
            field,
            reason: reason.into(),
        }
    }

    pub(crate) fn rejected(code: &str, message: impl Into<String>) -> Self {
        SearchError::Rejected {
            code: code.to_owned(),
            error_type: "invalid_request".to_owned(),
            message: message.into(),
            task: None,
        }
    }
}

/// Cuts `s` to at most `max` characters, for error messages.
pub(crate) fn truncate(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

impl From<SearchError> for keel_core::Error {
    fn from(e: SearchError) -> Self {
        use keel_core::Error;
        match e {
            SearchError::InvalidIndexName { .. } => Error::invalid_input("index", e.to_string()),
            SearchError::InvalidDocumentId { .. } => {
                Error::invalid_input("document_id", e.to_string())
            }
            SearchError::DocumentTooLarge { .. } => Error::invalid_input("document", e.to_string()),
            SearchError::BatchTooLarge { .. } => Error::invalid_input("documents", e.to_string()),
            SearchError::InvalidField { .. } => Error::invalid_input("attribute", e.to_string()),
            SearchError::InvalidArgument { field, reason } => Error::invalid_input(field, reason),
            SearchError::Serde(_) => Error::invalid_input("document", e.to_string()),
            SearchError::IndexNotFound { index } => {
                Error::not_found(format!("search index {index}"))
            }
            SearchError::IndexAlreadyExists { index } => Error::AlreadyExists {
                subject: format!("search index {index}"),
            },
            SearchError::Rejected {
                ref error_type,
                ref code,
                ..
            } => match error_type.as_str() {
                "auth" => Error::Unauthorized {
                    reason: format!("the search engine refused the credentials ({code})"),
                },
                "invalid_request" => Error::invalid_input("search", e.to_string()),
                _ => Error::internal(e.to_string(), e),
            },
            SearchError::Timeout { operation, after } => Error::Timeout {
                operation: operation.into(),
                after,
            },
            SearchError::Unavailable { message, source } => Error::Unavailable {
                service: "meilisearch".into(),
                message,
                source,
            },
            SearchError::Config(_) => Error::internal_msg(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use keel_core::ErrorKind;

    use super::*;

    #[test]
    fn kinds_follow_the_cause() {
        let kind = |e: SearchError| keel_core::Error::from(e).kind();
        assert_eq!(
            kind(SearchError::rejected("invalid_search_filter", "x")),
            ErrorKind::InvalidInput
        );
        assert_eq!(
            kind(SearchError::IndexNotFound { index: "a".into() }),
            ErrorKind::NotFound
        );
        assert_eq!(
            kind(SearchError::Timeout {
                operation: "task 1".into(),
                after: Duration::from_secs(1)
            }),
            ErrorKind::Timeout
        );
        assert_eq!(
            kind(SearchError::Rejected {
                code: "invalid_api_key".into(),
                error_type: "auth".into(),
                message: "no".into(),
                task: None
            }),
            ErrorKind::Unauthorized
        );
        assert_eq!(
            kind(SearchError::BatchTooLarge {
                unit: "documents",
                actual: 2,
                max: 1
            }),
            ErrorKind::InvalidInput
        );
    }

    #[test]
    fn code_is_exposed_for_rejections_only() {
        assert_eq!(
            SearchError::rejected("invalid_search_sort", "x").code(),
            Some("invalid_search_sort")
        );
        assert_eq!(SearchError::Config("x".into()).code(), None);
    }
}
