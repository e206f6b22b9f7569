//! The error taxonomy shared by every port.
//!
//! Two families are kept apart on purpose:
//!
//! * [`Error`]: infrastructure failed or refused (a conflict, a timeout, a
//!   database that is down, input that cannot be stored). It has a
//!   [`kind`](Error::kind), a stable machine-readable [`code`](Error::code),
//!   and says whether retrying may help ([`is_retryable`](Error::is_retryable)).
//! * Domain errors: a business rule was broken. They are the aggregate's own
//!   error type (or the ready-made [`DomainError`]); retrying never helps.
//!
//! [`CommandError`] carries either one out of a command handler.

use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

use crate::version::{ExpectedVersion, Version};

/// A boxed error that can cross threads; used for error sources.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// `Result` with Keel's infrastructure [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong in infrastructure, as returned by every Keel port.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An optimistic-concurrency check failed: someone else wrote first.
    #[error(transparent)]
    Conflict(#[from] VersionConflict),

    /// A record with this identity already exists (a duplicate id or a unique
    /// key taken).
    #[error("{subject} already exists")]
    AlreadyExists {
        /// What already exists, e.g. `order 0190…`.
        subject: String,
    },

    /// The requested record does not exist.
    #[error("{subject} was not found")]
    NotFound {
        /// What was looked for, e.g. `order 0190…`.
        subject: String,
    },

    /// The caller's input was refused before anything was written.
    #[error(transparent)]
    Invalid(#[from] InvalidInput),

    /// A dependency (database, broker, cache) could not be reached or dropped
    /// the connection. Retrying later may succeed.
    #[error("{service} is unavailable: {message}")]
    Unavailable {
        /// The dependency, e.g. `postgres` or `pubsub`.
        service: Cow<'static, str>,
        /// What happened, free of secrets.
        message: String,
        /// The underlying error.
        #[source]
        source: Option<BoxError>,
    },

    /// The database aborted the transaction because a concurrent one
    /// touched the same data (a serialization failure or a deadlock).
    /// Nothing of it was stored; running the whole unit of work again may
    /// succeed, which
    /// [`TransactionalService`](crate::command::TransactionalService) does.
    #[error("transaction conflict: {message}")]
    TransactionConflict {
        /// What happened, free of secrets.
        message: String,
        /// The underlying error.
        #[source]
        source: Option<BoxError>,
    },

    /// An operation did not finish in time. Retrying later may succeed.
    #[error("{operation} timed out after {after:?}")]
    Timeout {
        /// The operation that timed out.
        operation: Cow<'static, str>,
        /// The time limit that was exceeded.
        after: Duration,
    },

    /// The caller did not prove who they are.
    #[error("unauthorized: {reason}")]
    Unauthorized {
        /// Why authentication failed (safe to show the caller).
        reason: String,
    },

    /// The caller is known but may not do this.
    #[error("forbidden: {reason}")]
    Forbidden {
        /// Why the request was refused (safe to show the caller).
        reason: String,
    },

    /// The service refused the request because it is at capacity (too
    /// many calls in flight, a rate limit). Nothing was done; retrying
    /// after `retry_after` may succeed.
    #[error("{resource} exhausted")]
    ResourceExhausted {
        /// What ran out, e.g. `concurrent calls`.
        resource: Cow<'static, str>,
        /// When the caller may try again, when the service can tell.
        retry_after: Option<Duration>,
    },

    /// A bug or an unexpected state: stored data that cannot be read, a
    /// broken invariant, a misconfiguration.
    #[error("internal error: {message}")]
    Internal {
        /// What happened.
        message: String,
        /// The underlying error.
        #[source]
        source: Option<BoxError>,
    },
}

/// The broad class of an [`Error`], for mapping to transport status codes and
/// metrics.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A concurrency conflict or a duplicate.
    Conflict,
    /// The record does not exist.
    NotFound,
    /// A dependency is down or unreachable.
    Unavailable,
    /// An operation ran out of time.
    Timeout,
    /// The input was refused.
    InvalidInput,
    /// Authentication is missing or failed.
    Unauthorized,
    /// Authorization denied the request.
    Forbidden,
    /// The service is at capacity; retry later.
    ResourceExhausted,
    /// Anything else: a bug or corrupted data.
    Internal,
}

impl ErrorKind {
    /// A stable lower-case name, e.g. `invalid_input`.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Conflict => "conflict",
            ErrorKind::NotFound => "not_found",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Timeout => "timeout",
            ErrorKind::InvalidInput => "invalid_input",
            ErrorKind::Unauthorized => "unauthorized",
            ErrorKind::Forbidden => "forbidden",
            ErrorKind::ResourceExhausted => "resource_exhausted",
            ErrorKind::Internal => "internal",
        }
    }

    /// The HTTP status code for errors of this kind; `keel-http` answers
    /// with it. This table and [`grpc_code`](Self::grpc_code) are the one
    /// place the transports' codes are chosen.
    ///
    /// | kind | HTTP | gRPC |
    /// |---|---|---|
    /// | conflict | 409 Conflict | `ABORTED` (10); a duplicate is `ALREADY_EXISTS` (6) |
    /// | not found | 404 Not Found | `NOT_FOUND` (5) |
    /// | invalid input | 400 Bad Request | `INVALID_ARGUMENT` (3) |
    /// | unauthorized | 401 Unauthorized | `UNAUTHENTICATED` (16) |
    /// | forbidden | 403 Forbidden | `PERMISSION_DENIED` (7) |
    /// | resource exhausted | 429 Too Many Requests | `RESOURCE_EXHAUSTED` (8) |
    /// | unavailable | 503 Service Unavailable | `UNAVAILABLE` (14) |
    /// | timeout | 504 Gateway Timeout | `DEADLINE_EXCEEDED` (4) |
    /// | internal | 500 Internal Server Error | `INTERNAL` (13) |
    ///
    /// A rejected command (a [`DomainError`]) is
    /// [`DomainError::HTTP_STATUS`] / [`DomainError::GRPC_CODE`].
    #[must_use]
    pub const fn http_status(self) -> u16 {
        match self {
            ErrorKind::Conflict => 409,
            ErrorKind::NotFound => 404,
            ErrorKind::InvalidInput => 400,
            ErrorKind::Unauthorized => 401,
            ErrorKind::Forbidden => 403,
            ErrorKind::ResourceExhausted => 429,
            ErrorKind::Unavailable => 503,
            ErrorKind::Timeout => 504,
            ErrorKind::Internal => 500,
        }
    }

    /// The numeric gRPC status code for errors of this kind (see the
    /// table at [`http_status`](Self::http_status)); `keel-grpc` answers
    /// with it. [`Error::describe`] refines it for duplicates.
    #[must_use]
    pub const fn grpc_code(self) -> i32 {
        match self {
            ErrorKind::Conflict => 10,
            ErrorKind::NotFound => 5,
            ErrorKind::InvalidInput => 3,
            ErrorKind::Unauthorized => 16,
            ErrorKind::Forbidden => 7,
            ErrorKind::ResourceExhausted => 8,
            ErrorKind::Unavailable => 14,
            ErrorKind::Timeout => 4,
            ErrorKind::Internal => 13,
        }
    }
}

impl ErrorKind {
    /// Whether errors of this kind mean the service failed rather than the
    /// request: a dependency that is down or slow, or a bug. Transports
    /// answer them with a server-error status, log the whole error, and
    /// show the caller a fixed sentence instead of the error's text, which
    /// can name hosts, statements or credentials (see
    /// [`Error::describe`]).
    #[must_use]
    pub const fn is_server_fault(self) -> bool {
        match self {
            ErrorKind::Unavailable | ErrorKind::Timeout | ErrorKind::Internal => true,
            ErrorKind::Conflict
            | ErrorKind::NotFound
            | ErrorKind::InvalidInput
            | ErrorKind::Unauthorized
            | ErrorKind::Forbidden
            | ErrorKind::ResourceExhausted => false,
        }
    }
}

/// What a caller may be told about an [`Error`], whatever the transport:
/// the one description both edges render.
///
/// `keel-http` turns it into problem details (status
/// [`http_status`](Self::http_status), `Retry-After` from
/// [`retry_after`](Self::retry_after)) and `keel-grpc` into a status (code
/// [`grpc_code`](Self::grpc_code), the stable code in `keel-error-code`
/// metadata, the retry hint in `grpc-retry-pushback-ms`), so both show the
/// same code, title and text. Built by [`Error::describe`].
///
/// ```
/// use keel_core::Error;
///
/// let down = Error::unavailable("postgres", "db.internal:5432 refused", std::io::Error::other("refused"));
/// let shown = down.describe();
/// assert_eq!(shown.code, "keel.unavailable");
/// assert_eq!(shown.title, "Service unavailable");
/// assert!(!shown.detail.contains("db.internal"));
/// assert!(shown.retryable);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ErrorDescription {
    /// The broad class, which each transport maps to its status code.
    pub kind: ErrorKind,
    /// The stable code, as [`Error::code`].
    pub code: &'static str,
    /// A short summary, the same for every error with this code, e.g.
    /// `Version conflict`.
    pub title: &'static str,
    /// An explanation of this occurrence that is safe to show the caller:
    /// the error's own text for errors the caller caused (their messages
    /// are documented as free of secrets), a fixed sentence for
    /// [server faults](ErrorKind::is_server_fault).
    pub detail: Cow<'static, str>,
    /// As [`Error::is_retryable`].
    pub retryable: bool,
    /// The HTTP status code: [`ErrorKind::http_status`].
    pub http_status: u16,
    /// The numeric gRPC status code: [`ErrorKind::grpc_code`], except
    /// `ALREADY_EXISTS` (6) for [`Error::AlreadyExists`].
    pub grpc_code: i32,
    /// How long the caller should wait before retrying, when the error
    /// says ([`Error::ResourceExhausted`]).
    pub retry_after: Option<Duration>,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Error {
    /// The broad class of this error.
    #[must_use]
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Conflict(_)
            | Error::AlreadyExists { .. }
            | Error::TransactionConflict { .. } => ErrorKind::Conflict,
            Error::NotFound { .. } => ErrorKind::NotFound,
            Error::Invalid(_) => ErrorKind::InvalidInput,
            Error::Unavailable { .. } => ErrorKind::Unavailable,
            Error::Timeout { .. } => ErrorKind::Timeout,
            Error::Unauthorized { .. } => ErrorKind::Unauthorized,
            Error::Forbidden { .. } => ErrorKind::Forbidden,
            Error::ResourceExhausted { .. } => ErrorKind::ResourceExhausted,
            Error::Internal { .. } => ErrorKind::Internal,
        }
    }

    /// A stable, machine-readable code such as `keel.conflict.version`.
    /// Codes never change once released; clients may match on them.
    #[must_use]
    pub fn code(&self) -> &'static str {
        match self {
            Error::Conflict(_) => "keel.conflict.version",
            Error::AlreadyExists { .. } => "keel.conflict.already_exists",
            Error::TransactionConflict { .. } => "keel.conflict.transaction",
            Error::NotFound { .. } => "keel.not_found",
            Error::Invalid(_) => "keel.invalid_input",
            Error::Unavailable { .. } => "keel.unavailable",
            Error::Timeout { .. } => "keel.timeout",
            Error::Unauthorized { .. } => "keel.unauthorized",
            Error::Forbidden { .. } => "keel.forbidden",
            Error::ResourceExhausted { .. } => "keel.resource_exhausted",
            Error::Internal { .. } => "keel.internal",
        }
    }

    /// Whether repeating the same operation unchanged may succeed (the
    /// dependency was down or slow, the service was at capacity). A version
    /// conflict is not retryable as such: the caller must reload and decide
    /// again.
    #[must_use]
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Error::Unavailable { .. }
                | Error::Timeout { .. }
                | Error::TransactionConflict { .. }
                | Error::ResourceExhausted { .. }
        )
    }

    /// What a caller may be told about this error; see
    /// [`ErrorDescription`].
    #[must_use]
    pub fn describe(&self) -> ErrorDescription {
        let (title, detail): (&'static str, Cow<'static, str>) = match self {
            Error::Conflict(c) => (
                "Version conflict",
                format!(
                    "{} was changed by someone else: expected {}, found version {}",
                    c.subject, c.expected, c.actual
                )
                .into(),
            ),
            Error::AlreadyExists { .. } => ("Already exists", self.to_string().into()),
            Error::TransactionConflict { .. } => (
                "Transaction conflict",
                "The request collided with a concurrent one and was not applied. Try again.".into(),
            ),
            Error::NotFound { .. } => ("Not found", self.to_string().into()),
            Error::Invalid(_) => ("Invalid input", self.to_string().into()),
            Error::Unauthorized { reason } => ("Unauthorized", reason.clone().into()),
            Error::Forbidden { reason } => ("Forbidden", reason.clone().into()),
            Error::ResourceExhausted { .. } => (
                "Too many requests",
                "The service is at capacity. Try again later.".into(),
            ),
            // Server faults: the text names hosts, statements or
            // credentials, so the caller gets a fixed sentence.
            Error::Unavailable { .. } => (
                "Service unavailable",
                "A service this request depends on is unavailable. Try again later.".into(),
            ),
            Error::Timeout { .. } => (
                "Timed out",
                "The request did not complete in time. Try again later.".into(),
            ),
            Error::Internal { .. } => ("Internal error", "An unexpected error occurred.".into()),
        };
        let kind = self.kind();
        let grpc_code = match self {
            Error::AlreadyExists { .. } => 6,
            _ => kind.grpc_code(),
        };
        let retry_after = match self {
            Error::ResourceExhausted { retry_after, .. } => *retry_after,
            _ => None,
        };
        ErrorDescription {
            kind,
            code: self.code(),
            title,
            detail,
            retryable: self.is_retryable(),
            http_status: kind.http_status(),
            grpc_code,
            retry_after,
        }
    }

    /// The error's text followed by the text of each of its sources,
    /// joined by `: `. For logs only: the sources can name hosts,
    /// statements or credentials.
    #[must_use]
    pub fn full_message(&self) -> String {
        let mut text = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(s) = source {
            text.push_str(": ");
            text.push_str(&s.to_string());
            source = s.source();
        }
        text
    }

    /// The structured conflict, when this is a version conflict.
    #[must_use]
    pub fn as_conflict(&self) -> Option<&VersionConflict> {
        match self {
            Error::Conflict(c) => Some(c),
            _ => None,
        }
    }

    /// Shorthand for [`Error::Invalid`].
    pub fn invalid_input(field: impl Into<Cow<'static, str>>, reason: impl Into<String>) -> Self {
        Error::Invalid(InvalidInput::new(field, reason))
    }

    /// Shorthand for [`Error::NotFound`].
    pub fn not_found(subject: impl Into<String>) -> Self {
        Error::NotFound {
            subject: subject.into(),
        }
    }

    /// Shorthand for [`Error::Unavailable`] with a source.
    pub fn unavailable(
        service: impl Into<Cow<'static, str>>,
        message: impl Into<String>,
        source: impl Into<BoxError>,
    ) -> Self {
        Error::Unavailable {
            service: service.into(),
            message: message.into(),
            source: Some(source.into()),
        }
    }

    /// Shorthand for [`Error::Internal`] with a source.
    pub fn internal(message: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Error::Internal {
            message: message.into(),
            source: Some(source.into()),
        }
    }

    /// Shorthand for [`Error::Internal`] without a source.
    pub fn internal_msg(message: impl Into<String>) -> Self {
        Error::Internal {
            message: message.into(),
            source: None,
        }
    }

    /// A [`Error::TransactionConflict`] with its cause.
    pub fn transaction_conflict(message: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Error::TransactionConflict {
            message: message.into(),
            source: Some(source.into()),
        }
    }

    /// Whether this is a [`Error::TransactionConflict`]: the whole unit of
    /// work may be run again.
    #[must_use]
    pub fn is_transaction_conflict(&self) -> bool {
        matches!(self, Error::TransactionConflict { .. })
    }
}

/// A failed optimistic-concurrency check, with what the writer expected and
/// what it found.
#[derive(Clone, PartialEq, Eq, Debug, thiserror::Error)]
#[error("version conflict on {subject}: expected {expected}, actual version {actual}")]
pub struct VersionConflict {
    /// The stream or entity written to.
    pub subject: String,
    /// What the writer expected.
    pub expected: ExpectedVersion,
    /// The version actually found ([`Version::INITIAL`] when it does not exist).
    pub actual: Version,
}

/// Input refused before anything was written, naming the offending field.
#[derive(Clone, PartialEq, Eq, Debug, thiserror::Error)]
#[error("invalid {field}: {reason}")]
pub struct InvalidInput {
    /// The field or parameter that was refused.
    pub field: Cow<'static, str>,
    /// Why it was refused, free of secrets.
    pub reason: String,
}

impl InvalidInput {
    /// Builds an `InvalidInput`.
    pub fn new(field: impl Into<Cow<'static, str>>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// A ready-made domain error for aggregates that do not need their own type:
/// a broken business rule with a stable code and a message for people.
///
/// ```
/// use keel_core::DomainError;
/// let e = DomainError::new("order.already_shipped", "the order has already shipped");
/// assert_eq!(e.code(), "order.already_shipped");
/// ```
#[derive(Clone, PartialEq, Eq, Debug, thiserror::Error)]
#[error("{message}")]
pub struct DomainError {
    code: Cow<'static, str>,
    message: String,
}

impl DomainError {
    /// The HTTP status of a rejected command: 422 Unprocessable Content.
    pub const HTTP_STATUS: u16 = 422;

    /// The gRPC status code of a rejected command: `FAILED_PRECONDITION`
    /// (9), the system is not in a state the command accepts.
    pub const GRPC_CODE: i32 = 9;

    /// Builds a domain error from a stable code and a message.
    pub fn new(code: impl Into<Cow<'static, str>>, message: impl Into<String>) -> Self {
        Self {
            code: code.into(),
            message: message.into(),
        }
    }

    /// The stable code, e.g. `order.already_shipped`.
    #[must_use]
    pub fn code(&self) -> &str {
        &self.code
    }

    /// The message for people.
    #[must_use]
    pub fn message(&self) -> &str {
        &self.message
    }
}

/// The outcome of a failed command: a broken rule, or failed infrastructure.
#[derive(Debug, thiserror::Error)]
pub enum CommandError<E> {
    /// The aggregate refused the command; retrying will not help.
    #[error("command rejected: {0}")]
    Rejected(#[source] E),
    /// Infrastructure failed (a conflict, a timeout, a database error).
    #[error(transparent)]
    Infrastructure(#[from] Error),
}

impl<E> CommandError<E> {
    /// The infrastructure error, if that is what this is.
    pub fn as_infrastructure(&self) -> Option<&Error> {
        match self {
            CommandError::Infrastructure(e) => Some(e),
            CommandError::Rejected(_) => None,
        }
    }

    /// The domain error, if the command was rejected.
    pub fn as_rejection(&self) -> Option<&E> {
        match self {
            CommandError::Rejected(e) => Some(e),
            CommandError::Infrastructure(_) => None,
        }
    }
}

#[cfg(test)]
mod tests;
