//! Sealing committed rows into the chain, and the chainer that does it in
//! the background.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use keel_core::{Error, Result};
use sqlx::PgPool;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::super::chain;
use super::super::keys::AuditKeys;
use super::PgAuditLog;
use super::pending;
use super::rows::to_u64;

/// The most rows one sealing transaction seals.
pub(super) const SEAL_BATCH: i64 = 500;

/// What one sealing transaction did.
#[derive(Debug, Default)]
pub(super) struct Batch {
    /// Rows sealed into the chain.
    pub(super) sealed: usize,
    /// Pending rows it took: the sealed ones and the repeats it dropped.
    pub(super) consumed: usize,
}

/// Seals up to [`SEAL_BATCH`] committed pending rows, oldest row first,
/// in one short transaction holding the head's lock.
///
/// Rows of transactions that have not committed are invisible here and
/// get later sequences once they have: a sequence is given when a row is
/// sealed, so commit order never opens a gap. A row repeating an attempt
/// already stored (same command id and content hash: a retried append),
/// or one earlier in the same batch, is dropped instead of sealed.
pub(super) async fn seal_batch(pool: &PgPool, keys: Option<Arc<AuditKeys>>) -> Result<Batch> {
    // Cheap look first: an idle chainer or a query with nothing pending
    // takes no lock.
    let pending =
        sqlx::query_scalar!(r#"SELECT EXISTS (SELECT 1 FROM keel.audit_pending) AS "pending!""#)
            .fetch_one(pool)
            .await
            .map_err(keel_database::to_keel)?;
    if !pending {
        return Ok(Batch::default());
    }
    let mut tx = pool.begin().await.map_err(keel_database::to_keel)?;
    let head = sqlx::query!(
        r#"SELECT sequence, hash, recorded_at, clock_timestamp() AS "now!"
           FROM keel.audit_head WHERE singleton FOR UPDATE"#
    )
    .fetch_optional(&mut *tx)
    .await
    .map_err(keel_database::to_keel)?;
    let Some(head) = head else {
        return Err(Error::internal_msg(
            "the audit head row is missing; were Keel's migrations applied?",
        ));
    };
    // Read under the lock: rows another chainer sealed meanwhile are gone
    // from this table, and the attempts it stored are seen.
    let rows = sqlx::query!(
        r#"SELECT p.id, p.entry,
                  EXISTS (SELECT 1 FROM keel.audit_log l
                          WHERE l.command_id = (p.entry->>'command_id')::uuid
                            AND l.content_hash = p.entry->>'content_hash') AS "stored!"
           FROM keel.audit_pending p ORDER BY p.id LIMIT $1"#,
        SEAL_BATCH
    )
    .fetch_all(&mut *tx)
    .await
    .map_err(keel_database::to_keel)?;
    if rows.is_empty() {
        return Ok(Batch::default());
    }
    let mut sequence = to_u64(head.sequence)?;
    let mut prev_hash = head.hash;
    let recorded_at = head.recorded_at.map_or(head.now, |last| head.now.max(last));
    let time = recorded_at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let mut seals = Vec::with_capacity(rows.len());
    let mut done = Vec::with_capacity(rows.len());
    let mut attempts = HashSet::new();
    for row in rows {
        done.push(row.id);
        let pending = pending::read(row.id, row.entry)?;
        let attempt = pending.entry.command_id.zip(pending.content_hash.clone());
        if row.stored || attempt.is_some_and(|key| !attempts.insert(key)) {
            continue;
        }
        sequence += 1;
        let hash = chain::compute_hash(sequence, &pending.entry, recorded_at, &prev_hash);
        let mac = keys.as_ref().map(|k| k.current().seal(sequence, &hash));
        seals.push(serde_json::json!({
            "id": row.id,
            "sequence": sequence,
            "recorded_at": time,
            "prev_hash": prev_hash,
            "hash": hash,
            "mac_key_id": mac.as_ref().map(|m| &m.key_id),
            "mac": mac.as_ref().map(|m| &m.mac),
        }));
        prev_hash = hash;
    }
    let sealed = seals.len();
    // A void function called in FROM: the statement returns no column.
    sqlx::query!(
        "SELECT FROM keel.seal_pending_audit_records($1, $2)",
        serde_json::Value::Array(seals),
        &done,
    )
    .execute(&mut *tx)
    .await
    .map_err(keel_database::to_keel)?;
    tx.commit().await.map_err(keel_database::to_keel)?;
    Ok(Batch {
        sealed,
        consumed: done.len(),
    })
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
