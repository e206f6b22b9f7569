//! Snapshots.

use async_trait::async_trait;
use keel_core::{StreamId, Version};
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, Row};

const LOAD_SNAPSHOT: &str =
    "SELECT version, schema_version, state::text FROM keel.snapshots WHERE stream_id = $1";

use super::{PostgresEventStore, to_u64};
use crate::error::{EventStoreError, Result};
use crate::store::{Snapshot, SnapshotStore};

#[async_trait]
impl SnapshotStore for PostgresEventStore {
    async fn load_snapshot(&self, stream: &StreamId) -> Result<Option<Snapshot>> {
        let row = sqlx::query(LOAD_SNAPSHOT)
            .bind(stream.as_str())
            .fetch_optional(&self.pool)
            .await?;
        decode_snapshot(stream, row)
    }

    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<()> {
        let mut conn = self.pool.acquire().await?;
        save_snapshot_on(&mut conn, &snapshot).await
    }
}

/// The snapshot of `stream` in `row`, if there is one.
pub(super) fn decode_snapshot(stream: &StreamId, row: Option<PgRow>) -> Result<Option<Snapshot>> {
    row.map(|row| {
        let version: i64 = row.try_get(0)?;
        let schema: i32 = row.try_get(1)?;
        Ok(Snapshot::new(
            stream.clone(),
            Version::new(to_u64(version, "version")?),
            u32::try_from(schema).unwrap_or(0),
            row.try_get(2)?,
        ))
    })
    .transpose()
}

/// Stores `snapshot` on `conn` unless a newer one is stored.
pub(super) async fn save_snapshot_on(conn: &mut PgConnection, snapshot: &Snapshot) -> Result<()> {
    let version = i64::try_from(snapshot.version.get())
        .map_err(|_| EventStoreError::invalid("version", "beyond the largest storable version"))?;
    let schema = i32::try_from(snapshot.schema_version)
        .map_err(|_| EventStoreError::invalid("schema_version", "beyond 2147483647"))?;
    sqlx::query(
        "INSERT INTO keel.snapshots (stream_id, version, schema_version, state) \
             VALUES ($1, $2, $3, $4::json) \
             ON CONFLICT (stream_id) DO UPDATE \
                SET version = EXCLUDED.version, schema_version = EXCLUDED.schema_version, \
                    state = EXCLUDED.state, taken_at = now() \
              WHERE keel.snapshots.version <= EXCLUDED.version",
    )
    .bind(snapshot.stream_id.as_str())
    .bind(version)
    .bind(schema)
    .bind(&snapshot.state)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Reads the snapshot of `stream` on `conn`.
pub(super) async fn load_snapshot_on(
    conn: &mut PgConnection,
    stream: &StreamId,
) -> Result<Option<Snapshot>> {
    let row = sqlx::query(LOAD_SNAPSHOT)
        .bind(stream.as_str())
        .fetch_optional(&mut *conn)
        .await?;
    decode_snapshot(stream, row)
}
