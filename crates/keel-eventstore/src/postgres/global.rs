//! The global log, read in gap-safe order.

use std::sync::Mutex;
use std::time::Duration;

use futures::TryStreamExt;
use sqlx::Postgres;
use sqlx::pool::PoolConnection;

use super::{LogRow, PostgresEventStore, clamp};
use crate::error::Result;
use crate::event::ReadAll;
use crate::store::{EventStream, GlobalLog};

/// Opens the transaction a global-log batch is read in (see `read_all`).
///
/// Transaction control and settings, not a query: it runs as given (the
/// checked macros describe single statements with results).
/// `force_custom_plan` makes the server plan the batch statement for each
/// execution's values even though the statement is prepared once per
/// connection.
const ORDERED_READ: &str = "BEGIN READ ONLY; SET LOCAL enable_sort = off; \
     SET LOCAL enable_bitmapscan = off; SET LOCAL plan_cache_mode = force_custom_plan";

/// The connection a global-read batch runs its transaction on.
///
/// The transaction is opened and committed here rather than with sqlx's
/// `Transaction`: sqlx counts a transaction as open only once the server has
/// answered its `BEGIN`, so a read cancelled while waiting for that answer
/// (a stopping subscription or projection, an aborted task, a caller's
/// timeout) would hand the connection back to the pool inside the
/// read-only transaction, and the next append on it would fail. A lease
/// dropped before its `COMMIT` completed closes the connection instead.
struct ReadLease {
    conn: PoolConnection<Postgres>,
    finished: bool,
}

impl Drop for ReadLease {
    fn drop(&mut self) {
        if !self.finished {
            self.conn.close_on_drop();
        }
    }
}

/// Runs transaction-control text (no result to describe) on a read's
/// connection.
/// Text without parameters goes out as one simple query, several
/// statements included.
async fn control(conn: &mut sqlx::PgConnection, sql: &'static str) -> Result<()> {
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
                let mut lease = ReadLease {
                    conn: self.pool.acquire().await?,
                    finished: false,
                };
                control(&mut lease.conn, ORDERED_READ).await?;
                let mut rows = sqlx::query_as!(
                    LogRow,
                    r#"SELECT commit, position, event_id, stream_id, version, event_type,
                              schema_version, payload::text AS "payload!",
                              metadata::text AS "metadata!", recorded_at
                       FROM keel.events
                       WHERE (commit, position) > ($1, $2) AND commit < keel.commit_horizon()
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
                .fetch(&mut *lease.conn);
                let mut n = 0i64;
                while let Some(row) = rows.try_next().await? {
                    n += 1;
                    let e = row.into_event()?;
                    after = (e.position.commit as i64, e.position.sequence as i64);
                    yield e;
                }
                drop(rows);
                control(&mut lease.conn, "COMMIT").await?;
                lease.finished = true;
                drop(lease);
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
        let ends = sqlx::query!(
            r#"SELECT max(commit) AS target, keel.commit_horizon() AS "horizon!"
               FROM keel.events"#
        )
        .fetch_one(&self.pool)
        .await?;
        let (target, horizon) = (ends.target, ends.horizon);
        // Nothing stored beyond what was read: the reader is complete (its
        // last row's transaction was below its horizon, and so is all else).
        let Some(target) = target.filter(|&t| t > read_to) else {
            return Ok(false);
        };
        // The horizon may have passed the target since the last read.
        if target < horizon {
            return Ok(true);
        }
        let deadline = tokio::time::Instant::now() + self.config.settle_timeout;
        let mut pause = Duration::from_millis(1);
        loop {
            tokio::time::sleep(pause).await;
            let horizon = sqlx::query_scalar!(r#"SELECT keel.commit_horizon() AS "horizon!""#)
                .fetch_one(&self.pool)
                .await?;
            if horizon > target {
                return Ok(true);
            }
            if tokio::time::Instant::now() >= deadline {
                // Every caught-up reader hits this while the transaction
                // lasts: warn once a minute, not once per poll.
                if horizon_warning_due() {
                    tracing::warn!(
                        waited = ?self.config.settle_timeout,
                        "a long-running transaction holds back the event log's read horizon; \
                         events committed after it started stay unread until it ends"
                    );
                } else {
                    tracing::debug!("the read horizon is still held back");
                }
                return Ok(false);
            }
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }
}
