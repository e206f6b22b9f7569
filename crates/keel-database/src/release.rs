//! What happens to a connection when it goes back to the pool.
//!
//! sqlx keeps a connection that comes back from a dropped future as long as
//! it still answers a ping. That is not enough to reuse it: a future dropped
//! at the wrong moment can leave it inside a transaction that nobody will
//! ever finish. Two ways that happens with sqlx 0.8:
//!
//! * a `BEGIN` cancelled after it was sent and before its answer arrived
//!   (a caller's `tokio::time::timeout`, an aborted task, a stopping
//!   subscription): sqlx counts the transaction as open only once the server
//!   has answered, so its drop guard does not roll it back, and the server
//!   runs the `BEGIN` all the same;
//! * a transaction opened with plain SQL text (`BEGIN ...` through
//!   `execute`), whose owner was dropped before its `COMMIT`.
//!
//! The next user of such a connection then runs inside somebody else's
//! transaction: it sees that transaction's snapshot (stale results under
//! REPEATABLE READ), fails on a read-only one, or has its writes rolled back
//! when the connection is eventually closed.
//!
//! [`close_unclean_connections`] adds a check to a pool's release path that
//! asks the server itself and closes the connection unless it is idle outside
//! any transaction.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use sqlx::PgConnection;
use sqlx::postgres::PgPoolOptions;

/// The question asked on release. Sent as a simple query (text, no
/// parameters): for a simple query outside any transaction block,
/// PostgreSQL starts the implicit transaction with the statement's own start
/// time, so the two timestamps are equal. Inside a block the transaction
/// started at its `BEGIN`, at least one client round trip earlier (the driver
/// reads the `BEGIN`'s answer before it sends this statement). A transaction
/// in the failed state refuses the statement, which counts as unclean too.
/// (Not through the extended protocol: there the server stamps the
/// statement again at its Execute message, after the implicit transaction
/// began at Parse/Bind, and the timestamps differ even outside a block.)
const CLEAN: &str = "SELECT transaction_timestamp() = statement_timestamp()";

/// Whether `conn` may be reused: idle, outside any transaction block.
///
/// Runs one statement. The driver first reads whatever answers a cancelled
/// statement still owed, so the answer describes the connection as the next
/// user would find it. `Err` only when the connection itself failed.
async fn is_clean(conn: &mut PgConnection) -> Result<bool, sqlx::Error> {
    let answer = sqlx::Executor::fetch_one(&mut *conn, CLEAN)
        .await
        .and_then(|row| sqlx::Row::try_get::<bool, _>(&row, 0));
    match answer {
        Ok(clean) => Ok(clean),
        // The server answered with an error: most likely "current
        // transaction is aborted"; in any case not a state to hand on.
        Err(sqlx::Error::Database(e)) => {
            tracing::debug!(error = %e, "release check refused; closing the connection");
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// Adds Keel's release check to `options`: a connection given back to the
/// pool while still inside a transaction (or in the failed state of one, or
/// unable to answer) is closed instead of reused, and the pool opens a fresh
/// one when it needs it.
///
/// [`Database`](crate::Database) pools always have this check; call this
/// when building a `PgPool` yourself for Keel's adapters (the event store
/// and the outbox take a plain `PgPool`). It replaces an `after_release`
/// callback set earlier on `options`.
///
/// The check costs one short statement per release, run after the caller
/// has its result (sqlx's own release ping follows it).
///
/// ```no_run
/// # async fn run() -> Result<(), sqlx::Error> {
/// let pool = keel_database::close_unclean_connections(
///     sqlx::postgres::PgPoolOptions::new().max_connections(8),
/// )
/// .connect("postgres://localhost/orders")
/// .await?;
/// # let _ = pool;
/// # Ok(()) }
/// ```
#[must_use]
pub fn close_unclean_connections(options: PgPoolOptions) -> PgPoolOptions {
    with_counter(options, Arc::default())
}

/// [`close_unclean_connections`], counting the connections closed in
/// `closed`.
pub(crate) fn with_counter(options: PgPoolOptions, closed: Arc<AtomicU64>) -> PgPoolOptions {
    options.after_release(move |conn, _meta| {
        let closed = closed.clone();
        Box::pin(async move {
            let clean = is_clean(conn).await;
            if !matches!(clean, Ok(true)) {
                closed.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(
                    "a connection came back to the pool inside a transaction (or unusable); \
                     closing it"
                );
            }
            clean
        })
    })
}
