//! The gRPC edge of a Keel service, on tonic: a server builder that puts
//! the service's tonic services behind Keel's edge, and Keel errors as
//! `tonic::Status` with stable codes in metadata.
//!
//! [`GrpcServer`] gives, in a few lines, the standard health service fed
//! by the health registry, server reflection, bearer authentication into a
//! [`Principal`](keel_core::Principal) with an authorization hook, a span
//! per call continuing the caller's W3C trace, deadlines, message-size and
//! concurrency limits with load shedding (`RESOURCE_EXHAUSTED` with a retry
//! hint), guards against slow or malformed connections, and a graceful
//! shutdown that drains calls in flight ([`GrpcServerHandle`]).
//!
//! Handlers convert Keel results with [`StatusExt::or_status`] (or
//! [`status_from_error`]); the message is caller-safe (internal and
//! dependency failures never show their text) and the metadata carries
//! `keel-error-code`, `keel-retryable`, `grpc-retry-pushback-ms`, conflict
//! versions and the trace id. The status is rendered from keel-core's
//! [`ErrorDescription`](keel_core::ErrorDescription), the same description
//! keel-http renders as problem+json; this crate does not depend on
//! keel-http or axum.
//!
//! The calling side is [`client`]: a [`ChannelFactory`](client::ChannelFactory)
//! with one shared channel per target (keepalive, timeouts, balancing),
//! the caller's trace context and bearer token on every call, and retries
//! for the calls the caller marks idempotent. Keel's protobuf types and the
//! example services' stubs are [`proto`]; the guide is `docs/grpc.md`.
//!
//! # Example
//!
//! ```
//! use keel_core::{CommandError, DomainError};
//! use keel_grpc::{StatusExt, error_code};
//!
//! fn ship() -> Result<(), CommandError<DomainError>> {
//!     Err(CommandError::Rejected(DomainError::new(
//!         "order.already_shipped",
//!         "the order has already shipped",
//!     )))
//! }
//!
//! fn handler() -> Result<tonic::Response<()>, tonic::Status> {
//!     ship().or_status()?;
//!     Ok(tonic::Response::new(()))
//! }
//!
//! let status = handler().unwrap_err();
//! assert_eq!(status.code(), tonic::Code::FailedPrecondition);
//! assert_eq!(error_code(&status), Some("order.already_shipped"));
//! assert_eq!(status.message(), "the order has already shipped");
//! ```
//!
//! A server:
//!
//! ```no_run
//! # async fn run(registry: keel_telemetry::HealthRegistry, verifier: keel_security::JwtVerifier)
//! # -> Result<(), keel_core::Error> {
//! let server = keel_grpc::GrpcServer::builder()
//!     .health(registry)
//!     .authenticate(verifier)
//!     .timeout(std::time::Duration::from_secs(10))
//!     // .add_service(OrdersServer::new(orders))
//!     .serve("127.0.0.1:50051".parse().unwrap())
//!     .await?;
//! server.shutdown().await?;
//! # Ok(()) }
//! ```
//!
//! The mapping table is in [`code_for`] and `docs/errors.md`; the server
//! is described in `docs/grpc.md`. Services put together by hand can use
//! the parts: [`health_server`], [`TraceLayer`] and [`propagate_trace`],
//! and [`status_response`] as the rejection of keel-security's
//! `BearerAuthLayer`.
//!
//! # Feature flags
//!
//! `keel-grpc` has no optional features. It uses tonic's `codegen` and
//! `server` features (not its axum-based `router`); the service chooses
//! tonic's TLS features (rustls).

pub mod client;
mod health;
mod server;
mod status;
mod trace;

pub use server::{
    Authorize, DEFAULT_CONCURRENCY_LIMIT, DEFAULT_DRAIN_TIMEOUT, DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_KEEPALIVE_INTERVAL, DEFAULT_KEEPALIVE_TIMEOUT, DEFAULT_MAX_HEADER_LIST_SIZE,
    DEFAULT_MAX_MESSAGE_SIZE, DEFAULT_RETRY_AFTER, GrpcServer, GrpcServerHandle, PolicyAuthorizer,
};

pub use health::{
    DEFAULT_WATCH_INTERVAL, HealthService, LIVENESS_SERVICE, READINESS_SERVICE, WatchStream,
    health_server,
};
/// Keel's protobuf types and the example services' stubs (the
/// `keel-proto` crate, with its `grpc` feature), including the descriptor
/// set for reflection ([`proto::FILE_DESCRIPTOR_SET`]).
pub use keel_proto as proto;
pub use status::{
    ACTUAL_VERSION_KEY, ERROR_CODE_KEY, EXPECTED_VERSION_KEY, FIELD_KEY, IntoStatus, REJECTED_CODE,
    RETRY_PUSHBACK_KEY, RETRYABLE_KEY, StatusExt, TRACE_ID_KEY, code_for, code_for_error,
    error_code, status_from_command_error, status_from_domain, status_from_error, status_response,
};
/// The generated health protocol types, for clients and tests.
pub use tonic_health::pb as health_proto;
pub use trace::{TraceLayer, TraceService, propagate_trace, trace_context_from_headers};
