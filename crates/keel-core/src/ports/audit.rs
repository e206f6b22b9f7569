//! The audit-log port: an append-only, hash-chained record of who asked for
//! what, on which aggregate, and what came of it.
//!
//! The command pipeline's audit layer appends one [`AuditEntry`] per command
//! without the handler's involvement. Stores chain each [`AuditRecord`] to
//! the one before it by hash, so [`AuditLog::verify`] can name the first
//! record that was altered or removed after the fact.
//!
//! The record of an accepted command is written in the command's own
//! transaction, through [`AuditLog::within`], so it commits (or not)
//! together with the command's effects.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::command::AggregateRef;
use crate::error::Result;
use crate::id::{CommandId, CorrelationId};
use crate::uow::Transaction;

/// How a command ended.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
#[non_exhaustive]
pub enum AuditOutcome {
    /// The command was handled and its effects committed.
    Accepted,
    /// The command was refused: by authentication, by authorization or by a
    /// business rule. `code` is the stable error code, `reason` the message
    /// safe to show.
    Rejected {
        /// The stable error code (for example `keel.forbidden` or a domain
        /// error's code).
        code: String,
        /// Why, in words safe to store and show.
        reason: String,
    },
    /// Infrastructure failed while handling the command; nothing was
    /// committed.
    Failed {
        /// The stable error code (for example `keel.unavailable`).
        code: String,
    },
}

impl AuditOutcome {
    /// A stable lower-case name: `accepted`, `rejected` or `failed`.
    #[must_use]
    pub const fn as_str(&self) -> &'static str {
        match self {
            AuditOutcome::Accepted => "accepted",
            AuditOutcome::Rejected { .. } => "rejected",
            AuditOutcome::Failed { .. } => "failed",
        }
    }
}

/// One thing to record: the audit layer builds it from a command envelope
/// and the handler's result.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[non_exhaustive]
pub struct AuditEntry {
    /// When the command was received.
    pub occurred_at: DateTime<Utc>,
    /// The caller's subject; `None` when the caller could not be
    /// authenticated.
    pub principal: Option<String>,
    /// The tenant the caller acted for.
    pub tenant: Option<String>,
    /// The command's id. Several records may carry the same id: each
    /// attempt of a resent command is recorded (an identical retry of one
    /// entry is not; see [`AuditLog::append`]).
    pub command_id: Option<CommandId>,
    /// The command's type name.
    pub command_type: String,
    /// The types of the events the command produced (empty unless accepted).
    pub event_types: Vec<String>,
    /// The aggregate the command acted on.
    pub aggregate: Option<AggregateRef>,
    /// How it ended.
    pub outcome: AuditOutcome,
    /// The request's correlation id.
    pub correlation_id: Option<CorrelationId>,
    /// What the command chose to disclose about itself
    /// ([`Command::audit_details`](crate::command::Command::audit_details)).
    pub details: serde_json::Value,
}

impl AuditEntry {
    /// An entry for `command_type` with the given outcome, received now, with
    /// nothing else filled in.
    pub fn new(command_type: impl Into<String>, outcome: AuditOutcome) -> Self {
        Self {
            occurred_at: Utc::now(),
            principal: None,
            tenant: None,
            command_id: None,
            command_type: command_type.into(),
            event_types: Vec::new(),
            aggregate: None,
            outcome,
            correlation_id: None,
            details: serde_json::Value::Null,
        }
    }

    /// Sets the principal's subject.
    #[must_use]
    pub fn with_principal(mut self, subject: impl Into<String>) -> Self {
        self.principal = Some(subject.into());
        self
    }

    /// Sets the tenant.
    #[must_use]
    pub fn with_tenant(mut self, tenant: impl Into<String>) -> Self {
        self.tenant = Some(tenant.into());
        self
    }

    /// Sets the aggregate.
    #[must_use]
    pub fn with_aggregate(mut self, aggregate: AggregateRef) -> Self {
        self.aggregate = Some(aggregate);
        self
    }

    /// Sets the correlation id.
    #[must_use]
    pub fn with_correlation_id(mut self, id: CorrelationId) -> Self {
        self.correlation_id = Some(id);
        self
    }

    /// Sets when the command was received.
    #[must_use]
    pub fn with_occurred_at(mut self, at: DateTime<Utc>) -> Self {
        self.occurred_at = at;
        self
    }
}

/// A stored entry with its place in the chain.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[non_exhaustive]
pub struct AuditRecord {
    /// Position in the log, from 1, without gaps.
    pub sequence: u64,
    /// What was recorded.
    pub entry: AuditEntry,
    /// When the store wrote it (server time for PostgreSQL).
    pub recorded_at: DateTime<Utc>,
    /// The previous record's hash (hex); the chain's genesis value for the
    /// first record.
    pub prev_hash: String,
    /// This record's hash (hex) over its sequence, content and `prev_hash`.
    pub hash: String,
}

impl AuditRecord {
    /// A stored record: `entry` at `sequence`, written at `recorded_at`,
    /// chained to `prev_hash`, with its own `hash`. Stores build these; the
    /// hash is the store's to compute.
    #[must_use]
    pub fn new(
        sequence: u64,
        entry: AuditEntry,
        recorded_at: DateTime<Utc>,
        prev_hash: impl Into<String>,
        hash: impl Into<String>,
    ) -> Self {
        Self {
            sequence,
            entry,
            recorded_at,
            prev_hash: prev_hash.into(),
            hash: hash.into(),
        }
    }
}

/// Which records to return, oldest first.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
#[non_exhaustive]
pub struct AuditQuery {
    /// Only records of this principal's subject.
    pub principal: Option<String>,
    /// Only records about this aggregate.
    pub aggregate: Option<AggregateRef>,
    /// Only records that occurred at or after this instant.
    pub from: Option<DateTime<Utc>>,
    /// Only records that occurred before this instant.
    pub to: Option<DateTime<Utc>>,
    /// Continue after this sequence (from [`AuditPage::next_after`]).
    pub after: Option<u64>,
    /// At most this many records (1 to 1,000; 100 when 0).
    pub limit: u32,
}

impl AuditQuery {
    /// The largest page a store returns.
    pub const MAX_LIMIT: u32 = 1_000;
    /// The page size used when `limit` is 0.
    pub const DEFAULT_LIMIT: u32 = 100;

    /// Every record, one default-sized page at a time.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Filters by principal subject.
    #[must_use]
    pub fn principal(mut self, subject: impl Into<String>) -> Self {
        self.principal = Some(subject.into());
        self
    }

    /// Filters by aggregate.
    #[must_use]
    pub fn aggregate(mut self, aggregate: AggregateRef) -> Self {
        self.aggregate = Some(aggregate);
        self
    }

    /// Filters by time: `from` inclusive, `to` exclusive.
    #[must_use]
    pub fn between(mut self, from: Option<DateTime<Utc>>, to: Option<DateTime<Utc>>) -> Self {
        self.from = from;
        self.to = to;
        self
    }

    /// Continues after `sequence`.
    #[must_use]
    pub fn after(mut self, sequence: u64) -> Self {
        self.after = Some(sequence);
        self
    }

    /// Sets the page size.
    #[must_use]
    pub fn limit(mut self, limit: u32) -> Self {
        self.limit = limit;
        self
    }

    /// The page size a store should use: `limit`, clamped to
    /// 1..=[`MAX_LIMIT`](Self::MAX_LIMIT), or the default when 0.
    #[must_use]
    pub fn effective_limit(&self) -> u32 {
        match self.limit {
            0 => Self::DEFAULT_LIMIT,
            n => n.min(Self::MAX_LIMIT),
        }
    }
}

/// One page of query results.
#[derive(Clone, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub struct AuditPage {
    /// The records, oldest first.
    pub records: Vec<AuditRecord>,
    /// Pass to [`AuditQuery::after`] for the next page; `None` on the last.
    pub next_after: Option<u64>,
}

impl AuditPage {
    /// A page of `records` with the given continuation.
    #[must_use]
    pub fn new(records: Vec<AuditRecord>, next_after: Option<u64>) -> Self {
        Self {
            records,
            next_after,
        }
    }
}

/// The result of checking the chain.
#[derive(Clone, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub enum ChainVerification {
    /// Every record's hash matches its content and links to its predecessor.
    Intact {
        /// How many records were checked.
        records: u64,
    },
    /// The first record that does not check out.
    Broken {
        /// Its sequence (for a missing record: the first sequence absent).
        sequence: u64,
        /// What is wrong with it: a content hash mismatch, a broken link, a
        /// gap.
        reason: String,
    },
}

impl ChainVerification {
    /// Whether the chain is intact.
    #[must_use]
    pub const fn is_intact(&self) -> bool {
        matches!(self, ChainVerification::Intact { .. })
    }
}

/// An append-only, tamper-evident audit log.
#[async_trait]
pub trait AuditLog: Send + Sync {
    /// Appends an entry at the end of the chain and returns the stored
    /// record. Concurrent appends are serialised: the chain never forks.
    ///
    /// Appends are idempotent on the entry's
    /// [`command_id`](AuditEntry::command_id) for identical content: when a
    /// stored record has the same command id and the same content, that
    /// record is returned and nothing is written, so retrying an append
    /// whose outcome was lost (a timeout, a dropped connection) never
    /// duplicates it, even when retries race. An entry with a stored
    /// command id but different content (the command ran again: another
    /// receipt time, another outcome) is recorded as another attempt, with
    /// a record of its own; several records may share a command id, and no
    /// attempt is refused for its id. Entries without a command id are
    /// never merged.
    async fn append(&self, entry: AuditEntry) -> Result<AuditRecord>;

    /// Records matching `query`, oldest first, one page at a time.
    async fn query(&self, query: &AuditQuery) -> Result<AuditPage>;

    /// Walks the whole chain and reports the first broken link, if any.
    ///
    /// A store that chains records after they were committed (see
    /// [`within`](Self::within)) checks the records chained so far; records
    /// still waiting to be chained are not part of the verdict.
    async fn verify(&self) -> Result<ChainVerification>;

    /// This log bound to `tx`: [`AuditAppender::append`] writes the entry
    /// in the transaction, so the record commits with everything else
    /// written through it and vanishes if it rolls back. Queries see the
    /// record once the transaction has committed; the store places it in
    /// the chain after the commit (a committed record is never lost:
    /// whichever process chains next picks it up).
    ///
    /// A PostgreSQL log joins a `keel_database::UnitOfWork`, an in-memory
    /// one a [`MemoryTransaction`](crate::uow::MemoryTransaction); given the
    /// other kind, `append` fails with [`Error::Internal`](crate::Error::Internal)
    /// and writes nothing.
    ///
    /// ```text
    /// audit.within(tx).append(entry).await?;
    /// ```
    fn within<'t>(&'t self, tx: &'t mut dyn Transaction) -> Box<dyn AuditAppender + 't>;
}

/// An [`AuditLog`] bound to a transaction ([`AuditLog::within`]).
#[async_trait]
pub trait AuditAppender: Send + Sync {
    /// Writes `entry` in the transaction. The same validation and the same
    /// idempotency as [`AuditLog::append`]: an entry identical to a
    /// committed record with the same command id (or to one appended
    /// earlier in this transaction) writes nothing.
    ///
    /// # Errors
    ///
    /// [`Error::Invalid`](crate::Error::Invalid) for an entry no store may
    /// keep, [`Error::Internal`](crate::Error::Internal) for a transaction of
    /// another backend, and the backend's failures; the transaction should
    /// then be rolled back.
    async fn append(&self, entry: AuditEntry) -> Result<()>;
}
