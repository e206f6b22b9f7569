//! The authentication layer: a verified bearer token becomes the envelope's
//! principal.

use std::task::{Context, Poll};

use keel_core::command::{BoxFuture, Command, CommandEnvelope, Handled, PipelineError};
use keel_core::{Error, Principal, TenantId};
use tower::{Layer, Service};

use super::PrincipalSlot;
use crate::authn::JwtVerifier;

/// A [`Layer`] that authenticates each command's caller.
///
/// For every envelope:
///
/// * if it carries [`credentials`](CommandEnvelope::credentials), the token
///   is verified with the [`JwtVerifier`]; the resulting principal replaces
///   whatever [`principal`](CommandEnvelope::principal) was there, and the
///   token is removed from the envelope so the handler never holds it;
/// * if it carries none, the command is refused with
///   [`Error::Unauthorized`], unless the layer
///   [`trusts preset principals`](Self::trust_preset_principal) and the
///   envelope already names one;
/// * a refused token is [`Error::Unauthorized`]; a key set that cannot be
///   fetched is [`Error::Unavailable`] (retryable, and not the caller's
///   fault); a tenant claim that is not a valid [`TenantId`] is
///   `Unauthorized`.
///
/// On success it sets the metadata's `actor` to the principal's subject and
/// its `tenant` to the principal's tenant (clearing any tenant the caller
/// supplied), fills the [`PrincipalSlot`] if a layer above left one, and
/// records `enduser.id` on the current span (the command span of the
/// tracing layer).
#[derive(Clone, Debug)]
pub struct AuthenticationLayer {
    verifier: JwtVerifier,
    trust_preset: bool,
}

impl AuthenticationLayer {
    /// A layer verifying bearer tokens with `verifier`. Envelopes without a
    /// token are refused, even if they name a principal.
    #[must_use]
    pub fn new(verifier: JwtVerifier) -> Self {
        Self {
            verifier,
            trust_preset: false,
        }
    }

    /// Whether an envelope that carries no token but already names a
    /// principal is accepted as is. Off by default, so that a pipeline
    /// refuses unless a token was verified; turn it on for pipelines that
    /// also serve trusted in-process callers (a scheduler, a message
    /// consumer acting as a service account) or that sit behind
    /// `BearerAuthLayer` (feature `http`), which verified
    /// the token at the transport edge already.
    #[must_use]
    pub fn trust_preset_principal(mut self, yes: bool) -> Self {
        self.trust_preset = yes;
        self
    }
}

impl<S> Layer<S> for AuthenticationLayer {
    type Service = Authentication<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Authentication {
            inner,
            layer: self.clone(),
        }
    }
}

/// The [`Service`] made by [`AuthenticationLayer`].
#[derive(Clone, Debug)]
pub struct Authentication<S> {
    inner: S,
    layer: AuthenticationLayer,
}

impl AuthenticationLayer {
    async fn authenticate<C>(&self, envelope: &mut CommandEnvelope<C>) -> Result<Principal, Error> {
        let principal = match envelope.credentials.take() {
            Some(token) => self.verifier.verify(token.expose()).await?,
            None => match envelope.principal.take() {
                Some(preset) if self.trust_preset => preset,
                _ => {
                    return Err(Error::Unauthorized {
                        reason: "no bearer token".into(),
                    });
                }
            },
        };
        let tenant = match &principal.tenant {
            Some(tenant) => {
                Some(
                    TenantId::new(tenant.as_str()).map_err(|_| Error::Unauthorized {
                        reason: "the token's tenant is not a valid tenant id".into(),
                    })?,
                )
            }
            None => None,
        };
        envelope.metadata.actor = Some(principal.subject.clone());
        envelope.metadata.tenant = tenant;
        Ok(principal)
    }
}

impl<C, S, T> Service<CommandEnvelope<C>> for Authentication<S>
where
    C: Command,
    S: Service<CommandEnvelope<C>, Response = Handled<T>, Error = PipelineError>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    T: Send + 'static,
{
    type Response = Handled<T>;
    type Error = PipelineError;
    type Future = BoxFuture<Result<Handled<T>, PipelineError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut envelope: CommandEnvelope<C>) -> Self::Future {
        let mut inner = keel_core::command::take_ready(&mut self.inner);
        let layer = self.layer.clone();
        Box::pin(async move {
            let principal = layer.authenticate(&mut envelope).await?;
            tracing::Span::current().record("enduser.id", principal.subject.as_str());
            if let Some(slot) = envelope.extensions.get::<PrincipalSlot>() {
                slot.set(principal.clone());
            }
            envelope.principal = Some(principal);
            inner.call(envelope).await
        })
    }
}
