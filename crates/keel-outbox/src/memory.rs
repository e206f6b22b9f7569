//! The in-memory outbox: the same contract as the PostgreSQL one, kept in
//! a [`MemoryCell`] and joined through a [`MemoryTransaction`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::convert::Infallible;
use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use keel_core::uow::{MemoryCell, MemoryTransaction, Transaction, join};
use keel_core::{EventId, Message};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

use crate::error::{OutboxError, Result};
use crate::message::{DEFAULT_MAX_PAYLOAD_BYTES, OutboxMessage, Prepared, prepare};
use crate::port::{Outbox, OutboxWrite};
use crate::relay::source::{Batch, Claimed, Lease, Source, retry_delay, truncate};
use crate::relay::{OutboxStats, RelayConfig};

/// The [`Outbox`] kept in memory, for tests and for services that run
/// without PostgreSQL: it joins a
/// [`MemoryTransaction`](keel_core::uow::MemoryTransaction) (what
/// [`MemoryTransactions`](keel_core::uow::MemoryTransactions) begins) and
/// is published by [`Relay::in_memory`](crate::Relay::in_memory).
///
/// It keeps the PostgreSQL outbox's promises: rows are invisible to the
/// relay until their transaction commits and gone if it rolls back; an
/// aggregate's rows are numbered, and so published, in commit order; the
/// same messages are refused with the same errors; a duplicate event id
/// fails the transaction with [`keel_core::Error::AlreadyExists`]. Rows
/// live as long as the value (clones share them).
///
/// ```
/// use std::sync::Arc;
/// use keel_core::Message;
/// use keel_core::uow::{MemoryTransactions, TransactionSource};
/// use keel_outbox::{InMemoryOutbox, Outbox, OutboxMessage};
/// use serde_json::json;
///
/// # async fn demo() -> keel_core::Result<()> {
/// let outbox = InMemoryOutbox::new();
/// let mut tx = MemoryTransactions::new().begin().await?;
/// let m = Message::new("order.placed", json!({ "order_id": "o-1" }));
/// outbox.within(&mut *tx).write(&OutboxMessage::new("orders", "Order", "o-1", m)).await?;
/// assert_eq!(outbox.stats().pending, 0); // not committed yet
/// tx.commit().await?;
/// assert_eq!(outbox.stats().pending, 1);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct InMemoryOutbox {
    shared: Arc<Shared>,
    max_payload_bytes: usize,
}

struct Shared {
    cell: Arc<MemoryCell<Rows>>,
    /// Aggregates claimed by a relay's batch in flight.
    leased: Mutex<HashSet<String>>,
    /// Bumped after every commit that wrote rows: wakes the relays.
    commits: watch::Sender<u64>,
}

#[derive(Clone, Default)]
struct Rows {
    last_id: i64,
    rows: BTreeMap<i64, Row>,
    event_ids: HashSet<EventId>,
}

#[derive(Clone)]
struct Row {
    topic: String,
    aggregate_type: String,
    aggregate_id: String,
    key: String,
    message: Message,
    created_at: Instant,
    published_at: Option<Instant>,
    attempts: u32,
    retry_at: Option<Instant>,
    last_error: Option<String>,
}

impl fmt::Debug for InMemoryOutbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InMemoryOutbox")
            .field("rows", &self.shared.cell.read(|s| s.rows.len()))
            .field("max_payload_bytes", &self.max_payload_bytes)
            .finish_non_exhaustive()
    }
}

impl Default for InMemoryOutbox {
    fn default() -> Self {
        Self::new()
    }
}

impl InMemoryOutbox {
    /// An empty outbox with the default payload limit.
    #[must_use]
    pub fn new() -> Self {
        Self {
            shared: Arc::new(Shared {
                cell: Arc::new(MemoryCell::new(Rows::default())),
                leased: Mutex::default(),
                commits: watch::channel(0).0,
            }),
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
        }
    }

    /// Sets the largest payload accepted, in bytes of serialized JSON.
    #[must_use]
    pub fn with_max_payload_bytes(mut self, limit: usize) -> Self {
        self.max_payload_bytes = limit;
        self
    }

    /// The largest payload accepted, in bytes of serialized JSON.
    #[must_use]
    pub fn max_payload_bytes(&self) -> usize {
        self.max_payload_bytes
    }

    /// The backlog: committed rows not yet published, those waiting on a
    /// retry, and the age of the oldest.
    #[must_use]
    pub fn stats(&self) -> OutboxStats {
        self.shared.stats()
    }

    pub(crate) fn source(&self) -> Arc<dyn Source> {
        Arc::new(MemorySource {
            shared: Arc::clone(&self.shared),
        })
    }
}

impl Outbox for InMemoryOutbox {
    fn within<'t>(&'t self, tx: &'t mut dyn Transaction) -> Box<dyn OutboxWrite + 't> {
        Box::new(MemoryOutboxIn {
            outbox: self,
            tx: tokio::sync::Mutex::new(tx),
        })
    }
}

struct MemoryOutboxIn<'t> {
    outbox: &'t InMemoryOutbox,
    tx: tokio::sync::Mutex<&'t mut dyn Transaction>,
}

#[async_trait]
impl OutboxWrite for MemoryOutboxIn<'_> {
    async fn write_all(&self, messages: &[OutboxMessage]) -> keel_core::Result<()> {
        let mut tx = self.tx.lock().await;
        let tx = join::<MemoryTransaction>(&mut **tx)?;
        if messages.is_empty() {
            return Ok(());
        }
        let prepared = prepare(messages, self.outbox.max_payload_bytes)?;
        // Runs now on the transaction's copy, and again at commit if other
        // rows were committed meanwhile: ids are then taken in commit order.
        self.outbox
            .shared
            .cell
            .write_in(tx, move |rows: &mut Rows| insert(rows, &prepared))?;
        let shared = Arc::clone(&self.outbox.shared);
        tx.after_commit(Box::new(move || {
            shared.commits.send_modify(|n| *n = n.wrapping_add(1));
        }));
        Ok(())
    }
}

fn insert(rows: &mut Rows, prepared: &[Prepared]) -> keel_core::Result<()> {
    if let Some(p) = prepared
        .iter()
        .find(|p| rows.event_ids.contains(&p.event_id()))
    {
        return Err(OutboxError::DuplicateEvent {
            event_id: p.event_id(),
        }
        .into());
    }
    let now = Instant::now();
    for p in prepared {
        rows.last_id += 1;
        rows.event_ids.insert(p.event_id());
        rows.rows.insert(
            rows.last_id,
            Row {
                topic: p.topic.clone(),
                aggregate_type: p.aggregate_type.clone(),
                aggregate_id: p.aggregate_id.clone(),
                key: p.aggregate_key(),
                message: p.message.clone(),
                created_at: now,
                published_at: None,
                attempts: 0,
                retry_at: None,
                last_error: None,
            },
        );
    }
    Ok(())
}

impl Shared {
    fn leased(&self) -> MutexGuard<'_, HashSet<String>> {
        self.leased.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn stats(&self) -> OutboxStats {
        let now = Instant::now();
        self.cell.read(|s| {
            let mut stats = OutboxStats::default();
            for row in s.rows.values().filter(|r| r.published_at.is_none()) {
                stats.pending += 1;
                if row.attempts > 0 {
                    stats.retrying += 1;
                }
                let age = now.saturating_duration_since(row.created_at);
                stats.oldest_pending_age =
                    Some(stats.oldest_pending_age.map_or(age, |a| a.max(age)));
            }
            stats
        })
    }

    /// Picks a batch the way the PostgreSQL claim does: among the oldest
    /// `scan_window` unpublished rows of aggregates not waiting on a retry,
    /// the first row of each aggregate no other relay holds is a head; up
    /// to `batch_size` heads, their following rows sharing the batch.
    fn pick(&self, config: &RelayConfig, leased: &HashSet<String>) -> Vec<Claimed> {
        let now = Instant::now();
        self.cell.read(|s| {
            let wanted = |r: &Row| {
                r.published_at.is_none()
                    && config
                        .aggregate_types
                        .as_ref()
                        .is_none_or(|types| types.contains(&r.aggregate_type))
            };
            let waiting: HashSet<&str> = s
                .rows
                .values()
                .filter(|r| wanted(r) && r.retry_at.is_some_and(|at| at > now))
                .map(|r| r.key.as_str())
                .collect();
            let open = || {
                s.rows
                    .iter()
                    .filter(|(_, r)| wanted(r) && !waiting.contains(r.key.as_str()))
            };
            let mut seen = HashSet::new();
            let mut heads: HashMap<&str, usize> = HashMap::new();
            for (_, row) in open().take(config.scan_window) {
                if heads.len() == config.batch_size {
                    break;
                }
                if seen.insert(row.key.as_str()) && !leased.contains(&row.key) {
                    heads.insert(row.key.as_str(), 0);
                }
            }
            if heads.is_empty() {
                return Vec::new();
            }
            let share = config.batch_size.div_ceil(heads.len());
            let mut picked: Vec<(usize, i64, &Row)> = Vec::new();
            for (&id, row) in open() {
                if let Some(taken) = heads.get_mut(row.key.as_str())
                    && *taken < share
                {
                    picked.push((*taken, id, row));
                    *taken += 1;
                }
            }
            picked.sort_by_key(|&(rank, id, _)| (rank, id));
            picked.truncate(config.batch_size);
            picked
                .into_iter()
                .map(|(_, id, row)| Claimed {
                    id,
                    topic: row.topic.clone(),
                    aggregate_type: row.aggregate_type.clone(),
                    aggregate_id: row.aggregate_id.clone(),
                    message: Ok(row.message.clone()),
                })
                .collect()
        })
    }
}

/// The in-memory outbox as relays see it.
struct MemorySource {
    shared: Arc<Shared>,
}

#[async_trait]
impl Source for MemorySource {
    async fn claim(&self, config: &RelayConfig) -> Result<Option<Batch>> {
        let mut leased = self.shared.leased();
        let rows = self.shared.pick(config, &leased);
        if rows.is_empty() {
            return Ok(None);
        }
        let keys: HashSet<String> = rows
            .iter()
            .map(|r| format!("{}\u{1f}{}", r.aggregate_type, r.aggregate_id))
            .collect();
        leased.extend(keys.iter().cloned());
        drop(leased);
        Ok(Some(Batch {
            rows,
            lease: Box::new(MemoryLease {
                shared: Arc::clone(&self.shared),
                keys,
            }),
        }))
    }

    async fn prune(&self, retention: Duration) -> Result<u64> {
        let now = Instant::now();
        let pruned = self.shared.cell.write(|s| {
            let old: Vec<i64> = s
                .rows
                .iter()
                .filter(|(_, r)| {
                    r.published_at
                        .is_some_and(|at| now.saturating_duration_since(at) > retention)
                })
                .map(|(&id, _)| id)
                .collect();
            for id in &old {
                if let Some(row) = s.rows.remove(id) {
                    s.event_ids.remove(&row.message.event_id);
                }
            }
            Ok::<_, Infallible>(old.len() as u64)
        });
        Ok(pruned.unwrap_or_else(|never| match never {}))
    }

    async fn stats(&self) -> Result<OutboxStats> {
        Ok(self.shared.stats())
    }

    fn wake_on_commit(&self, wake: Arc<Notify>, _relay: String) -> JoinHandle<()> {
        let mut commits = self.shared.commits.subscribe();
        tokio::spawn(async move {
            while commits.changed().await.is_ok() {
                wake.notify_one();
            }
        })
    }
}

/// The aggregates of a batch in flight. Dropped (settled, or the relay
/// aborted), it lets them go.
struct MemoryLease {
    shared: Arc<Shared>,
    keys: HashSet<String>,
}

impl Drop for MemoryLease {
    fn drop(&mut self) {
        let mut leased = self.shared.leased();
        for key in &self.keys {
            leased.remove(key);
        }
    }
}

#[async_trait]
impl Lease for MemoryLease {
    async fn settle(
        self: Box<Self>,
        outcome: &crate::relay::publish::Outcome,
        config: &RelayConfig,
    ) -> Result<()> {
        let now = Instant::now();
        let marked = self.shared.cell.write(|s| {
            for id in &outcome.published {
                if config.retention.is_zero() {
                    if let Some(row) = s.rows.remove(id) {
                        s.event_ids.remove(&row.message.event_id);
                    }
                } else if let Some(row) = s.rows.get_mut(id) {
                    row.published_at = Some(now);
                }
            }
            for (id, error) in &outcome.failures {
                if let Some(row) = s.rows.get_mut(id) {
                    let delay = retry_delay(config, row.attempts).mul_f64(jitter());
                    row.attempts = row.attempts.saturating_add(1);
                    row.last_error = Some(truncate(error, 2000));
                    row.retry_at = Some(now + delay);
                }
            }
            Ok::<_, Infallible>(())
        });
        marked.unwrap_or_else(|never| match never {});
        // `self` drops here, after the marks: no relay can claim a row
        // between its publish and its mark.
        Ok(())
    }
}

/// A factor in [0.75, 1.25), so that retries of many aggregates spread out
/// (as the PostgreSQL relay's `random()` does).
fn jitter() -> f64 {
    let bits = RandomState::new().hash_one(Instant::now());
    0.75 + (bits % 1000) as f64 / 2000.0
}
