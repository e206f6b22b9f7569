//! Snapshots.

use async_trait::async_trait;
use keel_core::{StreamId, Version};
use sqlx::PgExecutor;

use super::{PostgresEventStore, to_u64};
use crate::error::{EventStoreError, Result};
use crate::store::{Snapshot, SnapshotStore};

#[async_trait]
impl SnapshotStore for PostgresEventStore {
    async fn load_snapshot(&self, stream: &StreamId) -> Result<Option<Snapshot>> {
        load_snapshot_on(&self.pool, stream).await
    }

    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<()> {
        save_snapshot_on(&self.pool, &snapshot).await
    }
}

/// Stores `snapshot` through `executor` unless a newer one is stored.
pub(super) async fn save_snapshot_on<'e>(
    executor: impl PgExecutor<'e>,
    snapshot: &Snapshot,
) -> Result<()> {
    let version = i64::try_from(snapshot.version.get())
        .map_err(|_| EventStoreError::invalid("version", "beyond the largest storable version"))?;
    let schema = i32::try_from(snapshot.schema_version)
        .map_err(|_| EventStoreError::invalid("schema_version", "beyond 2147483647"))?;
    sqlx::query!(
        "INSERT INTO keel.snapshots (stream_id, version, schema_version, state) \
             VALUES ($1, $2, $3, $4::text::json) \
             ON CONFLICT (stream_id) DO UPDATE \
                SET version = EXCLUDED.version, schema_version = EXCLUDED.schema_version, \
                    state = EXCLUDED.state, taken_at = now() \
              WHERE keel.snapshots.version <= EXCLUDED.version",
        snapshot.stream_id.as_str(),
        version,
        schema,
        snapshot.state,
    )
    .execute(executor)
    .await?;
    Ok(())
}

/// Reads the snapshot of `stream` through `executor`.
pub(super) async fn load_snapshot_on<'e>(
    executor: impl PgExecutor<'e>,
    stream: &StreamId,
) -> Result<Option<Snapshot>> {
    sqlx::query!(
        r#"SELECT version, schema_version, state::text AS "state!"
           FROM keel.snapshots WHERE stream_id = $1"#,
        stream.as_str()
    )
    .fetch_optional(executor)
    .await?
    .map(|row| {
        Ok(Snapshot::new(
            stream.clone(),
            Version::new(to_u64(row.version, "version")?),
            u32::try_from(row.schema_version).unwrap_or(0),
            row.state,
        ))
    })
    .transpose()
}
