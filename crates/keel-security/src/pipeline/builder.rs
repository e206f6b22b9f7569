//! Building the whole pipeline once, in a composition root.

use keel_core::command::{Command, CommandEnvelope, Handled, PipelineError};
use tower::layer::util::Identity;
use tower::util::BoxCloneSyncService;
use tower::{Layer, Service};

use super::{
    Audit, AuditLayer, Authentication, AuthenticationLayer, Authorization, AuthorizationLayer,
};

/// A finished command pipeline for commands of type `C` whose handler
/// outputs `T`, with its layer types erased: cheap to clone, `Send + Sync`,
/// so a composition root can keep it in its application state.
pub type CommandService<C, T> = BoxCloneSyncService<CommandEnvelope<C>, Handled<T>, PipelineError>;

/// The security layers in Keel's order (audit, then authentication, then
/// authorization), plus an optional outer layer (normally
/// `keel_telemetry::CommandTracingLayer`), built once and applied to as many
/// handlers as the service has.
///
/// The inner service is whatever runs below authorization: usually a
/// [`TransactionalService`](keel_core::command::TransactionalService) (one
/// transaction per command, the audit record of an accepted command in
/// it), or a [`HandlerService`](keel_core::command::HandlerService) for a
/// handler without a transaction.
///
/// ```
/// use std::sync::Arc;
/// use keel_core::command::{Command, CommandEnvelope, CommandHandler, Handled, HandlerService};
/// use keel_core::{AuditLog, PipelineError};
/// use keel_security::pipeline::{AuditLayer, AuthenticationLayer, AuthorizationLayer, CommandPipeline, CommandService};
/// use keel_security::{Algorithm, InMemoryAuditLog, JwtConfig, JwtVerifier, KeySource, PolicyEngine, Secret, VerificationKey};
/// use tower::ServiceExt;
///
/// struct Ping;
/// impl Command for Ping {
///     fn command_type(&self) -> &'static str { "ping.send" }
/// }
/// struct Pong;
/// #[async_trait::async_trait]
/// impl CommandHandler<Ping> for Pong {
///     type Output = ();
///     async fn handle(&self, _: CommandEnvelope<Ping>) -> Result<Handled<()>, PipelineError> {
///         Ok(Handled::new(()).with_events(["ping.sent"]))
///     }
/// }
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
/// let secret = Secret::new(b"an HMAC secret of at least 32 bytes!".to_vec());
/// let verifier = JwtVerifier::new(
///     JwtConfig::new("https://idp.example", "pings", [Algorithm::HS256]),
///     KeySource::fixed([VerificationKey::hmac(None, &secret)?]),
/// )?;
/// let audit_log = Arc::new(InMemoryAuditLog::new());
///
/// // The composition root: once.
/// let pipeline = CommandPipeline::new(
///     AuditLayer::new(audit_log.clone()),
///     AuthenticationLayer::new(verifier),
///     AuthorizationLayer::new(Arc::new(PolicyEngine::new().grant("pinger", ["ping.*"]))),
/// );
/// let ping: CommandService<Ping, ()> = pipeline.service(HandlerService::new(Pong));
///
/// // A request without a token is refused, and the attempt is audited.
/// let refused = ping.clone().oneshot(CommandEnvelope::new(Ping)).await.unwrap_err();
/// assert_eq!(refused.as_infrastructure().unwrap().code(), "keel.unauthorized");
/// let page = audit_log.query(&keel_core::AuditQuery::new()).await?;
/// assert_eq!(page.records[0].entry.outcome.as_str(), "rejected");
/// # Ok::<_, Box<dyn std::error::Error>>(())
/// # })
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct CommandPipeline<O = Identity> {
    outer: O,
    audit: AuditLayer,
    authn: AuthenticationLayer,
    authz: AuthorizationLayer,
}

impl CommandPipeline<Identity> {
    /// The security layers, with no outer layer yet.
    #[must_use]
    pub fn new(audit: AuditLayer, authn: AuthenticationLayer, authz: AuthorizationLayer) -> Self {
        Self {
            outer: Identity::new(),
            audit,
            authn,
            authz,
        }
    }
}

impl<O> CommandPipeline<O> {
    /// Puts `layer` outside the audit layer: the place for
    /// `keel_telemetry::CommandTracingLayer`, so the audit append and every
    /// refusal happen inside the command's span.
    #[must_use]
    pub fn outer<L>(self, layer: L) -> CommandPipeline<L> {
        CommandPipeline {
            outer: layer,
            audit: self.audit,
            authn: self.authn,
            authz: self.authz,
        }
    }

    /// The audit layer (for its failure count).
    #[must_use]
    pub fn audit_layer(&self) -> &AuditLayer {
        &self.audit
    }

    /// The authorization layer (for its [`Guard`](super::Guard)).
    #[must_use]
    pub fn authorization_layer(&self) -> &AuthorizationLayer {
        &self.authz
    }

    /// The pipeline around `inner`, boxed.
    pub fn service<C, S, T>(&self, inner: S) -> CommandService<C, T>
    where
        C: Command,
        T: Send + 'static,
        S: Service<CommandEnvelope<C>, Response = Handled<T>, Error = PipelineError>
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
        O: Layer<Audit<Authentication<Authorization<S>>>>,
        O::Service: Service<CommandEnvelope<C>, Response = Handled<T>, Error = PipelineError>
            + Clone
            + Send
            + Sync
            + 'static,
        <O::Service as Service<CommandEnvelope<C>>>::Future: Send + 'static,
    {
        BoxCloneSyncService::new(self.layer(inner))
    }
}

impl<O, S> Layer<S> for CommandPipeline<O>
where
    O: Layer<Audit<Authentication<Authorization<S>>>>,
{
    type Service = O::Service;

    fn layer(&self, inner: S) -> Self::Service {
        let authorized = self.authz.layer(inner);
        let authenticated = self.authn.layer(authorized);
        let audited = self.audit.layer(authenticated);
        self.outer.layer(audited)
    }
}
