//! Rows of `keel.audit_log`: writing an unsealed one, reading sealed ones.

use chrono::{DateTime, Utc};
use keel_core::{
    AggregateRef, AuditEntry, AuditOutcome, AuditRecord, CommandId, CorrelationId, Error, Result,
};
use sqlx::PgConnection;
use sqlx::postgres::PgRow;
use sqlx::types::{Json, Uuid};
use sqlx::{Executor, Postgres, Row};

use super::super::chain;
use super::super::keys::RecordMac;

/// The columns a record is read from.
pub(super) const COLUMNS: &str = "sequence, occurred_at, recorded_at, principal, tenant, \
     command_id, command_type, event_types, aggregate_kind, aggregate_id, outcome, \
     outcome_code, outcome_reason, correlation_id, details, prev_hash, hash";

/// What a verifying walk reads: the record and its seal.
pub(super) const WALK_COLUMNS: &str = "sequence, occurred_at, recorded_at, principal, tenant, \
     command_id, command_type, event_types, aggregate_kind, aggregate_id, outcome, \
     outcome_code, outcome_reason, correlation_id, details, prev_hash, hash, mac_key_id, mac";

/// What the chainer reads of an unsealed row: its id and content.
pub(super) const PENDING_COLUMNS: &str = "id, occurred_at, principal, tenant, command_id, \
     command_type, event_types, aggregate_kind, aggregate_id, outcome, outcome_code, \
     outcome_reason, correlation_id, details";

/// Writes `entry` (validated) as an unsealed row through `conn`, in
/// whatever transaction it runs. Returns the new row's id, or `None` when
/// a row with the same command id and content exists already (the append
/// is a retry; nothing is written).
pub(super) async fn insert_unsealed<'e, E>(conn: E, entry: &AuditEntry) -> Result<Option<i64>>
where
    E: Executor<'e, Database = Postgres>,
{
    let (outcome, code, reason) = chain::outcome_parts(&entry.outcome);
    sqlx::query_scalar(
        "INSERT INTO keel.audit_log \
           (occurred_at, principal, tenant, command_id, command_type, event_types, \
            aggregate_kind, aggregate_id, outcome, outcome_code, outcome_reason, \
            correlation_id, details, content_hash) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14) \
         ON CONFLICT (command_id, content_hash) WHERE content_hash IS NOT NULL DO NOTHING \
         RETURNING id",
    )
    .bind(entry.occurred_at)
    .bind(entry.principal.as_deref())
    .bind(entry.tenant.as_deref())
    .bind(entry.command_id.map(|id| *id.as_uuid()))
    .bind(&entry.command_type)
    .bind(&entry.event_types)
    .bind(entry.aggregate.as_ref().map(|a| a.kind.as_str()))
    .bind(entry.aggregate.as_ref().map(|a| a.id.as_str()))
    .bind(outcome)
    .bind(code)
    .bind(reason)
    .bind(entry.correlation_id.map(|id| *id.as_uuid()))
    .bind(Json(&entry.details))
    .bind(chain::content_hash(entry))
    .fetch_optional(conn)
    .await
    .map_err(keel_database::to_keel)
}

/// The id of the stored row an identical append found.
pub(super) async fn existing_id(conn: &mut PgConnection, entry: &AuditEntry) -> Result<i64> {
    sqlx::query_scalar("SELECT id FROM keel.audit_log WHERE command_id = $1 AND content_hash = $2")
        .bind(entry.command_id.map(|id| *id.as_uuid()))
        .bind(chain::content_hash(entry))
        .fetch_optional(conn)
        .await
        .map_err(keel_database::to_keel)?
        .ok_or_else(|| Error::internal_msg("the audit record this append repeats vanished"))
}

/// The content of a row, sealed or not.
pub(super) fn entry_from_row(row: &PgRow) -> Result<AuditEntry> {
    let outcome: String = row.try_get("outcome").map_err(decode)?;
    let code: Option<String> = row.try_get("outcome_code").map_err(decode)?;
    let reason: Option<String> = row.try_get("outcome_reason").map_err(decode)?;
    let outcome = match (outcome.as_str(), code, reason) {
        ("accepted", None, None) => AuditOutcome::Accepted,
        ("rejected", Some(code), Some(reason)) => AuditOutcome::Rejected { code, reason },
        ("failed", Some(code), None) => AuditOutcome::Failed { code },
        _ => return Err(Error::internal_msg("stored audit outcome is not readable")),
    };
    let command_type: String = row.try_get("command_type").map_err(decode)?;
    let mut entry = AuditEntry::new(command_type, outcome);
    entry.occurred_at = row.try_get("occurred_at").map_err(decode)?;
    entry.principal = row.try_get("principal").map_err(decode)?;
    entry.tenant = row.try_get("tenant").map_err(decode)?;
    entry.command_id = row
        .try_get::<Option<Uuid>, _>("command_id")
        .map_err(decode)?
        .map(CommandId::from_uuid);
    entry.event_types = row.try_get("event_types").map_err(decode)?;
    let kind: Option<String> = row.try_get("aggregate_kind").map_err(decode)?;
    let id: Option<String> = row.try_get("aggregate_id").map_err(decode)?;
    entry.aggregate = kind.zip(id).map(|(kind, id)| AggregateRef::new(kind, id));
    entry.correlation_id = row
        .try_get::<Option<Uuid>, _>("correlation_id")
        .map_err(decode)?
        .map(CorrelationId::from_uuid);
    entry.details = row
        .try_get::<Json<serde_json::Value>, _>("details")
        .map_err(decode)?
        .0;
    Ok(entry)
}

/// A sealed row as a record; `None` for a row not sealed yet.
pub(super) fn record_from_row(row: &PgRow) -> Result<Option<AuditRecord>> {
    let Some(sequence) = row.try_get::<Option<i64>, _>("sequence").map_err(decode)? else {
        return Ok(None);
    };
    let sealed = |column: &str| -> Result<String> {
        row.try_get::<Option<String>, _>(column)
            .map_err(decode)?
            .ok_or_else(|| Error::internal_msg("a sealed audit record lacks its hash"))
    };
    let recorded_at: Option<DateTime<Utc>> = row.try_get("recorded_at").map_err(decode)?;
    let recorded_at = recorded_at
        .ok_or_else(|| Error::internal_msg("a sealed audit record lacks its recorded_at"))?;
    Ok(Some(AuditRecord::new(
        to_u64(sequence)?,
        entry_from_row(row)?,
        recorded_at,
        sealed("prev_hash")?,
        sealed("hash")?,
    )))
}

/// A row read by `WHERE sequence …`, hence sealed.
pub(super) fn sealed_record(row: &PgRow) -> Result<AuditRecord> {
    record_from_row(row)?.ok_or_else(|| Error::internal_msg("an unsealed audit row in the chain"))
}

pub(super) fn mac_from_row(row: &PgRow) -> Result<Option<RecordMac>> {
    let key_id: Option<String> = row.try_get("mac_key_id").map_err(decode)?;
    let mac: Option<String> = row.try_get("mac").map_err(decode)?;
    Ok(key_id
        .zip(mac)
        .map(|(key_id, mac)| RecordMac { key_id, mac }))
}

pub(super) fn decode(e: sqlx::Error) -> Error {
    Error::internal("a stored audit record could not be read", e)
}

pub(super) fn to_u64(n: i64) -> Result<u64> {
    u64::try_from(n).map_err(|_| Error::internal_msg("negative audit sequence in storage"))
}
