//! Predicates over a raw `sqlx::Error`: the SQLSTATE and constraint it
//! carries and the classes of failure adapters ask about. They read the
//! same codes [`DatabaseError`] is classified by, for callers that keep
//! the `sqlx::Error`.

use std::error::Error as StdError;

use super::{DatabaseError, is_connection_sqlstate, sqlstate};

/// The SQLSTATE code of a server error.
#[must_use]
pub fn sqlstate_of(e: &sqlx::Error) -> Option<&str> {
    let db = e.as_database_error()?;
    db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
        .map(sqlx::postgres::PgDatabaseError::code)
}

/// The constraint named by a server error, if any.
#[must_use]
pub fn constraint_of(e: &sqlx::Error) -> Option<&str> {
    e.as_database_error()?.constraint()
}

/// Whether `e` is a unique violation (`23505`); with `Some(name)`, only of
/// that constraint (or unique index).
///
/// ```
/// # fn f(e: sqlx::Error) {
/// if keel_database::is_unique_violation(&e, Some("events_stream_version_key")) {
///     // someone else appended this version first
/// }
/// # }
/// ```
#[must_use]
pub fn is_unique_violation(e: &sqlx::Error, constraint: Option<&str>) -> bool {
    sqlstate_of(e) == Some(sqlstate::UNIQUE_VIOLATION)
        && (constraint.is_none() || constraint_of(e) == constraint)
}

/// Whether `e` is a serialization failure (`40001`).
#[must_use]
pub fn is_serialization_failure(e: &sqlx::Error) -> bool {
    sqlstate_of(e) == Some(sqlstate::SERIALIZATION_FAILURE)
}

/// Whether `e` is a deadlock (`40P01`).
#[must_use]
pub fn is_deadlock(e: &sqlx::Error) -> bool {
    sqlstate_of(e) == Some(sqlstate::DEADLOCK_DETECTED)
}

/// Whether `e` aborted the transaction in a way that running the whole
/// transaction again may fix: a serialization failure or a deadlock.
#[must_use]
pub fn is_transaction_conflict(e: &sqlx::Error) -> bool {
    is_serialization_failure(e) || is_deadlock(e)
}

/// Whether `e` is the server cancelling a statement (`57014`), as
/// `statement_timeout` does.
#[must_use]
pub fn is_statement_timeout(e: &sqlx::Error) -> bool {
    sqlstate_of(e) == Some(sqlstate::QUERY_CANCELED)
}

/// Whether `e` is a lock wait that gave up (`55P03`), as `lock_timeout`
/// and `NOWAIT` do.
#[must_use]
pub fn is_lock_timeout(e: &sqlx::Error) -> bool {
    sqlstate_of(e) == Some(sqlstate::LOCK_NOT_AVAILABLE)
}

/// Whether repeating the operation (for a transaction conflict, the whole
/// transaction) may succeed: the same answer as
/// [`DatabaseError::is_retryable`], without taking `e` by value. A
/// connection failure, the pool's acquire timeout, a statement or lock
/// timeout, a serialization failure or a deadlock.
#[must_use]
pub fn is_retryable(e: &sqlx::Error) -> bool {
    is_connection_error(e)
        || is_pool_timeout(e)
        || is_statement_timeout(e)
        || is_lock_timeout(e)
        || is_transaction_conflict(e)
}

/// Whether `e` means the connection failed or the server is unavailable:
/// I/O and TLS errors, a closed pool, a crashed worker, SQLSTATE class `08`,
/// a server shutting down or starting up (`57P01`, `57P02`, `57P03`), too
/// many connections (`53300`).
#[must_use]
pub fn is_connection_error(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(_) => sqlstate_of(e).is_some_and(is_connection_sqlstate),
        _ => false,
    }
}

/// Whether `e` is the pool giving up waiting for a connection.
#[must_use]
pub fn is_pool_timeout(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::PoolTimedOut)
}

/// Whether any error in `e`'s source chain (including `e` itself) is a
/// serialization failure or deadlock, as a [`DatabaseError`] or a raw
/// `sqlx::Error`. Useful to implement `TransactionError` for an
/// application's own error type.
#[must_use]
pub fn chain_has_transaction_conflict(e: &(dyn StdError + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(err) = next {
        if let Some(db) = err.downcast_ref::<DatabaseError>() {
            if db.is_transaction_conflict() {
                return true;
            }
        } else if let Some(sq) = err.downcast_ref::<sqlx::Error>()
            && is_transaction_conflict(sq)
        {
            return true;
        }
        next = err.source();
    }
    false
}
