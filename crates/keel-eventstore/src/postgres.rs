//! The PostgreSQL event store.

use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use futures::TryStreamExt;
use keel_core::{EventId, ExpectedVersion, Position, StreamId, Version, VersionConflict};
use sqlx::postgres::{PgListener, PgRow};
use sqlx::{Connection, PgConnection, PgPool, Row};

use crate::error::{EventStoreError, Result};
use crate::event::{
    AppendResult, NewEvent, ReadAll, ReadDirection, ReadStream, RecordedEvent, StoreConfig,
    StoredMetadata, StreamAppend, validate_batch,
};
use crate::store::{
    Appender, EventSignal, EventStream, GlobalLog, Leadership, Snapshot, SnapshotStore,
    StreamReader, SubscriptionSupport,
};
use crate::telemetry::{Appending, StoreMetrics};

/// The channel appends notify on (when [`StoreConfig::notify_on_append`]).
pub const NOTIFY_CHANNEL: &str = "keel_events";

const EVENT_ID_CONSTRAINT: &str = "events_event_id_key";
/// The unique index that lets one writer, and only one, store a version.
const STREAM_VERSION_CONSTRAINT: &str = "events_stream_version_key";

/// Opens the transaction a global-log batch is read in (see `read_all`).
const ORDERED_READ: &str =
    "BEGIN READ ONLY; SET LOCAL enable_sort = off; SET LOCAL enable_bitmapscan = off";

const COLUMNS: &str = "commit, position, event_id, stream_id, version, event_type, \
                       schema_version, payload::text, metadata::text, recorded_at";

/// The event store on PostgreSQL (tables in schema `keel`, created by
/// `keel_database::MIGRATOR`).
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

/// Sends the wake-up `NOTIFY` for appends made by this store, outside the
/// writers' transactions.
///
/// `NOTIFY` takes a cluster-wide lock at commit that is held through the
/// commit's WAL flush, so notifying inside every append serialises all
/// committers. Instead a background task notifies after the appends have
/// committed, coalescing bursts into one notification (at most one per
/// [`NOTIFY_SPACING`]).
#[derive(Debug, Default)]
struct Notifier {
    wake: tokio::sync::Notify,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

async fn notify_loop(pool: PgPool, notifier: Weak<Notifier>) {
    loop {
        let Some(n) = notifier.upgrade() else { return };
        // A bounded wait so the task ends soon after the store is dropped.
        let woke = tokio::time::timeout(Duration::from_secs(2), n.wake.notified())
            .await
            .is_ok();
        drop(n);
        if woke
            // The notification needs no durability of its own (a lost one
            // costs a subscription one polling interval), so its transaction
            // commits asynchronously: it never waits for a WAL flush and
            // never queues behind the writers' commits.
            && let Err(error) = sqlx::query(
                "SELECT set_config('synchronous_commit', 'off', true), pg_notify($1, '')",
            )
                .bind(NOTIFY_CHANNEL)
                .execute(&pool)
                .await
        {
            // Subscriptions fall back to polling; nothing is lost.
            tracing::debug!(%error, "could not send the append notification");
        }
        if woke {
            // Appends committed meanwhile leave one pending wake-up, answered
            // by one notification after the pause: under a steady stream of
            // appends the store sends at most one per pause, not one each.
            tokio::time::sleep(NOTIFY_SPACING).await;
        }
    }
}

/// The shortest time between two append notifications from one store. It
/// bounds the extra delay a subscription sees and the server work
/// notifications cost under heavy writing.
const NOTIFY_SPACING: Duration = Duration::from_millis(5);

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

    /// Wakes subscriptions after appends committed by this store.
    fn committed(&self) {
        if !self.config.notify_on_append {
            return;
        }
        {
            let mut task = self
                .notifier
                .task
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if task
                .as_ref()
                .is_none_or(tokio::task::JoinHandle::is_finished)
            {
                *task = Some(tokio::spawn(notify_loop(
                    self.pool.clone(),
                    Arc::downgrade(&self.notifier),
                )));
            }
        }
        self.notifier.wake.notify_one();
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

    /// Appends within the caller's transaction (a unit of work that also
    /// writes an outbox row or a read model, say). Nothing is visible until
    /// the caller commits; on an error the caller must roll back.
    ///
    /// The versions this append stores stay claimed until the caller's
    /// transaction ends: another writer of the same stream waits for it
    /// (and then conflicts or moves on), so keep such transactions short.
    pub async fn append_in(
        &self,
        conn: &mut PgConnection,
        stream: &StreamId,
        expected: ExpectedVersion,
        mut events: Vec<NewEvent>,
    ) -> Result<AppendResult> {
        let appending = Appending::start([(stream, &mut events)]);
        let result = match validate_batch(expected, &events, self.config.max_payload_bytes) {
            // The notification is sent in the caller's transaction, so it is
            // delivered only if and when that transaction commits.
            Ok(()) => {
                append_once(
                    conn,
                    stream,
                    expected,
                    &events,
                    self.config.notify_on_append,
                    false,
                )
                .await
            }
            Err(e) => Err(e),
        };
        appending.finish(&self.metrics.0, result)
    }

    /// Appends to several streams within the caller's transaction; see
    /// [`append_in`](Self::append_in).
    pub async fn append_multi_in(
        &self,
        conn: &mut PgConnection,
        mut appends: Vec<StreamAppend>,
    ) -> Result<Vec<AppendResult>> {
        let appending = Appending::start(appends.iter_mut().map(|a| (&a.stream_id, &mut a.events)));
        let result = self
            .append_multi_with(conn, appends, self.config.notify_on_append)
            .await;
        appending.finish(&self.metrics.0, result)
    }

    async fn append_multi_with(
        &self,
        conn: &mut PgConnection,
        appends: Vec<StreamAppend>,
        notify_in_transaction: bool,
    ) -> Result<Vec<AppendResult>> {
        check_multi(&appends, self.config.max_payload_bytes)?;
        // Claim streams in one global order (by id), so two multi-stream
        // appends over the same streams queue on each other's versions
        // instead of deadlocking.
        let mut order: Vec<usize> = (0..appends.len()).collect();
        order.sort_by(|&a, &b| appends[a].stream_id.cmp(&appends[b].stream_id));
        let mut results: Vec<Option<AppendResult>> = vec![None; appends.len()];
        for i in order {
            let a = &appends[i];
            results[i] = Some(
                append_once(
                    conn,
                    &a.stream_id,
                    a.expected,
                    &a.events,
                    notify_in_transaction,
                    false,
                )
                .await?,
            );
        }
        let results: Vec<AppendResult> = results.into_iter().flatten().collect();
        Ok(results)
    }
}

fn check_multi(appends: &[StreamAppend], max_payload: usize) -> Result<()> {
    if appends.is_empty() {
        return Err(EventStoreError::invalid(
            "appends",
            "at least one stream is needed",
        ));
    }
    let mut streams = std::collections::HashSet::new();
    let mut ids = std::collections::HashSet::new();
    for a in appends {
        validate_batch(a.expected, &a.events, max_payload)?;
        if !streams.insert(&a.stream_id) {
            return Err(EventStoreError::invalid(
                "appends",
                format!(
                    "stream {} appears twice in one multi-stream append",
                    a.stream_id
                ),
            ));
        }
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

fn expected_args(expected: ExpectedVersion) -> (i16, i64) {
    match expected {
        ExpectedVersion::Any => (0, 0),
        ExpectedVersion::NoStream => (1, 0),
        ExpectedVersion::StreamExists => (2, 0),
        // validate_batch has refused versions beyond i64 already
        ExpectedVersion::Exact(v) => (3, i64::try_from(v.get()).unwrap_or(i64::MAX)),
    }
}

/// Whether `e` is a unique violation of the named constraint.
fn is_unique_violation(e: &sqlx::Error, constraint: &str) -> bool {
    matches!(e, sqlx::Error::Database(db)
        if db.code().as_deref() == Some("23505") && db.constraint() == Some(constraint))
}

fn to_u64(v: i64, what: &str) -> Result<u64> {
    u64::try_from(v).map_err(|_| EventStoreError::Corrupt(format!("negative {what} {v}")))
}

/// Appends one batch. In autocommit mode (`autocommit`), an append that lost
/// a race for an event id to a concurrent transaction is tried once more:
/// now that the winner has committed, the second attempt tells an
/// idempotent retry from a misuse. Inside a caller's transaction the failed
/// statement has aborted the transaction, so the error is returned.
async fn append_once(
    conn: &mut PgConnection,
    stream: &StreamId,
    expected: ExpectedVersion,
    events: &[NewEvent],
    notify: bool,
    autocommit: bool,
) -> Result<AppendResult> {
    match append_call(conn, stream, expected, events, notify).await {
        Err(Raced) if autocommit => match append_call(conn, stream, expected, events, notify).await
        {
            Err(Raced) => Err(raced(stream, events)),
            Ok(r) => r,
        },
        Err(Raced) => Err(raced(stream, events)),
        Ok(r) => r,
    }
}

/// An append lost a race for an event id against a concurrent transaction.
struct Raced;

fn raced(stream: &StreamId, events: &[NewEvent]) -> EventStoreError {
    EventStoreError::EventIdReused {
        event_id: events[0].event_id(),
        stream_id: stream.clone(),
    }
}

async fn append_call(
    conn: &mut PgConnection,
    stream: &StreamId,
    expected: ExpectedVersion,
    events: &[NewEvent],
    notify: bool,
) -> std::result::Result<Result<AppendResult>, Raced> {
    let row = match call_append_function(conn, stream, expected, events, notify).await {
        Ok(row) => row,
        Err(CallError::Raced) => return Err(Raced),
        Err(CallError::Other(e)) => return Ok(Err(e)),
    };
    Ok(interpret(&row, stream, expected, events))
}

enum CallError {
    Raced,
    Other(EventStoreError),
}

impl From<EventStoreError> for CallError {
    fn from(e: EventStoreError) -> Self {
        Self::Other(e)
    }
}

async fn call_append_function(
    conn: &mut PgConnection,
    stream: &StreamId,
    expected: ExpectedVersion,
    events: &[NewEvent],
    notify: bool,
) -> std::result::Result<PgRow, CallError> {
    let (mode, version) = expected_args(expected);
    let EventColumns {
        ids,
        types,
        schemas,
        payloads,
        metadata,
    } = EventColumns::new(events)?;
    sqlx::query(
        "SELECT outcome, actual_version, first_version, positions, commits, conflicting_event_id \
         FROM keel.append_events($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(stream.as_str())
    .bind(mode)
    .bind(version)
    .bind(&ids)
    .bind(&types)
    .bind(&schemas)
    .bind(&payloads)
    .bind(&metadata)
    .bind(notify)
    .fetch_one(&mut *conn)
    .await
    .map_err(|e| {
        if is_unique_violation(&e, EVENT_ID_CONSTRAINT) {
            // Another transaction stored one of these ids at the same moment.
            CallError::Raced
        } else {
            CallError::Other(e.into())
        }
    })
}

/// The common path of an autocommit append, in one statement: check the
/// expectation against the stream's newest stored version and insert the
/// events after it.
///
/// There is no head row to move: the unique index on `(stream_id, version)`
/// refuses a second writer of the same version, so of two writers with the
/// same expectation exactly one inserts and the other's statement fails.
/// An exact expectation costs one index probe (is version `expected`
/// stored?); a version above it is then caught by the index on insert.
///
/// Returns `None` when the statement wrote nothing: the expectation did not
/// hold, a concurrent writer took the versions, or an event id is stored
/// already. Those are the rare paths (a conflict, an idempotent retry, a
/// reused id) and `keel.append_events` sorts them out. Because the statement
/// is its own transaction, a failed insert leaves nothing behind.
async fn fast_append(
    conn: &mut PgConnection,
    stream: &StreamId,
    expected: ExpectedVersion,
    events: &[NewEvent],
) -> Result<Option<AppendResult>> {
    // $1 stream, $2..$6 the event columns, $7 the expected version (exact
    // mode only).
    // A batch arrives as column arrays and is inserted with UNNEST; a single
    // event (the most common append) as plain values, which spares the
    // server the array decoding and the set-returning function.
    const INSERT_BATCH: &str = "
        ins AS (
            INSERT INTO keel.events
                (event_id, stream_id, version, event_type, schema_version, payload, metadata)
            SELECT n.event_id, $1, s.prev + n.ord, n.event_type, n.schema_version,
                   n.payload::json, n.metadata::json
            FROM s, unnest($2::uuid[], $3::text[], $4::int4[], $5::text[], $6::text[])
                    WITH ORDINALITY AS n(event_id, event_type, schema_version, payload, metadata, ord)
            RETURNING position, commit, version
        )
        SELECT (SELECT prev FROM s),
               array_agg(position ORDER BY version),
               array_agg(commit ORDER BY version)
        FROM ins";
    const INSERT_ONE: &str = "
        ins AS (
            INSERT INTO keel.events
                (event_id, stream_id, version, event_type, schema_version, payload, metadata)
            SELECT $2::uuid, $1, s.prev + 1, $3::text, $4::int4, $5::text::json, $6::text::json
            FROM s
            RETURNING position, commit, version
        )
        SELECT (SELECT prev FROM s), array_agg(position), array_agg(commit) FROM ins";
    // The version the batch follows, or no row when the expectation fails.
    const HEADS: [&str; 4] = [
        // any: after whatever is stored
        "WITH s AS (SELECT coalesce(max(version), 0) AS prev \
         FROM keel.events WHERE stream_id = $1),",
        // no stream: from the start (the index refuses version 1 if stored)
        "WITH s AS (SELECT 0::int8 AS prev),",
        // stream exists: after the newest stored version, if there is one
        "WITH s AS (SELECT max(version) AS prev FROM keel.events WHERE stream_id = $1 \
         HAVING max(version) IS NOT NULL),",
        // exact: after the expected version, if it is stored (the index
        // refuses the insert if a later one is)
        "WITH s AS (SELECT $7::int8 AS prev WHERE EXISTS \
         (SELECT 1 FROM keel.events WHERE stream_id = $1 AND version = $7)),",
    ];
    static SQL: std::sync::OnceLock<[[String; 4]; 2]> = std::sync::OnceLock::new();
    let sql = SQL.get_or_init(|| {
        [INSERT_BATCH, INSERT_ONE].map(|insert| HEADS.map(|head| format!("{head} {insert}")))
    });
    let (mode, expected_at) = expected_args(expected);
    let variant = match (mode, expected_at) {
        (0, _) => 0,
        (1, _) | (3, 0) => 1,
        (2, _) => 2,
        _ => 3,
    };
    let count = i64::try_from(events.len()).unwrap_or(i64::MAX);
    let one_metadata;
    let columns;
    let mut query = if let [event] = events {
        one_metadata = metadata_json(event)?;
        sqlx::query(&sql[1][variant])
            .bind(stream.as_str())
            .bind(*event.event_id().as_uuid())
            .bind(event.event_type())
            .bind(i32::try_from(event.schema_version()).unwrap_or(i32::MAX))
            .bind(event.payload_json())
            .bind(one_metadata.as_str())
    } else {
        columns = EventColumns::new(events)?;
        sqlx::query(&sql[0][variant])
            .bind(stream.as_str())
            .bind(&columns.ids)
            .bind(&columns.types)
            .bind(&columns.schemas)
            .bind(&columns.payloads)
            .bind(&columns.metadata)
    };
    if variant == 3 {
        query = query.bind(expected_at);
    }
    let row = match query.fetch_one(&mut *conn).await {
        Ok(row) => row,
        Err(e) if is_unique_violation(&e, EVENT_ID_CONSTRAINT) => return Ok(None),
        Err(e) if is_unique_violation(&e, STREAM_VERSION_CONSTRAINT) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let Some(prev) = row.try_get::<Option<i64>, _>(0)? else {
        return Ok(None);
    };
    let positions: Vec<i64> = row.try_get(1)?;
    let commits: Vec<i64> = row.try_get(2)?;
    let positions = commits
        .iter()
        .zip(&positions)
        .map(|(&c, &p)| Ok(Position::new(to_u64(c, "commit")?, to_u64(p, "position")?)))
        .collect::<Result<Vec<_>>>()?;
    Ok(Some(AppendResult {
        stream_id: stream.clone(),
        first_version: Version::new(to_u64(prev + 1, "version")?),
        next_expected_version: Version::new(to_u64(prev + count, "version")?),
        positions,
        was_retry: false,
    }))
}

/// An event's metadata as the JSON text the `metadata` column stores.
fn metadata_json(event: &NewEvent) -> Result<String> {
    serde_json::to_string(event.metadata()).map_err(|source| EventStoreError::Serialize {
        event_type: event.event_type().to_owned(),
        source,
    })
}

/// A batch of events as the column arrays the append statements take.
struct EventColumns<'a> {
    ids: Vec<uuid::Uuid>,
    types: Vec<&'a str>,
    schemas: Vec<i32>,
    payloads: Vec<&'a str>,
    metadata: Vec<String>,
}

impl<'a> EventColumns<'a> {
    fn new(events: &'a [NewEvent]) -> Result<Self> {
        let mut columns = Self {
            ids: Vec::with_capacity(events.len()),
            types: Vec::with_capacity(events.len()),
            schemas: Vec::with_capacity(events.len()),
            payloads: Vec::with_capacity(events.len()),
            metadata: Vec::with_capacity(events.len()),
        };
        for e in events {
            columns.ids.push(*e.event_id().as_uuid());
            columns.types.push(e.event_type());
            columns
                .schemas
                .push(i32::try_from(e.schema_version()).unwrap_or(i32::MAX));
            columns.payloads.push(e.payload_json());
            columns.metadata.push(metadata_json(e)?);
        }
        Ok(columns)
    }
}

fn interpret(
    row: &PgRow,
    stream: &StreamId,
    expected: ExpectedVersion,
    events: &[NewEvent],
) -> Result<AppendResult> {
    let outcome: i16 = row.try_get(0)?;
    let actual: i64 = row.try_get(1)?;
    match outcome {
        0 | 1 => {
            let first: i64 = row.try_get(2)?;
            let positions: Vec<i64> = row.try_get(3)?;
            let commits: Vec<i64> = row.try_get(4)?;
            let positions = commits
                .iter()
                .zip(&positions)
                .map(|(&c, &p)| Ok(Position::new(to_u64(c, "commit")?, to_u64(p, "position")?)))
                .collect::<Result<Vec<_>>>()?;
            Ok(AppendResult {
                stream_id: stream.clone(),
                first_version: Version::new(to_u64(first, "version")?),
                next_expected_version: Version::new(to_u64(actual, "version")?),
                positions,
                was_retry: outcome == 1,
            })
        }
        2 => Err(VersionConflict {
            subject: stream.to_string(),
            expected,
            actual: Version::new(to_u64(actual, "version")?),
        }
        .into()),
        3 => {
            let id: Option<uuid::Uuid> = row.try_get(5)?;
            Err(EventStoreError::EventIdReused {
                event_id: id.map_or_else(|| events[0].event_id(), EventId::from_uuid),
                stream_id: stream.clone(),
            })
        }
        other => Err(EventStoreError::Corrupt(format!(
            "keel.append_events returned unknown outcome {other}"
        ))),
    }
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

#[async_trait]
impl Appender for PostgresEventStore {
    async fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        mut events: Vec<NewEvent>,
    ) -> Result<AppendResult> {
        let appending = Appending::start([(stream, &mut events)]);
        let result = async {
            validate_batch(expected, &events, self.config.max_payload_bytes)?;
            let mut conn = self.pool.acquire().await?;
            let result = match fast_append(&mut conn, stream, expected, &events).await? {
                Some(result) => result,
                // A conflict, a retry or a reused id: let the full procedure
                // tell which (it is slower, and only runs on these paths).
                None => append_once(&mut conn, stream, expected, &events, false, true).await?,
            };
            if !result.was_retry {
                self.committed();
            }
            Ok(result)
        }
        .await;
        appending.finish(&self.metrics.0, result)
    }

    async fn append_multi(&self, mut appends: Vec<StreamAppend>) -> Result<Vec<AppendResult>> {
        let appending = Appending::start(appends.iter_mut().map(|a| (&a.stream_id, &mut a.events)));
        let result = async {
            check_multi(&appends, self.config.max_payload_bytes)?;
            let mut tx = self.pool.begin().await?;
            let results = self.append_multi_with(&mut tx, appends, false).await?;
            tx.commit().await?;
            if results.iter().any(|r| !r.was_retry) {
                self.committed();
            }
            Ok(results)
        }
        .await;
        appending.finish(&self.metrics.0, result)
    }
}

#[async_trait]
impl StreamReader for PostgresEventStore {
    fn read_stream<'a>(&'a self, stream: &'a StreamId, options: ReadStream) -> EventStream<'a> {
        let batch = i64::from(self.config.read_batch_size);
        let sql = match options.direction() {
            ReadDirection::Forward => format!(
                "SELECT {COLUMNS} FROM keel.events WHERE stream_id = $1 AND version >= $2 \
                 ORDER BY version LIMIT $3"
            ),
            ReadDirection::Backward => format!(
                "SELECT {COLUMNS} FROM keel.events WHERE stream_id = $1 AND version <= $2 \
                 ORDER BY version DESC LIMIT $3"
            ),
        };
        Box::pin(async_stream::try_stream! {
            let (mut from, mut remaining) = options.bounds();
            while remaining > 0 {
                let take = remaining.min(batch);
                // Rows stream in as they are consumed: memory stays bounded
                // by the socket buffer, not by the batch size.
                let mut rows = sqlx::query(&sql)
                    .bind(stream.as_str())
                    .bind(from)
                    .bind(take)
                    .fetch(&self.pool);
                let mut n = 0i64;
                while let Some(row) = rows.try_next().await? {
                    n += 1;
                    let e = decode_row(&row, Some(stream))?;
                    let v = e.version.get() as i64;
                    from = match options.direction() {
                        ReadDirection::Forward => v + 1,
                        ReadDirection::Backward => v - 1,
                    };
                    yield e;
                }
                remaining -= n;
                if n < take { break; }
            }
        })
    }

    async fn stream_version(&self, stream: &StreamId) -> Result<Version> {
        let v: Option<i64> =
            sqlx::query_scalar("SELECT max(version) FROM keel.events WHERE stream_id = $1")
                .bind(stream.as_str())
                .fetch_one(&self.pool)
                .await?;
        Ok(Version::new(to_u64(v.unwrap_or(0), "version")?))
    }
}

fn horizon_warning_due() -> bool {
    static LAST: Mutex<Option<std::time::Instant>> = Mutex::new(None);
    let mut last = LAST
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let due = last.is_none_or(|t| t.elapsed() >= Duration::from_secs(60));
    if due {
        *last = Some(std::time::Instant::now());
    }
    due
}

fn clamp(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl GlobalLog for PostgresEventStore {
    fn read_all(&self, options: ReadAll) -> EventStream<'_> {
        let batch = i64::from(self.config.read_batch_size);
        Box::pin(async_stream::try_stream! {
            let mut after = (clamp(options.after.commit), clamp(options.after.sequence));
            let mut remaining = options.limit.map_or(i64::MAX, clamp);
            let mut settled = false;
            while remaining > 0 {
                let take = remaining.min(batch);
                // Each batch must be an ordered index scan that stops at the
                // limit. Left to itself the planner has been seen choosing a
                // bitmap scan of the whole rest of the log plus a sort (on
                // disk) for every batch, whenever its row estimate was off: a
                // cached generic plan cannot see which filters are unused, and
                // a freshly filled table has no statistics. So each batch runs
                // in a short read-only transaction that rules sorts and bitmap
                // scans out, with a plan made for the actual values.
                let mut tx = self.pool.begin_with(ORDERED_READ).await?;
                let mut rows = sqlx::query(&self.global_sql)
                    .persistent(false)
                    .bind(after.0)
                    .bind(after.1)
                    .bind(options.category.as_deref())
                    .bind(options.stream_prefix.as_deref())
                    .bind(options.event_types.as_deref())
                    .bind(take)
                    .fetch(&mut *tx);
                let mut n = 0i64;
                while let Some(row) = rows.try_next().await? {
                    n += 1;
                    let e = decode_row(&row, None)?;
                    after = (e.position.commit as i64, e.position.sequence as i64);
                    yield e;
                }
                drop(rows);
                tx.commit().await?;
                remaining -= n;
                if n < take {
                    if settled {
                        break;
                    }
                    // Events committed before now may still sit above the
                    // horizon because some transaction that started earlier
                    // is running. Wait (briefly) for the horizon to pass them
                    // so a reader sees its own writes; never chase later ones.
                    settled = true;
                    if !self.settle(after.0).await? {
                        break;
                    }
                }
            }
        })
    }
}

impl PostgresEventStore {
    /// Waits until every event committed so far is below the read horizon,
    /// so that one more read returns them all. `read_to` is the commit key
    /// the reader has reached. Returns whether another read is needed.
    async fn settle(&self, read_to: i64) -> Result<bool> {
        let (target, horizon): (Option<i64>, i64) =
            sqlx::query_as("SELECT max(commit), keel.commit_horizon() FROM keel.events")
                .fetch_one(&self.pool)
                .await?;
        // Nothing stored beyond what was read: the reader is complete (its
        // last row's transaction was below its horizon, and so is all else).
        let Some(target) = target.filter(|&t| t > read_to) else {
            return Ok(false);
        };
        // The horizon may have passed the target since the last read.
        if target < horizon {
            return Ok(true);
        }
        let deadline = tokio::time::Instant::now() + self.config.settle_timeout;
        let mut pause = Duration::from_millis(1);
        loop {
            tokio::time::sleep(pause).await;
            let horizon: i64 = sqlx::query_scalar("SELECT keel.commit_horizon()")
                .fetch_one(&self.pool)
                .await?;
            if horizon > target {
                return Ok(true);
            }
            if tokio::time::Instant::now() >= deadline {
                // Every caught-up reader hits this while the transaction
                // lasts: warn once a minute, not once per poll.
                if horizon_warning_due() {
                    tracing::warn!(
                        waited = ?self.config.settle_timeout,
                        "a long-running transaction holds back the event log's read horizon; \
                         events committed after it started stay unread until it ends"
                    );
                } else {
                    tracing::debug!("the read horizon is still held back");
                }
                return Ok(false);
            }
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }
}

#[async_trait]
impl SnapshotStore for PostgresEventStore {
    async fn load_snapshot(&self, stream: &StreamId) -> Result<Option<Snapshot>> {
        let row = sqlx::query(
            "SELECT version, schema_version, state::text FROM keel.snapshots WHERE stream_id = $1",
        )
        .bind(stream.as_str())
        .fetch_optional(&self.pool)
        .await?;
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

    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<()> {
        let version = i64::try_from(snapshot.version.get()).map_err(|_| {
            EventStoreError::invalid("version", "beyond the largest storable version")
        })?;
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
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}

/// Leadership held as a session advisory lock on a dedicated connection: it
/// ends when the connection does, whichever process or network fault ends it.
#[derive(Debug)]
struct AdvisoryLeadership {
    conn: Option<PgConnection>,
}

#[async_trait]
impl Leadership for AdvisoryLeadership {
    async fn is_held(&mut self) -> bool {
        let Some(conn) = &mut self.conn else {
            return false;
        };
        match conn.ping().await {
            Ok(()) => true,
            Err(_) => {
                self.conn = None;
                false
            }
        }
    }
}

#[derive(Debug)]
struct ListenSignal {
    listener: Option<PgListener>,
}

#[async_trait]
impl EventSignal for ListenSignal {
    async fn wait(&mut self, timeout: Duration) {
        let Some(listener) = &mut self.listener else {
            tokio::time::sleep(timeout).await;
            return;
        };
        match tokio::time::timeout(timeout, listener.try_recv()).await {
            Ok(Ok(Some(_))) => {
                // Many appends may have notified; one wake-up covers them all.
                while listener.next_buffered().is_some() {}
            }
            // The connection dropped: PgListener reconnects on the next call;
            // until then this wait degrades to polling.
            Ok(Ok(None) | Err(_)) => tokio::time::sleep(timeout / 4).await,
            Err(_) => {}
        }
    }
}

#[async_trait]
impl SubscriptionSupport for PostgresEventStore {
    async fn load_checkpoint(&self, name: &str) -> Result<Option<Position>> {
        let row: Option<(i64, i64)> = sqlx::query_as(
            "SELECT commit, sequence FROM keel.subscription_checkpoints WHERE name = $1",
        )
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|(c, s)| Ok(Position::new(to_u64(c, "commit")?, to_u64(s, "sequence")?)))
            .transpose()
    }

    async fn save_checkpoint(&self, name: &str, position: Position) -> Result<()> {
        if name.is_empty() {
            return Err(EventStoreError::invalid(
                "subscription",
                "the name must not be empty",
            ));
        }
        sqlx::query(
            "INSERT INTO keel.subscription_checkpoints (name, commit, sequence) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO UPDATE \
                SET commit = EXCLUDED.commit, sequence = EXCLUDED.sequence, updated_at = now() \
              WHERE (keel.subscription_checkpoints.commit, keel.subscription_checkpoints.sequence) \
                    < (EXCLUDED.commit, EXCLUDED.sequence)",
        )
        .bind(name)
        .bind(clamp(position.commit))
        .bind(clamp(position.sequence))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn acquire_leadership(&self, name: &str, retry: Duration) -> Result<Box<dyn Leadership>> {
        let options = self.pool.connect_options();
        let mut conn = PgConnection::connect_with(&options).await?;
        loop {
            let won: bool = sqlx::query_scalar(
                "SELECT pg_try_advisory_lock(hashtextextended('keel.subscription:' || $1, 0))",
            )
            .bind(name)
            .fetch_one(&mut conn)
            .await?;
            if won {
                return Ok(Box::new(AdvisoryLeadership { conn: Some(conn) }));
            }
            tokio::time::sleep(retry).await;
        }
    }

    async fn event_signal(&self) -> Result<Box<dyn EventSignal>> {
        let listener = if self.config.notify_on_append {
            let mut l = PgListener::connect_with(&self.pool).await?;
            l.listen(NOTIFY_CHANNEL).await?;
            Some(l)
        } else {
            None
        };
        Ok(Box::new(ListenSignal { listener }))
    }
}
