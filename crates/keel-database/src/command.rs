//! The command pipeline's unit-of-work layer: one transaction per command,
//! committed when the handler accepts the command and rolled back when it
//! does not.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use keel_core::command::{BoxFuture, Command, CommandEnvelope, Handled, PipelineError};
use keel_core::{CommandError, Error};
use std::ops::{Deref, DerefMut};

use tokio::sync::{Mutex, OwnedMappedMutexGuard, OwnedMutexGuard};
use tower::{Layer, Service};

use crate::pool::Database;
use crate::uow::{TransactionOptions, UnitOfWork};

/// The command's transaction, as the handler finds it in
/// [`CommandEnvelope::extensions`]. Clones share the one transaction.
///
/// The handler [`lock`](Self::lock)s it for as long as it runs queries and
/// gets the [`UnitOfWork`] (and through it the `PgConnection`); the layer
/// commits or rolls back after the handler has returned, so a handler never
/// commits by itself.
///
/// ```no_run
/// use keel_core::command::{Command, CommandEnvelope, CommandHandler, Handled};
/// use keel_core::{Error, PipelineError};
/// use keel_database::CommandTransaction;
///
/// struct OpenAccount { id: i64 }
/// impl Command for OpenAccount {
///     fn command_type(&self) -> &'static str { "account.open" }
/// }
///
/// struct Opener;
/// #[async_trait::async_trait]
/// impl CommandHandler<OpenAccount> for Opener {
///     type Output = ();
///     async fn handle(&self, envelope: CommandEnvelope<OpenAccount>) -> Result<Handled<()>, PipelineError> {
///         let tx = CommandTransaction::of(&envelope)?;
///         let mut uow = tx.lock().await?;
///         sqlx::query("INSERT INTO accounts (id) VALUES ($1)")
///             .bind(envelope.command.id)
///             .execute(uow.conn())
///             .await
///             .map_err(keel_database::to_keel)?;
///         Ok(Handled::new(()).with_events(["account.opened"]))
///     }
/// }
/// ```
#[derive(Clone)]
pub struct CommandTransaction {
    uow: Arc<Mutex<Option<UnitOfWork<'static>>>>,
}

impl fmt::Debug for CommandTransaction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CommandTransaction").finish_non_exhaustive()
    }
}

impl CommandTransaction {
    fn new(uow: UnitOfWork<'static>) -> Self {
        Self {
            uow: Arc::new(Mutex::new(Some(uow))),
        }
    }

    /// The transaction the unit-of-work layer opened for `envelope`.
    ///
    /// # Errors
    ///
    /// [`Error::Internal`] when the pipeline has no
    /// [`UnitOfWorkLayer`] below the handler: a wiring mistake.
    pub fn of<C>(envelope: &CommandEnvelope<C>) -> Result<Self, Error> {
        envelope
            .extensions
            .get::<CommandTransaction>()
            .cloned()
            .ok_or_else(|| {
                Error::internal_msg("no unit of work: the pipeline lacks a UnitOfWorkLayer")
            })
    }

    /// Waits for exclusive use of the transaction. Hold the guard while
    /// running queries (`uow.conn()`, or `&mut **uow` as an executor) and
    /// drop it before awaiting anything slow that does not need the
    /// database.
    ///
    /// # Errors
    ///
    /// [`Error::Internal`] when the command has already finished (a
    /// handler that kept a clone past its return).
    pub async fn lock(&self) -> Result<TransactionGuard, Error> {
        let guard = Arc::clone(&self.uow).lock_owned().await;
        OwnedMutexGuard::try_map(guard, Option::as_mut)
            .map(TransactionGuard)
            .map_err(|_| {
                Error::internal_msg(
                    "the command's unit of work has already been committed or rolled back",
                )
            })
    }

    async fn take(&self) -> Option<UnitOfWork<'static>> {
        self.uow.lock().await.take()
    }
}

/// Exclusive use of a command's [`UnitOfWork`], from
/// [`CommandTransaction::lock`]; dereferences to the unit of work (and
/// twice to its `PgConnection`). Other holders of the transaction wait
/// until it is dropped.
pub struct TransactionGuard(
    OwnedMappedMutexGuard<Option<UnitOfWork<'static>>, UnitOfWork<'static>>,
);

impl fmt::Debug for TransactionGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("TransactionGuard").field(&*self.0).finish()
    }
}

impl Deref for TransactionGuard {
    type Target = UnitOfWork<'static>;

    fn deref(&self) -> &UnitOfWork<'static> {
        &self.0
    }
}

impl DerefMut for TransactionGuard {
    fn deref_mut(&mut self) -> &mut UnitOfWork<'static> {
        &mut self.0
    }
}

/// A [`Layer`] that runs the rest of the pipeline in one database
/// transaction.
///
/// Before the handler runs it begins a [`UnitOfWork`] with the layer's
/// [`TransactionOptions`] and puts a [`CommandTransaction`] into the
/// envelope's extensions. Afterwards it
///
/// * commits when the handler returned `Ok`: a failed commit (including a
///   serialization failure at commit time) turns the result into that
///   error, converted into [`keel_core::Error`], so the caller never hears
///   "accepted" for work that was not stored;
/// * rolls back when the handler returned `Err`, a domain rejection or an
///   infrastructure error alike, and returns the handler's error unchanged
///   (a failed rollback is logged: PostgreSQL discards the work either
///   way).
///
/// Commands are not run again after a serialization failure or a
/// deadlock: the first attempt consumed the envelope, and the handler may
/// have acted outside the database. The error reaches the caller as what
/// the [`DatabaseError`](crate::DatabaseError) converts into, which is
/// retryable for transaction conflicts, so a caller whose command is safe
/// to repeat can send it again.
///
/// Place it innermost, just around the
/// [`HandlerService`](keel_core::command::HandlerService), so that no
/// transaction is opened for a caller that authentication or authorization
/// refuses.
#[derive(Clone, Debug)]
pub struct UnitOfWorkLayer {
    db: Database,
    options: TransactionOptions,
}

impl UnitOfWorkLayer {
    /// A layer opening read-committed transactions on `db`.
    #[must_use]
    pub fn new(db: Database) -> Self {
        Self {
            db,
            options: TransactionOptions::default(),
        }
    }

    /// Opens transactions with `options` instead (isolation level, read
    /// only); the retry policy in them is not used.
    #[must_use]
    pub fn options(mut self, options: TransactionOptions) -> Self {
        self.options = options;
        self
    }
}

impl<S> Layer<S> for UnitOfWorkLayer {
    type Service = UnitOfWorkService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        UnitOfWorkService {
            inner,
            layer: self.clone(),
        }
    }
}

/// The [`Service`] made by [`UnitOfWorkLayer`].
#[derive(Clone, Debug)]
pub struct UnitOfWorkService<S> {
    inner: S,
    layer: UnitOfWorkLayer,
}

impl<C, S, T> Service<CommandEnvelope<C>> for UnitOfWorkService<S>
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
            let uow = layer
                .db
                .begin_with(&layer.options)
                .await
                .map_err(|e| CommandError::Infrastructure(e.into()))?;
            let tx = CommandTransaction::new(uow);
            envelope.extensions.insert(tx.clone());
            let result = inner.call(envelope).await;
            let Some(uow) = tx.take().await else {
                return Err(Error::internal_msg(
                    "the command's unit of work disappeared before it could be finished",
                )
                .into());
            };
            match result {
                Ok(handled) => match uow.commit().await {
                    Ok(()) => Ok(handled),
                    Err(e) => Err(CommandError::Infrastructure(e.into())),
                },
                Err(e) => {
                    if let Err(rollback) = uow.rollback().await {
                        tracing::warn!(error = %rollback, "rolling back a failed command's transaction failed");
                    }
                    Err(e)
                }
            }
        })
    }
}
