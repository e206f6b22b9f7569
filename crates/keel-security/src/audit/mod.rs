//! The tamper-evident audit log: implementations of [`keel_core::AuditLog`].
//!
//! Every appended [`AuditEntry`] becomes an [`AuditRecord`] with a gapless
//! sequence and a SHA-256 hash over its sequence, its content, the time it
//! was recorded and the previous record's hash ([`record_hash`]). Changing,
//! removing or reordering a stored record breaks the chain at that record,
//! and [`AuditLog::verify`] names the first one that does not check out.
//!
//! * `PgAuditLog` (feature `postgres`) keeps the chain in
//!   `keel.audit_log`, a table the database itself keeps append-only.
//!   Appends write the record's content in the caller's transaction
//!   without any lock on the chain ([`AuditLog::within`]); an
//!   `AuditChainer` then seals committed records into the chain, holding
//!   the chain's head in `keel.audit_head` for a short transaction of its
//!   own, so writers never wait for each other and the chain never forks.
//! * [`InMemoryAuditLog`] behaves the same in memory, for tests and
//!   single-process tools (it chains a record when its transaction
//!   commits).
//!
//! Both produce identical chains for identical input and pass one contract
//! suite (`testing`, feature `testing`). The [`AuditHead`] extension lets
//! an operator read the chain's head and later prove, against a copy kept
//! outside the database, that nothing was cut from its end, and check
//! incrementally what was appended since a verified head
//! ([`AuditHead::verify_after`]).
//!
//! * **Idempotent appends.** An entry identical to a stored record with
//!   the same command id returns that record instead of a second one; an
//!   entry with a stored command id but other content (a command run
//!   again) is recorded as another attempt, so nothing is lost.
//! * **Keyed mode.** With [`AuditKeys`], every record also carries an
//!   HMAC-SHA256 and its key's id, so whoever can write the store but does
//!   not hold the key cannot forge a chain that verifies; keys rotate.
//! * **Periodic verification.** [`AuditVerifier`] checks the log in the
//!   background, counts and logs faults, and is a
//!   [`HealthCheck`](keel_core::HealthCheck).
//!
//! ```
//! use keel_core::{AggregateRef, AuditEntry, AuditLog, AuditOutcome, AuditQuery};
//! use keel_security::audit::{AuditHead, InMemoryAuditLog};
//!
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! let log = InMemoryAuditLog::new();
//! let record = log
//!     .append(
//!         AuditEntry::new("order.place", AuditOutcome::Accepted)
//!             .with_principal("user-42")
//!             .with_aggregate(AggregateRef::new("Order", "o-1")),
//!     )
//!     .await?;
//! assert_eq!(record.sequence, 1);
//!
//! let page = log.query(&AuditQuery::new().principal("user-42")).await?;
//! assert_eq!(page.records, vec![record]);
//! assert!(log.verify().await?.is_intact());
//!
//! let head = log.head().await?; // keep a copy somewhere safe
//! assert!(log.verify_from(&head).await?.is_intact());
//! # Ok::<_, keel_core::Error>(())
//! # }).unwrap();
//! ```

use async_trait::async_trait;
use chrono::{DateTime, Datelike, Utc};
use keel_core::{AuditEntry, AuditLog, AuditOutcome, AuditQuery, ChainVerification, Error, Result};
use serde_json::Value;

mod chain;
mod keys;
mod memory;
#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "testing")]
pub mod testing;
mod verifier;

pub use chain::{ChainHead, GENESIS_HASH, record_hash};
pub use keel_core::AuditRecord;
pub use keys::{AuditKey, AuditKeys, MAX_KEY_ID_BYTES, MIN_KEY_BYTES, RecordMac};
pub use memory::InMemoryAuditLog;
#[cfg(feature = "postgres")]
pub use postgres::{AuditChainer, DEFAULT_CHAIN_INTERVAL, PgAuditLog};
pub use verifier::{
    AuditVerifier, AuditVerifierHandle, VERIFIED_SEQUENCE, VERIFY_FAILURES, VerifierOutcome,
    VerifierStatus,
};

/// The largest `details` document accepted, in bytes of compact JSON.
pub const MAX_DETAILS_BYTES: usize = 64 * 1024;
/// The longest principal, tenant, command type, event type, aggregate kind
/// or id, or outcome code accepted, in bytes.
pub const MAX_TEXT_BYTES: usize = 1_024;
/// The longest rejection reason accepted, in bytes.
pub const MAX_REASON_BYTES: usize = 4_096;
/// The most event types one entry may list.
pub const MAX_EVENT_TYPES: usize = 256;

/// Reading the chain's head and checking the chain against a head kept
/// elsewhere: what an operator needs to detect a cut-off tail.
///
/// A hash chain proves that no record was changed or removed *before* its
/// last record; someone able to write to the store could still delete the
/// newest records (and rewind the head). Copying [`head`](Self::head) to a
/// place they cannot write to, and later running
/// [`verify_from`](Self::verify_from) with that copy, closes that gap.
#[async_trait]
pub trait AuditHead: AuditLog {
    /// The chain's latest record (sequence 0 and [`GENESIS_HASH`] when
    /// empty).
    async fn head(&self) -> Result<ChainHead>;

    /// Walks the whole chain like [`AuditLog::verify`] and, in addition,
    /// checks that the chain reaches `anchor.sequence` and that the record
    /// there has `anchor.hash`.
    async fn verify_from(&self, anchor: &ChainHead) -> Result<ChainVerification>;

    /// Checks only what was appended since `from`, a head that an earlier
    /// check found intact: the record at `from.sequence` must still be
    /// there with `from.hash` (content and MAC rechecked), and every later
    /// record must link to it, carry a valid MAC in keyed mode, and reach
    /// the store's own head. Records before `from` are not read.
    ///
    /// [`ChainCheck::head`] is where the next incremental check starts; a
    /// chain that lost records since `from` (a cut tail, even with the head
    /// rewound) is reported broken, because `from` is a copy of the head
    /// kept outside the store.
    async fn verify_after(&self, from: &ChainHead) -> Result<ChainCheck>;

    /// How many committed records wait to be sealed into the chain (see
    /// [`AuditLog::within`]); verification does not cover them yet. Always
    /// 0 for a store that chains records as they commit.
    async fn pending(&self) -> Result<u64>;
}

/// The result of an incremental check ([`AuditHead::verify_after`]).
#[derive(Clone, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub struct ChainCheck {
    /// The verdict; `Intact { records }` counts the records checked after
    /// the starting head.
    pub verification: ChainVerification,
    /// The last record that checked out: the starting head when nothing
    /// new was found or the first new record is broken.
    pub head: ChainHead,
    /// Committed records not sealed into the chain yet when the check ran
    /// ([`AuditHead::pending`]).
    pub pending: u64,
}

impl ChainCheck {
    /// A result with this verdict, resuming from `head` (for
    /// implementations of [`AuditHead`] outside this crate).
    #[must_use]
    pub fn new(verification: ChainVerification, head: ChainHead) -> Self {
        Self {
            verification,
            head,
            pending: 0,
        }
    }

    /// Sets how many records waited to be sealed.
    #[must_use]
    pub fn with_pending(mut self, pending: u64) -> Self {
        self.pending = pending;
        self
    }

    pub(crate) fn of(walk: &chain::ChainWalk, verification: ChainVerification) -> Self {
        Self::new(verification, walk.last().clone())
    }
}

/// The length of `value` as compact JSON, counted without building the
/// text (every append checks it).
fn compact_json_len(value: &Value) -> serde_json::Result<usize> {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    serde_json::to_writer(&mut count, value)?;
    Ok(count.0)
}

/// Refuses what no store may keep, and brings timestamps to microseconds.
/// Both stores call this before they hash or write anything.
pub(crate) fn validate(mut entry: AuditEntry) -> Result<AuditEntry> {
    text("command_type", &entry.command_type, MAX_TEXT_BYTES)?;
    if let Some(p) = &entry.principal {
        text("principal", p, MAX_TEXT_BYTES)?;
    }
    if let Some(t) = &entry.tenant {
        text("tenant", t, MAX_TEXT_BYTES)?;
    }
    if entry.event_types.len() > MAX_EVENT_TYPES {
        return Err(Error::invalid_input(
            "event_types",
            format!(
                "{} event types exceed the limit of {MAX_EVENT_TYPES}",
                entry.event_types.len()
            ),
        ));
    }
    for event_type in &entry.event_types {
        text("event_types", event_type, MAX_TEXT_BYTES)?;
    }
    if let Some(a) = &entry.aggregate {
        text("aggregate.kind", &a.kind, MAX_TEXT_BYTES)?;
        text("aggregate.id", &a.id, MAX_TEXT_BYTES)?;
    }
    match &entry.outcome {
        AuditOutcome::Accepted => {}
        AuditOutcome::Rejected { code, reason } => {
            text("outcome.code", code, MAX_TEXT_BYTES)?;
            bounded("outcome.reason", reason, MAX_REASON_BYTES)?;
        }
        AuditOutcome::Failed { code } => text("outcome.code", code, MAX_TEXT_BYTES)?,
        other => {
            return Err(Error::invalid_input(
                "outcome",
                format!("outcome `{}` cannot be stored", other.as_str()),
            ));
        }
    }
    let size = compact_json_len(&entry.details)
        .map_err(|e| Error::invalid_input("details", format!("cannot be serialized: {e}")))?;
    if size > MAX_DETAILS_BYTES {
        return Err(Error::invalid_input(
            "details",
            format!("{size} bytes exceed the limit of {MAX_DETAILS_BYTES} bytes"),
        ));
    }
    if json_has_nul(&entry.details) {
        return Err(Error::invalid_input(
            "details",
            "strings must not contain U+0000",
        ));
    }
    if !(1..=9999).contains(&entry.occurred_at.year()) {
        return Err(Error::invalid_input(
            "occurred_at",
            "must lie between the years 1 and 9999",
        ));
    }
    entry.occurred_at = chain::truncate_micros(entry.occurred_at);
    Ok(entry)
}

/// The earlier attempt an entry repeats: the first of `stored` (records
/// with the entry's command id, oldest first) with the same content. An
/// entry that matches none of them is a new attempt and gets a record of
/// its own.
pub(crate) fn same_attempt<'r>(
    stored: impl IntoIterator<Item = &'r AuditRecord>,
    entry: &AuditEntry,
) -> Option<&'r AuditRecord> {
    stored
        .into_iter()
        // Cheap necessary condition first: identical content has the same
        // (already truncated) `occurred_at`.
        .filter(|r| r.entry.occurred_at == entry.occurred_at)
        .find(|r| chain::same_content(&r.entry, entry))
}

/// A query's filters, checked and brought to what the stores compare.
#[derive(Debug)]
pub(crate) struct Filters<'q> {
    pub(crate) principal: Option<&'q str>,
    pub(crate) aggregate: Option<(&'q str, &'q str)>,
    /// Inclusive, whole microseconds.
    pub(crate) from: Option<DateTime<Utc>>,
    /// Exclusive, whole microseconds.
    pub(crate) to: Option<DateTime<Utc>>,
    pub(crate) after: u64,
    pub(crate) limit: u32,
}

pub(crate) fn filters(query: &AuditQuery) -> Result<Filters<'_>> {
    if let Some(p) = &query.principal {
        no_nul("principal", p)?;
    }
    if let Some(a) = &query.aggregate {
        no_nul("aggregate.kind", &a.kind)?;
        no_nul("aggregate.id", &a.id)?;
    }
    if let (Some(from), Some(to)) = (query.from, query.to)
        && from > to
    {
        return Err(Error::invalid_input("to", "must not be before `from`"));
    }
    Ok(Filters {
        principal: query.principal.as_deref(),
        aggregate: query
            .aggregate
            .as_ref()
            .map(|a| (a.kind.as_str(), a.id.as_str())),
        from: query.from.map(bound),
        to: query.to.map(bound),
        after: query.after.unwrap_or(0),
        limit: query.effective_limit(),
    })
}

/// A time bound as stored values compare to it: stored instants are whole
/// microseconds, so `t >= bound` holds exactly when `t >= bound` rounded up
/// to a microsecond (likewise for `<`). Clamped to the years every store
/// can represent, which contain every storable instant.
fn bound(at: DateTime<Utc>) -> DateTime<Utc> {
    // 0001-01-01 and 10000-01-01, both whole seconds.
    let min = DateTime::from_timestamp(-62_135_596_800, 0).unwrap_or(DateTime::<Utc>::MIN_UTC);
    let max = DateTime::from_timestamp(253_402_300_800, 0).unwrap_or(DateTime::<Utc>::MAX_UTC);
    let at = at.clamp(min, max);
    let floor = chain::truncate_micros(at);
    if floor < at {
        floor + chrono::Duration::microseconds(1)
    } else {
        floor
    }
}

fn no_nul(field: &'static str, value: &str) -> Result<()> {
    if value.contains('\0') {
        return Err(Error::invalid_input(field, "must not contain U+0000"));
    }
    Ok(())
}

fn bounded(field: &'static str, value: &str, max: usize) -> Result<()> {
    if value.len() > max {
        return Err(Error::invalid_input(
            field,
            format!("{} bytes exceed the limit of {max} bytes", value.len()),
        ));
    }
    no_nul(field, value)
}

fn text(field: &'static str, value: &str, max: usize) -> Result<()> {
    if value.is_empty() {
        return Err(Error::invalid_input(field, "must not be empty"));
    }
    bounded(field, value, max)
}

fn json_has_nul(value: &Value) -> bool {
    match value {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(json_has_nul),
        Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || json_has_nul(v)),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_round_up_to_whole_microseconds() {
        let t: DateTime<Utc> = "2026-01-01T00:00:00.000001500Z".parse().unwrap();
        assert_eq!(
            bound(t),
            "2026-01-01T00:00:00.000002Z"
                .parse::<DateTime<Utc>>()
                .unwrap()
        );
        let exact: DateTime<Utc> = "2026-01-01T00:00:00.000001Z".parse().unwrap();
        assert_eq!(bound(exact), exact);
        assert_eq!(
            bound(DateTime::<Utc>::MAX_UTC).to_rfc3339(),
            "+10000-01-01T00:00:00+00:00"
        );
        assert_eq!(
            bound(DateTime::<Utc>::MIN_UTC).to_rfc3339(),
            "0001-01-01T00:00:00+00:00"
        );
    }
}
