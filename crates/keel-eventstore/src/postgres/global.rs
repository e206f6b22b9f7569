//! The global log, read in gap-safe order.

use std::sync::Mutex;
use std::time::Duration;

use futures::TryStreamExt;

use super::{LogRow, PostgresEventStore, clamp, to_u64};
use crate::error::Result;
use crate::event::ReadAll;
use crate::store::{EventStream, GlobalLog};

/// Opens the transaction a global-log batch is read in, with the planner
/// settings every batch needs (see `read_all`).
///
/// Transaction control and settings, not a query: it runs as given (the
/// checked macros describe single statements with results).
/// `force_custom_plan` makes the server plan the batch statement for each
/// execution's values even though the statement is prepared once per
/// connection. READ COMMITTED is spelled out because a server whose default
/// is REPEATABLE READ would take the transaction's one snapshot at its first
/// statement, before the read horizon was known.
const ORDERED_READ: &str = "BEGIN ISOLATION LEVEL READ COMMITTED READ ONLY; \
     SET LOCAL enable_sort = off; SET LOCAL enable_bitmapscan = off; \
     SET LOCAL plan_cache_mode = force_custom_plan";

/// The rest of a batch's opening text when the batch computes its own read
/// horizon ([`StoreConfig::horizon_max_age`](crate::StoreConfig) zero): in a
/// statement of its own, before the batch statement, into the
/// transaction-local setting `keel.read_horizon` the batch statement reads.
/// That order is what makes the read gap-safe: the batch statement takes its
/// snapshot after the horizon was computed, so every transaction that had
/// ended when `keel.commit_horizon()` looked at the lock table is visible to
/// it. An unknown horizon (NULL, a writer publishing its key at that very
/// moment) reads as 0: nothing new this time.
const OWN_HORIZON: &str =
    "; SELECT set_config('keel.read_horizon', coalesce(keel.commit_horizon(), 0)::text, true)";

/// The opening text of one batch: [`ORDERED_READ`], then its horizon,
/// computed in the batch's own transaction (`None`) or a shared one the
/// server computed before this text is sent (a number, so the same
/// ordering holds).
fn opening(shared: Option<Option<i64>>) -> std::borrow::Cow<'static, str> {
    match shared {
        None => format!("{ORDERED_READ}{OWN_HORIZON}").into(),
        Some(horizon) => format!(
            "{ORDERED_READ}; SET LOCAL keel.read_horizon = {}",
            horizon.unwrap_or(0)
        )
        .into(),
    }
}

/// Runs transaction-control text (no result to describe) on a read's
/// connection.
/// Text without parameters goes out as one simple query, several
/// statements included.
async fn control(conn: &mut sqlx::PgConnection, sql: &str) -> Result<()> {
    sqlx::Executor::execute(conn, sql).await?;
    Ok(())
}

fn horizon_warning_due() -> bool {
    static LAST: Mutex<Option<std::time::Instant>> = Mutex::new(None);
    let mut last = LAST
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let due = last.is_none_or(|t| t.elapsed() >= Duration::from_secs(60));
    if due {
        *last = Some(std::time::Instant::now());
    }
    due
}

impl GlobalLog for PostgresEventStore {
    fn read_all(&self, options: ReadAll) -> EventStream<'_> {
        let batch = i64::from(options.page(&self.config));
        Box::pin(async_stream::try_stream! {
            let mut after = (clamp(options.after.commit), clamp(options.after.sequence));
            let mut remaining = options.limit.map_or(i64::MAX, clamp);
            let mut settled = false;
            // The first batch wants a horizon computed since this read began
            // (a reader woken by an append's notification must not start
            // from one computed before that append); readers woken together
            // still share it. Later batches of the same read may reuse one
            // up to `horizon_max_age` old.
            let mut fresh_since = Some(std::time::Instant::now());
            while remaining > 0 {
                let take = remaining.min(batch);
                // Each batch must be an ordered index scan that stops at the
                // limit. Left to itself the planner has been seen choosing a
                // bitmap scan of the whole rest of the log plus a sort (on
                // disk) for every batch, whenever its row estimate was off: a
                // cached generic plan cannot see which filters are unused, and
                // a freshly filled table has no statistics. So each batch runs
                // in a short read-only transaction that rules sorts and bitmap
                // scans out, with a plan made for the actual values.
                //
                // A read dropped anywhere in here (a stopping subscription, an
                // aborted task, a caller's timeout) gives the connection back
                // inside this transaction, possibly with its `BEGIN` still
                // unanswered. The pool's release check (keel-database's
                // `close_unclean_connections`) closes such a connection
                // rather than handing it to the next append.
                //
                // The horizon first (shared by this store's readers, never
                // newer than a fresh one), then the connection: the batch
                // statement's snapshot comes after the horizon either way.
                let shared = if self.config.horizon_max_age.is_zero() {
                    self.horizon.count_scan();
                    None
                } else if let Some(since) = fresh_since.take() {
                    Some(self.horizon.at_least_since(&self.pool, since).await?)
                } else {
                    Some(self.horizon.within(&self.pool, self.config.horizon_max_age).await?)
                };
                let mut conn = self.pool.acquire().await?;
                control(&mut conn, &opening(shared)).await?;
                let mut rows = sqlx::query_as!(
                    LogRow,
                    r#"SELECT commit, position, event_id, stream_id, version, event_type,
                              schema_version, payload::text AS "payload!",
                              metadata::text AS "metadata!", recorded_at
                       FROM keel.events
                       WHERE (commit, position) > ($1, $2) AND commit < current_setting('keel.read_horizon', true)::int8
                         AND ($3::text IS NULL OR stream_id = $3
                              OR starts_with(stream_id, $3 || '-'))
                         AND ($4::text IS NULL OR starts_with(stream_id, $4))
                         AND ($5::text[] IS NULL OR event_type = ANY ($5))
                       ORDER BY commit, position LIMIT $6"#,
                    after.0,
                    after.1,
                    options.category.as_deref(),
                    options.stream_prefix.as_deref(),
                    options.event_types.as_deref(),
                    take,
                )
                .fetch(&mut *conn);
                let mut n = 0i64;
                while let Some(row) = rows.try_next().await? {
                    n += 1;
                    let e = row.into_event()?;
                    after = (e.position.commit as i64, e.position.sequence as i64);
                    yield e;
                }
                drop(rows);
                control(&mut conn, "COMMIT").await?;
                drop(conn);
                remaining -= n;
                if n < take {
                    if settled {
                        break;
                    }
                    // Events committed before now may still sit above the
                    // horizon because some transaction that started earlier
                    // is running. Wait (briefly) for the horizon to pass them
                    // so a reader sees its own writes; never chase later ones.
                    settled = true;
                    if !self.settle(after.0).await? {
                        break;
                    }
                }
            }
        })
    }
}

impl PostgresEventStore {
    /// Waits until every event committed so far is below the read horizon,
    /// so that one more read returns them all. `read_to` is the commit key
    /// the reader has reached. Returns whether another read is needed.
    async fn settle(&self, read_to: i64) -> Result<bool> {
        // Two statements, in this order: the horizon must be computed after
        // the snapshot that finds the target, or a key published after that
        // snapshot could be missed in the comparison (it would only make a
        // reader stop early, never skip, but it costs nothing to avoid).
        let target = sqlx::query_scalar!("SELECT max(commit) FROM keel.events")
            .fetch_one(&self.pool)
            .await?;
        // Nothing stored beyond what was read: the reader is complete (its
        // last row's transaction was below its horizon, and so is all else).
        let Some(target) = target.filter(|&t| t > read_to) else {
            return Ok(false);
        };
        let deadline = tokio::time::Instant::now() + self.config.settle_timeout;
        let mut pause = Duration::from_millis(1);
        loop {
            // Computed after the target was found (and after the last try):
            // a shared one only if its query was sent since then. Readers
            // settling together share one computation; the value also
            // serves their next batch.
            let horizon = if self.config.horizon_max_age.is_zero() {
                self.horizon.count_scan();
                sqlx::query_scalar!("SELECT keel.commit_horizon()")
                    .fetch_one(&self.pool)
                    .await?
            } else {
                self.horizon
                    .at_least_since(&self.pool, std::time::Instant::now())
                    .await?
            };
            // The horizon may have passed the target since the last read.
            if horizon.is_some_and(|h| h > target) {
                return Ok(true);
            }
            if tokio::time::Instant::now() >= deadline {
                // Every caught-up reader hits this while the transaction
                // lasts: warn once a minute, not once per poll.
                if horizon_warning_due() {
                    let holder = self.read_horizon().await.ok().and_then(|h| h.held_by);
                    tracing::warn!(
                        waited = ?self.config.settle_timeout,
                        holder_pid = holder.as_ref().map(|h| h.pid),
                        holder_commit = holder.as_ref().map(|h| h.first_commit),
                        holder_open_for = ?holder.as_ref().and_then(|h| h.open_for),
                        "an open transaction that appended events holds back the event log's \
                         read horizon; events stored after its first append stay unread until \
                         it ends"
                    );
                } else {
                    tracing::debug!("the read horizon is still held back");
                }
                return Ok(false);
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }

    /// The read horizon of the global log now, and what holds it back.
    ///
    /// Every event whose commit key is below [`ReadHorizon::horizon`] is
    /// final: a reader of the global log sees it, and nothing can be stored
    /// below it any more. Only transactions of this database that have
    /// appended events and are still open hold the horizon back (from their
    /// first append on); transactions that never appended, here or in any
    /// other database of the cluster, do not.
    ///
    /// Meant for health checks and metrics: a [`HorizonHolder`] open for
    /// long means readers (subscriptions, projections, relays) are waiting
    /// for it.
    ///
    /// ```no_run
    /// # async fn demo(store: keel_eventstore::PostgresEventStore) -> keel_eventstore::Result<()> {
    /// let horizon = store.read_horizon().await?;
    /// if let Some(holder) = horizon.held_by {
    ///     println!("backend {} holds the log back since {:?}", holder.pid, holder.open_for);
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// Fails when the database cannot be reached.
    pub async fn read_horizon(&self) -> Result<ReadHorizon> {
        let row = sqlx::query!(
            r#"SELECT horizon, last_commit AS "last_commit!", holder_pid, holder_commit,
                      holder_age_seconds
               FROM keel.commit_horizon_status()"#
        )
        .fetch_one(&self.pool)
        .await?;
        let held_by = match (row.holder_pid, row.holder_commit) {
            (Some(pid), Some(first_commit)) => Some(HorizonHolder {
                pid,
                first_commit: to_u64(first_commit, "commit")?,
                open_for: row
                    .holder_age_seconds
                    .filter(|s| s.is_finite() && *s >= 0.0)
                    .map(Duration::from_secs_f64),
            }),
            _ => None,
        };
        Ok(ReadHorizon {
            horizon: row.horizon.map(|h| to_u64(h, "horizon")).transpose()?,
            last_commit: to_u64(row.last_commit, "commit")?,
            held_by,
        })
    }
}

/// The global log's read horizon at one moment (see
/// [`PostgresEventStore::read_horizon`]).
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct ReadHorizon {
    /// Every event with a commit key below this is final and readable.
    /// `None` when a writer was publishing its first key at that very
    /// instant (a window of microseconds): ask again.
    pub horizon: Option<u64>,
    /// The last commit key handed out to an append.
    pub last_commit: u64,
    /// The open appending transaction with the lowest first key, if any.
    pub held_by: Option<HorizonHolder>,
}

impl ReadHorizon {
    /// How many commit keys were handed out at or above the horizon: 0 when
    /// nothing holds readers back (`None` when the horizon is unknown).
    #[must_use]
    pub fn held_keys(&self) -> Option<u64> {
        self.horizon
            .map(|h| (self.last_commit + 1).saturating_sub(h))
    }
}

/// An open transaction that appended events and so holds the read horizon
/// at its first commit key.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct HorizonHolder {
    /// The backend process id (`pg_stat_activity.pid`); 0 for a prepared
    /// (two-phase) transaction, which has no backend.
    pub pid: i32,
    /// The commit key of its first append: readers wait at it.
    pub first_commit: u64,
    /// How long its transaction has been open (`None` when unknown, e.g. a
    /// prepared transaction).
    pub open_for: Option<Duration>,
}
