//! Units of work: transactions, savepoints and after-commit hooks.

use std::borrow::Cow;
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::panic::AssertUnwindSafe;
use std::time::Duration;

use sqlx::{Connection, PgConnection, Postgres, Transaction};

use crate::error::{DatabaseError, Result};
use crate::retry::RetryPolicy;

/// A transaction isolation level.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
#[non_exhaustive]
pub enum IsolationLevel {
    /// PostgreSQL's default: each statement sees data committed before it
    /// began.
    #[default]
    ReadCommitted,
    /// The transaction sees one snapshot; concurrent updates of the same
    /// rows abort it with a serialization failure.
    RepeatableRead,
    /// Full serializability; conflicting transactions abort with a
    /// serialization failure and should be run again
    /// ([`Database::transaction`](crate::Database::transaction) does that).
    Serializable,
}

impl IsolationLevel {
    /// The SQL spelling, e.g. `SERIALIZABLE`.
    #[must_use]
    pub const fn as_sql(self) -> &'static str {
        match self {
            IsolationLevel::ReadCommitted => "READ COMMITTED",
            IsolationLevel::RepeatableRead => "REPEATABLE READ",
            IsolationLevel::Serializable => "SERIALIZABLE",
        }
    }
}

impl fmt::Display for IsolationLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_sql())
    }
}

/// How to start a unit of work: isolation level, read-only, deferrable, and
/// (for [`Database::transaction_with`](crate::Database::transaction_with))
/// the retry policy.
///
/// ```
/// use keel_database::{IsolationLevel, TransactionOptions};
/// let opts = TransactionOptions::serializable().read_only(true);
/// assert_eq!(opts.isolation_level(), IsolationLevel::Serializable);
/// assert_eq!(opts.begin_statement(), "BEGIN ISOLATION LEVEL SERIALIZABLE READ ONLY");
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TransactionOptions {
    isolation: IsolationLevel,
    read_only: bool,
    deferrable: bool,
    retry: Option<RetryPolicy>,
}

impl TransactionOptions {
    /// Read committed, read-write, the configured retry policy.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Shorthand for `new().isolation(IsolationLevel::Serializable)`.
    #[must_use]
    pub fn serializable() -> Self {
        Self::default().isolation(IsolationLevel::Serializable)
    }

    /// Sets the isolation level.
    #[must_use]
    pub fn isolation(mut self, level: IsolationLevel) -> Self {
        self.isolation = level;
        self
    }

    /// Makes the transaction read-only: writes fail with SQLSTATE `25006`.
    #[must_use]
    pub fn read_only(mut self, yes: bool) -> Self {
        self.read_only = yes;
        self
    }

    /// `DEFERRABLE`: a serializable read-only transaction waits for a safe
    /// snapshot and then can never fail with a serialization failure. Only
    /// meaningful together with `Serializable` and `read_only(true)`.
    #[must_use]
    pub fn deferrable(mut self, yes: bool) -> Self {
        self.deferrable = yes;
        self
    }

    /// Overrides the database's retry policy for this transaction.
    #[must_use]
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = Some(policy);
        self
    }

    /// The isolation level.
    #[must_use]
    pub fn isolation_level(&self) -> IsolationLevel {
        self.isolation
    }

    /// The retry policy override, if any.
    #[must_use]
    pub fn retry_policy(&self) -> Option<&RetryPolicy> {
        self.retry.as_ref()
    }

    /// The `BEGIN` statement these options produce.
    #[must_use]
    pub fn begin_statement(&self) -> Cow<'static, str> {
        if self.isolation == IsolationLevel::ReadCommitted && !self.read_only && !self.deferrable {
            return Cow::Borrowed("BEGIN");
        }
        let mut s = format!("BEGIN ISOLATION LEVEL {}", self.isolation.as_sql());
        if self.read_only {
            s.push_str(" READ ONLY");
        }
        if self.deferrable {
            s.push_str(" DEFERRABLE");
        }
        Cow::Owned(s)
    }
}

type Hook = Box<dyn FnOnce() + Send + 'static>;

/// One database transaction (or, when nested, one savepoint) that the event
/// store, the outbox and repositories write through together.
///
/// * [`commit`](Self::commit) makes the work durable, then runs the
///   [`after_commit`](Self::after_commit) hooks;
/// * [`rollback`](Self::rollback) discards it; so does dropping the unit of
///   work without committing (the `ROLLBACK` is sent before the connection is
///   used again), which is what happens when `?` returns early on an error;
/// * [`savepoint`](Self::savepoint) opens a nested scope whose rollback keeps
///   the outer work;
/// * the connection is reachable through `Deref`/`DerefMut` or
///   [`conn`](Self::conn): pass `&mut *uow` (or `uow.conn()`) wherever
///   `sqlx` expects an executor.
///
/// ```no_run
/// # async fn demo(db: keel_database::Database) -> Result<(), keel_database::DatabaseError> {
/// let mut uow = db.begin().await?;
/// sqlx::query("INSERT INTO orders (id) VALUES ($1)")
///     .bind(42_i64)
///     .execute(uow.conn())
///     .await?;
/// {
///     let mut sp = uow.savepoint().await?;
///     let attempt = sqlx::query("INSERT INTO audit (order_id) VALUES ($1)")
///         .bind(42_i64)
///         .execute(&mut *sp)
///         .await;
///     match attempt {
///         Ok(_) => sp.commit().await?,
///         Err(_) => sp.rollback().await?, // the order insert survives
///     }
/// }
/// uow.after_commit(|| println!("order 42 stored"));
/// uow.commit().await?;
/// # Ok(()) }
/// ```
#[must_use = "a unit of work rolls back when dropped; call commit()"]
pub struct UnitOfWork<'c> {
    tx: Transaction<'c, Postgres>,
    hooks: Vec<Hook>,
    parent_hooks: Option<&'c mut Vec<Hook>>,
    /// Statements sent in the `COMMIT`'s round trip ([`Self::send_with_commit`]).
    deferred: Vec<String>,
    parent_deferred: Option<&'c mut Vec<String>>,
    depth: u32,
    attempt: u32,
    isolation: IsolationLevel,
    statement_timeout: Option<Duration>,
}

impl fmt::Debug for UnitOfWork<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UnitOfWork")
            .field("depth", &self.depth)
            .field("attempt", &self.attempt)
            .field("isolation", &self.isolation)
            .field("after_commit_hooks", &self.hooks.len())
            .finish_non_exhaustive()
    }
}

impl UnitOfWork<'static> {
    pub(crate) fn top_level(
        tx: Transaction<'static, Postgres>,
        isolation: IsolationLevel,
        attempt: u32,
        statement_timeout: Option<Duration>,
    ) -> Self {
        Self {
            tx,
            hooks: Vec::new(),
            parent_hooks: None,
            deferred: Vec::new(),
            parent_deferred: None,
            depth: 0,
            attempt,
            isolation,
            statement_timeout,
        }
    }
}

impl<'c> UnitOfWork<'c> {
    /// The connection, for running queries inside this unit of work.
    pub fn conn(&mut self) -> &mut PgConnection {
        &mut self.tx
    }

    /// Nesting depth: 0 for the transaction, 1 for a savepoint in it, …
    #[must_use]
    pub fn depth(&self) -> u32 {
        self.depth
    }

    /// Which attempt of [`Database::transaction`](crate::Database::transaction)
    /// this is (1 for the first; always 1 for [`Database::begin`](crate::Database::begin)).
    #[must_use]
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The isolation level of the enclosing transaction.
    #[must_use]
    pub fn isolation_level(&self) -> IsolationLevel {
        self.isolation
    }

    /// Runs `hook` once the outermost transaction has committed, e.g. to
    /// wake an outbox relay. Hooks registered in a savepoint that is rolled
    /// back, or in a transaction that does not commit, never run. Hooks run
    /// in registration order; a panicking hook is logged and does not stop
    /// the others.
    pub fn after_commit(&mut self, hook: impl FnOnce() + Send + 'static) {
        self.hooks.push(Box::new(hook));
    }

    /// Opens a nested scope as a `SAVEPOINT`. Committing it releases the
    /// savepoint (its work becomes part of this unit of work); rolling it
    /// back or dropping it undoes only the nested work.
    pub async fn savepoint(&mut self) -> Result<UnitOfWork<'_>> {
        let statement_timeout = self.statement_timeout;
        let inner = Connection::begin(&mut *self.tx)
            .await
            .map_err(|e| classify(e, statement_timeout))?;
        Ok(UnitOfWork {
            tx: inner,
            hooks: Vec::new(),
            parent_hooks: Some(&mut self.hooks),
            deferred: Vec::new(),
            parent_deferred: Some(&mut self.deferred),
            depth: self.depth + 1,
            attempt: self.attempt,
            isolation: self.isolation,
            statement_timeout,
        })
    }

    /// Sends `statement` to the server together with the `COMMIT`, in the
    /// same round trip, instead of on its own now: work that must commit
    /// with this unit of work but whose result nobody waits for (an audit
    /// record, say) then costs no round trip of its own.
    ///
    /// `statement` is sent as text through the simple query protocol, so it
    /// takes no parameters: build its values with [`sql_literal`] (never by
    /// pasting text into quotes). It runs after everything else in the
    /// transaction, just before `COMMIT`; if it fails, nothing commits and
    /// [`commit`](Self::commit) returns its error. Registered in a
    /// savepoint, it moves to the enclosing transaction when the savepoint
    /// is released, and is dropped with it when it is rolled back.
    pub fn send_with_commit(&mut self, statement: impl Into<String>) {
        self.deferred.push(statement.into());
    }

    /// Commits the transaction (or releases the savepoint).
    ///
    /// For the outermost transaction, the after-commit hooks run once the
    /// server has confirmed the commit. If the connection dies during
    /// `COMMIT` the outcome is unknown and the error is
    /// [`DatabaseError::ConnectionLost`].
    ///
    /// If a statement failed earlier and its error was not propagated, the
    /// transaction is aborted: PostgreSQL would answer `COMMIT` with a
    /// silent `ROLLBACK`. `commit` therefore sends a probe statement first,
    /// which fails in an aborted transaction, and fails with
    /// [`DatabaseError::TransactionAborted`], rolling back; a savepoint's
    /// release fails the same way by itself.
    ///
    /// The outermost commit is one round trip: the statements registered
    /// with [`send_with_commit`](Self::send_with_commit), the probe and
    /// `COMMIT` go out as one batch (PostgreSQL skips the rest of a batch
    /// after a failed statement, so nothing commits if any of them fails).
    /// The batch ends with a `BEGIN` that the connection rolls back, empty,
    /// when it goes back to the pool, outside the caller's wait.
    pub async fn commit(self) -> Result<()> {
        let UnitOfWork {
            mut tx,
            hooks,
            parent_hooks,
            deferred,
            parent_deferred,
            statement_timeout,
            ..
        } = self;
        let Some(parent_hooks) = parent_hooks else {
            let mut batch = String::new();
            for statement in &deferred {
                batch.push_str(statement);
                batch.push_str(";\n");
            }
            // The probe fails with 25P02 in an aborted transaction (then
            // the server skips the COMMIT and `tx`, dropped on the error
            // path, rolls back). The trailing BEGIN leaves sqlx's view of
            // the connection true (a transaction is open); dropping `tx`
            // queues its ROLLBACK, which the pool sends when it takes the
            // connection back.
            batch.push_str("SELECT 1; COMMIT; BEGIN");
            // Without arguments sqlx sends the text as one simple query,
            // which may hold several statements.
            let conn: &mut PgConnection = &mut tx;
            sqlx::Executor::execute(conn, batch.as_str())
                .await
                .map_err(|e| classify(e, statement_timeout))?;
            drop(tx);
            run_hooks(hooks);
            return Ok(());
        };
        tx.commit()
            .await
            .map_err(|e| classify(e, statement_timeout))?;
        parent_hooks.extend(hooks);
        if let Some(parent) = parent_deferred {
            parent.extend(deferred);
        }
        Ok(())
    }

    /// Rolls the transaction back (or rolls back to the savepoint),
    /// discarding its after-commit hooks.
    pub async fn rollback(self) -> Result<()> {
        let statement_timeout = self.statement_timeout;
        self.tx
            .rollback()
            .await
            .map_err(|e| classify(e, statement_timeout))
    }
}

/// `value` as a PostgreSQL string constant, for statements sent as text
/// (such as [`UnitOfWork::send_with_commit`]'s): dollar-quoted with a tag
/// that does not occur in `value`, so no character of `value` (quotes,
/// backslashes, dollar signs) can end the constant early, whatever the
/// server's `standard_conforming_strings`. Cast it as needed
/// (`{}::uuid`, `{}::jsonb`).
///
/// Fails with an `Invalid` error when `value` holds a NUL byte, which no
/// PostgreSQL text can store (and which would cut a statement sent as
/// text short).
///
/// ```
/// let quoted = keel_database::sql_literal("it's $1 \\ $q$").unwrap();
/// assert_eq!(quoted, "$q0$it's $1 \\ $q$$q0$");
/// assert!(keel_database::sql_literal("nul\0byte").is_err());
/// ```
pub fn sql_literal(value: &str) -> keel_core::Result<String> {
    if value.contains('\0') {
        return Err(keel_core::Error::invalid_input(
            "value",
            "text holds a NUL byte, which PostgreSQL cannot store",
        ));
    }
    let mut n = 0_u32;
    loop {
        let tag = format!("$q{n}$");
        // The constant ends at the first occurrence of the tag after the
        // opening one: it must be the closing tag itself, also where the
        // end of `value` and the tag overlap.
        let body = format!("{value}{tag}");
        if body.find(&tag) == Some(value.len()) {
            return Ok(format!("{tag}{body}"));
        }
        n += 1;
    }
}

fn classify(e: sqlx::Error, statement_timeout: Option<Duration>) -> DatabaseError {
    DatabaseError::from(e).with_timeouts(None, statement_timeout)
}

fn run_hooks(hooks: Vec<Hook>) {
    for hook in hooks {
        if std::panic::catch_unwind(AssertUnwindSafe(hook)).is_err() {
            tracing::error!("an after-commit hook panicked; the transaction stays committed");
        }
    }
}

impl Deref for UnitOfWork<'_> {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        &self.tx
    }
}

impl DerefMut for UnitOfWork<'_> {
    fn deref_mut(&mut self) -> &mut PgConnection {
        &mut self.tx
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn begin_statements() {
        assert_eq!(TransactionOptions::new().begin_statement(), "BEGIN");
        assert_eq!(
            TransactionOptions::new()
                .isolation(IsolationLevel::RepeatableRead)
                .begin_statement(),
            "BEGIN ISOLATION LEVEL REPEATABLE READ"
        );
        assert_eq!(
            TransactionOptions::serializable()
                .read_only(true)
                .deferrable(true)
                .begin_statement(),
            "BEGIN ISOLATION LEVEL SERIALIZABLE READ ONLY DEFERRABLE"
        );
        assert_eq!(
            TransactionOptions::new().read_only(true).begin_statement(),
            "BEGIN ISOLATION LEVEL READ COMMITTED READ ONLY"
        );
    }
}
