//! The test kit's error type.

use std::path::PathBuf;

use crate::services::Service;

/// A specialised `Result` for the test kit.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why the test kit could not provide what a test asked for.
///
/// Every variant says what went wrong in words a person can act on: test
/// failures caused by a missing service should explain themselves.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No instance of a service was found and none could be started. The
    /// message lists every source that was tried and how to provide one.
    #[error("{service} is not available for tests.\nTried, in order:\n{tried}\nTo fix: {hint}")]
    ServiceUnavailable {
        /// The service that is missing.
        service: Service,
        /// One line per source that was tried, with why it did not work.
        tried: String,
        /// How to provide the service.
        hint: &'static str,
    },

    /// A local service process was started but did not become ready.
    #[error("{service} did not start: {reason} (log: {}){}", log.display(), tail_block(log_tail))]
    StartFailed {
        /// The service that failed to start.
        service: Service,
        /// What went wrong.
        reason: String,
        /// The service's log file.
        log: PathBuf,
        /// The last lines of that log.
        log_tail: String,
    },

    /// A helper program (`initdb`, `pg_ctl`, `runuser`, …) failed.
    #[error("`{command}` failed: {detail}")]
    Command {
        /// The command line that was run.
        command: String,
        /// Its exit status and output.
        detail: String,
    },

    /// A file-system or process operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What the test kit was doing.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A URL from the environment could not be parsed.
    #[error("{variable} is not a valid URL ({value:?}): {reason}")]
    InvalidUrl {
        /// The environment variable that held it.
        variable: &'static str,
        /// Its value, with any password replaced by `***`.
        value: String,
        /// What is wrong with it.
        reason: String,
    },

    /// A PostgreSQL operation of the test kit failed.
    #[error("PostgreSQL: {0}")]
    Database(#[from] sqlx::Error),

    /// Migrating the template database failed.
    #[error("migrating the template database failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),

    /// Applying a [`Schema`](crate::Schema) to a template database failed.
    #[error("migrating the template database failed: {0}")]
    Schema(#[source] crate::schema::BoxError),
}

fn tail_block(tail: &str) -> String {
    if tail.trim().is_empty() {
        String::new()
    } else {
        format!("\n--- last lines of the log ---\n{tail}")
    }
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}
