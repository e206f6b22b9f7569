//! The crate's error type and the classification of `sqlx` errors.
//!
//! Every PostgreSQL failure is classified by its SQLSTATE code (and, for
//! constraint violations, the constraint name), never by message text. The
//! predicates ([`is_unique_violation`], [`is_serialization_failure`],
//! [`is_connection_error`], …) and [`to_keel`] are meant for the other Keel
//! crates that talk to PostgreSQL through `sqlx` directly.
//!
//! No variant ever carries the connection URL or the password: the
//! configuration keeps the password to itself, and the connect-time variants
//! name the host, port, user or database instead.

use std::borrow::Cow;
use std::time::Duration;

mod classify;
mod predicates;
#[cfg(test)]
mod tests;

pub use classify::to_keel;
pub use predicates::{
    chain_has_transaction_conflict, constraint_of, is_connection_error, is_deadlock,
    is_lock_timeout, is_pool_timeout, is_retryable, is_serialization_failure, is_statement_timeout,
    is_transaction_conflict, is_unique_violation, sqlstate_of,
};

/// `Result` with [`DatabaseError`] as the default error type.
pub type Result<T, E = DatabaseError> = std::result::Result<T, E>;

/// The dependency name used in [`keel_core::Error::Unavailable`].
pub const SERVICE: &str = "postgres";

/// SQLSTATE codes Keel reacts to, from the PostgreSQL manual's appendix A.
pub mod sqlstate {
    /// `unique_violation`.
    pub const UNIQUE_VIOLATION: &str = "23505";
    /// `foreign_key_violation`.
    pub const FOREIGN_KEY_VIOLATION: &str = "23503";
    /// `not_null_violation`.
    pub const NOT_NULL_VIOLATION: &str = "23502";
    /// `check_violation`.
    pub const CHECK_VIOLATION: &str = "23514";
    /// `exclusion_violation`.
    pub const EXCLUSION_VIOLATION: &str = "23P01";
    /// `serialization_failure`.
    pub const SERIALIZATION_FAILURE: &str = "40001";
    /// `deadlock_detected`.
    pub const DEADLOCK_DETECTED: &str = "40P01";
    /// `query_canceled`: raised by `statement_timeout` and by cancel requests.
    pub const QUERY_CANCELED: &str = "57014";
    /// `lock_not_available`: raised by `lock_timeout` and `NOWAIT`.
    pub const LOCK_NOT_AVAILABLE: &str = "55P03";
    /// `idle_in_transaction_session_timeout`.
    pub const IDLE_IN_TRANSACTION_TIMEOUT: &str = "25P03";
    /// `admin_shutdown`: the server is shutting down or the backend was
    /// terminated.
    pub const ADMIN_SHUTDOWN: &str = "57P01";
    /// `crash_shutdown`.
    pub const CRASH_SHUTDOWN: &str = "57P02";
    /// `cannot_connect_now`: the server is starting up or shutting down.
    pub const CANNOT_CONNECT_NOW: &str = "57P03";
    /// `too_many_connections`.
    pub const TOO_MANY_CONNECTIONS: &str = "53300";
    /// `invalid_password`.
    pub const INVALID_PASSWORD: &str = "28P01";
    /// `invalid_authorization_specification` (e.g. no `pg_hba.conf` entry).
    pub const INVALID_AUTHORIZATION: &str = "28000";
    /// `invalid_catalog_name`: the database does not exist.
    pub const INVALID_CATALOG_NAME: &str = "3D000";
    /// `read_only_sql_transaction`: a write on a standby or in a read-only
    /// transaction.
    pub const READ_ONLY_TRANSACTION: &str = "25006";
    /// `in_failed_sql_transaction`: a statement in a transaction that an
    /// earlier error aborted.
    pub const IN_FAILED_TRANSACTION: &str = "25P02";
}

/// The kind of a violated integrity constraint other than a unique key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
#[non_exhaustive]
pub enum ConstraintKind {
    /// A foreign key points at a row that does not exist (`23503`).
    ForeignKey,
    /// A `NOT NULL` column received no value (`23502`).
    NotNull,
    /// A `CHECK` constraint refused the row (`23514`).
    Check,
    /// An exclusion constraint found an overlapping row (`23P01`).
    Exclusion,
}

impl ConstraintKind {
    /// A stable lower-case name, e.g. `foreign_key`.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            ConstraintKind::ForeignKey => "foreign_key",
            ConstraintKind::NotNull => "not_null",
            ConstraintKind::Check => "check",
            ConstraintKind::Exclusion => "exclusion",
        }
    }
}

impl std::fmt::Display for ConstraintKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What went wrong talking to PostgreSQL.
///
/// Build one from a `sqlx::Error` with `DatabaseError::from`, which
/// classifies it; convert it into Keel's shared [`keel_core::Error`] with
/// `keel_core::Error::from` (or use [`to_keel`] directly).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DatabaseError {
    /// A configuration value is missing, malformed or out of range.
    #[error("invalid database configuration: {setting}: {reason}")]
    Config {
        /// The setting, e.g. `DATABASE_URL` or `max_connections`.
        setting: Cow<'static, str>,
        /// What is wrong with it (never the value of a secret).
        reason: String,
    },

    /// The server could not be reached (refused, unknown host, no route).
    #[error("cannot reach PostgreSQL at {host}:{port}")]
    Unreachable {
        /// The host name or socket directory.
        host: String,
        /// The port.
        port: u16,
        /// The underlying error (an I/O error).
        #[source]
        source: sqlx::Error,
    },

    /// Establishing a connection took longer than the connect timeout.
    #[error("connecting to PostgreSQL at {host}:{port} timed out after {after:?}")]
    ConnectTimeout {
        /// The host name or socket directory.
        host: String,
        /// The port.
        port: u16,
        /// The connect timeout.
        after: Duration,
    },

    /// The server refused the credentials (`28P01`, `28000`). Retrying will
    /// not help: the user name, password or `pg_hba.conf` must change.
    #[error(
        "PostgreSQL refused to authenticate {} (SQLSTATE {code}); check the user name and password",
        user.as_deref().map_or_else(|| "the user".to_owned(), |u| format!("user \"{u}\""))
    )]
    AuthenticationFailed {
        /// The user name that was refused, when known.
        user: Option<String>,
        /// The SQLSTATE code the server returned.
        code: String,
        /// The server's error.
        #[source]
        source: sqlx::Error,
    },

    /// The database named in the configuration does not exist (`3D000`).
    #[error("database \"{database}\" does not exist on the server")]
    DatabaseNotFound {
        /// The database name.
        database: String,
        /// The server's error.
        #[source]
        source: sqlx::Error,
    },

    /// TLS negotiation failed (the server does not offer TLS, or its
    /// certificate was not accepted).
    #[error("TLS negotiation with PostgreSQL failed")]
    Tls {
        /// The underlying error.
        #[source]
        source: sqlx::Error,
    },

    /// The connection died or the server is not accepting work (I/O error,
    /// SQLSTATE class `08`, server shutting down `57P01`–`57P03`, too many
    /// connections `53300`). The outcome of an in-flight statement is
    /// unknown; retrying later may succeed.
    #[error("connection to PostgreSQL lost or refused")]
    ConnectionLost {
        /// The underlying error.
        #[source]
        source: sqlx::Error,
    },

    /// No pooled connection became available in time.
    #[error("no database connection became available within {}", fmt_after(*after))]
    AcquireTimeout {
        /// The acquire timeout, when known.
        after: Option<Duration>,
    },

    /// The pool was closed by [`Database::close`](crate::Database::close).
    #[error("the database pool is closed")]
    PoolClosed,

    /// The server cancelled a statement (`57014`): `statement_timeout`
    /// expired or someone sent a cancel request.
    #[error("statement cancelled by the server after {}", fmt_after(*after))]
    StatementTimeout {
        /// The configured statement timeout, when known.
        after: Option<Duration>,
        /// The server's error.
        #[source]
        source: sqlx::Error,
    },

    /// A lock could not be taken in time (`55P03`, `lock_timeout` or
    /// `NOWAIT`).
    #[error("lock not available")]
    LockTimeout {
        /// The server's error.
        #[source]
        source: sqlx::Error,
    },

    /// A serializable transaction could not be serialized (`40001`). The
    /// whole transaction must be run again.
    #[error("transaction aborted by a serialization failure; run it again")]
    SerializationFailure {
        /// The server's error.
        #[source]
        source: sqlx::Error,
    },

    /// The transaction was chosen as a deadlock victim (`40P01`). The whole
    /// transaction must be run again.
    #[error("transaction aborted to resolve a deadlock; run it again")]
    Deadlock {
        /// The server's error.
        #[source]
        source: sqlx::Error,
    },

    /// The transaction was aborted by an earlier statement's error (which
    /// the caller did not propagate) and can only be rolled back (`25P02`).
    /// [`UnitOfWork::commit`](crate::UnitOfWork::commit) reports this instead
    /// of letting PostgreSQL turn the `COMMIT` into a silent `ROLLBACK`.
    #[error("the transaction was aborted by an earlier error; nothing was committed")]
    TransactionAborted {
        /// The server's error.
        #[source]
        source: sqlx::Error,
    },

    /// A unique or primary-key constraint refused the row (`23505`).
    #[error("duplicate key: unique constraint {} violated", constraint.as_deref().unwrap_or("(unnamed)"))]
    UniqueViolation {
        /// The constraint (or unique index) name.
        constraint: Option<String>,
        /// The table, when the server names it.
        table: Option<String>,
        /// The server's error.
        #[source]
        source: sqlx::Error,
    },

    /// Another integrity constraint refused the row.
    #[error("{kind} constraint {} violated", constraint.as_deref().or(column.as_deref()).unwrap_or("(unnamed)"))]
    ConstraintViolation {
        /// Which kind of constraint.
        kind: ConstraintKind,
        /// The constraint name, when the server names it.
        constraint: Option<String>,
        /// The table, when the server names it.
        table: Option<String>,
        /// The column, for `NOT NULL` violations.
        column: Option<String>,
        /// The server's error.
        #[source]
        source: sqlx::Error,
    },

    /// A value was refused by the server (SQLSTATE class `22`: out of range,
    /// too long, malformed text representation, …).
    #[error("invalid data (SQLSTATE {code}): {message}")]
    InvalidData {
        /// The SQLSTATE code.
        code: String,
        /// The server's primary message.
        message: String,
        /// The server's error.
        #[source]
        source: sqlx::Error,
    },

    /// The query expected a row and found none.
    #[error("no row returned where one was expected")]
    RowNotFound,

    /// Applying Keel's migrations failed: a statement of a migration (named,
    /// with the server's message), a changed applied migration, or the
    /// migration history. See [`MigrateError`](crate::MigrateError).
    #[error(transparent)]
    Migration(Box<crate::MigrateError>),

    /// Any other failure: an SQL error, a decoding error, a protocol error.
    #[error("{}", describe_other(.0))]
    Query(#[source] sqlx::Error),
}

fn fmt_after(after: Option<Duration>) -> String {
    match after {
        Some(d) => format!("{d:?}"),
        None => "the configured timeout".to_owned(),
    }
}

fn describe_other(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Database(db) => match db.code() {
            Some(code) => format!("database error {code}: {}", db.message()),
            None => format!("database error: {}", db.message()),
        },
        sqlx::Error::Configuration(_) => "invalid connection options".to_owned(),
        sqlx::Error::ColumnDecode { index, .. } => format!("cannot decode column {index}"),
        sqlx::Error::ColumnNotFound(c) => format!("no column named {c}"),
        sqlx::Error::Decode(_) => "cannot decode a value".to_owned(),
        sqlx::Error::Encode(_) => "cannot encode a value".to_owned(),
        sqlx::Error::TypeNotFound { type_name } => format!("type {type_name} not found"),
        sqlx::Error::Protocol(_) => "unexpected data from the database server".to_owned(),
        _ => "database operation failed".to_owned(),
    }
}

impl DatabaseError {
    /// The SQLSTATE code, when the server reported one.
    #[must_use]
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            DatabaseError::AuthenticationFailed { code, .. }
            | DatabaseError::InvalidData { code, .. } => Some(code),
            _ => self.sqlx_source().and_then(sqlstate_of),
        }
    }

    /// The violated constraint's name, for constraint violations.
    #[must_use]
    pub fn constraint(&self) -> Option<&str> {
        match self {
            DatabaseError::UniqueViolation { constraint, .. }
            | DatabaseError::ConstraintViolation { constraint, .. } => constraint.as_deref(),
            _ => None,
        }
    }

    /// Whether this is a unique violation, optionally of one named
    /// constraint.
    #[must_use]
    pub fn is_unique_violation(&self, constraint: Option<&str>) -> bool {
        match self {
            DatabaseError::UniqueViolation { constraint: c, .. } => {
                constraint.is_none() || c.as_deref() == constraint
            }
            _ => false,
        }
    }

    /// Whether the transaction was aborted by a serialization failure or a
    /// deadlock, so that running the whole transaction again may succeed.
    #[must_use]
    pub fn is_transaction_conflict(&self) -> bool {
        matches!(
            self,
            DatabaseError::SerializationFailure { .. } | DatabaseError::Deadlock { .. }
        )
    }

    /// Whether the connection failed or the server is unreachable or
    /// shutting down.
    #[must_use]
    pub fn is_connection_error(&self) -> bool {
        matches!(
            self,
            DatabaseError::Unreachable { .. }
                | DatabaseError::ConnectTimeout { .. }
                | DatabaseError::ConnectionLost { .. }
                | DatabaseError::Tls { .. }
                | DatabaseError::PoolClosed
        )
    }

    /// Whether repeating the operation (or, for transaction conflicts, the
    /// whole transaction) may succeed.
    #[must_use]
    pub fn is_retryable(&self) -> bool {
        self.is_connection_error()
            || self.is_transaction_conflict()
            || matches!(
                self,
                DatabaseError::AcquireTimeout { .. }
                    | DatabaseError::StatementTimeout { .. }
                    | DatabaseError::LockTimeout { .. }
            )
    }

    /// Fills in timeouts that a bare `sqlx::Error` does not know about.
    pub(crate) fn with_timeouts(
        mut self,
        acquire: Option<Duration>,
        statement: Option<Duration>,
    ) -> Self {
        match &mut self {
            DatabaseError::AcquireTimeout { after } if after.is_none() => *after = acquire,
            DatabaseError::StatementTimeout { after, .. } if after.is_none() => *after = statement,
            _ => {}
        }
        self
    }

    /// Classifies an error raised while opening a connection, naming the
    /// host, port, user or database it concerns.
    pub(crate) fn from_connect(e: sqlx::Error, opts: &sqlx::postgres::PgConnectOptions) -> Self {
        let host = || match opts.get_socket() {
            Some(dir) => dir.display().to_string(),
            None => opts.get_host().to_owned(),
        };
        match sqlstate_of(&e) {
            Some(code @ (sqlstate::INVALID_PASSWORD | sqlstate::INVALID_AUTHORIZATION)) => {
                return DatabaseError::AuthenticationFailed {
                    user: Some(opts.get_username().to_owned()),
                    code: code.to_owned(),
                    source: e,
                };
            }
            Some(sqlstate::INVALID_CATALOG_NAME) => {
                return DatabaseError::DatabaseNotFound {
                    database: opts
                        .get_database()
                        .unwrap_or(opts.get_username())
                        .to_owned(),
                    source: e,
                };
            }
            _ => {}
        }
        match e {
            sqlx::Error::Io(ref io) if is_tls_io_error(io) => DatabaseError::Tls { source: e },
            sqlx::Error::Io(_) => DatabaseError::Unreachable {
                host: host(),
                port: opts.get_port(),
                source: e,
            },
            other => DatabaseError::from(other),
        }
    }

    fn sqlx_source(&self) -> Option<&sqlx::Error> {
        match self {
            DatabaseError::Unreachable { source, .. }
            | DatabaseError::AuthenticationFailed { source, .. }
            | DatabaseError::DatabaseNotFound { source, .. }
            | DatabaseError::Tls { source }
            | DatabaseError::ConnectionLost { source }
            | DatabaseError::StatementTimeout { source, .. }
            | DatabaseError::LockTimeout { source }
            | DatabaseError::SerializationFailure { source }
            | DatabaseError::Deadlock { source }
            | DatabaseError::TransactionAborted { source }
            | DatabaseError::UniqueViolation { source, .. }
            | DatabaseError::ConstraintViolation { source, .. }
            | DatabaseError::InvalidData { source, .. }
            | DatabaseError::Query(source) => Some(source),
            _ => None,
        }
    }
}

/// sqlx reports failures inside the TLS handshake (an untrusted or
/// mismatched certificate) as I/O errors wrapping the rustls error.
fn is_tls_io_error(e: &std::io::Error) -> bool {
    e.get_ref()
        .is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some())
}

fn is_connection_sqlstate(code: &str) -> bool {
    code.starts_with("08")
        || matches!(
            code,
            sqlstate::ADMIN_SHUTDOWN
                | sqlstate::CRASH_SHUTDOWN
                | sqlstate::CANNOT_CONNECT_NOW
                | sqlstate::TOO_MANY_CONNECTIONS
                | sqlstate::IDLE_IN_TRANSACTION_TIMEOUT
        )
}
