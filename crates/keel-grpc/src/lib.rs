//! The gRPC edge of a Keel service, on tonic: Keel errors as
//! `tonic::Status` with stable codes in metadata, and the standard
//! `grpc.health.v1.Health` service answered from the health registry.
//!
//! Services built on tonic convert Keel results with
//! [`StatusExt::or_status`] (or [`status_from_error`]); the message is
//! caller-safe (internal and dependency failures never show their text) and
//! the metadata carries `keel-error-code`, `keel-retryable`, conflict
//! versions and the trace id. They add [`health_server`] next to their own
//! services so load balancers and orchestrators can probe them. Calls
//! carry W3C trace context: [`propagate_trace`] on clients, [`TraceLayer`]
//! on servers.
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
//!
//! let health = keel_grpc::health_server(keel_telemetry::HealthRegistry::new());
//! // tonic::transport::Server::builder().add_service(health) …
//! # let _ = health;
//! ```
//!
//! The mapping table is in [`code_for`] and `docs/errors.md`.
//!
//! # Feature flags
//!
//! `keel-grpc` has no optional features. It needs only tonic's `codegen`
//! feature; the service chooses tonic's transport and TLS features (rustls).

pub mod client;
mod health;
mod status;
mod trace;

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
    RETRYABLE_KEY, StatusExt, TRACE_ID_KEY, code_for, code_for_error, error_code,
    status_from_command_error, status_from_domain, status_from_error,
};
/// The generated health protocol types, for clients and tests.
pub use tonic_health::pb as health_proto;
pub use trace::{TraceLayer, TraceService, propagate_trace};
