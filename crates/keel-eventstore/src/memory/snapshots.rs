//! The in-memory snapshot history and its [`SnapshotArchive`].

use std::collections::{BTreeMap, HashMap};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::stream::BoxStream;
use keel_core::StreamId;

use super::InMemoryEventStore;
use crate::archive::{
    ImportReport, SnapshotArchive, SnapshotRecord, SnapshotRetention, SnapshotSelection,
    validate_snapshot,
};
use crate::error::{EventStoreError, Result};
use crate::store::Snapshot;

/// Every stored snapshot: per stream, by version, with the time it was
/// taken.
pub(super) type SnapshotHistory = HashMap<StreamId, BTreeMap<u64, (Snapshot, DateTime<Utc>)>>;

/// The newest snapshot of `stream`.
pub(super) fn latest_snapshot(history: &SnapshotHistory, stream: &StreamId) -> Option<Snapshot> {
    history
        .get(stream)
        .and_then(|versions| versions.last_key_value())
        .map(|(_, (snapshot, _))| snapshot.clone())
}

/// Stores `snapshot` unless a newer one of its stream is stored (one at the
/// same version is replaced), as the PostgreSQL store does.
pub(super) fn keep_snapshot(history: &mut SnapshotHistory, snapshot: Snapshot, now: DateTime<Utc>) {
    let versions = history.entry(snapshot.stream_id.clone()).or_default();
    let version = snapshot.version.get();
    if versions
        .last_key_value()
        .is_some_and(|(newest, _)| *newest > version)
    {
        return;
    }
    versions.insert(version, (snapshot, now));
}

#[async_trait]
impl SnapshotArchive for InMemoryEventStore {
    fn export_snapshots(
        &self,
        selection: SnapshotSelection,
    ) -> BoxStream<'_, Result<SnapshotRecord>> {
        let mut records: Vec<SnapshotRecord> = self.inner.snapshots.read(|history| {
            history
                .iter()
                .filter(|(stream, _)| selection.matches(stream))
                .flat_map(|(_, versions)| {
                    let skip = if selection.latest_only {
                        versions.len().saturating_sub(1)
                    } else {
                        0
                    };
                    versions
                        .values()
                        .skip(skip)
                        .map(|(s, t)| SnapshotRecord::new(s.clone(), *t))
                })
                .collect()
        });
        records.sort_by(|a, b| {
            (a.snapshot.stream_id.as_str(), a.snapshot.version)
                .cmp(&(b.snapshot.stream_id.as_str(), b.snapshot.version))
        });
        Box::pin(futures::stream::iter(records.into_iter().map(Ok)))
    }

    async fn import_snapshots(&self, records: Vec<SnapshotRecord>) -> Result<ImportReport> {
        for record in &records {
            validate_snapshot(&record.snapshot)?;
        }
        self.inner.snapshots.write(|history| {
            let mut report = ImportReport::default();
            for record in records {
                let versions = history
                    .entry(record.snapshot.stream_id.clone())
                    .or_default();
                match versions.entry(record.snapshot.version.get()) {
                    std::collections::btree_map::Entry::Occupied(_) => report.skipped += 1,
                    std::collections::btree_map::Entry::Vacant(slot) => {
                        slot.insert((record.snapshot, record.taken_at));
                        report.imported += 1;
                    }
                }
            }
            Ok::<_, EventStoreError>(report)
        })
    }

    async fn prune_snapshots(&self, policy: &SnapshotRetention) -> Result<u64> {
        policy.validate()?;
        self.inner.snapshots.write(|history| {
            let mut deleted = 0u64;
            for (stream, versions) in history.iter_mut() {
                let doomed: Vec<u64> = versions
                    .iter()
                    .rev()
                    .enumerate()
                    .filter(|(rank, (_, (_, taken_at)))| policy.deletes(stream, *rank, *taken_at))
                    .map(|(_, (version, _))| *version)
                    .collect();
                for version in doomed {
                    versions.remove(&version);
                    deleted += 1;
                }
            }
            history.retain(|_, versions| !versions.is_empty());
            Ok::<_, EventStoreError>(deleted)
        })
    }
}
