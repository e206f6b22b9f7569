//! The in-memory audit log.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;
use keel_core::uow::{MemoryCell, MemoryTransaction, Transaction, join};
use keel_core::{
    AuditAppender, AuditEntry, AuditLog, AuditPage, AuditQuery, AuditRecord, ChainVerification,
    Clock, CommandId, Error, Result, SystemClock,
};

use super::chain::{self, ChainHead, ChainWalk, GENESIS_HASH};
use super::keys::{AuditKeys, KeySlot, RecordMac};
use super::{AuditHead, ChainCheck, Filters};

/// An [`AuditLog`] kept in memory, with the same observable behaviour as the
/// PostgreSQL store: same validation, same chain (byte for byte, given the
/// same entries and times), same idempotency, same queries and pages, same
/// keyed mode, and the same transactions: [`within`](AuditLog::within)
/// joins a [`MemoryTransaction`], and the record is chained when that
/// transaction commits (never when it rolls back).
///
/// `recorded_at` comes from the [`Clock`] (the system clock unless
/// [`with_clock`](Self::with_clock) says otherwise), truncated to
/// microseconds and never earlier than the previous record's.
#[derive(Debug)]
pub struct InMemoryAuditLog {
    chain: Chain,
}

/// The sealed chain and the committed entries waiting to join it; cheap
/// to clone (a transaction's commit hook keeps one).
#[derive(Clone, Debug)]
struct Chain {
    state: Arc<Mutex<State>>,
    /// Entries appended in transactions: staged per transaction, committed
    /// with it, then sealed into `state` by the commit's hook.
    pending: Arc<MemoryCell<Vec<AuditEntry>>>,
    clock: Arc<dyn Clock>,
    keys: Arc<KeySlot>,
}

#[derive(Debug, Default)]
struct State {
    records: Vec<AuditRecord>,
    /// Parallel to `records`: each record's MAC, when it was sealed.
    macs: Vec<Option<RecordMac>>,
    /// Every record of each command id (one per attempt), oldest first, as
    /// indexes into `records`.
    by_command: HashMap<CommandId, Vec<usize>>,
}

impl Default for InMemoryAuditLog {
    fn default() -> Self {
        Self::new()
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // Nothing panics while the lock is held with the vectors half changed,
    // so a poisoned lock still guards a consistent log.
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

impl State {
    /// The stored record `entry` repeats, if any.
    fn stored(&self, entry: &AuditEntry) -> Option<&AuditRecord> {
        let attempts = self.by_command.get(&entry.command_id?)?;
        super::same_attempt(attempts.iter().map(|&i| &self.records[i]), entry)
    }

    /// Chains `entry` after the last record.
    fn push(
        &mut self,
        entry: AuditEntry,
        now: chrono::DateTime<chrono::Utc>,
        keys: Option<&AuditKeys>,
    ) -> AuditRecord {
        let (sequence, prev_hash, recorded_at) = match self.records.last() {
            Some(last) => (
                last.sequence + 1,
                last.hash.clone(),
                now.max(last.recorded_at),
            ),
            None => (1, GENESIS_HASH.to_owned(), now),
        };
        let hash = chain::compute_hash(sequence, &entry, recorded_at, &prev_hash);
        let mac = keys.map(|k| k.current().seal(sequence, &hash));
        if let Some(id) = entry.command_id {
            let index = self.records.len();
            self.by_command.entry(id).or_default().push(index);
        }
        let record = AuditRecord::new(sequence, entry, recorded_at, prev_hash, hash);
        self.records.push(record.clone());
        self.macs.push(mac);
        record
    }
}

/// Whether `entry` repeats a record or a committed pending entry.
fn repeated(state: &State, pending: &[AuditEntry], entry: &AuditEntry) -> bool {
    entry.command_id.is_some()
        && (state.stored(entry).is_some()
            || pending
                .iter()
                .any(|p| p.command_id == entry.command_id && chain::same_content(p, entry)))
}

impl Chain {
    fn now(&self) -> chrono::DateTime<chrono::Utc> {
        chain::truncate_micros(self.clock.now())
    }

    /// Seals every committed pending entry, then runs `then` on the state,
    /// all while no transaction can commit.
    fn seal_then<R>(&self, then: impl FnOnce(&mut State) -> R) -> R {
        let keys = self.keys.get();
        let now = self.now();
        let sealed = self.pending.write(|pending| {
            let mut state = lock(&self.state);
            for entry in pending.drain(..) {
                state.push(entry, now, keys.as_deref());
            }
            Ok::<_, std::convert::Infallible>(then(&mut state))
        });
        match sealed {
            Ok(r) => r,
            Err(never) => match never {},
        }
    }

    fn seal(&self) {
        if self.pending.read(|p| !p.is_empty()) {
            self.seal_then(|_| ());
        }
    }
}

impl InMemoryAuditLog {
    /// An empty, unkeyed log on the system clock.
    #[must_use]
    pub fn new() -> Self {
        Self {
            chain: Chain {
                state: Arc::default(),
                pending: Arc::new(MemoryCell::new(Vec::new())),
                clock: Arc::new(SystemClock),
                keys: Arc::default(),
            },
        }
    }

    /// Takes `recorded_at` from `clock` instead.
    #[must_use]
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.chain.clock = clock;
        self
    }

    /// Keyed mode: seals new records with `keys`' current key and checks
    /// MACs when verifying (see [`AuditKeys`]).
    #[must_use]
    pub fn with_keys(self, keys: AuditKeys) -> Self {
        self.chain.keys.set(Some(keys));
        self
    }

    /// Replaces the keys while the log is in use (to rotate: the new
    /// current key, with the old one among the previous keys); `None`
    /// returns to unkeyed mode.
    pub fn set_keys(&self, keys: Option<AuditKeys>) {
        self.chain.keys.set(keys);
    }

    /// The MAC stored with the record at `sequence`, if it has one.
    #[must_use]
    pub fn mac(&self, sequence: u64) -> Option<RecordMac> {
        let index = usize::try_from(sequence.checked_sub(1)?).ok()?;
        self.lock().macs.get(index).cloned().flatten()
    }

    /// How many records the log holds.
    #[must_use]
    pub fn len(&self) -> usize {
        self.chain.seal();
        self.lock().records.len()
    }

    /// Whether the log holds no record.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.chain.state)
    }

    /// Walks from `start` (a 0-based index) to the end.
    fn walk(&self, mut walk: ChainWalk, mut start: usize) -> (ChainVerification, ChainWalk) {
        // Copies a slice at a time: appends are not held up for the whole
        // walk, and the extra memory stays bounded.
        const CHUNK: usize = 1_000;
        loop {
            let chunk: Vec<(AuditRecord, Option<RecordMac>)> = {
                let state = self.lock();
                let end = state.records.len().min(start + CHUNK);
                let from = start.min(end);
                state.records[from..end]
                    .iter()
                    .cloned()
                    .zip(state.macs[from..end].iter().cloned())
                    .collect()
            };
            if chunk.is_empty() {
                let verdict = walk.finish();
                return (verdict, walk);
            }
            start += chunk.len();
            for (record, mac) in &chunk {
                if let Err(broken) = walk.check(record, mac.as_ref()) {
                    return (broken, walk);
                }
            }
        }
    }

    /// Gives tests in this crate a way to tamper with stored records.
    #[cfg(test)]
    pub(crate) fn tamper(&self, f: impl FnOnce(&mut Vec<AuditRecord>)) {
        f(&mut self.lock().records);
    }

    /// Gives tests in this crate a way to tamper with stored MACs.
    #[cfg(test)]
    pub(crate) fn tamper_macs(&self, f: impl FnOnce(&mut Vec<Option<RecordMac>>)) {
        f(&mut self.lock().macs);
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
        let keys = self.chain.keys.get();
        let now = self.chain.now();
        Ok(self.chain.seal_then(move |state| {
            if let Some(stored) = state.stored(&entry) {
                return stored.clone();
            }
            state.push(entry, now, keys.as_deref())
        }))
    }

    async fn query(&self, query: &AuditQuery) -> Result<AuditPage> {
        let filters = super::filters(query)?;
        let limit = filters.limit as usize;
        self.chain.seal();
        let state = self.lock();
        let records = &state.records;
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
        drop(state);
        let next_after = if page.len() > limit {
            page.truncate(limit);
            page.last().map(|r| r.sequence)
        } else {
            None
        };
        Ok(AuditPage::new(page, next_after))
    }

    async fn verify(&self) -> Result<ChainVerification> {
        let walk = ChainWalk::new(None).keyed(self.chain.keys.get());
        Ok(self.walk(walk, 0).0)
    }

    fn within<'t>(&'t self, tx: &'t mut dyn Transaction) -> Box<dyn AuditAppender + 't> {
        Box::new(MemoryAppender {
            chain: &self.chain,
            tx: tokio::sync::Mutex::new(tx),
        })
    }
}

/// [`InMemoryAuditLog`] bound to a transaction.
struct MemoryAppender<'t> {
    chain: &'t Chain,
    tx: tokio::sync::Mutex<&'t mut dyn Transaction>,
}

#[async_trait]
impl AuditAppender for MemoryAppender<'_> {
    async fn append(&self, entry: AuditEntry) -> Result<()> {
        let entry = super::validate(entry)?;
        let mut tx = self.tx.lock().await;
        let tx = join::<MemoryTransaction>(&mut **tx)?;
        let state = Arc::clone(&self.chain.state);
        // Runs now on the transaction's copy, and again at commit when
        // another commit or a seal came first: the duplicate check then
        // sees what they stored.
        self.chain.pending.write_in(tx, move |pending| {
            if !repeated(&lock(&state), pending, &entry) {
                pending.push(entry.clone());
            }
            Ok::<_, Error>(())
        })?;
        let chain = self.chain.clone();
        tx.after_commit(Box::new(move || chain.seal()));
        Ok(())
    }
}

#[async_trait]
impl AuditHead for InMemoryAuditLog {
    async fn head(&self) -> Result<ChainHead> {
        Ok(self
            .lock()
            .records
            .last()
            .map_or_else(ChainHead::genesis, |r| ChainHead {
                sequence: r.sequence,
                hash: r.hash.clone(),
            }))
    }

    async fn verify_from(&self, anchor: &ChainHead) -> Result<ChainVerification> {
        let walk = ChainWalk::new(Some(anchor.clone())).keyed(self.chain.keys.get());
        Ok(self.walk(walk, 0).0)
    }

    async fn verify_after(&self, from: &ChainHead) -> Result<ChainCheck> {
        let walk = ChainWalk::resume(from, None).keyed(self.chain.keys.get());
        let start = usize::try_from(walk.first_needed() - 1).unwrap_or(usize::MAX);
        let (verdict, walk) = self.walk(walk, start);
        Ok(ChainCheck::of(&walk, verdict).with_pending(self.pending().await?))
    }

    async fn pending(&self) -> Result<u64> {
        Ok(self.chain.pending.read(Vec::len) as u64)
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

    fn keyed_log() -> InMemoryAuditLog {
        InMemoryAuditLog::new().with_keys(AuditKeys::single(
            super::super::AuditKey::new("k1", keel_telemetry::Secret::new(vec![5; 32])).unwrap(),
        ))
    }

    /// Rewrites record `at` and every hash after it, as someone who can
    /// write the store but does not hold the key would.
    fn forge_and_rechain(records: &mut [AuditRecord], at: usize) {
        records[at].entry.principal = Some("mallory".into());
        for i in at..records.len() {
            if i > 0 {
                records[i].prev_hash = records[i - 1].hash.clone();
            }
            records[i].hash = record_hash(&records[i]);
        }
    }

    #[tokio::test]
    async fn keyed_mode_finds_a_recomputed_chain() {
        // Unkeyed, a rewritten and rehashed chain verifies: the weakness
        // keyed mode closes.
        let plain = log_of(5).await;
        plain.tamper(|r| forge_and_rechain(r, 2));
        assert!(plain.verify().await.unwrap().is_intact());

        let log = keyed_log();
        for i in 1..=5 {
            log.append(entry(i)).await.unwrap();
        }
        assert_eq!(log.mac(1).unwrap().key_id, "k1");
        assert_eq!(log.mac(6), None);
        assert!(log.verify().await.unwrap().is_intact());
        log.tamper(|r| forge_and_rechain(r, 2));
        let (seq, reason) = broken(log.verify().await.unwrap());
        assert_eq!(seq, 3);
        assert!(reason.starts_with("MAC mismatch"), "{reason}");

        // Stripping the MACs does not help either.
        let log = keyed_log();
        for i in 1..=5 {
            log.append(entry(i)).await.unwrap();
        }
        log.tamper(|r| forge_and_rechain(r, 0));
        log.tamper_macs(|m| m.iter_mut().for_each(|mac| *mac = None));
        let (seq, reason) = broken(log.verify().await.unwrap());
        assert_eq!(seq, 1);
        assert!(reason.starts_with("MAC missing"), "{reason}");
    }

    #[tokio::test]
    async fn incremental_checks_see_changes_at_their_anchor_only() {
        let log = log_of(5).await;
        let first = log.verify_after(&ChainHead::genesis()).await.unwrap();
        assert_eq!(first.head.sequence, 5);
        // A change before the anchor is outside an incremental check...
        log.tamper(|r| r[1].entry.principal = Some("mallory".into()));
        let again = log.verify_after(&first.head).await.unwrap();
        assert!(again.verification.is_intact());
        // ...a change at the anchor is not, nor a cut that removed it.
        log.tamper(|r| r[4].entry.principal = Some("mallory".into()));
        let (seq, reason) = broken(log.verify_after(&first.head).await.unwrap().verification);
        assert_eq!(seq, 5);
        assert!(reason.starts_with("content altered"), "{reason}");
        log.tamper(|r| r.truncate(4));
        let (seq, reason) = broken(log.verify_after(&first.head).await.unwrap().verification);
        assert_eq!(seq, 5);
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
