//! The PostgreSQL event store.
//!
//! One file per seam: [`append`] (the `keel.append_events` procedure and
//! appends in a caller's transaction), [`fast`] (the one-statement fast
//! path), [`read`] (stream reads), [`global`] (the
//! gap-safe global log), [`horizon`] (the read horizon its readers share),
//! [`snapshots`] and [`subscriptions`] (checkpoints,
//! leadership, the wake-up notifier).
//!
//! # Checked SQL
//!
//! Every statement here is checked at compile time: it goes through sqlx's
//! `query!`, `query_as!` or `query_scalar!`, which check its text, its
//! parameter types and its result columns against the schema the migrations
//! build. The build itself needs no database: it reads the description of
//! each statement from the offline data committed in the crate's `.sqlx/`
//! (the crate's `.env` sets `SQLX_OFFLINE=true`, so a `DATABASE_URL` in the
//! environment does not send the build online).
//!
//! After changing a statement or a migration, regenerate that data and commit
//! it with the change: `scripts/sqlx-prepare` builds a throwaway database
//! from every migration on the local PostgreSQL (`KEEL_SQLX_ADMIN_URL`
//! chooses another server), recompiles against it and rewrites `.sqlx/`;
//! `scripts/sqlx-prepare --check` (run by CI) fails when the committed data
//! and the statements disagree.
//!
//! Two pieces of text are not checked statements: the global read's
//! `BEGIN READ ONLY; SET LOCAL ...` (transaction control and planner
//! settings, not a query with a result to describe) and the channel
//! `LISTEN`ed on, which sqlx's listener sends itself.

use std::sync::Arc;

use keel_core::{EventId, Position, StreamId, Version};
use sqlx::PgPool;

use crate::error::{EventStoreError, Result};
use crate::event::{RecordedEvent, StoreConfig, StoredMetadata};
use crate::telemetry::StoreMetrics;

mod append;
mod fast;
mod global;
mod horizon;
mod projection;
mod read;
#[cfg(test)]
mod rule_tests;
mod snapshots;
mod subscriptions;
mod transaction;

pub use global::{HorizonHolder, ReadHorizon};
use subscriptions::Notifier;

/// The channel appends notify on (when [`StoreConfig::notify_on_append`]).
pub const NOTIFY_CHANNEL: &str = "keel_events";

/// The event store on PostgreSQL (tables in schema `keel`, created by
/// `keel_eventstore::MIGRATIONS` (applied with `keel_database::migrate`)).
///
/// Cheap to clone: it holds a connection pool. Give it a pool from
/// `keel_database::Database::pool()`, or one built with
/// `keel_database::close_unclean_connections`: a global read dropped while
/// its read transaction is open hands its connection back inside that
/// transaction, and such a pool closes it instead of reusing it.
#[derive(Clone, Debug)]
pub struct PostgresEventStore {
    pool: PgPool,
    config: StoreConfig,
    notifier: Arc<Notifier>,
    horizon: Arc<horizon::HorizonCache>,
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
        Self {
            pool,
            config,
            notifier: Arc::default(),
            horizon: Arc::default(),
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

    /// How many times this store (with its clones) had the server compute
    /// the global log's read horizon for its reads, a scan of the lock
    /// table each. With the shared horizon on
    /// ([`StoreConfig::horizon_max_age`]) readers polling together share
    /// one; for metrics and benchmarks. [`read_horizon`](Self::read_horizon)
    /// calls are not counted.
    #[must_use]
    pub fn horizon_scans(&self) -> u64 {
        self.horizon.scans()
    }
}

fn to_u64(v: i64, what: &str) -> Result<u64> {
    u64::try_from(v).map_err(|_| EventStoreError::Corrupt(format!("negative {what} {v}")))
}

fn clamp(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// One event of a stream read, as the checked stream statements return it
/// (the stream is the one read, so its id is not fetched again).
///
/// The text columns arrive as owned strings: `payload` and `event_type` move
/// into the event, and `metadata` becomes [`StoredMetadata`] text without a
/// second copy (it is parsed only if someone reads it).
pub(super) struct EventRow {
    commit: i64,
    position: i64,
    event_id: uuid::Uuid,
    version: i64,
    event_type: String,
    schema_version: i32,
    payload: String,
    metadata: String,
    recorded_at: chrono::DateTime<chrono::Utc>,
}

impl EventRow {
    /// The event this row stores, in `stream_id`.
    pub(super) fn into_event(self, stream_id: StreamId) -> Result<RecordedEvent> {
        let schema_version = self.schema_version;
        Ok(RecordedEvent {
            event_id: EventId::from_uuid(self.event_id),
            stream_id,
            version: Version::new(to_u64(self.version, "version")?),
            position: Position::new(
                to_u64(self.commit, "commit")?,
                to_u64(self.position, "position")?,
            ),
            event_type: self.event_type,
            schema_version: u32::try_from(schema_version).map_err(|_| {
                EventStoreError::Corrupt(format!("schema version {schema_version}"))
            })?,
            recorded_at: self.recorded_at,
            metadata: StoredMetadata::from_json(self.metadata),
            payload: self.payload,
        })
    }
}

/// One event of a global-log read: an [`EventRow`] with its stream.
pub(super) struct LogRow {
    commit: i64,
    position: i64,
    event_id: uuid::Uuid,
    stream_id: String,
    version: i64,
    event_type: String,
    schema_version: i32,
    payload: String,
    metadata: String,
    recorded_at: chrono::DateTime<chrono::Utc>,
}

impl LogRow {
    /// The event this row stores.
    pub(super) fn into_event(self) -> Result<RecordedEvent> {
        let stream_id = StreamId::new(self.stream_id)?;
        EventRow {
            commit: self.commit,
            position: self.position,
            event_id: self.event_id,
            version: self.version,
            event_type: self.event_type,
            schema_version: self.schema_version,
            payload: self.payload,
            metadata: self.metadata,
            recorded_at: self.recorded_at,
        }
        .into_event(stream_id)
    }
}
