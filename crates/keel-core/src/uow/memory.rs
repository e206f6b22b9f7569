//! In-memory transactions for the in-memory adapters.
//!
//! Each in-memory store keeps its state in a [`MemoryCell`]. A write
//! through a [`MemoryTransaction`] runs on the transaction's own copy of
//! that state (so later reads in the same transaction see it, and nobody
//! else does), and is remembered. Commit publishes every copy at once; if
//! another writer changed a cell in the meantime, the remembered writes
//! are run again on the newer state first, and the first one that no
//! longer holds (a version taken meanwhile, say) fails the commit with its
//! own error and publishes nothing. That is first-committer-wins
//! optimistic concurrency, the in-memory counterpart of PostgreSQL making
//! the later writer wait and then fail.

use std::any::Any;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;

use super::{Transaction, TransactionSource};
use crate::error::{Error, Result};

/// Held by every in-memory write and commit, so a commit that spans
/// several cells publishes them with nobody writing in between.
static COMMIT: Mutex<()> = Mutex::new(());

fn commit_lock() -> MutexGuard<'static, ()> {
    COMMIT.lock().unwrap_or_else(PoisonError::into_inner)
}

static NEXT_CELL: AtomicU64 = AtomicU64::new(1);

type Hook = Box<dyn Fn() + Send + Sync>;

/// An in-memory store's state, shared by direct writes and transactions.
///
/// Stores create one with [`new`](Self::new), read with
/// [`read`](Self::read) / [`read_in`](Self::read_in) and write with
/// [`write`](Self::write) / [`write_in`](Self::write_in). Write closures
/// must leave the state unchanged when they fail; inside a transaction a
/// failed write also aborts the transaction, as a failed statement aborts
/// a PostgreSQL transaction.
///
/// ```
/// use std::sync::Arc;
/// use keel_core::uow::{MemoryCell, MemoryTransaction, Transaction};
/// use keel_core::Error;
///
/// # async fn demo() -> keel_core::Result<()> {
/// let cell = Arc::new(MemoryCell::new(Vec::<u32>::new()));
/// let mut tx = MemoryTransaction::new();
/// cell.write_in(&mut tx, |v| { v.push(1); Ok::<_, Error>(()) })?;
/// assert_eq!(cell.read(|v| v.len()), 0); // not committed yet
/// assert_eq!(cell.read_in(&mut tx, |v| v.len()), 1); // seen inside
/// Box::new(tx).commit().await?;
/// assert_eq!(cell.read(|v| v.clone()), vec![1]);
/// # Ok(()) }
/// ```
pub struct MemoryCell<S> {
    id: u64,
    state: Mutex<Committed<S>>,
    hooks: Vec<Hook>,
}

struct Committed<S> {
    value: S,
    version: u64,
}

impl<S> fmt::Debug for MemoryCell<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryCell")
            .field("id", &self.id)
            .field("version", &self.lock().version)
            .finish_non_exhaustive()
    }
}

impl<S> MemoryCell<S> {
    fn lock(&self) -> MutexGuard<'_, Committed<S>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<S: Clone + Send + 'static> MemoryCell<S> {
    /// A cell holding `value`.
    pub fn new(value: S) -> Self {
        Self {
            id: NEXT_CELL.fetch_add(1, Ordering::Relaxed),
            state: Mutex::new(Committed { value, version: 0 }),
            hooks: Vec::new(),
        }
    }

    /// Runs `hook` after every committed change (a direct write or a
    /// transaction that touched this cell), outside every lock: for waking
    /// subscribers.
    #[must_use]
    pub fn on_commit(mut self, hook: impl Fn() + Send + Sync + 'static) -> Self {
        self.hooks.push(Box::new(hook));
        self
    }

    fn run_hooks(&self) {
        for hook in &self.hooks {
            hook();
        }
    }

    /// Reads the committed state.
    pub fn read<R>(&self, f: impl FnOnce(&S) -> R) -> R {
        f(&self.lock().value)
    }

    /// Changes the committed state at once, outside any transaction.
    ///
    /// # Errors
    ///
    /// What `f` returns; `f` must then have left the state unchanged.
    pub fn write<R, E>(&self, f: impl FnOnce(&mut S) -> Result<R, E>) -> Result<R, E> {
        let result = {
            let _commit = commit_lock();
            let mut state = self.lock();
            let result = f(&mut state.value);
            if result.is_ok() {
                state.version += 1;
            }
            result
        };
        if result.is_ok() {
            self.run_hooks();
        }
        result
    }

    /// Reads the state as `tx` sees it: its own writes included.
    pub fn read_in<R>(&self, tx: &mut MemoryTransaction, f: impl FnOnce(&S) -> R) -> R {
        match tx.staged_mut::<S>(self.id) {
            Some(staged) => f(&staged.copy),
            None => self.read(f),
        }
    }

    /// Writes through `tx`: `op` runs now on the transaction's copy (its
    /// result is returned) and runs again at commit if the cell changed in
    /// the meantime.
    ///
    /// # Errors
    ///
    /// What `op` returns (the transaction is then aborted and its commit
    /// fails), or [`Error::Internal`] when `tx` was already aborted.
    pub fn write_in<R, E>(
        self: &Arc<Self>,
        tx: &mut MemoryTransaction,
        op: impl Fn(&mut S) -> Result<R, E> + Send + 'static,
    ) -> Result<R, E>
    where
        E: Into<Error> + From<Error>,
    {
        if let Some(reason) = &tx.aborted {
            return Err(E::from(aborted(reason)));
        }
        if tx.staged_mut::<S>(self.id).is_none() {
            let (copy, base) = {
                let state = self.lock();
                (state.value.clone(), state.version)
            };
            tx.staged.push(Box::new(Staged {
                cell: Arc::clone(self),
                base,
                copy,
                ops: Vec::new(),
            }));
        }
        let Some(staged) = tx.staged_mut::<S>(self.id) else {
            return Err(E::from(Error::internal_msg("staged state vanished")));
        };
        match op(&mut staged.copy) {
            Ok(value) => {
                staged.ops.push(Box::new(move |s: &mut S| {
                    op(s).map(|_| ()).map_err(Into::into)
                }));
                Ok(value)
            }
            Err(e) => {
                let e: Error = e.into();
                tx.aborted = Some(e.to_string());
                Err(E::from(e))
            }
        }
    }
}

fn aborted(reason: &str) -> Error {
    Error::internal_msg(format!(
        "the transaction was aborted by an earlier failed write ({reason}); roll it back"
    ))
}

type Op<S> = Box<dyn Fn(&mut S) -> Result<()> + Send>;

struct Staged<S> {
    cell: Arc<MemoryCell<S>>,
    base: u64,
    copy: S,
    ops: Vec<Op<S>>,
}

trait StagedCell: Send {
    fn cell_id(&self) -> u64;
    fn as_any_mut(&mut self) -> &mut dyn Any;
    /// Brings the copy up to date with the committed state (runs the
    /// writes again when someone else committed meanwhile).
    fn prepare(&mut self) -> Result<()>;
    /// Publishes the copy; returns a hook runner for after the commit.
    fn apply(self: Box<Self>) -> Box<dyn FnOnce() + Send>;
}

impl<S: Clone + Send + 'static> StagedCell for Staged<S> {
    fn cell_id(&self) -> u64 {
        self.cell.id
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }

    fn prepare(&mut self) -> Result<()> {
        let state = self.cell.lock();
        if state.version != self.base {
            let mut fresh = state.value.clone();
            drop(state);
            for op in &self.ops {
                op(&mut fresh)?;
            }
            self.copy = fresh;
        }
        Ok(())
    }

    fn apply(self: Box<Self>) -> Box<dyn FnOnce() + Send> {
        let Staged { cell, copy, .. } = *self;
        {
            let mut state = cell.lock();
            state.value = copy;
            state.version += 1;
        }
        Box::new(move || cell.run_hooks())
    }
}

/// A transaction of the in-memory adapters; see [`MemoryCell`] for how it
/// isolates and commits. Begin one with [`MemoryTransactions`] (or
/// [`new`](Self::new)) and hand `&mut tx` to in-memory ports.
#[derive(Default)]
pub struct MemoryTransaction {
    staged: Vec<Box<dyn StagedCell>>,
    aborted: Option<String>,
    after_commit: Vec<Box<dyn FnOnce() + Send>>,
}

impl fmt::Debug for MemoryTransaction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryTransaction")
            .field("cells", &self.staged.len())
            .field("aborted", &self.aborted)
            .finish_non_exhaustive()
    }
}

impl MemoryTransaction {
    /// An empty transaction.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether a failed write aborted this transaction (its commit will
    /// fail).
    #[must_use]
    pub fn is_aborted(&self) -> bool {
        self.aborted.is_some()
    }

    fn staged_mut<S: 'static>(&mut self, id: u64) -> Option<&mut Staged<S>> {
        self.staged
            .iter_mut()
            .find(|s| s.cell_id() == id)
            .and_then(|s| s.as_any_mut().downcast_mut::<Staged<S>>())
    }

    fn commit_now(self) -> Result<()> {
        let MemoryTransaction {
            mut staged,
            aborted: failed,
            after_commit,
        } = self;
        if let Some(reason) = failed {
            return Err(aborted(&reason));
        }
        let hooks: Vec<Box<dyn FnOnce() + Send>> = {
            let _commit = commit_lock();
            for cell in &mut staged {
                cell.prepare()?;
            }
            staged.into_iter().map(StagedCell::apply).collect()
        };
        for hook in hooks {
            hook();
        }
        for hook in after_commit {
            hook();
        }
        Ok(())
    }
}

#[async_trait]
impl Transaction for MemoryTransaction {
    fn backend(&self) -> &'static str {
        "memory"
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }

    fn after_commit(&mut self, hook: Box<dyn FnOnce() + Send>) {
        self.after_commit.push(hook);
    }

    async fn commit(self: Box<Self>) -> Result<()> {
        (*self).commit_now()
    }

    async fn rollback(self: Box<Self>) -> Result<()> {
        Ok(())
    }
}

/// Begins [`MemoryTransaction`]s: the in-memory [`TransactionSource`].
#[derive(Clone, Copy, Debug, Default)]
pub struct MemoryTransactions;

impl MemoryTransactions {
    /// The source.
    #[must_use]
    pub fn new() -> Self {
        Self
    }
}

#[async_trait]
impl TransactionSource for MemoryTransactions {
    async fn begin(&self) -> Result<Box<dyn Transaction>> {
        Ok(Box::new(MemoryTransaction::new()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn push(v: u32) -> impl Fn(&mut Vec<u32>) -> Result<()> + Send + 'static {
        move |s: &mut Vec<u32>| {
            s.push(v);
            Ok(())
        }
    }

    fn push_unique(v: u32) -> impl Fn(&mut Vec<u32>) -> Result<()> + Send + 'static {
        move |s: &mut Vec<u32>| {
            if s.contains(&v) {
                return Err(Error::AlreadyExists {
                    subject: format!("{v}"),
                });
            }
            s.push(v);
            Ok(())
        }
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(f)
    }

    #[test]
    fn writes_are_invisible_until_commit_and_gone_after_rollback() {
        let cell = Arc::new(MemoryCell::new(Vec::<u32>::new()));
        let mut tx = MemoryTransaction::new();
        cell.write_in(&mut tx, push(1)).unwrap();
        assert!(cell.read(Vec::is_empty));
        assert_eq!(cell.read_in(&mut tx, Vec::len), 1);
        block_on(Box::new(tx).rollback()).unwrap();
        assert!(cell.read(Vec::is_empty));

        let mut tx = MemoryTransaction::new();
        cell.write_in(&mut tx, push(2)).unwrap();
        block_on(Box::new(tx).commit()).unwrap();
        assert_eq!(cell.read(Clone::clone), vec![2]);
    }

    #[test]
    fn a_commit_replays_on_newer_state_and_fails_on_a_conflict() {
        let cell = Arc::new(MemoryCell::new(Vec::<u32>::new()));
        let mut a = MemoryTransaction::new();
        let mut b = MemoryTransaction::new();
        cell.write_in(&mut a, push_unique(7)).unwrap();
        cell.write_in(&mut b, push_unique(7)).unwrap();
        cell.write(push(1)).unwrap();
        block_on(Box::new(a).commit()).unwrap();
        let err = block_on(Box::new(b).commit()).unwrap_err();
        assert!(matches!(err, Error::AlreadyExists { .. }), "{err}");
        assert_eq!(cell.read(Clone::clone), vec![1, 7]);
    }

    #[test]
    fn a_failed_write_aborts_the_transaction_across_cells() {
        let one = Arc::new(MemoryCell::new(vec![5_u32]));
        let two = Arc::new(MemoryCell::new(Vec::<u32>::new()));
        let mut tx = MemoryTransaction::new();
        two.write_in(&mut tx, push(1)).unwrap();
        assert!(one.write_in(&mut tx, push_unique(5)).is_err());
        assert!(tx.is_aborted());
        assert!(two.write_in(&mut tx, push(2)).is_err());
        assert!(block_on(Box::new(tx).commit()).is_err());
        assert!(two.read(Vec::is_empty));
    }

    #[test]
    fn hooks_run_after_commits_only() {
        let seen = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&seen);
        let cell = Arc::new(MemoryCell::new(0_u32).on_commit(move || {
            counter.fetch_add(1, Ordering::SeqCst);
        }));
        let mut tx = MemoryTransaction::new();
        cell.write_in(&mut tx, |n: &mut u32| {
            *n += 1;
            Ok::<_, Error>(())
        })
        .unwrap();
        block_on(Box::new(tx).rollback()).unwrap();
        assert_eq!(seen.load(Ordering::SeqCst), 0);
        cell.write(|n| {
            *n += 1;
            Ok::<_, Error>(())
        })
        .unwrap();
        assert_eq!(seen.load(Ordering::SeqCst), 1);
    }
}
