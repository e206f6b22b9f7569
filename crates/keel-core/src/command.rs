//! The command pipeline's port types: commands, the envelope they travel in,
//! handlers, and the result a handler reports.
//!
//! A service dispatches every command through one [`tower::Service`] stack
//! that it builds once in its composition root: tracing, authentication,
//! authorization, audit and a unit of work wrap a [`CommandHandler`] turned
//! into a service by [`HandlerService`]. The layers live in the crates that
//! own each concern (`keel-telemetry`, `keel-security`, `keel-database`);
//! this module holds only the types they agree on, so a handler never depends
//! on any of them.
//!
//! ```
//! use keel_core::command::{Command, CommandEnvelope, CommandHandler, Handled, HandlerService};
//! use keel_core::{AggregateRef, CommandError, DomainError, Principal};
//! use tower::{Service, ServiceExt};
//!
//! struct RenameCart { cart: String, name: String }
//!
//! impl Command for RenameCart {
//!     fn command_type(&self) -> &'static str { "cart.rename" }
//!     fn target(&self) -> Option<AggregateRef> { Some(AggregateRef::new("Cart", &self.cart)) }
//! }
//!
//! struct Renamer;
//!
//! #[async_trait::async_trait]
//! impl CommandHandler<RenameCart> for Renamer {
//!     type Output = String;
//!     async fn handle(
//!         &self,
//!         envelope: CommandEnvelope<RenameCart>,
//!     ) -> Result<Handled<String>, CommandError<DomainError>> {
//!         if envelope.command.name.is_empty() {
//!             return Err(CommandError::Rejected(DomainError::new("cart.name_empty", "a cart needs a name")));
//!         }
//!         Ok(Handled::new(envelope.command.name).with_events(["cart.renamed"]))
//!     }
//! }
//!
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! let mut service = HandlerService::new(Renamer);
//! let envelope = CommandEnvelope::new(RenameCart { cart: "c-1".into(), name: "groceries".into() })
//!     .with_principal(Principal::new("user-7"));
//! let handled = service.ready().await.unwrap().call(envelope).await.unwrap();
//! assert_eq!(handled.output, "groceries");
//! assert_eq!(handled.event_types, ["cart.renamed"]);
//! # });
//! ```

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::error::{CommandError, DomainError};
use crate::event::Metadata;
use crate::id::{CommandId, CorrelationId};
use crate::principal::Principal;

mod transactional;

pub use transactional::{DEFAULT_MAX_ATTEMPTS, TransactionalHandler, TransactionalService};

/// Names the aggregate (or other resource) a command acts on: its type and
/// its id, both as text so audit records and policies can hold any id type.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
pub struct AggregateRef {
    /// The aggregate type, e.g. `Order` (usually [`Aggregate::TYPE`](crate::Aggregate::TYPE)).
    pub kind: String,
    /// The aggregate's id as text.
    pub id: String,
}

impl AggregateRef {
    /// A reference to aggregate `id` of type `kind`.
    pub fn new(kind: impl Into<String>, id: impl Into<String>) -> Self {
        Self {
            kind: kind.into(),
            id: id.into(),
        }
    }
}

impl fmt::Display for AggregateRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.kind, self.id)
    }
}

/// Something a caller asks the service to do (`PlaceOrder`), in the
/// imperative. A command may be refused; an event may not.
pub trait Command: Send + 'static {
    /// A stable name for this command's type, e.g. `order.place`. Used in
    /// spans, metrics, policies and audit records.
    fn command_type(&self) -> &'static str;

    /// The aggregate this command acts on, when it targets one. Audit records
    /// and authorization use it.
    fn target(&self) -> Option<AggregateRef> {
        None
    }

    /// What the audit log may record about this command's content. Nothing by
    /// default, so a command carrying personal data or a secret never lands
    /// in the audit log unless its author chooses fields to keep.
    fn audit_details(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
}

/// A bearer credential as received from the transport, before
/// authentication. Its `Debug` output is redacted so it cannot leak through
/// logs or error messages.
#[derive(Clone, PartialEq, Eq)]
pub struct BearerToken(String);

impl BearerToken {
    /// Wraps a token (without the `Bearer ` prefix).
    pub fn new(token: impl Into<String>) -> Self {
        Self(token.into())
    }

    /// The token itself; hand it only to a verifier.
    #[must_use]
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BearerToken(<redacted>)")
    }
}

/// A small type map that layers use to hand values to the layers below
/// them and to the handler (for example the unit of work's transaction
/// handle or the authorization decision).
#[derive(Default)]
pub struct Extensions {
    map: HashMap<TypeId, Box<dyn Any + Send + Sync>>,
}

impl Extensions {
    /// An empty map.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Stores `value`, returning the value of the same type it replaced.
    pub fn insert<T: Send + Sync + 'static>(&mut self, value: T) -> Option<T> {
        self.map
            .insert(TypeId::of::<T>(), Box::new(value))
            .and_then(|old| old.downcast::<T>().ok().map(|b| *b))
    }

    /// The stored value of type `T`.
    #[must_use]
    pub fn get<T: Send + Sync + 'static>(&self) -> Option<&T> {
        self.map
            .get(&TypeId::of::<T>())
            .and_then(|v| v.downcast_ref::<T>())
    }

    /// The stored value of type `T`, mutably.
    pub fn get_mut<T: Send + Sync + 'static>(&mut self) -> Option<&mut T> {
        self.map
            .get_mut(&TypeId::of::<T>())
            .and_then(|v| v.downcast_mut::<T>())
    }

    /// Removes and returns the stored value of type `T`.
    pub fn remove<T: Send + Sync + 'static>(&mut self) -> Option<T> {
        self.map
            .remove(&TypeId::of::<T>())
            .and_then(|old| old.downcast::<T>().ok().map(|b| *b))
    }

    /// How many values are stored.
    #[must_use]
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether nothing is stored.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

impl fmt::Debug for Extensions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Extensions")
            .field("len", &self.map.len())
            .finish_non_exhaustive()
    }
}

/// A command with everything the pipeline knows about its request: who
/// sent it, the credentials they presented, correlation and trace context.
#[derive(Debug)]
#[non_exhaustive]
pub struct CommandEnvelope<C> {
    /// This command's id; events it produces name it as their causation.
    pub command_id: CommandId,
    /// The command.
    pub command: C,
    /// Correlation id, trace context, actor and tenant. The authentication
    /// layer fills `actor` and `tenant` from the principal.
    pub metadata: Metadata,
    /// The authenticated caller: set by the authentication layer, or by the
    /// composition root for trusted internal callers.
    pub principal: Option<Principal>,
    /// The credential presented by the caller, if any, for the
    /// authentication layer to verify.
    pub credentials: Option<BearerToken>,
    /// When the pipeline received the command.
    pub received_at: DateTime<Utc>,
    /// Values passed from layers to the layers below and to the handler.
    pub extensions: Extensions,
}

impl<C> CommandEnvelope<C> {
    /// Wraps a command with a new id and a new correlation id.
    pub fn new(command: C) -> Self {
        Self {
            command_id: CommandId::new(),
            command,
            metadata: Metadata::new().with_correlation_id(CorrelationId::new()),
            principal: None,
            credentials: None,
            received_at: Utc::now(),
            extensions: Extensions::new(),
        }
    }

    /// Replaces the metadata (keeping a correlation id: a new one is made if
    /// `metadata` has none).
    #[must_use]
    pub fn with_metadata(mut self, mut metadata: Metadata) -> Self {
        if metadata.correlation_id.is_none() {
            metadata.correlation_id = self.metadata.correlation_id;
        }
        self.metadata = metadata;
        self
    }

    /// Sets the correlation id.
    #[must_use]
    pub fn with_correlation_id(mut self, id: CorrelationId) -> Self {
        self.metadata.correlation_id = Some(id);
        self
    }

    /// Sets the principal (for trusted callers that were authenticated
    /// elsewhere, and for tests).
    #[must_use]
    pub fn with_principal(mut self, principal: Principal) -> Self {
        self.principal = Some(principal);
        self
    }

    /// Sets the bearer credential for the authentication layer to verify.
    #[must_use]
    pub fn with_bearer_token(mut self, token: BearerToken) -> Self {
        self.credentials = Some(token);
        self
    }

    /// The correlation id (always present on envelopes built with
    /// [`new`](Self::new)).
    #[must_use]
    pub fn correlation_id(&self) -> Option<CorrelationId> {
        self.metadata.correlation_id
    }

    /// Metadata for the events this command produces: the envelope's
    /// correlation id, trace context, actor and tenant, with the command id
    /// as causation.
    #[must_use]
    pub fn event_metadata(&self) -> Metadata {
        let mut metadata = self
            .metadata
            .clone()
            .with_causation_id(self.command_id.into());
        if metadata.actor.is_none() {
            metadata.actor = self.principal.as_ref().map(|p| p.subject.clone());
        }
        metadata
    }
}

impl<C: Command> CommandEnvelope<C> {
    /// The command's type name.
    #[must_use]
    pub fn command_type(&self) -> &'static str {
        self.command.command_type()
    }
}

/// What a handler reports for an accepted command: its output, the types of
/// the events it recorded, and (when the command did not say up front) the
/// aggregate it acted on.
#[derive(Clone, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub struct Handled<T> {
    /// The handler's result.
    pub output: T,
    /// Types of the events the command produced, in order.
    pub event_types: Vec<String>,
    /// The aggregate the command acted on, when the handler learned it
    /// (for example a newly created aggregate's id).
    pub aggregate: Option<AggregateRef>,
}

impl<T> Handled<T> {
    /// An accepted command's output with no events recorded.
    pub fn new(output: T) -> Self {
        Self {
            output,
            event_types: Vec::new(),
            aggregate: None,
        }
    }

    /// Records the types of the events the command produced.
    #[must_use]
    pub fn with_events<I, S>(mut self, event_types: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.event_types
            .extend(event_types.into_iter().map(Into::into));
        self
    }

    /// Names the aggregate the command acted on.
    #[must_use]
    pub fn with_aggregate(mut self, aggregate: AggregateRef) -> Self {
        self.aggregate = Some(aggregate);
        self
    }

    /// Transforms the output, keeping the rest.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Handled<U> {
        Handled {
            output: f(self.output),
            event_types: self.event_types,
            aggregate: self.aggregate,
        }
    }
}

/// The error every stage of the command pipeline returns: a domain rejection
/// or an infrastructure error (which includes
/// [`Unauthorized`](crate::Error::Unauthorized) and
/// [`Forbidden`](crate::Error::Forbidden)).
pub type PipelineError = CommandError<DomainError>;

/// Handles one command type. Application services implement it; the
/// pipeline's layers run around it.
#[async_trait]
pub trait CommandHandler<C: Command>: Send + Sync + 'static {
    /// What an accepted command returns to the caller.
    type Output: Send + 'static;

    /// Handles the command.
    async fn handle(
        &self,
        envelope: CommandEnvelope<C>,
    ) -> Result<Handled<Self::Output>, PipelineError>;
}

/// A boxed, sendable future, as returned by the pipeline's services.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Takes the service a layer polled ready out of `slot`, leaving a fresh
/// clone behind for the next request.
///
/// A layer's `call` must use the very service whose `poll_ready` answered
/// ready; every pipeline layer that moves its inner service into a boxed
/// future calls this instead of cloning, which would hand the request to a
/// service that was never polled.
pub fn take_ready<S: Clone>(slot: &mut S) -> S {
    let fresh = slot.clone();
    std::mem::replace(slot, fresh)
}

/// Turns a [`CommandHandler`] into the innermost [`tower::Service`] of a
/// command pipeline. Cheap to clone (the handler is shared).
pub struct HandlerService<H> {
    handler: Arc<H>,
}

impl<H> HandlerService<H> {
    /// Wraps a handler.
    pub fn new(handler: H) -> Self {
        Self {
            handler: Arc::new(handler),
        }
    }

    /// Wraps a handler that is already shared.
    pub fn from_arc(handler: Arc<H>) -> Self {
        Self { handler }
    }
}

impl<H> Clone for HandlerService<H> {
    fn clone(&self) -> Self {
        Self {
            handler: Arc::clone(&self.handler),
        }
    }
}

impl<H> fmt::Debug for HandlerService<H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerService")
            .field("handler", &std::any::type_name::<H>())
            .finish()
    }
}

impl<C, H> tower::Service<CommandEnvelope<C>> for HandlerService<H>
where
    C: Command,
    H: CommandHandler<C>,
{
    type Response = Handled<H::Output>;
    type Error = PipelineError;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, envelope: CommandEnvelope<C>) -> Self::Future {
        let handler = Arc::clone(&self.handler);
        Box::pin(async move { handler.handle(envelope).await })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extensions_store_one_value_per_type() {
        let mut ext = Extensions::new();
        assert!(ext.is_empty());
        assert_eq!(ext.insert(5_u32), None);
        assert_eq!(ext.insert(7_u32), Some(5));
        ext.insert("text");
        assert_eq!(ext.get::<u32>(), Some(&7));
        *ext.get_mut::<u32>().unwrap() += 1;
        assert_eq!(ext.remove::<u32>(), Some(8));
        assert_eq!(ext.get::<u32>(), None);
        assert_eq!(ext.len(), 1);
    }

    #[test]
    fn bearer_tokens_never_print() {
        let token = BearerToken::new("eyJ.secret.sig");
        let envelope = CommandEnvelope::new(()).with_bearer_token(token.clone());
        let printed = format!("{envelope:?} {token:?}");
        assert!(!printed.contains("eyJ.secret.sig"), "{printed}");
        assert_eq!(token.expose(), "eyJ.secret.sig");
    }

    #[test]
    fn event_metadata_names_the_command_and_the_actor() {
        let envelope = CommandEnvelope::new(()).with_principal(Principal::new("user-1"));
        let metadata = envelope.event_metadata();
        assert_eq!(metadata.causation_id, Some(envelope.command_id.into()));
        assert_eq!(metadata.correlation_id, envelope.correlation_id());
        assert!(metadata.correlation_id.is_some());
        assert_eq!(metadata.actor.as_deref(), Some("user-1"));
    }

    #[test]
    fn with_metadata_keeps_a_correlation_id() {
        let envelope = CommandEnvelope::new(());
        let before = envelope.correlation_id();
        let envelope = envelope.with_metadata(Metadata::new().with_actor("svc"));
        assert_eq!(envelope.correlation_id(), before);
        assert_eq!(envelope.metadata.actor.as_deref(), Some("svc"));
    }
}
