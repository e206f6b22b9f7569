//! The in-memory audit log.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;
use keel_core::{
    AuditEntry, AuditLog, AuditPage, AuditQuery, AuditRecord, ChainVerification, Clock, Result,
    SystemClock,
};

use super::chain::{self, ChainHead, ChainWalk, GENESIS_HASH};
use super::{AuditHead, Filters};

/// An [`AuditLog`] kept in memory, with the same observable behaviour as the
/// PostgreSQL store: same validation, same chain (byte for byte, given the
/// same entries and times), same queries and pages.
///
/// `recorded_at` comes from the [`Clock`] (the system clock unless
/// [`with_clock`](Self::with_clock) says otherwise), truncated to
/// microseconds and never earlier than the previous record's.
#[derive(Debug)]
pub struct InMemoryAuditLog {
    records: Mutex<Vec<AuditRecord>>,
    clock: Arc<dyn Clock>,
}

impl Default for InMemoryAuditLog {
    fn default() -> Self {
        Self::new()
    }
}

impl InMemoryAuditLog {
    /// An empty log on the system clock.
    #[must_use]
    pub fn new() -> Self {
        Self {
            records: Mutex::new(Vec::new()),
            clock: Arc::new(SystemClock),
        }
    }

    /// Takes `recorded_at` from `clock` instead.
    #[must_use]
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// How many records the log holds.
    #[must_use]
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether the log holds no record.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    fn lock(&self) -> MutexGuard<'_, Vec<AuditRecord>> {
        // Nothing panics while the lock is held with the vector half
        // changed, so a poisoned lock still guards a consistent log.
        self.records.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn walk(&self, anchor: Option<ChainHead>) -> ChainVerification {
        // Copies a slice at a time: appends are not held up for the whole
        // walk, and the extra memory stays bounded.
        const CHUNK: usize = 1_000;
        let mut walk = ChainWalk::new(anchor);
        let mut start = 0;
        loop {
            let chunk: Vec<AuditRecord> = {
                let records = self.lock();
                let end = records.len().min(start + CHUNK);
                records[start.min(end)..end].to_vec()
            };
            if chunk.is_empty() {
                return walk.finish();
            }
            start += chunk.len();
            for record in &chunk {
                if let Err(broken) = walk.check(record) {
                    return broken;
                }
            }
        }
    }

    /// Gives tests in this crate a way to tamper with stored records.
    #[cfg(test)]
    pub(crate) fn tamper(&self, f: impl FnOnce(&mut Vec<AuditRecord>)) {
        f(&mut self.lock());
    }
}

fn matches(record: &AuditRecord, f: &Filters<'_>) -> bool {
    let e = &record.entry;
    record.sequence > f.after
        && f.principal
            .is_none_or(|p| e.principal.as_deref() == Some(p))
        && f.aggregate.is_none_or(|(kind, id)| {
            e.aggregate
                .as_ref()
                .is_some_and(|a| a.kind == kind && a.id == id)
        })
        && f.from.is_none_or(|from| e.occurred_at >= from)
        && f.to.is_none_or(|to| e.occurred_at < to)
}

#[async_trait]
impl AuditLog for InMemoryAuditLog {
    async fn append(&self, entry: AuditEntry) -> Result<AuditRecord> {
        let entry = super::validate(entry)?;
        let mut records = self.lock();
        let now = chain::truncate_micros(self.clock.now());
        let (sequence, prev_hash, recorded_at) = match records.last() {
            Some(last) => (
                last.sequence + 1,
                last.hash.clone(),
                now.max(last.recorded_at),
            ),
            None => (1, GENESIS_HASH.to_owned(), now),
        };
        let hash = chain::compute_hash(sequence, &entry, recorded_at, &prev_hash);
        let record = AuditRecord::new(sequence, entry, recorded_at, prev_hash, hash);
        records.push(record.clone());
        Ok(record)
    }

    async fn query(&self, query: &AuditQuery) -> Result<AuditPage> {
        let filters = super::filters(query)?;
        let limit = filters.limit as usize;
        let records = self.lock();
        // Sequences are 1, 2, 3, … so the record after `after` sits at
        // index `after`.
        let start = usize::try_from(filters.after)
            .unwrap_or(usize::MAX)
            .min(records.len());
        let mut page: Vec<AuditRecord> = records[start..]
            .iter()
            .filter(|r| matches(r, &filters))
            .take(limit + 1)
            .cloned()
            .collect();
        drop(records);
        let next_after = if page.len() > limit {
            page.truncate(limit);
            page.last().map(|r| r.sequence)
        } else {
            None
        };
        Ok(AuditPage::new(page, next_after))
    }

    async fn verify(&self) -> Result<ChainVerification> {
        Ok(self.walk(None))
    }
}

#[async_trait]
impl AuditHead for InMemoryAuditLog {
    async fn head(&self) -> Result<ChainHead> {
        Ok(self
            .lock()
            .last()
            .map_or_else(ChainHead::genesis, |r| ChainHead {
                sequence: r.sequence,
                hash: r.hash.clone(),
            }))
    }

    async fn verify_from(&self, anchor: &ChainHead) -> Result<ChainVerification> {
        Ok(self.walk(Some(anchor.clone())))
    }
}

#[cfg(test)]
mod tests {
    use keel_core::{AuditOutcome, ManualClock};

    use super::super::record_hash;
    use super::*;

    fn entry(n: u32) -> AuditEntry {
        AuditEntry::new(format!("cmd.{n}"), AuditOutcome::Accepted).with_principal("p")
    }

    async fn log_of(n: u32) -> InMemoryAuditLog {
        let log = InMemoryAuditLog::new();
        for i in 1..=n {
            log.append(entry(i)).await.unwrap();
        }
        log
    }

    fn broken(v: ChainVerification) -> (u64, String) {
        match v {
            ChainVerification::Broken { sequence, reason } => (sequence, reason),
            other => panic!("expected a broken chain, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn tampering_is_found_where_it_happened() {
        let log = log_of(5).await;
        log.tamper(|r| r[2].entry.principal = Some("mallory".into()));
        let (seq, reason) = broken(log.verify().await.unwrap());
        assert_eq!(seq, 3);
        assert!(reason.starts_with("content altered"), "{reason}");

        let log = log_of(5).await;
        log.tamper(|r| {
            r.remove(2);
        });
        let (seq, reason) = broken(log.verify().await.unwrap());
        assert_eq!(seq, 3);
        assert!(reason.starts_with("missing record"), "{reason}");

        let log = log_of(5).await;
        log.tamper(|r| {
            r[1].entry.command_type = "forged".into();
            r[1].hash = record_hash(&r[1]);
        });
        let (seq, reason) = broken(log.verify().await.unwrap());
        assert_eq!(seq, 3);
        assert!(reason.starts_with("link broken"), "{reason}");
    }

    #[tokio::test]
    async fn a_cut_tail_shows_only_against_an_anchor() {
        let log = log_of(5).await;
        let head = log.head().await.unwrap();
        log.tamper(|r| r.truncate(3));
        assert!(log.verify().await.unwrap().is_intact());
        let (seq, reason) = broken(log.verify_from(&head).await.unwrap());
        assert_eq!(seq, 4);
        assert!(reason.starts_with("missing record"), "{reason}");
    }

    #[tokio::test]
    async fn recorded_at_never_goes_back() {
        let clock = Arc::new(ManualClock::at(
            "2026-05-01T00:00:00.000000999Z".parse().unwrap(),
        ));
        let log = InMemoryAuditLog::new().with_clock(clock.clone());
        let first = log.append(entry(1)).await.unwrap();
        assert_eq!(first.recorded_at.timestamp_subsec_nanos(), 0);
        clock.advance(chrono::Duration::seconds(-10));
        let second = log.append(entry(2)).await.unwrap();
        assert_eq!(second.recorded_at, first.recorded_at);
        assert!(log.verify().await.unwrap().is_intact());
    }
}
