//! Keel errors as `tonic::Status`, with the stable code in metadata.

use keel_core::{CommandError, DomainError, Error, ErrorKind};
use keel_http::Problem;
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

/// The gRPC code for an error kind.
///
/// | kind | code |
/// |---|---|
/// | conflict (version) | `ABORTED` |
/// | conflict (already exists) | `ALREADY_EXISTS` |
/// | not found | `NOT_FOUND` |
/// | invalid input | `INVALID_ARGUMENT` |
/// | unauthorized | `UNAUTHENTICATED` |
/// | forbidden | `PERMISSION_DENIED` |
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
    match kind {
        ErrorKind::Conflict => Code::Aborted,
        ErrorKind::NotFound => Code::NotFound,
        ErrorKind::InvalidInput => Code::InvalidArgument,
        ErrorKind::Unauthorized => Code::Unauthenticated,
        ErrorKind::Forbidden => Code::PermissionDenied,
        ErrorKind::Unavailable => Code::Unavailable,
        ErrorKind::Timeout => Code::DeadlineExceeded,
        _ => Code::Internal,
    }
}

/// The gRPC code for an error, distinguishing duplicates from version
/// conflicts.
#[must_use]
pub fn code_for_error(error: &Error) -> Code {
    match error {
        Error::AlreadyExists { .. } => Code::AlreadyExists,
        other => code_for(other.kind()),
    }
}

/// The gRPC code for a rejected command.
pub const REJECTED_CODE: Code = Code::FailedPrecondition;

fn insert(metadata: &mut MetadataMap, key: &'static str, value: &str) {
    if let Ok(v) = MetadataValue::try_from(value) {
        metadata.insert(key, v);
    }
}

fn status_from_problem(code: Code, problem: &Problem) -> Status {
    let mut metadata = MetadataMap::new();
    insert(&mut metadata, ERROR_CODE_KEY, &problem.code);
    insert(
        &mut metadata,
        RETRYABLE_KEY,
        if problem.retryable { "true" } else { "false" },
    );
    for (member, key) in [
        ("expected", EXPECTED_VERSION_KEY),
        ("actual", ACTUAL_VERSION_KEY),
        ("field", FIELD_KEY),
    ] {
        match problem.extensions.get(member) {
            Some(serde_value) if serde_value.is_string() => {
                insert(&mut metadata, key, serde_value.as_str().unwrap_or_default());
            }
            Some(other) => insert(&mut metadata, key, &other.to_string()),
            None => {}
        }
    }
    if let Some(tc) = keel_telemetry::propagation::current_trace_context() {
        insert(&mut metadata, TRACE_ID_KEY, tc.trace_id());
    }
    let message = problem
        .detail
        .clone()
        .unwrap_or_else(|| problem.title.clone());
    Status::with_metadata(code, message, metadata)
}

/// The caller-safe status for an infrastructure error: the message is the
/// same safe detail as the HTTP problem (internal and dependency failures
/// get a fixed sentence), the stable code and conflict details travel in
/// metadata. Server-side failures are logged with their full chain.
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
    let code = code_for_error(error);
    if error.kind().is_server_fault() {
        tracing::error!(
            grpc.code = ?code,
            code = error.code(),
            error = %error.full_message(),
            "call failed"
        );
    }
    status_from_problem(code, &Problem::from_error(error))
}

/// The status for a rejected command: `FAILED_PRECONDITION` with the
/// domain error's code and message.
#[must_use]
pub fn status_from_domain(error: &DomainError) -> Status {
    status_from_problem(REJECTED_CODE, &Problem::from_domain(error))
}

/// The status for a command's outcome.
pub fn status_from_command_error<E: Into<DomainError>>(error: CommandError<E>) -> Status {
    match error {
        CommandError::Rejected(e) => status_from_domain(&e.into()),
        CommandError::Infrastructure(e) => status_from_error(&e),
    }
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
