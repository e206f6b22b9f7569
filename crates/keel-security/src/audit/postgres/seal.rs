//! Sealing committed rows into the chain, and the chainer that does it in
//! the background.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use keel_core::{Error, Result};
use sqlx::PgPool;
use sqlx::types::Json;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::super::chain;
use super::super::keys::AuditKeys;
use super::PgAuditLog;
use super::rows::{PENDING_COLUMNS, decode, entry_from_row, to_u64};

/// The most rows one sealing transaction seals.
pub(super) const SEAL_BATCH: i64 = 500;

/// The locked head: sequence, hash, its `recorded_at`, and the server's
/// clock.
type HeadRow = (i64, String, Option<DateTime<Utc>>, DateTime<Utc>);

/// Seals up to [`SEAL_BATCH`] committed unsealed rows, oldest row first,
/// in one short transaction holding the head's lock. Returns how many it
/// sealed.
///
/// Rows of transactions that have not committed are invisible here and
/// get later sequences once they have: a sequence is given when a row is
/// sealed, so commit order never opens a gap.
pub(super) async fn seal_batch(pool: &PgPool, keys: Option<Arc<AuditKeys>>) -> Result<usize> {
    // Cheap look first (a partial index): an idle chainer or a query with
    // nothing pending takes no lock.
    let pending: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM keel.audit_log WHERE sequence IS NULL)")
            .fetch_one(pool)
            .await
            .map_err(keel_database::to_keel)?;
    if !pending {
        return Ok(0);
    }
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
    // Read under the lock: rows another chainer sealed meanwhile are gone
    // from this list.
    let rows = sqlx::query(&format!(
        "SELECT {PENDING_COLUMNS} FROM keel.audit_log WHERE sequence IS NULL ORDER BY id LIMIT $1"
    ))
    .bind(SEAL_BATCH)
    .fetch_all(&mut *tx)
    .await
    .map_err(keel_database::to_keel)?;
    if rows.is_empty() {
        return Ok(0);
    }
    let mut sequence = to_u64(last_sequence)?;
    let recorded_at = last_recorded_at.map_or(now, |last| now.max(last));
    let time = recorded_at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let mut seals = Vec::with_capacity(rows.len());
    for row in &rows {
        let id: i64 = sqlx::Row::try_get(row, "id").map_err(decode)?;
        let entry = entry_from_row(row)?;
        sequence += 1;
        let hash = chain::compute_hash(sequence, &entry, recorded_at, &prev_hash);
        let mac = keys.as_ref().map(|k| k.current().seal(sequence, &hash));
        seals.push(serde_json::json!({
            "id": id,
            "sequence": sequence,
            "recorded_at": time,
            "prev_hash": prev_hash,
            "hash": hash,
            "mac_key_id": mac.as_ref().map(|m| &m.key_id),
            "mac": mac.as_ref().map(|m| &m.mac),
        }));
        prev_hash = hash;
    }
    sqlx::query("SELECT keel.seal_audit_records($1)")
        .bind(Json(&seals))
        .execute(&mut *tx)
        .await
        .map_err(keel_database::to_keel)?;
    tx.commit().await.map_err(keel_database::to_keel)?;
    Ok(seals.len())
}

/// How often a chainer looks for rows committed by other processes (rows
/// appended through its own log wake it at once).
pub const DEFAULT_CHAIN_INTERVAL: Duration = Duration::from_millis(500);

/// How long a woken chainer waits for more commits before it seals.
const LINGER: Duration = Duration::from_millis(50);

/// The handle of a background task that seals committed audit rows into
/// the chain ([`PgAuditLog::chainer`]).
///
/// Like every Keel handle: [`shutdown`](Self::shutdown) stops gracefully
/// (the round in flight finishes, one last round seals what committed
/// until then); [`abort`](Self::abort) stops at once and returns when the
/// task has ended; dropping the handle aborts without waiting. Stopping a
/// chainer loses nothing: unsealed rows are committed and wait for the
/// next chainer, query or append.
#[derive(Debug)]
#[must_use = "dropping the handle stops the chainer"]
pub struct AuditChainer {
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl AuditChainer {
    pub(super) fn start(log: PgAuditLog, interval: Duration) -> Self {
        let (stop, mut stopped) = oneshot::channel();
        let task = tokio::spawn(async move {
            loop {
                log.seal_round("chainer").await;
                tokio::select! {
                    _ = &mut stopped => break,
                    () = log.shared.wake.notified() => {
                        // Lets a burst of commits gather, so one sealing
                        // transaction serves many commands instead of
                        // competing with each of them.
                        tokio::select! {
                            _ = &mut stopped => break,
                            () = tokio::time::sleep(LINGER) => {}
                        }
                    }
                    () = tokio::time::sleep(interval) => {}
                }
            }
            log.seal_round("chainer").await;
        });
        Self {
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Stops after the round in flight and one last round.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            // A panic in the task has been reported by the runtime already.
            let _ = task.await;
        }
    }

    /// Stops at once; returns when the task has ended. A sealing
    /// transaction cut short rolls back and seals nothing.
    pub async fn abort(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }
}

impl Drop for AuditChainer {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl PgAuditLog {
    /// Seals rounds until nothing is pending, logging a failure instead of
    /// returning it (for the background task).
    async fn seal_round(&self, who: &'static str) {
        if let Err(e) = self.seal().await {
            tracing::warn!(error = %e, code = e.code(), who, "sealing audit records failed; will retry");
        }
    }
}
