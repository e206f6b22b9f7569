//! Snapshots: save and load (the repository's side), export, import and
//! pruning (the operator's side, [`SnapshotArchive`]).

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::stream::BoxStream;
use keel_core::{StreamId, Version};
use sqlx::PgExecutor;

use super::{PostgresEventStore, clamp, to_u64};
use crate::archive::{
    ImportReport, SnapshotArchive, SnapshotRecord, SnapshotRetention, SnapshotSelection,
    validate_snapshot,
};
use crate::error::{EventStoreError, Result};
use crate::store::{Snapshot, SnapshotStore};

/// Snapshots fetched per round trip by an export.
const EXPORT_PAGE: i64 = 500;

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
    validate_snapshot(snapshot)?;
    sqlx::query!(
        "INSERT INTO keel.snapshots (stream_id, version, schema_version, state) \
             SELECT $1, $2, $3, $4::text::json \
              WHERE NOT EXISTS (SELECT 1 FROM keel.snapshots \
                                 WHERE stream_id = $1 AND version > $2) \
             ON CONFLICT (stream_id, version) DO UPDATE \
                SET schema_version = EXCLUDED.schema_version, \
                    state = EXCLUDED.state, taken_at = now()",
        snapshot.stream_id.as_str(),
        clamp(snapshot.version.get()),
        i32::try_from(snapshot.schema_version).unwrap_or(i32::MAX),
        snapshot.state,
    )
    .execute(executor)
    .await?;
    Ok(())
}

/// Reads the newest snapshot of `stream` through `executor`.
pub(super) async fn load_snapshot_on<'e>(
    executor: impl PgExecutor<'e>,
    stream: &StreamId,
) -> Result<Option<Snapshot>> {
    sqlx::query!(
        r#"SELECT version, schema_version, state::text AS "state!"
           FROM keel.snapshots WHERE stream_id = $1
           ORDER BY version DESC LIMIT 1"#,
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

/// One exported row.
struct ArchiveRow {
    stream_id: String,
    version: i64,
    schema_version: i32,
    state: String,
    taken_at: DateTime<Utc>,
}

impl ArchiveRow {
    fn into_record(self) -> Result<SnapshotRecord> {
        let schema = self.schema_version;
        Ok(SnapshotRecord::new(
            Snapshot::new(
                StreamId::new(self.stream_id)?,
                Version::new(to_u64(self.version, "version")?),
                u32::try_from(schema)
                    .map_err(|_| EventStoreError::Corrupt(format!("snapshot schema {schema}")))?,
                self.state,
            ),
            self.taken_at,
        ))
    }
}

/// One page of an export after `(after_stream, after_version)`.
async fn export_page(
    store: &PostgresEventStore,
    selection: &SnapshotSelection,
    after_stream: &str,
    after_version: i64,
) -> Result<Vec<ArchiveRow>> {
    let prefix = selection.stream_prefix.as_deref();
    let rows = if selection.latest_only {
        sqlx::query_as!(
            ArchiveRow,
            r#"SELECT DISTINCT ON (stream_id)
                      stream_id, version, schema_version, state::text AS "state!", taken_at
               FROM keel.snapshots
               WHERE stream_id > $1 AND ($2::text IS NULL OR starts_with(stream_id, $2))
               ORDER BY stream_id, version DESC
               LIMIT $3"#,
            after_stream,
            prefix,
            EXPORT_PAGE,
        )
        .fetch_all(&store.pool)
        .await?
    } else {
        sqlx::query_as!(
            ArchiveRow,
            r#"SELECT stream_id, version, schema_version, state::text AS "state!", taken_at
               FROM keel.snapshots
               WHERE (stream_id, version) > ($1, $2)
                 AND ($3::text IS NULL OR starts_with(stream_id, $3))
               ORDER BY stream_id, version
               LIMIT $4"#,
            after_stream,
            after_version,
            prefix,
            EXPORT_PAGE,
        )
        .fetch_all(&store.pool)
        .await?
    };
    Ok(rows)
}

#[async_trait]
impl SnapshotArchive for PostgresEventStore {
    fn export_snapshots(
        &self,
        selection: SnapshotSelection,
    ) -> BoxStream<'_, Result<SnapshotRecord>> {
        Box::pin(async_stream::try_stream! {
            // Stream ids are never empty, so ("", 0) is before every row.
            let mut after = (String::new(), 0_i64);
            loop {
                let page = export_page(self, &selection, &after.0, after.1).await?;
                let full = page.len() as i64 >= EXPORT_PAGE;
                for row in page {
                    after = (row.stream_id.clone(), row.version);
                    yield row.into_record()?;
                }
                if !full {
                    break;
                }
            }
        })
    }

    async fn import_snapshots(&self, records: Vec<SnapshotRecord>) -> Result<ImportReport> {
        for record in &records {
            validate_snapshot(&record.snapshot)?;
        }
        let total = records.len() as u64;
        let mut streams = Vec::with_capacity(records.len());
        let mut versions = Vec::with_capacity(records.len());
        let mut schemas = Vec::with_capacity(records.len());
        let mut states = Vec::with_capacity(records.len());
        let mut taken = Vec::with_capacity(records.len());
        for r in records {
            streams.push(r.snapshot.stream_id.as_str().to_owned());
            versions.push(clamp(r.snapshot.version.get()));
            schemas.push(i32::try_from(r.snapshot.schema_version).unwrap_or(i32::MAX));
            states.push(r.snapshot.state);
            taken.push(r.taken_at);
        }
        let imported = sqlx::query!(
            "INSERT INTO keel.snapshots (stream_id, version, schema_version, state, taken_at) \
             SELECT s, v, sv, st::json, t \
               FROM unnest($1::text[], $2::bigint[], $3::int[], $4::text[], $5::timestamptz[]) \
                    AS r(s, v, sv, st, t) \
             ON CONFLICT (stream_id, version) DO NOTHING",
            &streams,
            &versions,
            &schemas,
            &states,
            &taken,
        )
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(ImportReport {
            imported,
            skipped: total - imported,
        })
    }

    async fn prune_snapshots(&self, policy: &SnapshotRetention) -> Result<u64> {
        policy.validate()?;
        let deleted = sqlx::query!(
            "WITH ranked AS ( \
                 SELECT stream_id, version, taken_at, \
                        row_number() OVER (PARTITION BY stream_id ORDER BY version DESC) AS rank \
                   FROM keel.snapshots \
                  WHERE $2::text IS NULL OR starts_with(stream_id, $2)) \
             DELETE FROM keel.snapshots s USING ranked r \
              WHERE s.stream_id = r.stream_id AND s.version = r.version \
                AND r.rank > $1 \
                AND ($3::timestamptz IS NULL OR r.taken_at < $3)",
            i64::from(policy.keep_latest),
            policy.stream_prefix.as_deref(),
            policy.taken_before,
        )
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(deleted)
    }
}
