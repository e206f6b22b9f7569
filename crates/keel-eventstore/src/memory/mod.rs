//! The in-memory event store: same behaviour as the PostgreSQL one, no
//! server. For tests and examples.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use keel_core::uow::MemoryCell;
use keel_core::{ExpectedVersion, Position, StreamId, Version, VersionConflict};
use keel_telemetry::KeelMetrics;
use tokio::sync::watch;

use crate::error::{EventStoreError, Result};
use crate::event::{
    AppendResult, NewEvent, ReadAll, ReadDirection, ReadStream, RecordedEvent, StoreConfig,
    StreamAppend, validate_batch,
};
use crate::store::{
    Appender, EventSignal, EventStream, GlobalLog, Leadership, Snapshot, SnapshotStore,
    StreamReader, SubscriptionSupport,
};
use crate::telemetry::{Appending, StoreMetrics};

mod projection;
mod snapshots;
mod transaction;

use snapshots::{SnapshotHistory, keep_snapshot, latest_snapshot};

/// An event store held in memory. Cloning shares the same store.
///
/// Global positions use a per-append commit counter and a global sequence,
/// so readers see the same ordering rules as with PostgreSQL.
///
/// The log lives in a [`MemoryCell`], so the store joins a
/// [`MemoryTransaction`](keel_core::uow::MemoryTransaction) with
/// [`within`](Self::within) and commits atomically with every other
/// in-memory adapter written in the same transaction. A transaction works
/// on its own copy of the log's index (cheap for test-sized stores; the
/// events themselves are shared).
#[derive(Clone, Debug)]
pub struct InMemoryEventStore {
    inner: Arc<Shared>,
    metrics: StoreMetrics,
}

impl Default for InMemoryEventStore {
    fn default() -> Self {
        Self::new()
    }
}

#[derive(Debug)]
struct Shared {
    config: StoreConfig,
    log: Arc<MemoryCell<Log>>,
    snapshots: Arc<MemoryCell<SnapshotHistory>>,
    checkpoints: Mutex<HashMap<String, Position>>,
    delivered: Mutex<HashMap<String, Position>>,
    projections: Arc<MemoryCell<projection::Book>>,
    appended: Arc<watch::Sender<u64>>,
    leaders: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// The stored events and their indexes. Events are shared, so the copy a
/// transaction takes costs the indexes only.
#[derive(Clone, Debug, Default)]
struct Log {
    events: Vec<Arc<RecordedEvent>>,
    streams: HashMap<StreamId, Vec<usize>>,
    ids: HashMap<keel_core::EventId, usize>,
    last_commit: u64,
}

impl InMemoryEventStore {
    /// An empty store with default settings.
    #[must_use]
    pub fn new() -> Self {
        Self::with_config(StoreConfig::default())
    }

    /// An empty store with the given settings.
    #[must_use]
    pub fn with_config(config: StoreConfig) -> Self {
        let (tx, _) = watch::channel(0);
        let appended = Arc::new(tx);
        let wake = Arc::clone(&appended);
        Self {
            inner: Arc::new(Shared {
                config,
                // Subscriptions wake after every committed change of the
                // log, direct or through a transaction, never before.
                log: Arc::new(MemoryCell::new(Log::default()).on_commit(move || {
                    wake.send_modify(|n| *n += 1);
                })),
                snapshots: Arc::new(MemoryCell::new(SnapshotHistory::default())),
                checkpoints: Mutex::default(),
                delivered: Mutex::default(),
                projections: Arc::new(MemoryCell::new(projection::Book::default())),
                appended,
                leaders: Mutex::default(),
            }),
            metrics: StoreMetrics::default(),
        }
    }

    fn checkpoints(&self) -> MutexGuard<'_, HashMap<String, Position>> {
        // A checkpoint update is one map insert: poisoning carries no
        // meaning here.
        self.inner
            .checkpoints
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

enum Plan {
    Append { current: Version },
    Retry(AppendResult),
}

fn plan(
    state: &Log,
    stream: &StreamId,
    expected: ExpectedVersion,
    events: &[NewEvent],
) -> Result<Plan> {
    let indexes = state.streams.get(stream);
    let current = Version::new(indexes.map_or(0, |v| v.len() as u64));
    let stored: Vec<Option<&RecordedEvent>> = events
        .iter()
        .map(|e| state.ids.get(&e.event_id()).map(|&i| &*state.events[i]))
        .collect();
    if stored.iter().any(Option::is_some) {
        let first = stored
            .iter()
            .flatten()
            .filter(|r| &r.stream_id == stream)
            .map(|r| r.version)
            .min();
        let matches = |i: usize, e: &NewEvent, r: &RecordedEvent| {
            first.is_some_and(|f| {
                r.stream_id == *stream
                    && r.version == f.advance(i as u64)
                    && r.event_type == e.event_type()
                    && r.schema_version == e.schema_version()
                    && json_eq(&r.payload, e.payload_json())
            })
        };
        let all_match = events
            .iter()
            .zip(&stored)
            .enumerate()
            .all(|(i, (e, r))| r.is_some_and(|r| matches(i, e, r)));
        let first_v = first.unwrap_or_default();
        let expectation_ok = match expected {
            ExpectedVersion::Exact(v) => v.next() == first_v,
            ExpectedVersion::NoStream => first_v == Version::new(1),
            _ => true,
        };
        if all_match && expectation_ok {
            return Ok(Plan::Retry(AppendResult {
                stream_id: stream.clone(),
                first_version: first_v,
                next_expected_version: first_v.advance(events.len() as u64 - 1),
                positions: stored.iter().flatten().map(|r| r.position).collect(),
                was_retry: true,
            }));
        }
        let bad = events
            .iter()
            .zip(&stored)
            .enumerate()
            .find(|(i, (e, r))| r.is_some_and(|r| !matches(*i, e, r)))
            .or_else(|| {
                events
                    .iter()
                    .zip(&stored)
                    .enumerate()
                    .find(|(_, (_, r))| r.is_some())
            })
            .map(|(_, (e, _))| e.event_id())
            .unwrap_or_default();
        return Err(EventStoreError::EventIdReused {
            event_id: bad,
            stream_id: stream.clone(),
        });
    }
    if !expected.is_satisfied_by(current) {
        return Err(VersionConflict {
            subject: stream.to_string(),
            expected,
            actual: current,
        }
        .into());
    }
    Ok(Plan::Append { current })
}

fn json_eq(a: &str, b: &str) -> bool {
    match (
        serde_json::from_str::<serde_json::Value>(a),
        serde_json::from_str::<serde_json::Value>(b),
    ) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

fn apply(
    state: &mut Log,
    commit: u64,
    stream: &StreamId,
    current: Version,
    events: &[NewEvent],
) -> AppendResult {
    let now = Utc::now();
    let mut positions = Vec::with_capacity(events.len());
    let first = current.next();
    for (i, e) in events.iter().enumerate() {
        let index = state.events.len();
        let position = Position::new(commit, index as u64 + 1);
        positions.push(position);
        state.ids.insert(e.event_id(), index);
        state.streams.entry(stream.clone()).or_default().push(index);
        state.events.push(Arc::new(RecordedEvent {
            event_id: e.event_id(),
            stream_id: stream.clone(),
            version: first.advance(i as u64),
            position,
            event_type: e.event_type().to_owned(),
            schema_version: e.schema_version(),
            recorded_at: now,
            metadata: e.metadata().clone().into(),
            payload: e.payload_json().to_owned(),
        }));
    }
    let next = Version::new(state.streams[stream].len() as u64);
    AppendResult {
        stream_id: stream.clone(),
        first_version: first,
        next_expected_version: next,
        positions,
        was_retry: false,
    }
}

#[async_trait]
impl Appender for InMemoryEventStore {
    async fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendResult> {
        self.append_multi(vec![StreamAppend::new(stream.clone(), expected, events)])
            .await
            .map(|mut r| r.remove(0))
    }

    async fn append_multi(&self, mut appends: Vec<StreamAppend>) -> Result<Vec<AppendResult>> {
        let appending = Appending::start(appends.iter_mut().map(|a| (&a.stream_id, &mut a.events)));
        let result = self.append_multi_unrecorded(&appends);
        appending.finish(&self.metrics.0, result)
    }
}

impl InMemoryEventStore {
    /// Records `keel.eventstore.append.*` through `metrics` instead of the
    /// global meter provider's instruments taken when the store was built.
    /// Clones made afterwards share the choice.
    #[must_use]
    pub fn with_metrics(mut self, metrics: KeelMetrics) -> Self {
        self.metrics = StoreMetrics(metrics);
        self
    }

    fn append_multi_unrecorded(&self, appends: &[StreamAppend]) -> Result<Vec<AppendResult>> {
        check_multi(appends, self.inner.config.max_payload_bytes)?;
        self.inner.log.write(|log| append_all(log, appends))
    }
}

/// Refuses malformed multi-stream appends before anything is planned.
fn check_multi(appends: &[StreamAppend], max_payload: usize) -> Result<()> {
    if appends.is_empty() {
        return Err(EventStoreError::invalid(
            "appends",
            "at least one stream is needed",
        ));
    }
    for a in appends {
        validate_batch(a.expected, &a.events, max_payload)?;
    }
    let mut streams = HashSet::new();
    for a in appends {
        if !streams.insert(&a.stream_id) {
            return Err(EventStoreError::invalid(
                "appends",
                format!(
                    "stream {} appears twice in one multi-stream append",
                    a.stream_id
                ),
            ));
        }
    }
    let mut ids = HashSet::new();
    for a in appends {
        for e in &a.events {
            if !ids.insert(e.event_id()) {
                return Err(EventStoreError::invalid(
                    "event_id",
                    format!("{} appears twice in one append", e.event_id()),
                ));
            }
        }
    }
    Ok(())
}

/// Plans every part against the log, without writing: all or nothing.
fn plan_all(log: &Log, appends: &[StreamAppend]) -> Result<Vec<Plan>> {
    appends
        .iter()
        .map(|a| plan(log, &a.stream_id, a.expected, &a.events))
        .collect()
}

/// Plans, then writes every part under one new commit key.
fn append_all(log: &mut Log, appends: &[StreamAppend]) -> Result<Vec<AppendResult>> {
    let plans = plan_all(log, appends)?;
    if plans.iter().any(|p| matches!(p, Plan::Append { .. })) {
        log.last_commit += 1;
    }
    let commit = log.last_commit;
    Ok(appends
        .iter()
        .zip(plans)
        .map(|(a, p)| match p {
            Plan::Retry(r) => r,
            Plan::Append { current } => apply(log, commit, &a.stream_id, current, &a.events),
        })
        .collect())
}

/// Where a stream read continues.
struct StreamCursor {
    direction: ReadDirection,
    next: i64,
    remaining: usize,
}

impl StreamCursor {
    fn new(options: &ReadStream) -> Self {
        let (from, limit) = options.bounds();
        Self {
            direction: options.direction,
            // Versions are 1-based and dense, so a version is an index + 1.
            next: match options.direction {
                ReadDirection::Forward => from.max(1),
                ReadDirection::Backward => from,
            },
            remaining: usize::try_from(limit).unwrap_or(usize::MAX),
        }
    }

    /// The next batch of at most `batch` events; empty at the end.
    fn next_chunk(&mut self, log: &Log, stream: &StreamId, batch: usize) -> Vec<RecordedEvent> {
        if self.remaining == 0 {
            return Vec::new();
        }
        let Some(idx) = log.streams.get(stream) else {
            return Vec::new();
        };
        let len = idx.len() as i64;
        let take = self.remaining.min(batch);
        let chunk: Vec<RecordedEvent> = match self.direction {
            ReadDirection::Forward => {
                if self.next > len {
                    Vec::new()
                } else {
                    let start = (self.next - 1) as usize;
                    idx[start..]
                        .iter()
                        .take(take)
                        .map(|&i| (*log.events[i]).clone())
                        .collect()
                }
            }
            ReadDirection::Backward => {
                let top = self.next.min(len);
                if top < 1 {
                    Vec::new()
                } else {
                    idx[..top as usize]
                        .iter()
                        .rev()
                        .take(take)
                        .map(|&i| (*log.events[i]).clone())
                        .collect()
                }
            }
        };
        let n = chunk.len();
        self.remaining -= n;
        self.next = match self.direction {
            ReadDirection::Forward => self.next + n as i64,
            ReadDirection::Backward => match chunk.first() {
                Some(first) => self.next.min(first.version.get() as i64) - n as i64,
                None => self.next,
            },
        };
        if n < take {
            self.remaining = 0;
        }
        chunk
    }
}

fn version_of(log: &Log, stream: &StreamId) -> Version {
    Version::new(log.streams.get(stream).map_or(0, |v| v.len() as u64))
}

#[async_trait]
impl StreamReader for InMemoryEventStore {
    fn read_stream<'a>(&'a self, stream: &'a StreamId, options: ReadStream) -> EventStream<'a> {
        let batch = options.page(&self.inner.config) as usize;
        Box::pin(async_stream::try_stream! {
            let mut cursor = StreamCursor::new(&options);
            loop {
                let chunk = self.inner.log.read(|log| cursor.next_chunk(log, stream, batch));
                if chunk.is_empty() { break; }
                for e in chunk { yield e; }
            }
        })
    }

    async fn stream_version(&self, stream: &StreamId) -> Result<Version> {
        Ok(self.inner.log.read(|log| version_of(log, stream)))
    }
}

impl GlobalLog for InMemoryEventStore {
    fn read_all(&self, options: ReadAll) -> EventStream<'_> {
        let batch = options.page(&self.inner.config) as usize;
        Box::pin(async_stream::try_stream! {
            let mut remaining = options.limit.map_or(usize::MAX, |l| usize::try_from(l).unwrap_or(usize::MAX));
            let mut after = options.after;
            while remaining > 0 {
                let (chunk, scanned_to_end) = {
                    self.inner.log.read(|log| {
                        let start = log.events.partition_point(|e| e.position <= after);
                        let mut out = Vec::new();
                        let mut end = true;
                        for e in &log.events[start..] {
                            if out.len() == remaining.min(batch) { end = false; break; }
                            if options.matches(e) { out.push((**e).clone()); }
                            after = e.position;
                        }
                        (out, end)
                    })
                };
                remaining -= chunk.len();
                for e in chunk { yield e; }
                if scanned_to_end { break; }
            }
        })
    }
}

#[async_trait]
impl SnapshotStore for InMemoryEventStore {
    async fn load_snapshot(&self, stream: &StreamId) -> Result<Option<Snapshot>> {
        Ok(self.inner.snapshots.read(|s| latest_snapshot(s, stream)))
    }

    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<()> {
        crate::archive::validate_snapshot(&snapshot)?;
        self.inner.snapshots.write(|s| {
            keep_snapshot(s, snapshot, Utc::now());
            Ok::<_, EventStoreError>(())
        })
    }
}

#[derive(Debug)]
struct MemoryLeadership {
    _guard: tokio::sync::OwnedMutexGuard<()>,
}

#[async_trait]
impl Leadership for MemoryLeadership {
    async fn is_held(&mut self) -> bool {
        true
    }
}

#[derive(Debug)]
struct MemorySignal {
    rx: Option<watch::Receiver<u64>>,
}

#[async_trait]
impl EventSignal for MemorySignal {
    async fn wait(&mut self, timeout: Duration) {
        match &mut self.rx {
            Some(rx) => {
                let _ = tokio::time::timeout(timeout, rx.changed()).await;
            }
            None => tokio::time::sleep(timeout).await,
        }
    }
}

#[async_trait]
impl SubscriptionSupport for InMemoryEventStore {
    async fn load_checkpoint(&self, name: &str) -> Result<Option<Position>> {
        Ok(self.checkpoints().get(name).copied())
    }

    async fn save_checkpoint(&self, name: &str, position: Position) -> Result<()> {
        if name.is_empty() {
            return Err(EventStoreError::invalid(
                "subscription",
                "the name must not be empty",
            ));
        }
        let mut checkpoints = self.checkpoints();
        let entry = checkpoints.entry(name.to_owned()).or_insert(position);
        if *entry < position {
            *entry = position;
        }
        Ok(())
    }

    async fn load_delivered(&self, name: &str) -> Result<Option<Position>> {
        Ok(self
            .inner
            .delivered
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(name)
            .copied())
    }

    async fn save_delivered(&self, name: &str, position: Position) -> Result<()> {
        if name.is_empty() {
            return Err(EventStoreError::invalid(
                "subscription",
                "the name must not be empty",
            ));
        }
        // As on PostgreSQL, where the mark shares the checkpoint's row: a
        // subscription that has started delivering has a checkpoint, at the
        // start of the log until it stores one.
        self.checkpoints()
            .entry(name.to_owned())
            .or_insert(Position::START);
        let mut delivered = self
            .inner
            .delivered
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let entry = delivered.entry(name.to_owned()).or_insert(position);
        if *entry < position {
            *entry = position;
        }
        Ok(())
    }

    async fn acquire_leadership(
        &self,
        name: &str,
        _retry: Duration,
    ) -> Result<Box<dyn Leadership>> {
        let lock = {
            let mut leaders = self
                .inner
                .leaders
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            leaders.entry(name.to_owned()).or_default().clone()
        };
        let guard = lock.lock_owned().await;
        Ok(Box::new(MemoryLeadership { _guard: guard }))
    }

    async fn event_signal(&self) -> Result<Box<dyn EventSignal>> {
        let mut rx = self.inner.appended.subscribe();
        rx.mark_unchanged();
        Ok(Box::new(MemorySignal { rx: Some(rx) }))
    }
}
