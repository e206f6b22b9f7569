//! The PostgreSQL event store.
//!
//! One file per seam: [`append`] (the single-statement fast path and the
//! `keel.append_events` procedure), [`read`] (stream reads), [`global`] (the
//! gap-safe global log), [`snapshots`] and [`subscriptions`] (checkpoints,
//! leadership, the wake-up notifier).

use std::sync::Arc;

use keel_core::{EventId, Position, StreamId, Version};
use sqlx::postgres::PgRow;
use sqlx::{PgPool, Row};

use crate::error::{EventStoreError, Result};
use crate::event::{RecordedEvent, StoreConfig, StoredMetadata};
use crate::telemetry::StoreMetrics;

mod append;
mod global;
mod read;
mod snapshots;
mod subscriptions;
mod transaction;

use subscriptions::Notifier;

/// The channel appends notify on (when [`StoreConfig::notify_on_append`]).
pub const NOTIFY_CHANNEL: &str = "keel_events";

const COLUMNS: &str = "commit, position, event_id, stream_id, version, event_type, \
                       schema_version, payload::text, metadata::text, recorded_at";

/// The event store on PostgreSQL (tables in schema `keel`, created by
/// `keel_eventstore::MIGRATIONS` (applied with `keel_database::migrate`)).
///
/// Cheap to clone: it holds a connection pool.
#[derive(Clone, Debug)]
pub struct PostgresEventStore {
    pool: PgPool,
    config: StoreConfig,
    global_sql: String,
    notifier: Arc<Notifier>,
    pub(crate) metrics: StoreMetrics,
}

impl PostgresEventStore {
    /// A store on `pool` with default settings.
    #[must_use]
    pub fn new(pool: PgPool) -> Self {
        Self::with_config(pool, StoreConfig::default())
    }

    /// A store on `pool` with the given settings.
    #[must_use]
    pub fn with_config(pool: PgPool, config: StoreConfig) -> Self {
        let global_sql = format!(
            "SELECT {COLUMNS} FROM keel.events \
             WHERE (commit, position) > ($1, $2) AND commit < keel.commit_horizon() \
               AND ($3::text IS NULL OR stream_id = $3 OR starts_with(stream_id, $3 || '-')) \
               AND ($4::text IS NULL OR starts_with(stream_id, $4)) \
               AND ($5::text[] IS NULL OR event_type = ANY ($5)) \
             ORDER BY commit, position LIMIT $6"
        );
        Self {
            pool,
            config,
            global_sql,
            notifier: Arc::default(),
            metrics: StoreMetrics::default(),
        }
    }

    /// The pool the store uses.
    #[must_use]
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The store's settings.
    #[must_use]
    pub fn config(&self) -> &StoreConfig {
        &self.config
    }
}

fn to_u64(v: i64, what: &str) -> Result<u64> {
    u64::try_from(v).map_err(|_| EventStoreError::Corrupt(format!("negative {what} {v}")))
}

fn clamp(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn decode_row(row: &PgRow, stream: Option<&StreamId>) -> Result<RecordedEvent> {
    let commit: i64 = row.try_get(0)?;
    let position: i64 = row.try_get(1)?;
    let event_id: uuid::Uuid = row.try_get(2)?;
    let stream_id = match stream {
        Some(s) => s.clone(),
        None => StreamId::new(row.try_get::<String, _>(3)?)?,
    };
    let version: i64 = row.try_get(4)?;
    let event_type: String = row.try_get(5)?;
    let schema_version: i32 = row.try_get(6)?;
    let payload: String = row.try_get(7)?;
    // Kept as text: parsed only if someone reads it (see StoredMetadata).
    let metadata = StoredMetadata::from_json(row.try_get::<&str, _>(8)?);
    Ok(RecordedEvent {
        event_id: EventId::from_uuid(event_id),
        stream_id,
        version: Version::new(to_u64(version, "version")?),
        position: Position::new(to_u64(commit, "commit")?, to_u64(position, "position")?),
        event_type,
        schema_version: u32::try_from(schema_version)
            .map_err(|_| EventStoreError::Corrupt(format!("schema version {schema_version}")))?,
        recorded_at: row.try_get(9)?,
        metadata,
        payload,
    })
}
