//! The HTTP edge of a Keel service, on axum: Keel errors as RFC 9457
//! `application/problem+json` responses, and the health endpoints.
//!
//! Services built on axum use [`ApiError`] as their handlers' error type, so
//! `?` turns any [`keel_core::Error`], [`DomainError`](keel_core::DomainError)
//! or [`CommandError`](keel_core::CommandError) into the right status code
//! and a problem body that never leaks internal details; and they merge
//! [`health_router`] to serve the [`HealthRegistry`](keel_telemetry::HealthRegistry)
//! the adapters registered their checks in. The [`trace_requests`]
//! middleware starts a server span per request that continues the caller's
//! W3C trace (`traceparent` header).
//!
//! # Example
//!
//! ```
//! use axum::{Router, routing::post};
//! use keel_core::{CommandError, DomainError};
//! use keel_http::{ApiError, health_router};
//! use keel_telemetry::HealthRegistry;
//!
//! async fn ship_order() -> Result<&'static str, ApiError> {
//!     let outcome: Result<(), CommandError<DomainError>> = Err(CommandError::Rejected(
//!         DomainError::new("order.already_shipped", "the order has already shipped"),
//!     ));
//!     outcome?; // 422, code "order.already_shipped"
//!     Ok("shipped")
//! }
//!
//! let registry = HealthRegistry::new();
//! let app: Router = Router::new()
//!     .route("/orders/{id}/ship", post(ship_order))
//!     .merge(health_router(registry));
//! ```
//!
//! The mapping from error kinds to status codes is keel-core's
//! ([`ErrorKind::http_status`](keel_core::ErrorKind::http_status), read by
//! [`status_for`]) and is listed in `docs/errors.md`; keel-grpc renders the
//! same description as a gRPC status and does not depend on this crate.
//! [`problem_response`] is the rejection for
//! `keel_security::pipeline::BearerAuthLayer`. The health endpoints are
//! described in `docs/health.md`.
//!
//! # Feature flags
//!
//! `keel-http` has no optional features.

mod health;
mod problem;
mod trace;

pub use health::{LIVENESS_PATH, READINESS_PATH, health_router};
pub use problem::{
    ApiError, PROBLEM_JSON, PROBLEM_TYPE_PREFIX, Problem, REJECTED_STATUS, problem_response,
    status_for,
};
pub use trace::{trace_context_from_headers, trace_requests};
