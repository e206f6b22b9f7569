//! What a relay needs from an outbox backend: claim a batch, settle it,
//! prune, count, and wake up on commits.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use keel_core::Message;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use super::publish::Outcome;
use super::{OutboxStats, RelayConfig};
use crate::error::Result;

/// One claimed row.
#[derive(Debug)]
pub(crate) struct Claimed {
    pub(crate) id: i64,
    pub(crate) topic: String,
    pub(crate) aggregate_type: String,
    pub(crate) aggregate_id: String,
    /// The message to publish, or why the row cannot be read.
    pub(crate) message: Result<Message>,
}

/// A claimed batch: its rows, and what keeps other relays off their
/// aggregates until the batch is settled (a PostgreSQL transaction holding
/// row locks; in memory, a lease dropped with the batch).
pub(crate) struct Batch {
    pub(crate) rows: Vec<Claimed>,
    pub(crate) lease: Box<dyn Lease>,
}

/// An outbox backend as a relay sees it.
#[async_trait]
pub(crate) trait Source: Send + Sync + 'static {
    /// Claims the next batch; `None` when there is nothing to publish.
    async fn claim(&self, config: &RelayConfig) -> Result<Option<Batch>>;

    /// Deletes published rows older than `retention`; returns how many.
    async fn prune(&self, retention: Duration) -> Result<u64>;

    /// The backlog.
    async fn stats(&self) -> Result<OutboxStats>;

    /// Starts a task that wakes `wake` whenever rows are committed.
    fn wake_on_commit(&self, wake: Arc<Notify>, relay: String) -> JoinHandle<()>;
}

/// Records what became of a claimed batch and lets go of its aggregates.
/// Dropped without settling (the relay was aborted), it lets go without
/// recording anything, and the rows are claimed again: at-least-once.
#[async_trait]
pub(crate) trait Lease: Send {
    /// Marks the published rows (or deletes them, with zero retention) and
    /// schedules the retries of the failed ones.
    async fn settle(self: Box<Self>, outcome: &Outcome, config: &RelayConfig) -> Result<()>;
}

/// The delay before the `attempts`-th retry (0-based), without jitter.
pub(crate) fn retry_delay(config: &RelayConfig, attempts: u32) -> Duration {
    config
        .retry_min
        .saturating_mul(1u32 << attempts.min(20))
        .min(config.retry_max)
}

pub(crate) fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}
