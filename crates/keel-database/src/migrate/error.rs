//! What can go wrong applying migrations.

use std::fmt;

/// Which migration an error is about: its component (the crate that owns
/// it, e.g. `keel-eventstore`), version and description.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MigrationId {
    /// The component (set) the migration belongs to.
    pub component: String,
    /// The migration's version (the number its file name starts with).
    pub version: i64,
    /// The migration's description (the rest of its file name).
    pub description: String,
}

impl fmt::Display for MigrationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} migration {} ({})",
            self.component, self.version, self.description
        )
    }
}

/// Why applying Keel's migrations failed.
///
/// Carried by [`DatabaseError::Migration`](crate::DatabaseError::Migration);
/// [`migrate`](fn@crate::migrate) and [`Database::migrate`](crate::Database::migrate)
/// return it inside that variant (connection failures are reported as the
/// usual connection variants instead).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MigrateError {
    /// A statement of a migration failed. The migration's transaction was
    /// rolled back: nothing of it is applied (unless the migration opted out
    /// of the transaction with `-- no-transaction`).
    #[error(
        "{migration} failed at line {line}: {message} (SQLSTATE {code})\n  statement: {statement}"
    )]
    Failed {
        /// The failed migration.
        migration: MigrationId,
        /// The 1-based line of the migration file where the failing
        /// statement starts (or where the server pointed).
        line: usize,
        /// The failing statement, shortened to a few hundred characters.
        statement: String,
        /// The server's SQLSTATE code (empty when it gave none).
        code: String,
        /// The server's message.
        message: String,
        /// The server's error.
        #[source]
        source: sqlx::Error,
    },

    /// An applied migration's SQL changed since it was applied (its checksum
    /// differs from the one recorded). Restore the file; change the schema
    /// with a new migration instead.
    #[error(
        "{migration} was changed after it was applied (checksum differs from the recorded one)"
    )]
    ChecksumMismatch {
        /// The changed migration.
        migration: MigrationId,
    },

    /// Two sets passed to one call share a component name but not their
    /// migrations, or a component name is empty or malformed.
    #[error("invalid migration set {component:?}: {reason}")]
    InvalidSet {
        /// The component name (truncated).
        component: String,
        /// What is wrong.
        reason: &'static str,
    },

    /// Reading or writing the migration history failed (the history table
    /// `keel.schema_history`, the carry-over from `_sqlx_migrations`, the
    /// advisory lock).
    #[error("migration history: {what}")]
    History {
        /// What was being done.
        what: &'static str,
        /// The server's error.
        #[source]
        source: sqlx::Error,
    },
}

impl MigrateError {
    /// The migration the error is about, if it is about one.
    #[must_use]
    pub fn migration(&self) -> Option<&MigrationId> {
        match self {
            MigrateError::Failed { migration, .. }
            | MigrateError::ChecksumMismatch { migration } => Some(migration),
            _ => None,
        }
    }
}

/// At most `max` characters of `text`, newlines kept (a statement reads
/// better on several lines), with `…` when shortened.
pub(crate) fn shorten(text: &str, max: usize) -> String {
    let text = text.trim();
    match text.char_indices().nth(max) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}
