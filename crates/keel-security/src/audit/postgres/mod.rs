//! The PostgreSQL audit log (`keel.audit_log`, `keel.audit_head`).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use keel_core::uow::Transaction;
use keel_core::{
    AuditAppender, AuditEntry, AuditLog, AuditPage, AuditQuery, AuditRecord, ChainVerification,
    Result,
};
use sqlx::PgPool;

use super::chain::{ChainHead, ChainWalk};
use super::keys::{AuditKeys, KeySlot, RecordMac};
use super::{AuditHead, ChainCheck, Filters};

mod pending;
mod rows;
mod seal;

pub use seal::{AuditChainer, DEFAULT_CHAIN_INTERVAL};

use rows::{mac_of, select_audit_rows, to_u64};

/// How many records [`AuditLog::verify`] reads per round trip; with the
/// 64 KiB limit on details, at most a few tens of MiB in memory at once.
const VERIFY_PAGE: i64 = 500;

/// An [`AuditLog`] in PostgreSQL.
///
/// Appending and chaining are two steps, so that writers never wait for
/// each other:
///
/// * **Append.** [`within(tx)`](AuditLog::within)`.append(entry)` inserts
///   the record's content, one `jsonb` document in the narrow table
///   `keel.audit_pending`, in the caller's transaction (the command's, in
///   the command pipeline), with no lock on the chain: it commits or rolls
///   back with the transaction. The `INSERT` travels with the transaction's
///   `COMMIT`, in the same round trip
///   ([`UnitOfWork::send_with_commit`](keel_database::UnitOfWork::send_with_commit)),
///   so it costs the command no round trip of its own; until then the row
///   is not visible, not even to the transaction itself. [`append`](AuditLog::append) does the same
///   in a statement of its own, then seals (below) until its record is in
///   the chain, and returns it.
/// * **Seal.** In a short transaction of its own, holding the one row of
///   `keel.audit_head`, [`seal`](Self::seal) takes the committed pending
///   rows (oldest row first), moves them into `keel.audit_log` (the sealed,
///   indexed table queries read) and gives each the next sequence,
///   `recorded_at` (the server's `clock_timestamp()`, never earlier than
///   the previous record's), `prev_hash`, `hash` and, in keyed mode, its
///   MAC, and moves the head. Rows of transactions still open are
///   invisible to it and are sealed by a later round: sequences are gapless
///   and the chain never forks, whatever order transactions commit in.
///   [`chainer`](Self::chainer) seals in the background (woken by every
///   commit that appended through this log, and polling for other
///   processes' rows); queries seal what is pending before they read, so a
///   committed record is found at once.
///
/// [`verify`](AuditLog::verify) checks the sealed chain;
/// [`AuditHead::pending`] counts what waits to be sealed. A record
/// committed by a process that died before sealing it is sealed by the
/// next chainer, query or append on the database: none is lost.
///
/// Appends are idempotent on the entry's command id: each row keeps the
/// hash of its content (`content_hash`), and sealing, which alone writes
/// the chain, drops a pending row whose command id and content are stored
/// already, so an entry identical to a stored one leaves no second record
/// ([`append`](AuditLog::append) returns the stored one), even when
/// retries race from several processes. An entry whose command
/// id is stored only with other content (the command ran again: another
/// receipt time, perhaps another outcome) is a new attempt and gets a
/// record of its own, so several records may share a command id.
///
/// With [`with_keys`](Self::with_keys) the log is keyed: each record is
/// sealed with the current key's id and an HMAC-SHA256 (`mac_key_id`,
/// `mac`), and verification checks them ([`AuditKeys`]). The tables come
/// from Keel's migrations (`keel_security::MIGRATIONS`); the database refuses
/// (SQLSTATE `KL003`) changing or removing a sealed record, adding one
/// anywhere but right after the chain's last, and changing a pending row
/// or removing it before it is sealed.
///
/// Failures map onto [`keel_core::Error`] through keel-database's
/// classification: a lost connection is `Unavailable` (retryable), a pool
/// timeout is `Timeout`; messages carry no SQL and no parameter values.
///
/// ```no_run
/// # async fn run(db: keel_database::Database) -> keel_core::Result<()> {
/// use keel_core::uow::TransactionSource;
/// use keel_core::{AuditEntry, AuditLog, AuditOutcome, ChainVerification};
/// use keel_security::audit::{AuditHead, PgAuditLog};
///
/// db.migrate(&[&keel_security::MIGRATIONS]).await.expect("migrations");
/// let log = PgAuditLog::new(db.pool().clone());
/// let chainer = log.chainer(); // seals committed records in the background
///
/// // In a command's transaction: commits, or not, with its other writes.
/// let mut tx = TransactionSource::begin(&db).await?;
/// log.within(&mut *tx)
///     .append(AuditEntry::new("order.place", AuditOutcome::Accepted).with_principal("user-42"))
///     .await?;
/// tx.commit().await?;
///
/// if let ChainVerification::Broken { sequence, reason } = log.verify().await? {
///     eprintln!("audit record {sequence}: {reason}");
/// }
/// let anchor = log.head().await?; // keep a copy outside the database
/// chainer.shutdown().await;
/// # let _ = anchor; Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct PgAuditLog {
    pool: PgPool,
    keys: Arc<KeySlot>,
    shared: Arc<Shared>,
}

/// What the clones of one log share.
#[derive(Debug, Default)]
struct Shared {
    /// One sealing transaction at a time from this process: the others
    /// would only queue on the head's lock, each holding a connection.
    sealer: tokio::sync::Mutex<()>,
    /// Wakes the chainer when a transaction that appended has committed.
    wake: tokio::sync::Notify,
}

impl PgAuditLog {
    /// An audit log on `pool` (migrated with `keel_security::MIGRATIONS`).
    #[must_use]
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            keys: Arc::default(),
            shared: Arc::default(),
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

    /// Starts the background task that seals committed records into the
    /// chain, looking for other processes' records every
    /// [`DEFAULT_CHAIN_INTERVAL`]. Run one per process that appends through
    /// [`within`](AuditLog::within); needs a Tokio runtime.
    pub fn chainer(&self) -> AuditChainer {
        self.chainer_every(DEFAULT_CHAIN_INTERVAL)
    }

    /// As [`chainer`](Self::chainer), polling every `interval`.
    pub fn chainer_every(&self, interval: Duration) -> AuditChainer {
        AuditChainer::start(self.clone(), interval)
    }

    /// Seals every committed record not yet in the chain, now, and returns
    /// how many it sealed. The chainer, queries and appends call this; call
    /// it directly in tools and tests.
    ///
    /// # Errors
    ///
    /// As for appends: `Unavailable` or `Timeout` when the database fails.
    pub async fn seal(&self) -> Result<u64> {
        let _sealer = self.shared.sealer.lock().await;
        let mut sealed = 0;
        loop {
            let batch = seal::seal_batch(&self.pool, self.keys.get()).await?;
            sealed += batch.sealed as u64;
            if (batch.consumed as i64) < seal::SEAL_BATCH {
                return Ok(sealed);
            }
        }
    }

    /// The MAC stored with the record at `sequence`, if there is such a
    /// record and it was sealed.
    ///
    /// # Errors
    ///
    /// As for queries: `Unavailable` or `Timeout` when the database fails.
    pub async fn mac(&self, sequence: u64) -> Result<Option<RecordMac>> {
        let row = sqlx::query!(
            "SELECT mac_key_id, mac FROM keel.audit_log WHERE sequence = $1",
            i64::try_from(sequence).unwrap_or(i64::MAX),
        )
        .fetch_optional(&self.pool)
        .await
        .map_err(keel_database::to_keel)?;
        Ok(row.and_then(|row| mac_of(row.mac_key_id, row.mac)))
    }

    /// The pool this log writes through.
    #[must_use]
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The sealed record of the pending row `id`, once it is sealed: the
    /// row itself, or, when sealing dropped it as a repeat, the earliest
    /// record of the same attempt (`entry`'s command id and content hash).
    async fn record_of(
        &self,
        id: i64,
        entry: &AuditEntry,
        content_hash: &str,
    ) -> Result<Option<AuditRecord>> {
        let row = match entry.command_id {
            Some(command_id) => select_audit_rows!(
                "WHERE command_id = $1 AND content_hash = $2 AND sequence > 0 \
                 ORDER BY sequence LIMIT 1",
                *command_id.as_uuid(),
                content_hash,
            )
            .fetch_optional(&self.pool)
            .await
            .map_err(keel_database::to_keel)?,
            None => select_audit_rows!("WHERE id = $1 AND sequence > 0", id)
                .fetch_optional(&self.pool)
                .await
                .map_err(keel_database::to_keel)?,
        };
        row.map(|row| row.sealed_record()).transpose()
    }

    async fn stored_head(&self) -> Result<Option<ChainHead>> {
        let row = sqlx::query!("SELECT sequence, hash FROM keel.audit_head WHERE singleton")
            .fetch_optional(&self.pool)
            .await
            .map_err(keel_database::to_keel)?;
        row.map(|row| {
            Ok(ChainHead {
                sequence: to_u64(row.sequence)?,
                hash: row.hash,
            })
        })
        .transpose()
    }

    async fn walk(&self, walk: &mut ChainWalk) -> Result<ChainVerification> {
        let mut after = i64::try_from(walk.first_needed() - 1).unwrap_or(i64::MAX);
        loop {
            let rows = select_audit_rows!(
                "WHERE sequence > $1 ORDER BY sequence LIMIT $2",
                after,
                VERIFY_PAGE,
            )
            .fetch_all(&self.pool)
            .await
            .map_err(keel_database::to_keel)?;
            for row in &rows {
                let record = row.sealed_record()?;
                after = i64::try_from(record.sequence).unwrap_or(i64::MAX);
                if let Err(broken) = walk.check(&record, row.mac().as_ref()) {
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
        let content_hash = super::chain::content_hash(&entry);
        let id = pending::insert(&self.pool, &entry, &content_hash).await?;
        // The row is committed: from here on, dropping this future loses
        // nothing (the next chainer, query or append seals it).
        loop {
            if let Some(record) = self.record_of(id, &entry, &content_hash).await? {
                return Ok(record);
            }
            if self.seal().await? == 0 && self.record_of(id, &entry, &content_hash).await?.is_none()
            {
                // Nothing to seal yet our row is not in the chain: another
                // process is sealing it right now; its commit releases the
                // head.
                tokio::task::yield_now().await;
            }
        }
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
        // Whatever committed before the query is in the chain, and found.
        self.seal().await?;
        let after = i64::try_from(after).unwrap_or(i64::MAX);
        // One row more than the page tells whether another page follows.
        let fetch = i64::from(limit) + 1;
        // Three fixed statements, one per index that leads the search:
        // the principal's, the aggregate's, or the chain order itself.
        // The other filters are parameters that are NULL when absent. The
        // statements are prepared and cached per connection, and after a
        // few runs PostgreSQL may keep one generic plan for all values:
        // with a `$n IS NULL OR principal = $n` form that plan can no
        // longer use the principal's index (checked with EXPLAIN: it
        // walked the whole chain for a rare principal), while
        // `principal = $n` keeps it in every plan. A time range alone
        // reads in chain order and filters, as it did when the statement
        // was assembled per query.
        let rows = match (principal, aggregate) {
            (Some(principal), aggregate) => {
                let (kind, id) = aggregate.unzip();
                select_audit_rows!(
                    "WHERE principal = $1 AND sequence > $2 \
                       AND ($3::text IS NULL OR aggregate_kind = $3) \
                       AND ($4::text IS NULL OR aggregate_id = $4) \
                       AND ($5::timestamptz IS NULL OR occurred_at >= $5) \
                       AND ($6::timestamptz IS NULL OR occurred_at < $6) \
                     ORDER BY sequence LIMIT $7",
                    principal,
                    after,
                    kind,
                    id,
                    from,
                    to,
                    fetch,
                )
                .fetch_all(&self.pool)
                .await
            }
            (None, Some((kind, id))) => {
                select_audit_rows!(
                    "WHERE aggregate_kind = $1 AND aggregate_id = $2 AND sequence > $3 \
                       AND ($4::timestamptz IS NULL OR occurred_at >= $4) \
                       AND ($5::timestamptz IS NULL OR occurred_at < $5) \
                     ORDER BY sequence LIMIT $6",
                    kind,
                    id,
                    after,
                    from,
                    to,
                    fetch,
                )
                .fetch_all(&self.pool)
                .await
            }
            (None, None) => {
                select_audit_rows!(
                    "WHERE sequence > $1 \
                       AND ($2::timestamptz IS NULL OR occurred_at >= $2) \
                       AND ($3::timestamptz IS NULL OR occurred_at < $3) \
                     ORDER BY sequence LIMIT $4",
                    after,
                    from,
                    to,
                    fetch,
                )
                .fetch_all(&self.pool)
                .await
            }
        }
        .map_err(keel_database::to_keel)?;
        let mut records = rows
            .iter()
            .map(rows::AuditRow::sealed_record)
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
        // The head is read first: every record up to it was sealed
        // before, so a shorter chain lost records from its end.
        let head = self.stored_head().await?;
        let mut walk = ChainWalk::new(head).keyed(self.keys.get());
        self.walk(&mut walk).await
    }

    fn within<'t>(&'t self, tx: &'t mut dyn Transaction) -> Box<dyn AuditAppender + 't> {
        Box::new(PgAppender {
            log: self,
            tx: tokio::sync::Mutex::new(tx),
        })
    }
}

/// [`PgAuditLog`] bound to a transaction.
struct PgAppender<'t> {
    log: &'t PgAuditLog,
    tx: tokio::sync::Mutex<&'t mut dyn Transaction>,
}

#[async_trait]
impl AuditAppender for PgAppender<'_> {
    async fn append(&self, entry: AuditEntry) -> Result<()> {
        let entry = super::validate(entry)?;
        // Built before anything is registered: a value that cannot be
        // written fails the append, not the commit.
        let insert = pending::insert_text(&entry)?;
        let mut tx = self.tx.lock().await;
        let uow = keel_database::UnitOfWork::join(&mut **tx)?;
        // Sent with the COMMIT, in its round trip: the record commits with
        // the command's effects, or neither does.
        uow.send_with_commit(insert);
        let shared = Arc::clone(&self.log.shared);
        uow.after_commit(move || shared.wake.notify_one());
        Ok(())
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
        Ok(ChainCheck::of(&walk, verification).with_pending(self.pending().await?))
    }

    async fn pending(&self) -> Result<u64> {
        let n = sqlx::query_scalar!(r#"SELECT count(*) AS "n!" FROM keel.audit_pending"#)
            .fetch_one(&self.pool)
            .await
            .map_err(keel_database::to_keel)?;
        to_u64(n)
    }
}

#[cfg(test)]
mod tests {
    use chrono::{DateTime, Utc};
    use keel_core::{AuditOutcome, AuditQuery, CommandId};
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

    // Pending rows written in one transaction, sealed together: each
    // attempt once (repeats dropped at sealing), in the order written.
    #[tokio::test]
    async fn one_transaction_stores_each_attempt_once() {
        let db = TestDatabase::create(&keel_security::MIGRATIONS)
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
        let mut tx = pool.begin().await.expect("begin");
        for e in [&accepted, &accepted, &failed, &later, &failed] {
            pending::insert(&mut *tx, e, &crate::audit::chain::content_hash(e))
                .await
                .expect("insert");
        }
        tx.commit().await.expect("commit");

        let log = PgAuditLog::new(pool.clone());
        assert_eq!(log.pending().await.expect("pending"), 5);
        assert_eq!(log.seal().await.expect("seal"), 3, "repeats dropped");
        assert_eq!(log.pending().await.expect("pending"), 0);
        let page = log.query(&AuditQuery::new()).await.expect("query");
        let stored: Vec<&AuditEntry> = page.records.iter().map(|r| &r.entry).collect();
        assert_eq!(stored, [&accepted, &failed, &later]);
        let again = log.append(failed.clone()).await.expect("retry");
        assert_eq!((again.sequence, &again.entry), (2, &failed));
        // The retry found its record; its own row is dropped when sealing
        // comes to it.
        assert_eq!(log.pending().await.expect("pending"), 1);
        assert_eq!(log.seal().await.expect("seal"), 0, "the retry dropped");
        assert_eq!(log.pending().await.expect("pending"), 0);
        let newest = log
            .append(attempt(id, AuditOutcome::Accepted, 2))
            .await
            .expect("new attempt");
        assert_eq!(newest.sequence, 4);
        assert_eq!(
            log.verify().await.expect("verify"),
            ChainVerification::Intact { records: 4 }
        );
    }

    // The inline INSERT a command's commit carries stores exactly the
    // entry, hostile text included: the sealed row reads back as the
    // entry, with its content hash, in an intact chain; sent twice (a
    // retried commit), it is sealed once.
    #[tokio::test]
    async fn inline_insert_stores_the_entry() {
        let db = TestDatabase::create(&keel_security::MIGRATIONS)
            .await
            .expect("test database");
        let pool = db.pool().clone();
        let hostile = "x$q0$'); DROP TABLE keel.audit_log; -- \\ $$ ünï 🚀";
        let mut entry = attempt(
            CommandId::new(),
            AuditOutcome::Rejected {
                code: "keel.forbidden".into(),
                reason: hostile.into(),
            },
            3,
        );
        entry.tenant = Some(format!("t-{hostile}"));
        entry.event_types = vec!["a.b".into(), hostile.into()];
        entry.aggregate = Some(keel_core::AggregateRef::new("Order", hostile));
        entry.correlation_id = Some(keel_core::CorrelationId::new());
        entry.details = serde_json::json!({ "note": hostile, "n": [1, 2.5, null], "k'$": true });
        let entry = super::super::validate(entry).expect("valid");
        let plain = attempt(CommandId::new(), AuditOutcome::Accepted, 4);
        let mut bare = AuditEntry::new("order.bare", AuditOutcome::Accepted);
        bare.details = serde_json::Value::Null;
        let bare = super::super::validate(bare).expect("valid");
        for e in [&entry, &plain, &bare] {
            let sql = pending::insert_text(e).expect("text");
            sqlx::Executor::execute(&pool, sql.as_str())
                .await
                .expect("insert");
            if e.command_id.is_some() {
                sqlx::Executor::execute(&pool, sql.as_str())
                    .await
                    .expect("retry");
            }
        }
        let log = PgAuditLog::new(pool.clone());
        assert_eq!(log.seal().await.expect("seal"), 3);
        let rows = select_audit_rows!(
            "WHERE sequence > $1 ORDER BY sequence LIMIT $2",
            0_i64,
            VERIFY_PAGE,
        )
        .fetch_all(&pool)
        .await
        .expect("rows");
        let stored: Vec<AuditEntry> = rows.iter().map(|r| r.entry().expect("entry")).collect();
        assert_eq!(stored, [entry.clone(), plain.clone(), bare]);
        let hashes: Vec<String> =
            sqlx::query_scalar("SELECT content_hash FROM keel.audit_log ORDER BY sequence")
                .fetch_all(&pool)
                .await
                .expect("hashes");
        assert_eq!(
            hashes[..2],
            [
                crate::audit::chain::content_hash(&entry),
                crate::audit::chain::content_hash(&plain)
            ]
        );
        assert_eq!(
            log.verify().await.expect("verify"),
            ChainVerification::Intact { records: 3 }
        );
    }
}
