//! Keel errors as `tonic::Status`, rendered from keel-core's error
//! description, with the stable code in metadata.

use keel_core::{CommandError, DomainError, Error, ErrorKind};
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Code, Status};

/// Metadata key carrying the stable error code (e.g. `keel.conflict.version`).
pub const ERROR_CODE_KEY: &str = "keel-error-code";
/// Metadata key carrying `true` when repeating the call unchanged may succeed.
pub const RETRYABLE_KEY: &str = "keel-retryable";
/// Metadata key carrying a conflict's expected version (e.g. `version 3`).
pub const EXPECTED_VERSION_KEY: &str = "keel-expected-version";
/// Metadata key carrying a conflict's actual version (e.g. `4`).
pub const ACTUAL_VERSION_KEY: &str = "keel-actual-version";
/// Metadata key naming the refused field of invalid input.
pub const FIELD_KEY: &str = "keel-field";
/// Metadata key carrying the trace id of the failed call, when traced.
pub const TRACE_ID_KEY: &str = "keel-trace-id";

/// Metadata key carrying the retry hint in milliseconds, read by gRPC
/// clients' retry policies (gRFC A6).
pub const RETRY_PUSHBACK_KEY: &str = "grpc-retry-pushback-ms";

/// The gRPC code for an error kind: keel-core's table
/// ([`ErrorKind::grpc_code`]), the same one keel-http reads its statuses
/// from.
///
/// | kind | code |
/// |---|---|
/// | conflict (version) | `ABORTED` |
/// | conflict (already exists) | `ALREADY_EXISTS` |
/// | not found | `NOT_FOUND` |
/// | invalid input | `INVALID_ARGUMENT` |
/// | unauthorized | `UNAUTHENTICATED` |
/// | forbidden | `PERMISSION_DENIED` |
/// | resource exhausted | `RESOURCE_EXHAUSTED` |
/// | unavailable | `UNAVAILABLE` |
/// | timeout | `DEADLINE_EXCEEDED` |
/// | internal, and any kind added later | `INTERNAL` |
///
/// A version conflict is `ABORTED` (the gRPC convention for a
/// read-modify-write race: retry at a higher level, after re-reading),
/// while a duplicate is `ALREADY_EXISTS`; use [`code_for_error`] to tell
/// them apart.
#[must_use]
pub fn code_for(kind: ErrorKind) -> Code {
    Code::from_i32(kind.grpc_code())
}

/// The gRPC code for an error, distinguishing duplicates from version
/// conflicts ([`Error::describe`]'s `grpc_code`).
#[must_use]
pub fn code_for_error(error: &Error) -> Code {
    Code::from_i32(error.describe().grpc_code)
}

/// The gRPC code for a rejected command: `FAILED_PRECONDITION`
/// ([`DomainError::GRPC_CODE`]).
pub const REJECTED_CODE: Code = Code::FailedPrecondition;

fn insert(metadata: &mut MetadataMap, key: &'static str, value: &str) {
    if let Ok(v) = MetadataValue::try_from(value) {
        metadata.insert(key, v);
    }
}

fn with_trace_id(metadata: &mut MetadataMap) {
    if let Some(tc) = keel_telemetry::propagation::current_trace_context() {
        insert(metadata, TRACE_ID_KEY, tc.trace_id());
    }
}

/// The caller-safe status for an infrastructure error, rendered from
/// keel-core's [`ErrorDescription`](keel_core::ErrorDescription): its
/// gRPC code and safe detail as the message (internal and dependency
/// failures get a fixed sentence), and in metadata the stable code
/// (`keel-error-code`), `keel-retryable`, the retry hint
/// (`grpc-retry-pushback-ms`), conflict versions or the refused field, and
/// the trace id. Server-side failures are logged with their full chain.
///
/// ```
/// use keel_core::Error;
/// use keel_grpc::{ERROR_CODE_KEY, status_from_error};
///
/// let status = status_from_error(&Error::not_found("order 42"));
/// assert_eq!(status.code(), tonic::Code::NotFound);
/// assert_eq!(status.metadata().get(ERROR_CODE_KEY).unwrap(), "keel.not_found");
/// ```
#[must_use]
pub fn status_from_error(error: &Error) -> Status {
    if error.kind().is_server_fault() {
        tracing::error!(
            grpc.code = ?Code::from_i32(error.describe().grpc_code),
            code = error.code(),
            error = %error.full_message(),
            "call failed"
        );
    }
    render(error)
}

/// The status for `error`, without logging it (for refusals the server
/// itself decides on: shed load, an expired deadline).
pub(crate) fn render(error: &Error) -> Status {
    let shown = error.describe();
    let code = Code::from_i32(shown.grpc_code);
    let mut metadata = MetadataMap::new();
    insert(&mut metadata, ERROR_CODE_KEY, shown.code);
    insert(
        &mut metadata,
        RETRYABLE_KEY,
        if shown.retryable { "true" } else { "false" },
    );
    if let Some(after) = shown.retry_after {
        insert(
            &mut metadata,
            RETRY_PUSHBACK_KEY,
            &after.as_millis().max(1).to_string(),
        );
    }
    match error {
        Error::Conflict(c) => {
            insert(&mut metadata, EXPECTED_VERSION_KEY, &c.expected.to_string());
            insert(
                &mut metadata,
                ACTUAL_VERSION_KEY,
                &c.actual.get().to_string(),
            );
        }
        Error::Invalid(invalid) => insert(&mut metadata, FIELD_KEY, &invalid.field),
        _ => {}
    }
    with_trace_id(&mut metadata);
    Status::with_metadata(code, shown.detail, metadata)
}

/// The status for a rejected command: `FAILED_PRECONDITION` with the
/// domain error's code and message.
#[must_use]
pub fn status_from_domain(error: &DomainError) -> Status {
    let mut metadata = MetadataMap::new();
    insert(&mut metadata, ERROR_CODE_KEY, error.code());
    insert(&mut metadata, RETRYABLE_KEY, "false");
    with_trace_id(&mut metadata);
    Status::with_metadata(
        Code::from_i32(DomainError::GRPC_CODE),
        error.message(),
        metadata,
    )
}

/// The status for a command's outcome.
pub fn status_from_command_error<E: Into<DomainError>>(error: CommandError<E>) -> Status {
    match error {
        CommandError::Rejected(e) => status_from_domain(&e.into()),
        CommandError::Infrastructure(e) => status_from_error(&e),
    }
}

/// A complete gRPC response for `error` (HTTP 200, the status in the
/// headers, no body), as tonic sends a status returned before a handler
/// runs.
///
/// It is the rejection to give `keel_security::pipeline::BearerAuthLayer`
/// when a tonic server is put together by hand (the [`GrpcServer`]
/// builder authenticates by itself): `UNAUTHENTICATED` for a missing or
/// refused token, `UNAVAILABLE` when the key set could not be fetched,
/// with the stable code in `keel-error-code`.
///
/// ```
/// use keel_core::Error;
///
/// let refused = Error::Unauthorized { reason: "token expired".into() };
/// let response: http::Response<tonic::body::Body> = keel_grpc::status_response(&refused);
/// assert_eq!(response.headers()["grpc-status"], "16");
/// assert_eq!(response.headers()["keel-error-code"], "keel.unauthorized");
/// ```
///
/// [`GrpcServer`]: crate::GrpcServer
#[must_use]
pub fn status_response<B: Default>(error: &Error) -> http::Response<B> {
    status_from_error(error).into_http()
}

/// The stable Keel error code a status carries, if any (for clients).
#[must_use]
pub fn error_code(status: &Status) -> Option<&str> {
    status.metadata().get(ERROR_CODE_KEY)?.to_str().ok()
}

/// Conversion of Keel errors into `tonic::Status` (tonic's `Status` and
/// Keel's errors are both foreign here, so `From` cannot be implemented).
pub trait IntoStatus {
    /// The caller-safe status.
    fn into_status(self) -> Status;
}

impl IntoStatus for Error {
    fn into_status(self) -> Status {
        status_from_error(&self)
    }
}

impl IntoStatus for DomainError {
    fn into_status(self) -> Status {
        status_from_domain(&self)
    }
}

impl<E: Into<DomainError>> IntoStatus for CommandError<E> {
    fn into_status(self) -> Status {
        status_from_command_error(self)
    }
}

/// `?`-friendly conversion of Keel results in tonic handlers.
///
/// ```
/// use keel_core::Error;
/// use keel_grpc::StatusExt;
///
/// fn load() -> Result<u32, Error> { Err(Error::not_found("order 1")) }
///
/// fn handler() -> Result<tonic::Response<u32>, tonic::Status> {
///     let n = load().or_status()?;
///     Ok(tonic::Response::new(n))
/// }
/// assert_eq!(handler().unwrap_err().code(), tonic::Code::NotFound);
/// ```
pub trait StatusExt<T> {
    /// Maps the error into a caller-safe `Status`.
    fn or_status(self) -> Result<T, Status>;
}

impl<T, E: IntoStatus> StatusExt<T> for Result<T, E> {
    fn or_status(self) -> Result<T, Status> {
        self.map_err(IntoStatus::into_status)
    }
}
