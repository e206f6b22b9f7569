//! Long-term retention of snapshots: export, import and pruning.
//!
//! Both stores keep every snapshot saved through
//! [`SnapshotStore::save_snapshot`](crate::SnapshotStore::save_snapshot),
//! one per stream version, and load the newest. [`SnapshotArchive`] is the
//! operator's side of that history:
//!
//! * [`export_snapshots`](SnapshotArchive::export_snapshots) reads it (all
//!   of it, or the newest per stream, or one category), and [`export_ndjson`]
//!   writes it as NDJSON, one self-describing line per snapshot, with its
//!   schema version and the time it was taken;
//! * [`import_snapshots`](SnapshotArchive::import_snapshots) and
//!   [`import_ndjson`] bring such a file back (into the same store or a new
//!   one), idempotently;
//! * [`prune_snapshots`](SnapshotArchive::prune_snapshots) deletes old ones
//!   by a [`SnapshotRetention`] policy: by count per stream, by age, by
//!   stream prefix, and never the newest of a stream unless asked.
//!
//! Snapshots are a cache of state that the events can always rebuild, so
//! pruning loses no information; an exported file is what keeps old states
//! around once they are pruned from the database.
//!
//! # The NDJSON format
//!
//! One JSON object per line, UTF-8, `\n`-terminated:
//!
//! ```text
//! {"format":"keel.snapshot","format_version":1,"stream_id":"Cart-7","version":12,"schema_version":2,"taken_at":"2026-12-06T07:15:02.118Z","state":{"items":3}}
//! ```
//!
//! `state` is the snapshot's JSON exactly as stored; `schema_version` is the
//! version of the state's shape (a reader ignores a snapshot whose schema
//! version is not its own); `format_version` is the version of this line
//! format, so a future format can still read old files. Blank lines are
//! ignored on import.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use futures::stream::BoxStream;
use keel_core::{StreamId, Version};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::error::{EventStoreError, Result};
use crate::store::Snapshot;

/// The `format` field of every exported line.
pub const SNAPSHOT_FORMAT: &str = "keel.snapshot";

/// The line format version this crate writes and reads.
pub const SNAPSHOT_FORMAT_VERSION: u32 = 1;

/// The longest line [`import_ndjson`] accepts (64 MiB): a bound on memory
/// for a damaged or hostile file.
pub const MAX_SNAPSHOT_LINE_BYTES: usize = 64 << 20;

/// A stored snapshot with the time it was taken: what an export yields and
/// an import takes.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct SnapshotRecord {
    /// The snapshot: stream, version, schema version, state.
    pub snapshot: Snapshot,
    /// When it was saved (kept as is by an import).
    pub taken_at: DateTime<Utc>,
}

impl SnapshotRecord {
    /// A record of `snapshot` taken at `taken_at`.
    #[must_use]
    pub fn new(snapshot: Snapshot, taken_at: DateTime<Utc>) -> Self {
        Self { snapshot, taken_at }
    }

    /// The record as one NDJSON line, without the trailing newline.
    ///
    /// # Errors
    ///
    /// [`EventStoreError::Invalid`] when the state is not JSON (a store
    /// never holds such a snapshot; a hand-made record may).
    pub fn to_ndjson(&self) -> Result<String> {
        let state: &RawValue = serde_json::from_str(&self.snapshot.state)
            .map_err(|e| EventStoreError::invalid("state", format!("not JSON: {e}")))?;
        let line = Line {
            format: SNAPSHOT_FORMAT.into(),
            format_version: SNAPSHOT_FORMAT_VERSION,
            stream_id: self.snapshot.stream_id.as_str().into(),
            version: self.snapshot.version.get(),
            schema_version: self.snapshot.schema_version,
            taken_at: self.taken_at,
            state,
        };
        serde_json::to_string(&line).map_err(|e| EventStoreError::invalid("state", e.to_string()))
    }

    /// Parses one NDJSON line written by [`to_ndjson`](Self::to_ndjson) and
    /// validates it as [`SnapshotArchive::import_snapshots`] would.
    ///
    /// # Errors
    ///
    /// [`EventStoreError::Invalid`] naming what is wrong: not JSON, another
    /// format or a newer format version, a missing field, an invalid
    /// stream id, version 0, a schema version beyond `i32::MAX`.
    pub fn from_ndjson(line: &str) -> Result<Self> {
        let parsed: Line<'_> = serde_json::from_str(line).map_err(|e| {
            EventStoreError::invalid("snapshot line", format!("not a snapshot record: {e}"))
        })?;
        if parsed.format != SNAPSHOT_FORMAT {
            return Err(EventStoreError::invalid(
                "format",
                format!("{:?} is not {SNAPSHOT_FORMAT:?}", parsed.format),
            ));
        }
        if parsed.format_version != SNAPSHOT_FORMAT_VERSION {
            return Err(EventStoreError::invalid(
                "format_version",
                format!(
                    "{} is not supported (this build reads version {SNAPSHOT_FORMAT_VERSION})",
                    parsed.format_version
                ),
            ));
        }
        let record = Self::new(
            Snapshot::new(
                StreamId::new(parsed.stream_id.as_ref())?,
                Version::new(parsed.version),
                parsed.schema_version,
                parsed.state.get().to_owned(),
            ),
            parsed.taken_at,
        );
        validate_snapshot(&record.snapshot)?;
        Ok(record)
    }
}

/// One exported line. `Cow` and `RawValue` keep the state's text as is.
#[derive(Serialize, Deserialize)]
struct Line<'a> {
    #[serde(borrow)]
    format: std::borrow::Cow<'a, str>,
    format_version: u32,
    #[serde(borrow)]
    stream_id: std::borrow::Cow<'a, str>,
    version: u64,
    schema_version: u32,
    taken_at: DateTime<Utc>,
    #[serde(borrow)]
    state: &'a RawValue,
}

/// Checks what both stores refuse in a snapshot: version 0, a schema
/// version or stream version beyond what PostgreSQL stores, state that is
/// not JSON.
pub(crate) fn validate_snapshot(snapshot: &Snapshot) -> Result<()> {
    if snapshot.version.get() == 0 {
        return Err(EventStoreError::invalid(
            "version",
            "a snapshot reflects at least one event (version 0 is the empty stream)",
        ));
    }
    if i64::try_from(snapshot.version.get()).is_err() {
        return Err(EventStoreError::invalid(
            "version",
            "beyond the largest storable version",
        ));
    }
    if i32::try_from(snapshot.schema_version).is_err() {
        return Err(EventStoreError::invalid(
            "schema_version",
            "beyond 2147483647",
        ));
    }
    serde_json::from_str::<&RawValue>(&snapshot.state)
        .map_err(|e| EventStoreError::invalid("state", format!("not JSON: {e}")))?;
    Ok(())
}

/// Which snapshots an export reads.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SnapshotSelection {
    /// Only streams whose id starts with this text.
    pub stream_prefix: Option<String>,
    /// Only the newest snapshot of each stream (default: every stored one).
    pub latest_only: bool,
}

impl SnapshotSelection {
    /// Every stored snapshot of every stream.
    #[must_use]
    pub fn all() -> Self {
        Self::default()
    }

    /// Only the newest snapshot of each stream.
    #[must_use]
    pub fn latest_only(mut self) -> Self {
        self.latest_only = true;
        self
    }

    /// Only streams whose id starts with `prefix` (`"Cart-"` for the `Cart`
    /// category).
    #[must_use]
    pub fn stream_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.stream_prefix = Some(prefix.into());
        self
    }

    pub(crate) fn matches(&self, stream: &StreamId) -> bool {
        self.stream_prefix
            .as_deref()
            .is_none_or(|p| stream.as_str().starts_with(p))
    }
}

/// Which snapshots [`SnapshotArchive::prune_snapshots`] deletes.
///
/// A snapshot is deleted when all of these hold:
///
/// * its stream matches [`stream_prefix`](Self::stream_prefix) (if set);
/// * it is not one of the [`keep_latest`](Self::keep_latest) newest of its
///   stream (by version);
/// * it was taken before [`taken_before`](Self::taken_before) (if set).
///
/// So `keep_latest(3)` bounds every stream to three snapshots, and
/// `keep_latest(1).older_than(90 days)` deletes everything but the newest
/// once it is 90 days old. Keeping zero (deleting the newest snapshot too)
/// must be asked for with [`including_newest`](Self::including_newest).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct SnapshotRetention {
    /// How many of each stream's newest snapshots are always kept.
    pub keep_latest: u32,
    /// Only snapshots taken before this time are deleted.
    pub taken_before: Option<DateTime<Utc>>,
    /// Only streams whose id starts with this text are pruned.
    pub stream_prefix: Option<String>,
    /// Allows `keep_latest == 0`, which deletes the newest snapshots too.
    pub include_newest: bool,
}

impl SnapshotRetention {
    /// Keep the `n` newest snapshots of each stream, delete the rest.
    #[must_use]
    pub fn keep_latest(n: u32) -> Self {
        Self {
            keep_latest: n,
            taken_before: None,
            stream_prefix: None,
            include_newest: false,
        }
    }

    /// Only delete snapshots older than `age` (measured from now).
    #[must_use]
    pub fn older_than(self, age: Duration) -> Self {
        let age = chrono::Duration::from_std(age).unwrap_or(chrono::Duration::MAX);
        let cutoff = Utc::now()
            .checked_sub_signed(age)
            .unwrap_or(DateTime::<Utc>::MIN_UTC);
        self.taken_before(cutoff)
    }

    /// Only delete snapshots taken before `time`.
    #[must_use]
    pub fn taken_before(mut self, time: DateTime<Utc>) -> Self {
        self.taken_before = Some(time);
        self
    }

    /// Only prune streams whose id starts with `prefix`.
    #[must_use]
    pub fn stream_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.stream_prefix = Some(prefix.into());
        self
    }

    /// Allows [`keep_latest(0)`](Self::keep_latest): the newest snapshot of
    /// a stream may be deleted too (the next load replays the events).
    #[must_use]
    pub fn including_newest(mut self) -> Self {
        self.include_newest = true;
        self
    }

    /// Refuses a policy that would delete newest snapshots without saying
    /// so.
    pub(crate) fn validate(&self) -> Result<()> {
        if self.keep_latest == 0 && !self.include_newest {
            return Err(EventStoreError::invalid(
                "keep_latest",
                "0 would delete the newest snapshot of every stream; \
                 call including_newest() to allow that",
            ));
        }
        Ok(())
    }

    /// Whether a snapshot is deleted, given its rank among its stream's
    /// snapshots (0 = newest).
    pub(crate) fn deletes(&self, stream: &StreamId, rank: usize, taken_at: DateTime<Utc>) -> bool {
        self.stream_prefix
            .as_deref()
            .is_none_or(|p| stream.as_str().starts_with(p))
            && rank >= self.keep_latest as usize
            && self.taken_before.is_none_or(|t| taken_at < t)
    }
}

/// What an import did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ImportReport {
    /// Snapshots stored.
    pub imported: u64,
    /// Snapshots left out because the store already had one of that stream
    /// at that version (the stored one is kept).
    pub skipped: u64,
}

impl std::ops::AddAssign for ImportReport {
    fn add_assign(&mut self, other: Self) {
        self.imported += other.imported;
        self.skipped += other.skipped;
    }
}

/// The operator's side of the snapshot history: export, import, prune.
///
/// Implemented by [`PostgresEventStore`](crate::PostgresEventStore) and
/// [`InMemoryEventStore`](crate::InMemoryEventStore), which pass the same
/// contract (`testing::snapshot_archive_round_trip` and
/// `testing::snapshot_retention_policy`).
#[async_trait]
pub trait SnapshotArchive: Send + Sync {
    /// The selected snapshots, grouped by stream, versions ascending within
    /// a stream (the order of the streams is the backend's), fetched in
    /// bounded pages.
    fn export_snapshots(
        &self,
        selection: SnapshotSelection,
    ) -> BoxStream<'_, Result<SnapshotRecord>>;

    /// Stores `records` in one transaction, keeping their `taken_at`.
    ///
    /// A record for a stream and version the store already holds is
    /// skipped (the stored snapshot wins), so an import can be repeated.
    /// Older versions are imported beside newer ones; loads still return
    /// the newest.
    ///
    /// # Errors
    ///
    /// [`EventStoreError::Invalid`] for a record with version 0, state that
    /// is not JSON or a schema version beyond `i32::MAX`; nothing is
    /// written then.
    async fn import_snapshots(&self, records: Vec<SnapshotRecord>) -> Result<ImportReport>;

    /// Deletes the snapshots `policy` selects, in one transaction, and
    /// returns how many.
    ///
    /// # Errors
    ///
    /// [`EventStoreError::Invalid`] for `keep_latest(0)` without
    /// [`including_newest`](SnapshotRetention::including_newest); nothing
    /// is deleted then.
    async fn prune_snapshots(&self, policy: &SnapshotRetention) -> Result<u64>;
}

/// Writes the selected snapshots to `writer` as NDJSON and flushes it;
/// returns how many lines were written.
///
/// # Errors
///
/// The store's errors, and [`EventStoreError::Io`] when writing fails.
pub async fn export_ndjson<A, W>(
    archive: &A,
    selection: SnapshotSelection,
    writer: &mut W,
) -> Result<u64>
where
    A: SnapshotArchive + ?Sized,
    W: AsyncWrite + Unpin + ?Sized,
{
    let mut records = archive.export_snapshots(selection);
    let mut written = 0u64;
    while let Some(record) = records.next().await {
        let mut line = record?.to_ndjson()?;
        line.push('\n');
        writer
            .write_all(line.as_bytes())
            .await
            .map_err(|e| EventStoreError::io("writing the snapshot export", e))?;
        written += 1;
    }
    writer
        .flush()
        .await
        .map_err(|e| EventStoreError::io("writing the snapshot export", e))?;
    Ok(written)
}

/// Reads NDJSON written by [`export_ndjson`] and imports it in batches of
/// `batch_size` lines (each batch one transaction, see
/// [`SnapshotArchive::import_snapshots`]).
///
/// A batch is parsed and validated in full before it is written, so a bad
/// line stops the import with nothing of its batch stored; earlier batches
/// stay, and since an import skips what is already stored, running it again
/// after fixing the file completes it.
///
/// # Errors
///
/// [`EventStoreError::Invalid`] naming the line number and what is wrong,
/// [`EventStoreError::Io`] when reading fails, and the store's errors.
pub async fn import_ndjson<A, R>(
    archive: &A,
    reader: &mut R,
    batch_size: usize,
) -> Result<ImportReport>
where
    A: SnapshotArchive + ?Sized,
    R: AsyncBufRead + Unpin + ?Sized,
{
    let batch_size = batch_size.max(1);
    let mut report = ImportReport::default();
    let mut batch = Vec::with_capacity(batch_size);
    let mut number = 0u64;
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let read = (&mut *reader)
            .take(MAX_SNAPSHOT_LINE_BYTES as u64 + 1)
            .read_until(b'\n', &mut buf)
            .await
            .map_err(|e| EventStoreError::io("reading the snapshot import", e))?;
        if read == 0 {
            break;
        }
        number += 1;
        if buf.len() > MAX_SNAPSHOT_LINE_BYTES {
            return Err(EventStoreError::invalid(
                "snapshot line",
                format!("line {number} is longer than {MAX_SNAPSHOT_LINE_BYTES} bytes"),
            ));
        }
        let text = std::str::from_utf8(&buf).map_err(|_| {
            EventStoreError::invalid("snapshot line", format!("line {number} is not UTF-8"))
        })?;
        let text = text.trim();
        if text.is_empty() {
            continue;
        }
        let record = SnapshotRecord::from_ndjson(text).map_err(|e| match e {
            EventStoreError::Invalid(inv) => EventStoreError::invalid(
                "snapshot line",
                format!("line {number}: {}: {}", inv.field, inv.reason),
            ),
            other => other,
        })?;
        batch.push(record);
        if batch.len() == batch_size {
            report += archive.import_snapshots(std::mem::take(&mut batch)).await?;
        }
    }
    if !batch.is_empty() {
        report += archive.import_snapshots(batch).await?;
    }
    Ok(report)
}
