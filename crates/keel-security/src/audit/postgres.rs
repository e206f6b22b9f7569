//! The PostgreSQL audit log (`keel.audit_log`, `keel.audit_head`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use keel_core::{
    AggregateRef, AuditEntry, AuditLog, AuditOutcome, AuditPage, AuditQuery, AuditRecord,
    ChainVerification, CommandId, CorrelationId, Error, Result,
};
use sqlx::postgres::PgRow;
use sqlx::types::Json;
use sqlx::types::Uuid;
use sqlx::{PgPool, QueryBuilder, Row};
use tokio::sync::oneshot;
use tokio::sync::oneshot::error::TryRecvError;

use super::chain::{self, ChainHead, ChainWalk};
use super::keys::{AuditKeys, KeySlot, RecordMac};
use super::{AuditHead, ChainCheck, Filters};

const COLUMNS: &str = "sequence, occurred_at, recorded_at, principal, tenant, command_id, \
     command_type, event_types, aggregate_kind, aggregate_id, outcome, outcome_code, \
     outcome_reason, correlation_id, details, prev_hash, hash";

/// What a verifying walk reads: the record and its seal.
const WALK_COLUMNS: &str = "sequence, occurred_at, recorded_at, principal, tenant, command_id, \
     command_type, event_types, aggregate_kind, aggregate_id, outcome, outcome_code, \
     outcome_reason, correlation_id, details, prev_hash, hash, mac_key_id, mac";

/// How many records [`AuditLog::verify`] reads per round trip; with the
/// 64 KiB limit on details, at most a few tens of MiB in memory at once.
const VERIFY_PAGE: i64 = 500;

/// The locked head: sequence, hash, its `recorded_at`, and the server's
/// clock.
type HeadRow = (i64, String, Option<DateTime<Utc>>, DateTime<Utc>);

/// The most records one append transaction writes.
const MAX_BATCH: usize = 100;

/// An [`AuditLog`] in PostgreSQL.
///
/// Appends lock the one row of `keel.audit_head`, read the previous hash
/// and the server's clock, compute the new record's hash in Rust and write
/// the record and the new head in the same transaction, so sequences are
/// gapless and the chain never forks, however many writers append at once.
///
/// Because that lock is held until the commit, appends through one
/// `PgAuditLog` (and its clones) are grouped: while one transaction is
/// being written, further entries queue up, and the next transaction
/// writes all of them (up to 100) under one lock and one commit. Each
/// caller still gets its own record back once its transaction committed.
/// The write runs on its own task, so a caller that gives up waiting does
/// not abort a transaction that holds other callers' entries, and an entry
/// whose caller gave up is still written.
///
/// Appends are idempotent on the entry's command id: under the head's lock
/// the writer looks up the records already stored under the batch's
/// command ids, and an entry identical to one of them gets that record
/// back (same sequence, same hash) instead of a second record. A retry
/// after a commit whose outcome was lost is therefore safe, from any number
/// of tasks or processes at once. An entry whose command id is stored only
/// with other content (the command was run again: another receipt time,
/// perhaps another outcome) is a new attempt and gets a record of its own,
/// so several records may share a command id.
///
/// With [`with_keys`](Self::with_keys) the log is keyed: each record also
/// stores the current key's id and an HMAC-SHA256 (`mac_key_id`, `mac`),
/// and verification checks them ([`AuditKeys`]).
/// `recorded_at` is the server's `clock_timestamp()` taken under the lock
/// (never earlier than the previous record's), so it is monotonic along
/// the chain. The tables come from Keel's migrations
/// (`keel_database::MIGRATOR`); the database refuses `UPDATE`, `DELETE` and
/// `TRUNCATE` on them (SQLSTATE `KL003`).
///
/// Failures map onto [`keel_core::Error`] through keel-database's
/// classification: a lost connection is `Unavailable` (retryable), a pool
/// timeout is `Timeout`; messages carry no SQL and no parameter values.
///
/// ```no_run
/// # async fn run(pool: sqlx::PgPool) -> keel_core::Result<()> {
/// use keel_core::{AuditEntry, AuditLog, AuditOutcome, ChainVerification};
/// use keel_security::audit::{AuditHead, PgAuditLog};
///
/// keel_database::MIGRATOR.run(&pool).await.expect("migrations");
/// let log = PgAuditLog::new(pool);
/// log.append(AuditEntry::new("order.place", AuditOutcome::Accepted).with_principal("user-42"))
///     .await?;
/// if let ChainVerification::Broken { sequence, reason } = log.verify().await? {
///     eprintln!("audit record {sequence}: {reason}");
/// }
/// let anchor = log.head().await?; // keep a copy outside the database
/// # let _ = anchor; Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct PgAuditLog {
    pool: PgPool,
    queue: Arc<Queue>,
    keys: Arc<KeySlot>,
}

/// Entries waiting for a transaction, and the right to write one.
#[derive(Debug, Default)]
struct Queue {
    pending: Mutex<Vec<Pending>>,
    writer: tokio::sync::Mutex<()>,
}

#[derive(Debug)]
struct Pending {
    entry: AuditEntry,
    reply: oneshot::Sender<Result<AuditRecord>>,
}

impl PgAuditLog {
    /// An audit log on `pool` (migrated with `keel_database::MIGRATOR`).
    #[must_use]
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            queue: Arc::default(),
            keys: Arc::default(),
        }
    }

    /// Keyed mode: seals new records with `keys`' current key and checks
    /// MACs when verifying (see [`AuditKeys`]). Clones share the keys.
    #[must_use]
    pub fn with_keys(self, keys: AuditKeys) -> Self {
        self.keys.set(Some(keys));
        self
    }

    /// Replaces the keys of this log and its clones while in use (to
    /// rotate: the new current key, with the old one among the previous
    /// keys); `None` returns to unkeyed mode.
    pub fn set_keys(&self, keys: Option<AuditKeys>) {
        self.keys.set(keys);
    }

    /// The MAC stored with the record at `sequence`, if there is such a
    /// record and it was sealed.
    ///
    /// # Errors
    ///
    /// As for queries: `Unavailable` or `Timeout` when the database fails.
    pub async fn mac(&self, sequence: u64) -> Result<Option<RecordMac>> {
        let row: Option<(Option<String>, Option<String>)> =
            sqlx::query_as("SELECT mac_key_id, mac FROM keel.audit_log WHERE sequence = $1")
                .bind(i64::try_from(sequence).unwrap_or(i64::MAX))
                .fetch_optional(&self.pool)
                .await
                .map_err(keel_database::to_keel)?;
        Ok(row.and_then(|(key_id, mac)| {
            Some(RecordMac {
                key_id: key_id?,
                mac: mac?,
            })
        }))
    }

    /// The pool this log writes through.
    #[must_use]
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    async fn stored_head(&self) -> Result<Option<ChainHead>> {
        let row: Option<(i64, String)> =
            sqlx::query_as("SELECT sequence, hash FROM keel.audit_head WHERE singleton")
                .fetch_optional(&self.pool)
                .await
                .map_err(keel_database::to_keel)?;
        row.map(|(sequence, hash)| {
            Ok(ChainHead {
                sequence: to_u64(sequence)?,
                hash,
            })
        })
        .transpose()
    }

    async fn walk(&self, walk: &mut ChainWalk) -> Result<ChainVerification> {
        let mut after = i64::try_from(walk.first_needed() - 1).unwrap_or(i64::MAX);
        loop {
            let rows = sqlx::query(&format!(
                "SELECT {WALK_COLUMNS} FROM keel.audit_log WHERE sequence > $1 ORDER BY sequence LIMIT $2"
            ))
            .bind(after)
            .bind(VERIFY_PAGE)
            .fetch_all(&self.pool)
            .await
            .map_err(keel_database::to_keel)?;
            let Some(last) = rows.last() else {
                return Ok(walk.finish());
            };
            after = last.try_get("sequence").map_err(decode)?;
            for row in &rows {
                let record = record_from_row(row)?;
                let mac = mac_from_row(row)?;
                if let Err(broken) = walk.check(&record, mac.as_ref()) {
                    return Ok(broken);
                }
            }
            if (rows.len() as i64) < VERIFY_PAGE {
                return Ok(walk.finish());
            }
        }
    }
}

#[async_trait]
impl AuditLog for PgAuditLog {
    async fn append(&self, entry: AuditEntry) -> Result<AuditRecord> {
        let entry = super::validate(entry)?;
        let (reply, mut answer) = oneshot::channel();
        lock(&self.queue.pending).push(Pending { entry, reply });
        // Should this future be dropped before its entry was taken, the
        // guard has the queue written anyway.
        let guard = FlushOnDrop {
            pool: self.pool.clone(),
            keys: self.keys.clone(),
            queue: Some(self.queue.clone()),
        };
        let result = loop {
            let _writer = self.queue.writer.lock().await;
            // Whoever held the writer before may have written our entry.
            match answer.try_recv() {
                Ok(result) => break result,
                Err(TryRecvError::Closed) => break Err(interrupted()),
                Err(TryRecvError::Empty) => {}
            }
            let batch = take_batch(&self.queue);
            // Our entry is in this batch unless more than MAX_BATCH queued
            // before it; then the loop writes the next batch.
            let task = tokio::spawn(write_batch(self.pool.clone(), self.keys.clone(), batch));
            if task.await.is_err() {
                break Err(interrupted());
            }
        };
        guard.disarm();
        result
    }

    async fn query(&self, query: &AuditQuery) -> Result<AuditPage> {
        let Filters {
            principal,
            aggregate,
            from,
            to,
            after,
            limit,
        } = super::filters(query)?;
        let mut sql = QueryBuilder::new(format!(
            "SELECT {COLUMNS} FROM keel.audit_log WHERE sequence > "
        ));
        sql.push_bind(i64::try_from(after).unwrap_or(i64::MAX));
        if let Some(principal) = principal {
            sql.push(" AND principal = ").push_bind(principal);
        }
        if let Some((kind, id)) = aggregate {
            sql.push(" AND aggregate_kind = ").push_bind(kind);
            sql.push(" AND aggregate_id = ").push_bind(id);
        }
        if let Some(from) = from {
            sql.push(" AND occurred_at >= ").push_bind(from);
        }
        if let Some(to) = to {
            sql.push(" AND occurred_at < ").push_bind(to);
        }
        // One row more than the page tells whether another page follows.
        sql.push(" ORDER BY sequence LIMIT ")
            .push_bind(i64::from(limit) + 1);
        let rows = sql
            .build()
            .fetch_all(&self.pool)
            .await
            .map_err(keel_database::to_keel)?;
        let mut records = rows
            .iter()
            .map(record_from_row)
            .collect::<Result<Vec<_>>>()?;
        let next_after = if records.len() > limit as usize {
            records.truncate(limit as usize);
            records.last().map(|r| r.sequence)
        } else {
            None
        };
        Ok(AuditPage::new(records, next_after))
    }

    async fn verify(&self) -> Result<ChainVerification> {
        // The head is read first: every record up to it was committed
        // before, so a shorter chain lost records from its end.
        let head = self.stored_head().await?;
        let mut walk = ChainWalk::new(head).keyed(self.keys.get());
        self.walk(&mut walk).await
    }
}

#[async_trait]
impl AuditHead for PgAuditLog {
    async fn head(&self) -> Result<ChainHead> {
        Ok(self.stored_head().await?.unwrap_or_else(ChainHead::genesis))
    }

    async fn verify_from(&self, anchor: &ChainHead) -> Result<ChainVerification> {
        let mut anchors = vec![anchor.clone()];
        anchors.extend(self.stored_head().await?);
        let mut walk = ChainWalk::new(anchors).keyed(self.keys.get());
        self.walk(&mut walk).await
    }

    async fn verify_after(&self, from: &ChainHead) -> Result<ChainCheck> {
        let head = self.stored_head().await?;
        let mut walk = ChainWalk::resume(from, head).keyed(self.keys.get());
        let verification = self.walk(&mut walk).await?;
        Ok(ChainCheck::of(&walk, verification))
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The queue is a plain vector changed in single calls: a panic
    // elsewhere cannot leave it half-changed.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn take_batch(queue: &Queue) -> Vec<Pending> {
    let mut pending = lock(&queue.pending);
    let n = pending.len().min(MAX_BATCH);
    pending.drain(..n).collect()
}

/// Writes whatever is queued when an `append` is dropped while its entry
/// may still wait in the queue: an audit record for a command that was
/// received must not depend on the caller's patience.
struct FlushOnDrop {
    pool: PgPool,
    keys: Arc<KeySlot>,
    queue: Option<Arc<Queue>>,
}

impl FlushOnDrop {
    fn disarm(mut self) {
        self.queue = None;
    }
}

impl Drop for FlushOnDrop {
    fn drop(&mut self) {
        let Some(queue) = self.queue.take() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let pool = self.pool.clone();
        let keys = self.keys.clone();
        runtime.spawn(async move {
            let _writer = queue.writer.lock().await;
            loop {
                let batch = take_batch(&queue);
                if batch.is_empty() {
                    break;
                }
                write_batch(pool.clone(), keys.clone(), batch).await;
            }
        });
    }
}

fn interrupted() -> Error {
    Error::internal_msg("the audit append was interrupted before its outcome was known")
}

/// Writes `batch` in one transaction and answers every entry.
async fn write_batch(pool: PgPool, keys: Arc<KeySlot>, batch: Vec<Pending>) {
    let (entries, replies): (Vec<_>, Vec<_>) =
        batch.into_iter().map(|p| (p.entry, p.reply)).unzip();
    match write(&pool, keys.get(), entries).await {
        Ok(records) => {
            for (reply, record) in replies.into_iter().zip(records) {
                // A caller that stopped waiting no longer needs its record.
                let _ = reply.send(Ok(record));
            }
        }
        Err(err) => {
            let mut replies = replies.into_iter().peekable();
            while let Some(reply) = replies.next() {
                let err = if replies.peek().is_some() {
                    copy_error(&err)
                } else {
                    // The last one gets the original, with its source.
                    let _ = reply.send(Err(err));
                    break;
                };
                let _ = reply.send(Err(err));
            }
        }
    }
}

/// Writes the new entries of a batch in one transaction and returns one
/// record per entry, in order: the stored one for a repeated entry, else
/// the new one. An error is a failure of the whole transaction.
async fn write(
    pool: &PgPool,
    keys: Option<Arc<AuditKeys>>,
    entries: Vec<AuditEntry>,
) -> Result<Vec<AuditRecord>> {
    let mut tx = pool.begin().await.map_err(keel_database::to_keel)?;
    let head: Option<HeadRow> = sqlx::query_as(
        "SELECT sequence, hash, recorded_at, clock_timestamp() \
         FROM keel.audit_head WHERE singleton FOR UPDATE",
    )
    .fetch_optional(&mut *tx)
    .await
    .map_err(keel_database::to_keel)?;
    let Some((last_sequence, mut prev_hash, last_recorded_at, now)) = head else {
        return Err(Error::internal_msg(
            "the audit head row is missing; were Keel's migrations applied?",
        ));
    };
    let mut sequence = to_u64(last_sequence)?;
    let recorded_at = last_recorded_at.map_or(now, |last| now.max(last));
    // Under the head's lock no other writer can add records with these
    // command ids before this transaction ends, so the look-up cannot race.
    let mut known = stored_attempts(&mut tx, &entries).await?;
    let mut results = Vec::with_capacity(entries.len());
    let mut rows = Vec::with_capacity(entries.len());
    for entry in entries {
        // Earlier entries of this batch are in `known` too: two identical
        // entries in one batch make one record, two different ones two.
        if let Some(stored) = entry
            .command_id
            .and_then(|id| known.get(&id))
            .and_then(|attempts| super::same_attempt(attempts, &entry))
        {
            results.push(stored.clone());
            continue;
        }
        sequence += 1;
        let hash = chain::compute_hash(sequence, &entry, recorded_at, &prev_hash);
        let mac = keys.as_ref().map(|k| k.current().seal(sequence, &hash));
        rows.push(row_json(
            sequence,
            &entry,
            recorded_at,
            &prev_hash,
            &hash,
            mac.as_ref(),
        ));
        let command_id = entry.command_id;
        let record = AuditRecord::new(sequence, entry, recorded_at, prev_hash, hash.clone());
        if let Some(id) = command_id {
            known.entry(id).or_default().push(record.clone());
        }
        prev_hash = hash;
        results.push(record);
    }
    if rows.is_empty() {
        // Only retries: nothing to write, and the lock goes with the
        // rollback.
        return Ok(results);
    }
    sqlx::query("SELECT keel.append_audit_records($1)")
        .bind(Json(&rows))
        .execute(&mut *tx)
        .await
        .map_err(keel_database::to_keel)?;
    tx.commit().await.map_err(keel_database::to_keel)?;
    Ok(results)
}

/// The stored records that entries of the batch might repeat, by command
/// id, oldest first.
///
/// Only records with one of the batch's command ids *and* one of its
/// `occurred_at` values can have the same content as one of its entries,
/// so only those are read: a command run many times under one id (each
/// attempt with its own receipt time) does not make every later append
/// read all of its attempts. Which of them is really the same is decided
/// in Rust, on the canonical encoding ([`super::same_attempt`]).
async fn stored_attempts(
    tx: &mut sqlx::PgConnection,
    entries: &[AuditEntry],
) -> Result<HashMap<CommandId, Vec<AuditRecord>>> {
    let (ids, times): (Vec<Uuid>, Vec<DateTime<Utc>>) = entries
        .iter()
        .filter_map(|e| e.command_id.map(|id| (*id.as_uuid(), e.occurred_at)))
        .unzip();
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    let rows = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM keel.audit_log \
         WHERE command_id = ANY($1) AND occurred_at = ANY($2) ORDER BY sequence"
    ))
    .bind(&ids)
    .bind(&times)
    .fetch_all(tx)
    .await
    .map_err(keel_database::to_keel)?;
    let mut known: HashMap<CommandId, Vec<AuditRecord>> = HashMap::with_capacity(rows.len());
    for row in &rows {
        let record = record_from_row(row)?;
        if let Some(id) = record.entry.command_id {
            known.entry(id).or_default().push(record);
        }
    }
    Ok(known)
}

/// One record as `keel.append_audit_records` reads it. Timestamps travel as
/// text with all six fractional digits, which PostgreSQL reads back exactly.
fn row_json(
    sequence: u64,
    entry: &AuditEntry,
    recorded_at: DateTime<Utc>,
    prev_hash: &str,
    hash: &str,
    mac: Option<&RecordMac>,
) -> serde_json::Value {
    let time = |t: DateTime<Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let (outcome, code, reason) = chain::outcome_parts(&entry.outcome);
    serde_json::json!({
        "sequence": sequence,
        "occurred_at": time(entry.occurred_at),
        "recorded_at": time(recorded_at),
        "principal": entry.principal,
        "tenant": entry.tenant,
        "command_id": entry.command_id,
        "command_type": entry.command_type,
        "event_types": entry.event_types,
        "aggregate_kind": entry.aggregate.as_ref().map(|a| &a.kind),
        "aggregate_id": entry.aggregate.as_ref().map(|a| &a.id),
        "outcome": outcome,
        "outcome_code": code,
        "outcome_reason": reason,
        "correlation_id": entry.correlation_id,
        "details": entry.details,
        "prev_hash": prev_hash,
        "hash": hash,
        "mac_key_id": mac.map(|m| &m.key_id),
        "mac": mac.map(|m| &m.mac),
    })
}

/// The same failure for another caller of the same transaction (errors
/// are not `Clone`; the source stays with one of them).
fn copy_error(err: &Error) -> Error {
    match err {
        Error::Unavailable {
            service, message, ..
        } => Error::Unavailable {
            service: service.clone(),
            message: message.clone(),
            source: None,
        },
        Error::Timeout { operation, after } => Error::Timeout {
            operation: operation.clone(),
            after: *after,
        },
        Error::Invalid(invalid) => Error::Invalid(invalid.clone()),
        other => Error::internal_msg(other.to_string()),
    }
}

fn record_from_row(row: &PgRow) -> Result<AuditRecord> {
    let outcome: String = row.try_get("outcome").map_err(decode)?;
    let code: Option<String> = row.try_get("outcome_code").map_err(decode)?;
    let reason: Option<String> = row.try_get("outcome_reason").map_err(decode)?;
    let outcome = match (outcome.as_str(), code, reason) {
        ("accepted", None, None) => AuditOutcome::Accepted,
        ("rejected", Some(code), Some(reason)) => AuditOutcome::Rejected { code, reason },
        ("failed", Some(code), None) => AuditOutcome::Failed { code },
        _ => return Err(Error::internal_msg("stored audit outcome is not readable")),
    };
    let command_type: String = row.try_get("command_type").map_err(decode)?;
    let mut entry = AuditEntry::new(command_type, outcome);
    entry.occurred_at = row.try_get("occurred_at").map_err(decode)?;
    entry.principal = row.try_get("principal").map_err(decode)?;
    entry.tenant = row.try_get("tenant").map_err(decode)?;
    entry.command_id = row
        .try_get::<Option<Uuid>, _>("command_id")
        .map_err(decode)?
        .map(CommandId::from_uuid);
    entry.event_types = row.try_get("event_types").map_err(decode)?;
    let kind: Option<String> = row.try_get("aggregate_kind").map_err(decode)?;
    let id: Option<String> = row.try_get("aggregate_id").map_err(decode)?;
    entry.aggregate = kind.zip(id).map(|(kind, id)| AggregateRef::new(kind, id));
    entry.correlation_id = row
        .try_get::<Option<Uuid>, _>("correlation_id")
        .map_err(decode)?
        .map(CorrelationId::from_uuid);
    entry.details = row
        .try_get::<Json<serde_json::Value>, _>("details")
        .map_err(decode)?
        .0;
    Ok(AuditRecord::new(
        to_u64(row.try_get("sequence").map_err(decode)?)?,
        entry,
        row.try_get("recorded_at").map_err(decode)?,
        row.try_get::<String, _>("prev_hash").map_err(decode)?,
        row.try_get::<String, _>("hash").map_err(decode)?,
    ))
}

fn mac_from_row(row: &PgRow) -> Result<Option<RecordMac>> {
    let key_id: Option<String> = row.try_get("mac_key_id").map_err(decode)?;
    let mac: Option<String> = row.try_get("mac").map_err(decode)?;
    Ok(key_id
        .zip(mac)
        .map(|(key_id, mac)| RecordMac { key_id, mac }))
}

fn decode(e: sqlx::Error) -> Error {
    Error::internal("a stored audit record could not be read", e)
}

fn to_u64(n: i64) -> Result<u64> {
    u64::try_from(n).map_err(|_| Error::internal_msg("negative audit sequence in storage"))
}

#[cfg(test)]
mod tests {
    use keel_core::AuditOutcome;
    use keel_testkit::TestDatabase;

    use super::*;

    fn attempt(id: CommandId, outcome: AuditOutcome, seconds: i64) -> AuditEntry {
        let at: DateTime<Utc> = "2026-03-01T12:00:00.123456Z".parse().expect("time");
        let mut e = AuditEntry::new("order.place", outcome)
            .with_principal("alice")
            .with_occurred_at(at + chrono::Duration::seconds(seconds));
        e.command_id = Some(id);
        super::super::validate(e).expect("a valid entry")
    }

    fn sequences(records: &[AuditRecord]) -> Vec<u64> {
        records.iter().map(|r| r.sequence).collect()
    }

    // One transaction's batch, written directly: which entries share a
    // batch is otherwise up to timing.
    #[tokio::test]
    async fn a_batch_stores_each_attempt_once() {
        let db = TestDatabase::create(&keel_database::MIGRATOR)
            .await
            .expect("test database");
        let pool = db.pool().clone();
        let id = CommandId::new();
        let accepted = attempt(id, AuditOutcome::Accepted, 0);
        let failed = attempt(
            id,
            AuditOutcome::Failed {
                code: "keel.unavailable".into(),
            },
            0,
        );
        let later = attempt(id, AuditOutcome::Accepted, 1);

        let first = write(
            &pool,
            None,
            vec![
                accepted.clone(),
                accepted.clone(),
                failed.clone(),
                later.clone(),
                failed.clone(),
            ],
        )
        .await
        .expect("write");
        assert_eq!(sequences(&first), [1, 1, 2, 3, 2]);
        assert_eq!(first[2].entry, failed);
        assert_eq!(first[3].entry, later);

        // Retries in a later batch find every stored attempt, next to a
        // new attempt and an entry of another command.
        let other = attempt(CommandId::new(), AuditOutcome::Accepted, 0);
        let newest = attempt(id, AuditOutcome::Accepted, 2);
        let second = write(
            &pool,
            None,
            vec![later, other, newest.clone(), accepted, failed, newest],
        )
        .await
        .expect("write");
        assert_eq!(sequences(&second), [3, 4, 5, 1, 2, 5]);
        assert_eq!(second[3], first[0]);

        let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM keel.audit_log")
            .fetch_one(&pool)
            .await
            .expect("count");
        assert_eq!(stored, 5);
        let log = PgAuditLog::new(pool);
        assert_eq!(
            log.verify().await.expect("verify"),
            ChainVerification::Intact { records: 5 }
        );
    }
}
