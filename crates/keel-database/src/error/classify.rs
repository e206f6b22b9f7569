//! How a `sqlx` error becomes a [`DatabaseError`], and a [`DatabaseError`]
//! Keel's shared error.

use std::borrow::Cow;

use super::{
    ConstraintKind, DatabaseError, SERVICE, is_connection_sqlstate, is_tls_io_error, sqlstate,
};

impl From<sqlx::Error> for DatabaseError {
    fn from(e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::Io(ref io) if is_tls_io_error(io) => DatabaseError::Tls { source: e },
            sqlx::Error::Io(_) | sqlx::Error::WorkerCrashed => {
                DatabaseError::ConnectionLost { source: e }
            }
            sqlx::Error::Tls(_) => DatabaseError::Tls { source: e },
            sqlx::Error::PoolTimedOut => DatabaseError::AcquireTimeout { after: None },
            sqlx::Error::PoolClosed => DatabaseError::PoolClosed,
            sqlx::Error::RowNotFound => DatabaseError::RowNotFound,
            sqlx::Error::Configuration(ref inner) => DatabaseError::Config {
                setting: Cow::Borrowed("connection options"),
                reason: inner.to_string(),
            },
            sqlx::Error::Database(_) => classify_database(e),
            other => DatabaseError::Query(other),
        }
    }
}

fn classify_database(e: sqlx::Error) -> DatabaseError {
    let Some(db) = e.as_database_error() else {
        return DatabaseError::Query(e);
    };
    let code = db.code().map(Cow::into_owned).unwrap_or_default();
    let constraint = db.constraint().map(str::to_owned);
    let table = db.table().map(str::to_owned);
    let column = db
        .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
        .and_then(|pg| pg.column())
        .map(str::to_owned);
    let constraint_kind = match code.as_str() {
        sqlstate::FOREIGN_KEY_VIOLATION => Some(ConstraintKind::ForeignKey),
        sqlstate::NOT_NULL_VIOLATION => Some(ConstraintKind::NotNull),
        sqlstate::CHECK_VIOLATION => Some(ConstraintKind::Check),
        sqlstate::EXCLUSION_VIOLATION => Some(ConstraintKind::Exclusion),
        _ => None,
    };
    if let Some(kind) = constraint_kind {
        return DatabaseError::ConstraintViolation {
            kind,
            constraint,
            table,
            column,
            source: e,
        };
    }
    match code.as_str() {
        sqlstate::UNIQUE_VIOLATION => DatabaseError::UniqueViolation {
            constraint,
            table,
            source: e,
        },
        sqlstate::SERIALIZATION_FAILURE => DatabaseError::SerializationFailure { source: e },
        sqlstate::DEADLOCK_DETECTED => DatabaseError::Deadlock { source: e },
        sqlstate::QUERY_CANCELED => DatabaseError::StatementTimeout {
            after: None,
            source: e,
        },
        sqlstate::LOCK_NOT_AVAILABLE => DatabaseError::LockTimeout { source: e },
        sqlstate::IN_FAILED_TRANSACTION => DatabaseError::TransactionAborted { source: e },
        sqlstate::INVALID_PASSWORD | sqlstate::INVALID_AUTHORIZATION => {
            DatabaseError::AuthenticationFailed {
                user: None,
                code,
                source: e,
            }
        }
        _ if is_connection_sqlstate(&code) => DatabaseError::ConnectionLost { source: e },
        c if c.starts_with("22") => DatabaseError::InvalidData {
            message: db.message().to_owned(),
            code,
            source: e,
        },
        _ => DatabaseError::Query(e),
    }
}

impl From<DatabaseError> for keel_core::Error {
    fn from(e: DatabaseError) -> Self {
        use keel_core::{Error, InvalidInput};
        match e {
            DatabaseError::AcquireTimeout { after } => Error::Timeout {
                operation: Cow::Borrowed("postgres connection acquire"),
                after: after.unwrap_or_default(),
            },
            DatabaseError::ConnectTimeout { after, .. } => Error::Timeout {
                operation: Cow::Borrowed("postgres connect"),
                after,
            },
            DatabaseError::StatementTimeout { after, .. } => Error::Timeout {
                operation: Cow::Borrowed("postgres statement"),
                after: after.unwrap_or_default(),
            },
            DatabaseError::LockTimeout { .. } => {
                let message = e.to_string();
                Error::unavailable(SERVICE, message, e)
            }
            DatabaseError::UniqueViolation { ref constraint, .. } => Error::AlreadyExists {
                subject: match constraint {
                    Some(c) => format!("a row with the same key for {c}"),
                    None => "a row with the same key".to_owned(),
                },
            },
            DatabaseError::ConstraintViolation {
                kind,
                ref constraint,
                ref column,
                ..
            } => {
                let field = column
                    .clone()
                    .or_else(|| constraint.clone())
                    .unwrap_or_else(|| kind.as_str().to_owned());
                Error::Invalid(InvalidInput::new(field, e.to_string()))
            }
            DatabaseError::InvalidData { ref message, .. } => {
                Error::Invalid(InvalidInput::new("value", message.clone()))
            }
            DatabaseError::RowNotFound => Error::not_found("row"),
            ref err if err.is_transaction_conflict() => {
                let message = err.to_string();
                Error::transaction_conflict(message, e)
            }
            ref err if err.is_connection_error() => {
                let message = err.to_string();
                Error::unavailable(SERVICE, message, e)
            }
            other => {
                let message = other.to_string();
                Error::internal(message, other)
            }
        }
    }
}

/// Classifies a `sqlx` error and converts it into Keel's shared error.
///
/// Connection failures and pool closure become
/// [`keel_core::Error::Unavailable`] (retryable); serialization failures and
/// deadlocks become [`keel_core::Error::TransactionConflict`] (retryable as
/// a whole unit of work); acquire and
/// statement timeouts become [`keel_core::Error::Timeout`] (retryable); a
/// unique violation becomes [`keel_core::Error::AlreadyExists`]; other
/// constraint violations and refused values become
/// [`keel_core::Error::Invalid`]; everything else is
/// [`keel_core::Error::Internal`]. The original error stays reachable through
/// [`std::error::Error::source`].
///
/// A bare `sqlx::Error` does not say which timeout expired, so `Timeout`
/// carries a zero duration here; errors produced through a
/// [`Database`](crate::Database) carry the configured one.
pub fn to_keel(e: sqlx::Error) -> keel_core::Error {
    DatabaseError::from(e).into()
}
