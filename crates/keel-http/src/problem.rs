//! Keel errors as RFC 9457 problem details.

use std::fmt;

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use keel_core::{CommandError, DomainError, Error, ErrorKind};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The media type of problem details.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// The prefix of every problem `type` URI; the stable error code follows,
/// e.g. `urn:keel:problem:keel.conflict.version`.
pub const PROBLEM_TYPE_PREFIX: &str = "urn:keel:problem:";

/// The HTTP status for an error kind: keel-core's table
/// ([`ErrorKind::http_status`]), the same one keel-grpc reads its codes
/// from.
///
/// | kind | status |
/// |---|---|
/// | conflict | 409 Conflict |
/// | not found | 404 Not Found |
/// | invalid input | 400 Bad Request |
/// | unauthorized | 401 Unauthorized |
/// | forbidden | 403 Forbidden |
/// | resource exhausted | 429 Too Many Requests |
/// | unavailable | 503 Service Unavailable |
/// | timeout | 504 Gateway Timeout |
/// | internal, and any kind added later | 500 Internal Server Error |
#[must_use]
pub fn status_for(kind: ErrorKind) -> StatusCode {
    StatusCode::from_u16(kind.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

/// The status for a rejected command (a broken business rule):
/// [`DomainError::HTTP_STATUS`], 422.
pub const REJECTED_STATUS: StatusCode = StatusCode::UNPROCESSABLE_ENTITY;

/// RFC 9457 problem details, with Keel's `code` and `retryable` members.
///
/// Built from Keel errors with only what is safe to show a caller: the
/// text of internal and dependency failures is replaced by a generic
/// sentence, because it can name hosts, queries or credentials. The full
/// error is logged where the problem is built.
///
/// ```
/// use keel_core::{Error, ExpectedVersion, Version, VersionConflict};
/// use keel_http::Problem;
///
/// let conflict = Error::from(VersionConflict {
///     subject: "Order-42".into(),
///     expected: ExpectedVersion::Exact(Version::new(3)),
///     actual: Version::new(4),
/// });
/// let problem = Problem::from_error(&conflict);
/// assert_eq!(problem.status, 409);
/// assert_eq!(problem.code, "keel.conflict.version");
/// assert_eq!(problem.extensions["actual"], 4);
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Problem {
    /// A URI naming the problem type: `urn:keel:problem:<code>`.
    #[serde(rename = "type")]
    pub type_uri: String,
    /// A short summary of the problem type, the same for every occurrence.
    pub title: String,
    /// The HTTP status code.
    pub status: u16,
    /// An explanation of this occurrence, safe for the caller.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// A URI reference for this occurrence (e.g. the request path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    /// The stable, machine-readable error code clients match on.
    pub code: String,
    /// Whether repeating the request unchanged may succeed.
    pub retryable: bool,
    /// Further members: `expected`/`actual` for conflicts, `field` for
    /// invalid input, `retry_after` (whole seconds) when the error carries
    /// a retry hint, `trace_id` when the request was traced.
    #[serde(flatten)]
    pub extensions: Map<String, Value>,
}

impl Problem {
    /// A problem with a status, a stable code and a title; the type URI is
    /// derived from the code.
    pub fn new(status: StatusCode, code: impl Into<String>, title: impl Into<String>) -> Self {
        let code = code.into();
        Self {
            type_uri: format!("{PROBLEM_TYPE_PREFIX}{code}"),
            title: title.into(),
            status: status.as_u16(),
            detail: None,
            instance: None,
            code,
            retryable: false,
            extensions: Map::new(),
        }
    }

    /// Sets the detail.
    #[must_use]
    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    /// Sets the instance.
    #[must_use]
    pub fn with_instance(mut self, instance: impl Into<String>) -> Self {
        self.instance = Some(instance.into());
        self
    }

    /// Marks the problem retryable or not.
    #[must_use]
    pub fn with_retryable(mut self, retryable: bool) -> Self {
        self.retryable = retryable;
        self
    }

    /// Adds an extension member.
    #[must_use]
    pub fn with_extension(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        self.extensions.insert(key.into(), value.into());
        self
    }

    /// The HTTP status.
    #[must_use]
    pub fn status_code(&self) -> StatusCode {
        StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    /// The caller-safe problem for an infrastructure error: the code,
    /// title, detail, HTTP status, retryability and retry hint of
    /// [`Error::describe`](keel_core::Error::describe) (so server faults
    /// carry a fixed sentence), and the `expected`/`actual` or `field`
    /// members.
    #[must_use]
    pub fn from_error(error: &Error) -> Self {
        let shown = error.describe();
        let status =
            StatusCode::from_u16(shown.http_status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut problem = Problem::new(status, shown.code, shown.title)
            .with_detail(shown.detail)
            .with_retryable(shown.retryable);
        if let Some(after) = shown.retry_after {
            problem = problem.with_extension(RETRY_AFTER_MEMBER, retry_after_secs(after));
        }
        match error {
            Error::Conflict(c) => problem
                .with_extension("expected", c.expected.to_string())
                .with_extension("actual", c.actual.get()),
            Error::Invalid(invalid) => problem.with_extension("field", invalid.field.to_string()),
            _ => problem,
        }
    }

    /// The problem for a rejected command: 422 with the domain error's code
    /// and message (domain messages are written for people).
    #[must_use]
    pub fn from_domain(error: &DomainError) -> Self {
        let status = StatusCode::from_u16(DomainError::HTTP_STATUS).unwrap_or(REJECTED_STATUS);
        Problem::new(status, error.code(), "Request rejected").with_detail(error.message())
    }

    /// The problem for a command's outcome: a rejection or an
    /// infrastructure failure.
    pub fn from_command_error<E: Into<DomainError>>(error: CommandError<E>) -> Self {
        match error {
            CommandError::Rejected(e) => Self::from_domain(&e.into()),
            CommandError::Infrastructure(e) => Self::from_error(&e),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} ({})", self.status, self.title, self.code)
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = self.status_code();
        let body = serde_json::to_vec(&self).unwrap_or_else(|_| {
            br#"{"type":"about:blank","title":"Internal error","status":500}"#.to_vec()
        });
        let mut response = (status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if status == StatusCode::UNAUTHORIZED {
            // RFC 9110 requires a challenge with every 401.
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Some(secs) = self
            .extensions
            .get(RETRY_AFTER_MEMBER)
            .and_then(Value::as_u64)
        {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

/// The problem member carrying the retry hint, in whole seconds (also sent
/// as the `Retry-After` header).
const RETRY_AFTER_MEMBER: &str = "retry_after";

/// A retry hint in whole seconds, rounded up so the caller never comes
/// back early.
fn retry_after_secs(after: std::time::Duration) -> u64 {
    after.as_secs() + u64::from(after.subsec_nanos() > 0)
}

/// The problem+json response for a refused or failed request: what
/// [`ApiError`] answers for `error`, as a plain function.
///
/// It is the rejection to give `keel_security::pipeline::BearerAuthLayer`
/// in an axum service: 401 with `WWW-Authenticate: Bearer` for a missing or
/// refused token, 503 (retryable) when the key set could not be fetched,
/// never the internal text of a server-side failure.
///
/// ```
/// use keel_core::Error;
///
/// let response = keel_http::problem_response(&Error::Unauthorized { reason: "token expired".into() });
/// assert_eq!(response.status(), 401);
/// assert_eq!(response.headers()["www-authenticate"], "Bearer");
/// assert_eq!(response.headers()["content-type"], keel_http::PROBLEM_JSON);
/// ```
#[must_use]
pub fn problem_response(error: &Error) -> Response {
    ApiError {
        problem: Problem::from_error(error),
        internal: error.kind().is_server_fault().then(|| error.full_message()),
    }
    .into_response()
}

/// The error type for axum handlers: anything Keel returns converts into it
/// with `?`, and it responds with a [`Problem`].
///
/// Server-side failures (5xx) are logged with the full error chain, which
/// never reaches the response; the response carries the current trace id
/// so the two can be matched.
///
/// ```
/// use axum::{Router, routing::get};
/// use keel_core::Error;
/// use keel_http::ApiError;
///
/// async fn get_order() -> Result<String, ApiError> {
///     Err(Error::not_found("order 42"))?
/// }
///
/// let app: Router = Router::new().route("/orders/42", get(get_order));
/// ```
pub struct ApiError {
    problem: Problem,
    internal: Option<String>,
}

impl fmt::Debug for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiError")
            .field("problem", &self.problem)
            .finish_non_exhaustive()
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.problem, f)
    }
}

impl ApiError {
    /// The problem that will be sent.
    #[must_use]
    pub fn problem(&self) -> &Problem {
        &self.problem
    }
}

impl From<Error> for ApiError {
    fn from(error: Error) -> Self {
        let problem = Problem::from_error(&error);
        let internal = error.kind().is_server_fault().then(|| error.full_message());
        Self { problem, internal }
    }
}

impl From<DomainError> for ApiError {
    fn from(error: DomainError) -> Self {
        Self {
            problem: Problem::from_domain(&error),
            internal: None,
        }
    }
}

impl<E: Into<DomainError>> From<CommandError<E>> for ApiError {
    fn from(error: CommandError<E>) -> Self {
        match error {
            CommandError::Rejected(e) => Self::from(e.into()),
            CommandError::Infrastructure(e) => Self::from(e),
        }
    }
}

impl From<Problem> for ApiError {
    fn from(problem: Problem) -> Self {
        Self {
            problem,
            internal: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut problem = self.problem;
        if let Some(tc) = keel_telemetry::propagation::current_trace_context() {
            problem
                .extensions
                .insert("trace_id".to_owned(), tc.trace_id().into());
        }
        if let Some(internal) = &self.internal {
            tracing::error!(
                status = problem.status,
                code = %problem.code,
                error = %internal,
                "request failed"
            );
        }
        problem.into_response()
    }
}
