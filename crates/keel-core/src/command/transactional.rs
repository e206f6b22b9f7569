//! Handlers that run inside one transaction, and the service that gives
//! them one.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use async_trait::async_trait;

use super::{BoxFuture, Command, CommandEnvelope, Handled, PipelineError};
use crate::error::{CommandError, Error};
use crate::uow::{Accepted, BeforeCommitSteps, Transaction, TransactionSource};

/// Handles one command type inside a transaction that the pipeline begins,
/// commits and rolls back: the handler only writes through `tx`.
///
/// The transaction is a parameter, so a handler that needs one cannot be
/// wired without a [`TransactionalService`]; there is no run-time lookup
/// that could find it missing. The handler borrows the envelope because
/// the service may run it more than once (see
/// [`TransactionalService::max_attempts`]).
///
/// ```
/// use keel_core::command::{
///     Command, CommandEnvelope, Handled, PipelineError, TransactionalHandler, TransactionalService,
/// };
/// use keel_core::uow::{MemoryTransactions, Transaction};
/// use tower::{Service, ServiceExt};
///
/// struct Rename { name: String }
/// impl Command for Rename {
///     fn command_type(&self) -> &'static str { "thing.rename" }
/// }
///
/// struct Renamer;
///
/// #[async_trait::async_trait]
/// impl TransactionalHandler<Rename> for Renamer {
///     type Output = String;
///     async fn handle(
///         &self,
///         _tx: &mut dyn Transaction,
///         envelope: &CommandEnvelope<Rename>,
///     ) -> Result<Handled<String>, PipelineError> {
///         // repository.within(tx).update(...).await?; outbox.within(tx).write(...).await?;
///         Ok(Handled::new(envelope.command.name.clone()).with_events(["thing.renamed"]))
///     }
/// }
///
/// # async fn run() -> Result<(), PipelineError> {
/// let mut service = TransactionalService::new(MemoryTransactions::new(), Renamer);
/// let handled = service
///     .ready()
///     .await?
///     .call(CommandEnvelope::new(Rename { name: "new".into() }))
///     .await?;
/// assert_eq!(handled.output, "new");
/// # Ok(()) }
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(run()).unwrap();
/// ```
#[async_trait]
pub trait TransactionalHandler<C: Command + Sync>: Send + Sync + 'static {
    /// What an accepted command returns to the caller.
    type Output: Send + 'static;

    /// Handles the command, writing through `tx`. Returning `Ok` commits
    /// everything written through `tx`; returning `Err` rolls it all back.
    async fn handle(
        &self,
        tx: &mut dyn Transaction,
        envelope: &CommandEnvelope<C>,
    ) -> Result<Handled<Self::Output>, PipelineError>;
}

/// The innermost [`tower::Service`] of a command pipeline whose handler
/// writes in a transaction: one transaction per command.
///
/// For each command it begins a transaction on its [`TransactionSource`]
/// (`keel_database::Database`, or [`MemoryTransactions`](crate::uow::MemoryTransactions)
/// in tests) and hands it to the [`TransactionalHandler`]. Then:
///
/// * when the handler returns `Ok`, it runs the layers'
///   [`BeforeCommit`](crate::uow::BeforeCommit) steps found in the
///   envelope's [`BeforeCommitSteps`] (the audit record of an accepted
///   command, say) in the same transaction, and commits. A failed step or
///   a failed commit is the command's error, so the caller never hears
///   "accepted" for work that was not stored;
/// * when the handler returns `Err`, a domain rejection or an
///   infrastructure error alike, it rolls back and returns that error;
/// * when any of these fails with [`Error::TransactionConflict`] (a
///   serialization failure or a deadlock: nothing was stored), it runs the
///   whole command again in a new transaction, up to
///   [`max_attempts`](Self::max_attempts) times in all.
///
/// Cheap to clone (the handler and the source are shared).
pub struct TransactionalService<H> {
    handler: Arc<H>,
    source: Arc<dyn TransactionSource>,
    max_attempts: u32,
}

impl<H> Clone for TransactionalService<H> {
    fn clone(&self) -> Self {
        Self {
            handler: Arc::clone(&self.handler),
            source: Arc::clone(&self.source),
            max_attempts: self.max_attempts,
        }
    }
}

impl<H> fmt::Debug for TransactionalService<H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TransactionalService")
            .field("handler", &std::any::type_name::<H>())
            .field("source", &self.source)
            .field("max_attempts", &self.max_attempts)
            .finish()
    }
}

/// How many times [`TransactionalService`] runs a command that keeps
/// meeting transaction conflicts, unless told otherwise.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;

impl<H> TransactionalService<H> {
    /// Runs `handler` in transactions begun on `source`.
    pub fn new(source: impl TransactionSource + 'static, handler: H) -> Self {
        Self::from_parts(Arc::new(source), Arc::new(handler))
    }

    /// As [`new`](Self::new), with a source and a handler that are already
    /// shared.
    pub fn from_parts(source: Arc<dyn TransactionSource>, handler: Arc<H>) -> Self {
        Self {
            handler,
            source,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
        }
    }

    /// Runs a command at most `attempts` times in all when its transaction
    /// meets conflicts (at least 1; default [`DEFAULT_MAX_ATTEMPTS`]).
    #[must_use]
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts.max(1);
        self
    }

    /// The configured number of attempts.
    #[must_use]
    pub fn attempts(&self) -> u32 {
        self.max_attempts
    }
}

fn is_conflict(e: &PipelineError) -> bool {
    e.as_infrastructure()
        .is_some_and(Error::is_transaction_conflict)
}

async fn roll_back(tx: Box<dyn Transaction>) {
    // A failed rollback loses nothing: the backend discards an unfinished
    // transaction either way (PostgreSQL with its connection), and the
    // command's own error is the one worth returning.
    let _ = tx.rollback().await;
}

async fn run_once<C, H>(
    handler: &H,
    source: &dyn TransactionSource,
    envelope: &CommandEnvelope<C>,
    steps: Option<&BeforeCommitSteps>,
) -> Result<Handled<H::Output>, PipelineError>
where
    C: Command + Sync,
    H: TransactionalHandler<C>,
{
    let mut tx = source.begin().await.map_err(CommandError::Infrastructure)?;
    let handled = match handler.handle(&mut *tx, envelope).await {
        Ok(handled) => handled,
        Err(e) => {
            roll_back(tx).await;
            return Err(e);
        }
    };
    if let Some(steps) = steps {
        let accepted = Accepted {
            command_id: envelope.command_id,
            command_type: envelope.command.command_type(),
            event_types: &handled.event_types,
            aggregate: handled.aggregate.as_ref(),
        };
        for step in steps.steps() {
            if let Err(e) = step.before_commit(&mut *tx, &accepted).await {
                roll_back(tx).await;
                return Err(CommandError::Infrastructure(e));
            }
        }
    }
    tx.commit().await.map_err(CommandError::Infrastructure)?;
    if let Some(steps) = steps {
        steps.mark_committed();
    }
    Ok(handled)
}

impl<C, H> tower::Service<CommandEnvelope<C>> for TransactionalService<H>
where
    C: Command + Sync,
    H: TransactionalHandler<C>,
{
    type Response = Handled<H::Output>;
    type Error = PipelineError;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, envelope: CommandEnvelope<C>) -> Self::Future {
        let handler = Arc::clone(&self.handler);
        let source = Arc::clone(&self.source);
        let max_attempts = self.max_attempts;
        Box::pin(async move {
            let steps = envelope.extensions.get::<BeforeCommitSteps>().cloned();
            let mut attempt = 1;
            loop {
                let result = run_once(&*handler, &*source, &envelope, steps.as_ref()).await;
                match result {
                    Err(e) if attempt < max_attempts && is_conflict(&e) => attempt += 1,
                    other => return other,
                }
            }
        })
    }
}
