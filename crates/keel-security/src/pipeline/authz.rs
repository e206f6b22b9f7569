//! The authorization layer and the guard for application services.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use keel_core::command::{BoxFuture, Command, CommandEnvelope, Handled, PipelineError};
use keel_core::{Error, Principal};
use tower::{Layer, Service};

use crate::authz::{Decision, Policy, Resource};

/// Asks a [`Policy`] whether a principal may act, and turns the answer into
/// Keel's error taxonomy: the shape an application service wants for a
/// check it makes itself (for example after loading an aggregate whose
/// owner the policy needs).
///
/// ```
/// use std::sync::Arc;
/// use keel_security::pipeline::Guard;
/// use keel_security::{Condition, PolicyEngine, Principal, Resource};
///
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let guard = Guard::new(Arc::new(
///     PolicyEngine::new().grant("customer", ["cart.*"]).require("cart.*", Condition::Owner),
/// ));
/// let alice = Principal::new("alice").with_role("customer");
/// let cart = Resource::new("Cart").with_id("c-1").with_owner("alice");
/// assert!(guard.check(Some(&alice), "cart.rename", &cart).await.is_ok());
///
/// let bobs = Resource::new("Cart").with_id("c-2").with_owner("bob");
/// let refused = guard.check(Some(&alice), "cart.rename", &bobs).await.unwrap_err();
/// assert_eq!(refused.kind(), keel_core::ErrorKind::Forbidden);
/// let anonymous = guard.check(None, "cart.rename", &cart).await.unwrap_err();
/// assert_eq!(anonymous.kind(), keel_core::ErrorKind::Unauthorized);
/// # });
/// ```
#[derive(Clone, Debug)]
pub struct Guard {
    policy: Arc<dyn Policy>,
}

impl Guard {
    /// A guard consulting `policy`.
    #[must_use]
    pub fn new(policy: Arc<dyn Policy>) -> Self {
        Self { policy }
    }

    /// The policy's decision as a result: the allowing decision, or
    /// [`Error::Forbidden`] with the policy's reason, or
    /// [`Error::Unauthorized`] when there is no principal at all.
    ///
    /// # Errors
    ///
    /// As above. Both convert into a [`PipelineError`] with `?`.
    pub async fn check(
        &self,
        principal: Option<&Principal>,
        action: &str,
        resource: &Resource,
    ) -> Result<Decision, Error> {
        let Some(principal) = principal else {
            return Err(Error::Unauthorized {
                reason: "no authenticated principal".into(),
            });
        };
        match self.policy.decide(principal, action, resource).await {
            allow @ Decision::Allow { .. } => Ok(allow),
            Decision::Deny { reason } => Err(Error::Forbidden { reason }),
        }
    }

    /// [`check`](Self::check) for the envelope's principal doing the
    /// envelope's command type on `resource`.
    ///
    /// # Errors
    ///
    /// As [`check`](Self::check).
    pub fn check_command<'a, C: Command>(
        &'a self,
        envelope: &CommandEnvelope<C>,
        resource: &'a Resource,
    ) -> impl Future<Output = Result<Decision, Error>> + Send + 'a {
        // Taken out before awaiting, so the future does not borrow the
        // envelope (whose command need not be `Sync`).
        let principal = envelope.principal.clone();
        let action = envelope.command_type();
        async move { self.check(principal.as_ref(), action, resource).await }
    }
}

/// What the authorization layer leaves in the envelope's extensions for the
/// handler: the resource it checked and the allowing decision.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct Authorized {
    /// The resource the policy was asked about.
    pub resource: Resource,
    /// The policy's decision (always an allow; its reason names the role).
    pub decision: Decision,
}

type Mapper<C> = dyn Fn(&CommandEnvelope<C>) -> Resource + Send + Sync;

/// A [`Layer`] that asks a [`Policy`] whether the envelope's principal may
/// run the command, before anything below it runs.
///
/// The action is the command's [`command_type`](Command::command_type);
/// the resource is, by default, built from
/// [`Command::target`]: its kind and id, with the envelope's tenant (the
/// caller's, set by the authentication layer), which fits services whose
/// commands always act inside the caller's tenant. A command without a
/// target is checked against a resource whose kind is the command type.
/// Register a mapper with [`resource_for`](Self::resource_for) to add
/// attributes an ABAC condition needs (an owner, a state). A mapper sees
/// only the envelope; a check that needs stored data (the loaded
/// aggregate's owner) belongs in the handler, through a [`Guard`].
///
/// A denial is [`Error::Forbidden`] with the policy's reason; an envelope
/// with no principal is [`Error::Unauthorized`]. An allowed command gets an
/// [`Authorized`] in its extensions.
#[derive(Clone)]
pub struct AuthorizationLayer {
    guard: Guard,
    mappers: Arc<HashMap<TypeId, Arc<dyn Any + Send + Sync>>>,
}

impl fmt::Debug for AuthorizationLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthorizationLayer")
            .field("policy", &self.guard.policy)
            .field("mappers", &self.mappers.len())
            .finish()
    }
}

impl AuthorizationLayer {
    /// A layer consulting `policy`.
    #[must_use]
    pub fn new(policy: Arc<dyn Policy>) -> Self {
        Self {
            guard: Guard::new(policy),
            mappers: Arc::new(HashMap::new()),
        }
    }

    /// Builds the resource for commands of type `C` with `mapper` instead
    /// of the default. One mapper per command type; a later one replaces an
    /// earlier one.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// use keel_core::command::{Command, CommandEnvelope};
    /// use keel_security::pipeline::AuthorizationLayer;
    /// use keel_security::{PolicyEngine, Resource};
    ///
    /// struct CloseAccount { account: String, holder: String }
    /// impl Command for CloseAccount {
    ///     fn command_type(&self) -> &'static str { "account.close" }
    /// }
    ///
    /// let layer = AuthorizationLayer::new(Arc::new(PolicyEngine::new()))
    ///     .resource_for(|envelope: &CommandEnvelope<CloseAccount>| {
    ///         Resource::new("Account")
    ///             .with_id(envelope.command.account.as_str())
    ///             .with_owner(envelope.command.holder.as_str())
    ///     });
    /// # let _ = layer;
    /// ```
    #[must_use]
    pub fn resource_for<C: Command>(
        mut self,
        mapper: impl Fn(&CommandEnvelope<C>) -> Resource + Send + Sync + 'static,
    ) -> Self {
        let mapper: Arc<Mapper<C>> = Arc::new(mapper);
        Arc::make_mut(&mut self.mappers).insert(TypeId::of::<C>(), Arc::new(mapper));
        self
    }

    /// The resource the layer checks for `envelope`.
    #[must_use]
    pub fn resource<C: Command>(&self, envelope: &CommandEnvelope<C>) -> Resource {
        if let Some(mapper) = self
            .mappers
            .get(&TypeId::of::<C>())
            .and_then(|m| m.downcast_ref::<Arc<Mapper<C>>>())
        {
            return mapper(envelope);
        }
        let mut resource = match envelope.command.target() {
            Some(target) => Resource::new(target.kind).with_id(target.id),
            None => Resource::new(envelope.command_type()),
        };
        if let Some(tenant) = &envelope.metadata.tenant {
            resource = resource.with_tenant(tenant.as_str());
        }
        resource
    }

    /// The guard this layer uses, for checks inside handlers.
    #[must_use]
    pub fn guard(&self) -> &Guard {
        &self.guard
    }
}

impl<S> Layer<S> for AuthorizationLayer {
    type Service = Authorization<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Authorization {
            inner,
            layer: self.clone(),
        }
    }
}

/// The [`Service`] made by [`AuthorizationLayer`].
#[derive(Clone, Debug)]
pub struct Authorization<S> {
    inner: S,
    layer: AuthorizationLayer,
}

impl<C, S, T> Service<CommandEnvelope<C>> for Authorization<S>
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
            let resource = layer.resource(&envelope);
            let decision = layer.guard.check_command(&envelope, &resource).await?;
            envelope
                .extensions
                .insert(Authorized { resource, decision });
            inner.call(envelope).await
        })
    }
}
