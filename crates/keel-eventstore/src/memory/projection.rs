//! Projection checkpoints, parked events and active versions in memory,
//! written through a [`MemoryTransaction`] like the read models.

use std::collections::{BTreeMap, HashMap};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use keel_core::Position;
use keel_core::uow::{MemoryTransaction, Transaction, join};

use super::InMemoryEventStore;
use crate::error::{EventStoreError, Result};
use crate::event::ReadAll;
use crate::projection::{
    LAG_COUNT_LIMIT, Lag, LogLag, ParkedEvent, ProjectionId, ProjectionState, ProjectionSupport,
    moved, not_caught_up, still_active, unknown,
};

/// Every projection version's state, and the active versions.
#[derive(Clone, Debug, Default)]
pub(super) struct Book {
    versions: HashMap<ProjectionId, Entry>,
    active: HashMap<String, u32>,
}

#[derive(Clone, Debug)]
struct Entry {
    checkpoint: Position,
    caught_up_at: Option<DateTime<Utc>>,
    parked: BTreeMap<Position, ParkedEvent>,
}

impl Entry {
    fn state(&self, id: &ProjectionId) -> ProjectionState {
        ProjectionState {
            id: id.clone(),
            checkpoint: self.checkpoint,
            caught_up_at: self.caught_up_at,
        }
    }
}

#[async_trait]
impl ProjectionSupport for InMemoryEventStore {
    async fn register_projection(&self, id: &ProjectionId) -> Result<ProjectionState> {
        self.inner.projections.write(|book| {
            let entry = book.versions.entry(id.clone()).or_insert_with(|| Entry {
                checkpoint: Position::START,
                caught_up_at: None,
                parked: BTreeMap::new(),
            });
            Ok::<_, EventStoreError>(entry.state(id))
        })
    }

    async fn projection_state(&self, id: &ProjectionId) -> Result<Option<ProjectionState>> {
        Ok(self
            .inner
            .projections
            .read(|book| book.versions.get(id).map(|e| e.state(id))))
    }

    async fn advance_projection(
        &self,
        tx: &mut dyn Transaction,
        id: &ProjectionId,
        from: Position,
        to: Position,
    ) -> Result<()> {
        let tx = join::<MemoryTransaction>(tx)?;
        let id = id.clone();
        // Runs again at commit on the newest state: a runner that moved the
        // checkpoint meanwhile fails this commit, and the read-model writes
        // of the same transaction with it.
        self.inner.projections.write_in(tx, move |book| {
            let entry = book
                .versions
                .get_mut(&id)
                .filter(|e| e.checkpoint == from)
                .ok_or_else(|| moved(&id))?;
            entry.checkpoint = to;
            entry
                .parked
                .retain(|p, parked| parked.skipped || *p <= from || *p > to);
            Ok::<_, EventStoreError>(())
        })
    }

    async fn park_event(
        &self,
        tx: &mut dyn Transaction,
        id: &ProjectionId,
        parked: &ParkedEvent,
    ) -> Result<()> {
        let tx = join::<MemoryTransaction>(tx)?;
        let (id, parked) = (id.clone(), parked.clone());
        self.inner.projections.write_in(tx, move |book| {
            let entry = book.versions.get_mut(&id).ok_or_else(|| unknown(&id))?;
            let mut next = parked.clone();
            if let Some(before) = entry.parked.get(&parked.position) {
                next.attempts = before.attempts.saturating_add(parked.attempts);
            }
            entry.parked.insert(parked.position, next);
            Ok::<_, EventStoreError>(())
        })
    }

    async fn unpark_event(
        &self,
        tx: &mut dyn Transaction,
        id: &ProjectionId,
        position: Position,
    ) -> Result<Option<ParkedEvent>> {
        let tx = join::<MemoryTransaction>(tx)?;
        let present = self.inner.projections.read_in(tx, |book| {
            book.versions
                .get(id)
                .is_some_and(|e| e.parked.contains_key(&position))
        });
        if !present {
            return Ok(None);
        }
        let id = id.clone();
        // At commit the event must still be parked: a replay that raced
        // this one and committed first makes this commit fail.
        self.inner
            .projections
            .write_in(tx, move |book| {
                book.versions
                    .get_mut(&id)
                    .and_then(|e| e.parked.remove(&position))
                    .ok_or_else(|| moved(&id))
            })
            .map(Some)
    }

    async fn parked_events(&self, id: &ProjectionId) -> Result<Vec<ParkedEvent>> {
        Ok(self.inner.projections.read(|book| {
            book.versions
                .get(id)
                .map(|e| e.parked.values().cloned().collect())
                .unwrap_or_default()
        }))
    }

    async fn mark_caught_up(&self, id: &ProjectionId) -> Result<()> {
        self.inner.projections.write(|book| {
            let entry = book.versions.get_mut(id).ok_or_else(|| unknown(id))?;
            entry.caught_up_at.get_or_insert_with(Utc::now);
            Ok::<_, EventStoreError>(())
        })
    }

    async fn active_projection_version(&self, name: &str) -> Result<Option<u32>> {
        Ok(self
            .inner
            .projections
            .read(|book| book.active.get(name).copied()))
    }

    async fn activate_projection(&self, id: &ProjectionId, newer_only: bool) -> Result<bool> {
        self.inner.projections.write(|book| {
            let entry = book.versions.get(id).ok_or_else(|| unknown(id))?;
            if entry.caught_up_at.is_none() {
                return Err(not_caught_up(id));
            }
            let current = book.active.get(id.name()).copied();
            if newer_only && current.is_some_and(|v| v >= id.version()) {
                return Ok(current == Some(id.version()));
            }
            book.active.insert(id.name().to_owned(), id.version());
            Ok(true)
        })
    }

    async fn retire_projection(&self, id: &ProjectionId) -> Result<()> {
        self.inner.projections.write(|book| {
            if book.active.get(id.name()) == Some(&id.version()) {
                return Err(still_active(id));
            }
            book.versions.remove(id);
            Ok(())
        })
    }
}

#[async_trait]
impl LogLag for InMemoryEventStore {
    async fn lag_after(&self, after: Position, filter: &ReadAll) -> Result<Lag> {
        Ok(self.inner.log.read(|log| {
            let start = log.events.partition_point(|e| e.position <= after);
            let mut lag = Lag::default();
            for e in log.events[start..].iter().filter(|e| filter.matches(e)) {
                if lag.events >= LAG_COUNT_LIMIT {
                    break;
                }
                lag.events += 1;
                lag.oldest = Some(lag.oldest.map_or(e.recorded_at, |t| t.min(e.recorded_at)));
            }
            lag
        }))
    }
}
