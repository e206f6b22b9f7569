//! Rows of `keel.audit_pending`: records committed but not yet sealed into
//! the chain, each one `jsonb` document.
//!
//! The document's keys are the columns of `keel.audit_log` (absent keys
//! read as NULL), so sealing moves a row with one `INSERT … SELECT` and
//! `jsonb_populate_record` (see `keel.seal_pending_audit_records`), and
//! its `content_hash` lets sealing drop a repeated attempt.

use chrono::{DateTime, Utc};
use keel_core::{AggregateRef, AuditEntry, AuditOutcome, CommandId, CorrelationId, Error, Result};
use serde::{Deserialize, Serialize};
use sqlx::types::Uuid;
use sqlx::{Executor, Postgres};

use super::super::chain;

/// A pending record as written: borrowed from the entry.
#[derive(Serialize)]
struct Written<'e> {
    occurred_at: DateTime<Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    principal: Option<&'e str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tenant: Option<&'e str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    command_id: Option<Uuid>,
    command_type: &'e str,
    event_types: &'e [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    aggregate_kind: Option<&'e str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    aggregate_id: Option<&'e str>,
    outcome: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    outcome_code: Option<&'e str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    outcome_reason: Option<&'e str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    correlation_id: Option<Uuid>,
    details: &'e serde_json::Value,
    content_hash: &'e str,
}

/// A pending record as read back.
#[derive(Deserialize)]
struct Read {
    occurred_at: DateTime<Utc>,
    #[serde(default)]
    principal: Option<String>,
    #[serde(default)]
    tenant: Option<String>,
    #[serde(default)]
    command_id: Option<Uuid>,
    command_type: String,
    #[serde(default)]
    event_types: Vec<String>,
    #[serde(default)]
    aggregate_kind: Option<String>,
    #[serde(default)]
    aggregate_id: Option<String>,
    outcome: String,
    #[serde(default)]
    outcome_code: Option<String>,
    #[serde(default)]
    outcome_reason: Option<String>,
    #[serde(default)]
    correlation_id: Option<Uuid>,
    #[serde(default)]
    details: serde_json::Value,
    #[serde(default)]
    content_hash: Option<String>,
}

/// A pending record's content, as sealing needs it.
#[derive(Debug)]
pub(super) struct Pending {
    pub(super) entry: AuditEntry,
    /// `None` only for rows carried over from an old log that had none.
    pub(super) content_hash: Option<String>,
}

/// The JSON text of `entry` (validated) as a pending document.
fn document(entry: &AuditEntry, content_hash: &str) -> Result<String> {
    let (outcome, outcome_code, outcome_reason) = chain::outcome_parts(&entry.outcome);
    let written = Written {
        occurred_at: entry.occurred_at,
        principal: entry.principal.as_deref(),
        tenant: entry.tenant.as_deref(),
        command_id: entry.command_id.map(|id| *id.as_uuid()),
        command_type: &entry.command_type,
        event_types: &entry.event_types,
        aggregate_kind: entry.aggregate.as_ref().map(|a| a.kind.as_str()),
        aggregate_id: entry.aggregate.as_ref().map(|a| a.id.as_str()),
        outcome,
        outcome_code,
        outcome_reason,
        correlation_id: entry.correlation_id.map(|id| *id.as_uuid()),
        details: &entry.details,
        content_hash,
    };
    serde_json::to_string(&written)
        .map_err(|e| Error::internal_msg(format!("an audit record is not JSON: {e}")))
}

/// The `INSERT` of `entry` (validated) into `keel.audit_pending`, as text
/// with its one value in line, for a unit of work to send in its
/// `COMMIT`'s round trip
/// ([`keel_database::UnitOfWork::send_with_commit`]).
///
/// The statement is as small as the server can take: one constant (the
/// document, dollar-quoted by [`keel_database::sql_literal`] so no
/// character of it can end the constant early), one table with one index,
/// no conflict clause. Parsing and planning it is cheap, which matters
/// because text sent with the commit cannot use a prepared statement.
pub(super) fn insert_text(entry: &AuditEntry) -> Result<String> {
    let document = document(entry, &chain::content_hash(entry))?;
    Ok(format!(
        "INSERT INTO keel.audit_pending (entry) VALUES ({})",
        keel_database::sql_literal(&document)?
    ))
}

/// Writes `entry` (validated) as a pending row through `conn` and returns
/// its id (which the sealed record keeps).
pub(super) async fn insert<'e, E>(conn: E, entry: &AuditEntry, content_hash: &str) -> Result<i64>
where
    E: Executor<'e, Database = Postgres>,
{
    let document = document(entry, content_hash)?;
    sqlx::query_scalar!(
        "INSERT INTO keel.audit_pending (entry) VALUES ($1::text::jsonb) RETURNING id",
        document,
    )
    .fetch_one(conn)
    .await
    .map_err(keel_database::to_keel)
}

/// Reads a pending document back into the entry it was made from.
pub(super) fn read(id: i64, document: serde_json::Value) -> Result<Pending> {
    let unreadable = |why: String| {
        Error::internal_msg(format!("pending audit record {id} is not readable: {why}"))
    };
    let r: Read = serde_json::from_value(document).map_err(|e| unreadable(e.to_string()))?;
    let outcome = match (r.outcome.as_str(), r.outcome_code, r.outcome_reason) {
        ("accepted", None, None) => AuditOutcome::Accepted,
        ("rejected", Some(code), Some(reason)) => AuditOutcome::Rejected { code, reason },
        ("failed", Some(code), None) => AuditOutcome::Failed { code },
        _ => return Err(unreadable("its outcome does not fit a stored one".into())),
    };
    let aggregate = match (r.aggregate_kind, r.aggregate_id) {
        (Some(kind), Some(id)) => Some(AggregateRef::new(kind, id)),
        (None, None) => None,
        _ => return Err(unreadable("half an aggregate".into())),
    };
    let mut entry = AuditEntry::new(r.command_type, outcome);
    entry.occurred_at = chain::truncate_micros(r.occurred_at);
    entry.principal = r.principal;
    entry.tenant = r.tenant;
    entry.command_id = r.command_id.map(CommandId::from_uuid);
    entry.event_types = r.event_types;
    entry.aggregate = aggregate;
    entry.correlation_id = r.correlation_id.map(CorrelationId::from_uuid);
    entry.details = r.details;
    Ok(Pending {
        entry,
        content_hash: r.content_hash,
    })
}
