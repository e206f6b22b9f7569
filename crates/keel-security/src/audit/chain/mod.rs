//! The hash chain: one canonical encoding of a record, the SHA-256 over it,
//! and the walk that checks a chain record by record.
//!
//! Both stores call [`record_hash`] and [`ChainWalk`], so identical input
//! gives identical chains whichever store wrote it.

use chrono::{DateTime, Utc};
use std::sync::Arc;

use keel_core::{AuditEntry, AuditOutcome, AuditRecord, ChainVerification};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::keys::{AuditKeys, RecordMac};

/// The `prev_hash` of the first record: 64 zeros.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Names the encoding, so a future change of layout can never produce the
/// same bytes as this one.
const DOMAIN: &[u8] = b"keel.audit.v1\0";

/// The latest record of a chain: its sequence and hash. Operators copy it
/// somewhere the database's writers cannot reach (a ticket, a signed log, a
/// WORM bucket) and later check the chain still ends in, or passes through,
/// the same record ([`AuditHead::verify_from`](crate::AuditHead::verify_from)).
#[derive(Clone, PartialEq, Eq, Debug, serde::Serialize, serde::Deserialize)]
pub struct ChainHead {
    /// The latest record's sequence; 0 for an empty chain.
    pub sequence: u64,
    /// The latest record's hash; [`GENESIS_HASH`] for an empty chain.
    pub hash: String,
}

impl ChainHead {
    /// The head of an empty chain.
    #[must_use]
    pub fn genesis() -> Self {
        Self {
            sequence: 0,
            hash: GENESIS_HASH.to_owned(),
        }
    }
}

/// Recomputes a record's hash from its sequence, entry, `recorded_at` and
/// `prev_hash` (lower-case hex SHA-256).
///
/// A record is genuine when this equals its `hash`; a chain is intact when,
/// in addition, every `prev_hash` equals the previous record's `hash`. The
/// encoding is length-prefixed and tagged, so no two different records
/// encode alike; timestamps count whole microseconds (what PostgreSQL
/// keeps) and `details` is encoded from its JSON value with keys sorted and
/// numbers in one canonical form, so a value that went through `jsonb` and
/// back hashes as before.
#[must_use]
pub fn record_hash(record: &AuditRecord) -> String {
    compute_hash(
        record.sequence,
        &record.entry,
        record.recorded_at,
        &record.prev_hash,
    )
}

/// The hash of a record with these parts (see [`record_hash`]).
pub(crate) fn compute_hash(
    sequence: u64,
    entry: &AuditEntry,
    recorded_at: DateTime<Utc>,
    prev_hash: &str,
) -> String {
    let mut enc = Encoder(Sha256::new());
    enc.raw(DOMAIN);
    enc.u64(sequence);
    enc.time(entry.occurred_at);
    enc.time(recorded_at);
    enc.opt_str(entry.principal.as_deref());
    enc.opt_str(entry.tenant.as_deref());
    enc.opt_bytes(
        entry
            .command_id
            .as_ref()
            .map(|id| id.as_uuid().as_bytes().as_slice()),
    );
    enc.str(&entry.command_type);
    enc.u64(entry.event_types.len() as u64);
    for event_type in &entry.event_types {
        enc.str(event_type);
    }
    match &entry.aggregate {
        None => enc.raw(&[0]),
        Some(aggregate) => {
            enc.raw(&[1]);
            enc.str(&aggregate.kind);
            enc.str(&aggregate.id);
        }
    }
    let (name, code, reason) = outcome_parts(&entry.outcome);
    enc.str(name);
    enc.opt_str(code);
    enc.opt_str(reason);
    enc.opt_bytes(
        entry
            .correlation_id
            .as_ref()
            .map(|id| id.as_uuid().as_bytes().as_slice()),
    );
    enc.json(&entry.details);
    enc.str(prev_hash);
    hex(&enc.0.finalize())
}

/// Whether two entries record the same thing: equal under the canonical
/// encoding, so an entry that went through storage (`jsonb` numbers and key
/// order, microsecond timestamps) matches the entry it was made from.
pub(crate) fn same_content(a: &AuditEntry, b: &AuditEntry) -> bool {
    content_hash(a) == content_hash(b)
}

/// The hash of an entry's content alone (no position in a chain): equal
/// for two entries exactly when [`same_content`] holds. PostgreSQL keeps it
/// with each row, so one unique index makes appends idempotent.
pub(crate) fn content_hash(entry: &AuditEntry) -> String {
    compute_hash(0, entry, DateTime::<Utc>::UNIX_EPOCH, GENESIS_HASH)
}

/// An outcome's stored parts: name, code, reason.
pub(crate) fn outcome_parts(outcome: &AuditOutcome) -> (&'static str, Option<&str>, Option<&str>) {
    match outcome {
        AuditOutcome::Rejected { code, reason } => {
            (outcome.as_str(), Some(code.as_str()), Some(reason.as_str()))
        }
        AuditOutcome::Failed { code } => (outcome.as_str(), Some(code.as_str()), None),
        // Accepted, and any outcome added to the port later (validation
        // refuses those before anything is hashed or stored).
        _ => (outcome.as_str(), None, None),
    }
}

/// Timestamps as PostgreSQL keeps them: whole microseconds (rounded down).
pub(crate) fn truncate_micros(at: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(at.timestamp_micros()).unwrap_or(at)
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0x0f)] as char);
    }
    out
}

/// Feeds the canonical encoding straight into the hasher.
struct Encoder(Sha256);

impl Encoder {
    fn raw(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    fn u64(&mut self, n: u64) {
        self.raw(&n.to_be_bytes());
    }

    fn time(&mut self, at: DateTime<Utc>) {
        self.raw(&at.timestamp_micros().to_be_bytes());
    }

    fn bytes(&mut self, bytes: &[u8]) {
        self.u64(bytes.len() as u64);
        self.raw(bytes);
    }

    fn str(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }

    fn opt_bytes(&mut self, bytes: Option<&[u8]>) {
        match bytes {
            None => self.raw(&[0]),
            Some(b) => {
                self.raw(&[1]);
                self.bytes(b);
            }
        }
    }

    fn opt_str(&mut self, s: Option<&str>) {
        self.opt_bytes(s.map(str::as_bytes));
    }

    /// JSON, independent of serde_json's feature flags (`preserve_order`,
    /// `arbitrary_precision`) and of `jsonb`'s normalisation: object keys in
    /// byte order, numbers in [`canonical_number`] form.
    fn json(&mut self, value: &Value) {
        match value {
            Value::Null => self.raw(b"n"),
            Value::Bool(false) => self.raw(b"f"),
            Value::Bool(true) => self.raw(b"t"),
            Value::Number(n) => {
                self.raw(b"d");
                self.str(&canonical_number(n));
            }
            Value::String(s) => {
                self.raw(b"s");
                self.str(s);
            }
            Value::Array(items) => {
                self.raw(b"a");
                self.u64(items.len() as u64);
                for item in items {
                    self.json(item);
                }
            }
            Value::Object(map) => {
                self.raw(b"o");
                self.u64(map.len() as u64);
                let mut entries: Vec<_> = map.iter().collect();
                entries.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
                for (key, item) in entries {
                    self.str(key);
                    self.json(item);
                }
            }
        }
    }
}

/// A number as decimal digits without exponent: integers as they are,
/// other values through `f64` (shortest form that reads back the same),
/// zero without sign. `jsonb` turns `1e2` into `100` and `-0.0` into `0.0`,
/// and serde_json reads `5.0` back as a float; all of these encode alike.
fn canonical_number(n: &serde_json::Number) -> String {
    if let Some(i) = n.as_i64() {
        return i.to_string();
    }
    if let Some(u) = n.as_u64() {
        return u.to_string();
    }
    match n.as_f64() {
        // A float pattern compares with `==`, so this catches -0.0 as well.
        Some(0.0) => "0".to_owned(),
        Some(f) => format!("{f}"),
        // Only reachable with `arbitrary_precision` and a number outside
        // f64's range: keep its text.
        None => n.to_string(),
    }
}

/// Checks a chain one record at a time, in sequence order, in constant
/// memory, and remembers the first fault.
#[derive(Debug)]
pub(crate) struct ChainWalk {
    expected: u64,
    prev_hash: String,
    anchors: Vec<ChainHead>,
    /// Set for an incremental walk: the record the walk starts at, which
    /// must still be there with this hash.
    start: Option<ChainHead>,
    /// The sequence the walk resumed from (0 from genesis): records up to
    /// it are not counted as checked.
    base: u64,
    keys: Option<Arc<AuditKeys>>,
    /// The last record that checked out.
    last: ChainHead,
}

impl ChainWalk {
    /// A walk from genesis; the chain must also reach each anchor's
    /// sequence and have the anchor's hash there.
    pub(crate) fn new(anchors: impl IntoIterator<Item = ChainHead>) -> Self {
        Self {
            expected: 1,
            prev_hash: GENESIS_HASH.to_owned(),
            anchors: anchors.into_iter().collect(),
            start: None,
            base: 0,
            keys: None,
            last: ChainHead::genesis(),
        }
    }

    /// A walk that starts at `from`, a record checked by an earlier walk:
    /// the first record it is given must be `from.sequence` with `from.hash`
    /// (nothing when `from` is the genesis head), then the records after it.
    pub(crate) fn resume(from: &ChainHead, anchors: impl IntoIterator<Item = ChainHead>) -> Self {
        let mut walk = Self::new(anchors);
        if from.sequence > 0 {
            walk.expected = from.sequence;
            walk.start = Some(from.clone());
            walk.base = from.sequence;
            walk.last = from.clone();
        }
        walk
    }

    /// Also checks every record's MAC against `keys` (keyed mode).
    pub(crate) fn keyed(mut self, keys: Option<Arc<AuditKeys>>) -> Self {
        self.keys = keys;
        self
    }

    /// The sequence the walk needs next: the first to read from storage.
    pub(crate) fn first_needed(&self) -> u64 {
        self.expected
    }

    /// How many records checked out so far.
    pub(crate) fn checked(&self) -> u64 {
        self.expected.saturating_sub(self.base + 1)
    }

    /// The last record that checked out (the resumed-from one, or genesis,
    /// when none did).
    pub(crate) fn last(&self) -> &ChainHead {
        &self.last
    }

    /// Checks the next record and its MAC; `Err` names the first fault.
    pub(crate) fn check(
        &mut self,
        record: &AuditRecord,
        mac: Option<&RecordMac>,
    ) -> Result<(), ChainVerification> {
        if record.sequence != self.expected {
            return Err(broken(
                self.expected,
                if record.sequence > self.expected {
                    format!(
                        "missing record: sequence {} is absent (the next stored record is {})",
                        self.expected, record.sequence
                    )
                } else {
                    format!(
                        "sequence out of order: expected {}, found {}",
                        self.expected, record.sequence
                    )
                },
            ));
        }
        if record_hash(record) != record.hash {
            return Err(broken(
                record.sequence,
                "content altered: the stored hash does not match the record's content",
            ));
        }
        match self.start.take() {
            // The start record was checked when it was new; its link to
            // its predecessor is outside this walk.
            Some(start) => {
                if start.hash != record.hash {
                    return Err(broken(
                        record.sequence,
                        "anchor mismatch: the record's hash differs from the last verified one",
                    ));
                }
            }
            None => {
                if record.prev_hash != self.prev_hash {
                    return Err(broken(
                        record.sequence,
                        format!(
                            "link broken: prev_hash does not match the hash of record {}",
                            record.sequence - 1
                        ),
                    ));
                }
            }
        }
        if let Some(keys) = &self.keys
            && let Err(reason) = keys.check(record.sequence, &record.hash, mac)
        {
            return Err(broken(record.sequence, reason));
        }
        if self
            .anchors
            .iter()
            .any(|a| a.sequence == record.sequence && a.hash != record.hash)
        {
            return Err(broken(
                record.sequence,
                "anchor mismatch: the record's hash differs from the anchored head",
            ));
        }
        self.prev_hash.clone_from(&record.hash);
        self.last = ChainHead {
            sequence: record.sequence,
            hash: record.hash.clone(),
        };
        self.expected += 1;
        Ok(())
    }

    /// The verdict once every stored record was checked.
    pub(crate) fn finish(&self) -> ChainVerification {
        if let Some(start) = &self.start {
            return broken(
                start.sequence,
                format!(
                    "missing record: the chain no longer reaches the last verified record {}",
                    start.sequence
                ),
            );
        }
        let end = self.expected - 1;
        if let Some(far) = self.anchors.iter().map(|a| a.sequence).max()
            && far > end
        {
            return broken(
                end + 1,
                format!("missing record: the chain ends at {end} but the head names {far}"),
            );
        }
        if self
            .anchors
            .iter()
            .any(|a| a.sequence == 0 && a.hash != GENESIS_HASH)
        {
            return broken(
                0,
                "anchor mismatch: a head at sequence 0 must carry the genesis hash",
            );
        }
        ChainVerification::Intact {
            records: self.checked(),
        }
    }
}

fn broken(sequence: u64, reason: impl Into<String>) -> ChainVerification {
    ChainVerification::Broken {
        sequence,
        reason: reason.into(),
    }
}

#[cfg(test)]
mod tests;
