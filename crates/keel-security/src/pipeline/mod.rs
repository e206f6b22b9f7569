//! The command pipeline's security layers: authentication, authorization
//! and audit, as [`tower`] layers around a
//! [`CommandHandler`](keel_core::command::CommandHandler); a [`Guard`] for
//! checks inside application services; and, with the `http` feature, a
//! bearer-token layer for HTTP and gRPC servers.
//!
//! The order Keel recommends, outermost first, and why:
//!
//! | layer | crate | why here |
//! |---|---|---|
//! | [`CommandTracingLayer`](https://docs.rs/keel-telemetry) | keel-telemetry | everything after it, audit included, belongs to the command's span |
//! | [`AuditLayer`] | keel-security | outside authentication and authorization, so refused attempts are recorded too |
//! | [`AuthenticationLayer`] | keel-security | turns the envelope's bearer token into a principal |
//! | [`AuthorizationLayer`] | keel-security | asks the policy before any transaction is opened |
//! | [`TransactionalService`](keel_core::command::TransactionalService) | keel-core | one transaction per command, handed to the handler; runs the audit layer's step (the accepted command's record) before the commit |
//!
//! [`CommandPipeline`] stacks the three security layers in that order (and
//! an optional outer layer, normally the tracing layer) around any inner
//! service, and boxes the result as a [`CommandService`] a composition root
//! can store. The guide is `docs/command-pipeline.md`.
//!
//! Layers pass values down through
//! [`CommandEnvelope::extensions`](keel_core::command::CommandEnvelope):
//! the audit layer leaves a [`PrincipalSlot`] that the authentication layer
//! fills (the envelope itself never travels back up), and the authorization
//! layer leaves its [`Authorized`] decision for the handler.

mod audit;
mod authn;
mod authz;
mod builder;
#[cfg(feature = "http")]
mod http;

use std::sync::{Arc, OnceLock};

use keel_core::Principal;

pub use audit::{Audit, AuditFailurePolicy, AuditLayer};
pub use authn::{Authentication, AuthenticationLayer};
pub use authz::{Authorization, AuthorizationLayer, Authorized, Guard};
pub use builder::{CommandPipeline, CommandService};
#[cfg(feature = "http")]
pub use http::{BearerAuth, BearerAuthLayer, Rejection};

/// Where the authentication layer leaves the principal it verified, for a
/// layer above it (the audit layer) that cannot see the envelope any more.
///
/// The audit layer inserts one into the envelope's extensions; the
/// authentication layer [`set`](Self::set)s it. Clones share the value. An
/// authentication layer of your own should fill it the same way.
#[derive(Clone, Debug, Default)]
pub struct PrincipalSlot(Arc<OnceLock<Principal>>);

impl PrincipalSlot {
    /// An empty slot.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Records the authenticated principal. The first value wins; later
    /// calls are ignored.
    pub fn set(&self, principal: Principal) {
        let _ = self.0.set(principal);
    }

    /// The principal, once authenticated.
    #[must_use]
    pub fn get(&self) -> Option<&Principal> {
        self.0.get()
    }
}
