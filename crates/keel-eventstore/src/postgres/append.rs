//! Appends: the single-statement fast path, the `keel.append_events`
//! procedure for the rare paths, and the caller's-transaction variants.

use async_trait::async_trait;
use keel_core::{EventId, ExpectedVersion, Position, StreamId, Version, VersionConflict};
use keel_database::is_unique_violation;
use sqlx::PgConnection;

use super::{PostgresEventStore, to_u64};
use crate::error::{EventStoreError, Result};
use crate::event::{AppendResult, NewEvent, StreamAppend, validate_batch};
use crate::store::Appender;
use crate::telemetry::Appending;

const EVENT_ID_CONSTRAINT: &str = "events_event_id_key";
/// The unique index that lets one writer, and only one, store a version.
const STREAM_VERSION_CONSTRAINT: &str = "events_stream_version_key";

impl PostgresEventStore {
    /// Appends to several streams on `conn`, inside a transaction open on
    /// it (the caller's unit of work, or one begun for the call).
    ///
    /// With `notify_in_transaction` the wake-up notification is sent in
    /// that transaction, so it is delivered only if and when it commits.
    /// The versions stored stay claimed until the transaction ends: another
    /// writer of the same stream waits for it (and then conflicts or moves
    /// on).
    pub(super) async fn append_multi_with(
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
    Ok(interpret(row, stream, expected, events))
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
) -> std::result::Result<Outcome, CallError> {
    let (mode, version) = expected_args(expected);
    let EventColumns {
        ids,
        types,
        schemas,
        payloads,
        metadata,
    } = EventColumns::new(events)?;
    sqlx::query_as!(
        Outcome,
        r#"SELECT outcome AS "outcome!", actual_version AS "actual_version!",
                  first_version AS "first_version?", positions AS "positions?",
                  commits AS "commits?", conflicting_event_id AS "conflicting_event_id?"
           FROM keel.append_events($1, $2, $3, $4, $5, $6, $7, $8, $9)"#,
        stream.as_str(),
        mode,
        version,
        ids.as_slice(),
        // `&[&str]` encodes as text[] without copying the strings into
        // `String`s (the override replaces the macro's `&[String]` check).
        types.as_slice() as &[&str],
        schemas.as_slice(),
        payloads.as_slice() as &[&str],
        metadata.as_slice(),
        notify,
    )
    .fetch_one(&mut *conn)
    .await
    .map_err(|e| {
        if is_unique_violation(&e, Some(EVENT_ID_CONSTRAINT)) {
            // Another transaction stored one of these ids at the same moment.
            CallError::Raced
        } else {
            CallError::Other(e.into())
        }
    })
}

/// The row a fast append returns: the version the batch follows (none when
/// the statement wrote nothing), and the stored events' positions and commit
/// keys in version order.
struct FastAppended {
    prev: Option<i64>,
    positions: Option<Vec<i64>>,
    commits: Option<Vec<i64>>,
}

/// How a fast append finds the version its batch follows.
#[derive(Clone, Copy)]
enum Head {
    Any,
    NoStream,
    StreamExists,
    Exact,
}

/// Runs the fast append statement `$insert` (`insert_one` or `insert_batch`)
/// after the head that `$head` selects: a CTE `s` holding the version the
/// batch follows, or no row when the expectation fails. The arguments are
/// $1 the stream and $2..$6 the event columns; the exact head adds $7, the
/// expected version.
///
/// The statements differ only in their head; each is spelled out (and so
/// checked) as its own literal, which a planner sees as its own statement.
macro_rules! fast_append_after {
    ($insert:ident, $head:expr, $conn:expr, ($($arg:expr),+), $expected:expr) => {
        match $head {
            // any: after whatever is stored
            Head::Any => $insert!(
                $conn,
                "WITH s AS (SELECT coalesce(max(version), 0) AS prev \
                 FROM keel.events WHERE stream_id = $1),",
                $($arg),+
            ),
            // no stream: from the start (the index refuses version 1 if stored)
            Head::NoStream => $insert!($conn, "WITH s AS (SELECT 0::int8 AS prev),", $($arg),+),
            // stream exists: after the newest stored version, if there is one
            Head::StreamExists => $insert!(
                $conn,
                "WITH s AS (SELECT max(version) AS prev FROM keel.events WHERE stream_id = $1 \
                 HAVING max(version) IS NOT NULL),",
                $($arg),+
            ),
            // exact: after the expected version, if it is stored (the index
            // refuses the insert if a later one is)
            Head::Exact => $insert!(
                $conn,
                "WITH s AS (SELECT $7::int8 AS prev WHERE EXISTS \
                 (SELECT 1 FROM keel.events WHERE stream_id = $1 AND version = $7)),",
                $($arg),+,
                $expected
            ),
        }
    };
}

/// The fast append of a batch after `$head`: the columns arrive as arrays
/// and are inserted with UNNEST.
macro_rules! insert_batch {
    ($conn:expr, $head:literal, $($arg:expr),+) => {
        sqlx::query_as!(
            FastAppended,
            $head
                + r#"
        ins AS (
            INSERT INTO keel.events
                (commit, event_id, stream_id, version, event_type, schema_version, payload,
                 metadata)
            SELECT (SELECT keel.next_commit()), n.event_id, $1, s.prev + n.ord, n.event_type,
                   n.schema_version, n.payload::json, n.metadata::json
            FROM s, unnest($2::uuid[], $3::text[], $4::int4[], $5::text[], $6::text[])
                    WITH ORDINALITY AS n(event_id, event_type, schema_version, payload, metadata, ord)
            RETURNING position, commit, version
        )
        SELECT (SELECT prev FROM s) AS "prev?",
               array_agg(position ORDER BY version) AS "positions?",
               array_agg(commit ORDER BY version) AS "commits?"
        FROM ins"#,
            $($arg),+
        )
        .fetch_one($conn)
        .await
    };
}

/// The fast append of a single event (the most common append) after
/// `$head`: plain values, which spares the server the array decoding and
/// the set-returning function.
macro_rules! insert_one {
    ($conn:expr, $head:literal, $($arg:expr),+) => {
        sqlx::query_as!(
            FastAppended,
            $head
                + r#"
        ins AS (
            INSERT INTO keel.events
                (commit, event_id, stream_id, version, event_type, schema_version, payload,
                 metadata)
            SELECT (SELECT keel.next_commit()), $2::uuid, $1, s.prev + 1, $3::text, $4::int4,
                   $5::text::json, $6::text::json
            FROM s
            RETURNING position, commit, version
        )
        SELECT (SELECT prev FROM s) AS "prev?", array_agg(position) AS "positions?",
               array_agg(commit) AS "commits?"
        FROM ins"#,
            $($arg),+
        )
        .fetch_one($conn)
        .await
    };
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
///
/// The commit key comes from `(SELECT keel.next_commit())`, an uncorrelated
/// subquery the server evaluates once, when the first row is inserted: one
/// key for the whole batch, taken after the statement's snapshot saw the
/// head the batch follows (so a later version always gets a larger key), and
/// none at all when the expectation fails. See docs/event-store.md ("The
/// read horizon").
async fn fast_append(
    conn: &mut PgConnection,
    stream: &StreamId,
    expected: ExpectedVersion,
    events: &[NewEvent],
) -> Result<Option<AppendResult>> {
    let (mode, expected_at) = expected_args(expected);
    let head = match (mode, expected_at) {
        (0, _) => Head::Any,
        (1, _) | (3, 0) => Head::NoStream,
        (2, _) => Head::StreamExists,
        _ => Head::Exact,
    };
    let count = i64::try_from(events.len()).unwrap_or(i64::MAX);
    // A batch arrives as column arrays and is inserted with UNNEST; a single
    // event (the most common append) as plain values, which spares the
    // server the array decoding and the set-returning function.
    let appended = if let [event] = events {
        let id = *event.event_id().as_uuid();
        let schema = i32::try_from(event.schema_version()).unwrap_or(i32::MAX);
        let metadata = metadata_json(event)?;
        fast_append_after!(
            insert_one,
            head,
            &mut *conn,
            (
                stream.as_str(),
                id,
                event.event_type(),
                schema,
                event.payload_json(),
                metadata.as_str()
            ),
            expected_at
        )
    } else {
        let columns = EventColumns::new(events)?;
        fast_append_after!(
            insert_batch,
            head,
            &mut *conn,
            (
                stream.as_str(),
                columns.ids.as_slice(),
                // `&[&str]` encodes as text[] without copying the strings
                // (the override replaces the macro's `&[String]` check).
                columns.types.as_slice() as &[&str],
                columns.schemas.as_slice(),
                columns.payloads.as_slice() as &[&str],
                columns.metadata.as_slice()
            ),
            expected_at
        )
    };
    let row = match appended {
        Ok(row) => row,
        Err(e) if is_unique_violation(&e, Some(EVENT_ID_CONSTRAINT)) => return Ok(None),
        Err(e) if is_unique_violation(&e, Some(STREAM_VERSION_CONSTRAINT)) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let Some(prev) = row.prev else {
        return Ok(None);
    };
    let positions = positions_of(row.commits, row.positions, "the fast append")?;
    Ok(Some(AppendResult {
        stream_id: stream.clone(),
        first_version: Version::new(to_u64(prev + 1, "version")?),
        next_expected_version: Version::new(to_u64(prev + count, "version")?),
        positions,
        was_retry: false,
    }))
}

/// Whether `e` broke the connection an append ran on (not a pool that is
/// closed or timed out, which a second try would meet again).
fn is_lost_connection(e: &sqlx::Error) -> bool {
    keel_database::is_connection_error(e) && !matches!(e, sqlx::Error::PoolClosed)
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

/// The row `keel.append_events` returns.
struct Outcome {
    /// 0 appended, 1 idempotent retry, 2 version conflict, 3 reused id.
    outcome: i16,
    actual_version: i64,
    first_version: Option<i64>,
    positions: Option<Vec<i64>>,
    commits: Option<Vec<i64>>,
    conflicting_event_id: Option<uuid::Uuid>,
}

/// The positions of appended events from their commit keys and positions,
/// which `what` returned (`None` when it returned no arrays).
fn positions_of(
    commits: Option<Vec<i64>>,
    positions: Option<Vec<i64>>,
    what: &str,
) -> Result<Vec<Position>> {
    let (Some(commits), Some(positions)) = (commits, positions) else {
        return Err(EventStoreError::Corrupt(format!(
            "{what} returned no positions for stored events"
        )));
    };
    commits
        .iter()
        .zip(&positions)
        .map(|(&c, &p)| Ok(Position::new(to_u64(c, "commit")?, to_u64(p, "position")?)))
        .collect()
}

fn interpret(
    row: Outcome,
    stream: &StreamId,
    expected: ExpectedVersion,
    events: &[NewEvent],
) -> Result<AppendResult> {
    let actual = row.actual_version;
    match row.outcome {
        0 | 1 => {
            let first = row.first_version.ok_or_else(|| {
                EventStoreError::Corrupt(
                    "keel.append_events returned no first version for stored events".to_owned(),
                )
            })?;
            Ok(AppendResult {
                stream_id: stream.clone(),
                first_version: Version::new(to_u64(first, "version")?),
                next_expected_version: Version::new(to_u64(actual, "version")?),
                positions: positions_of(row.commits, row.positions, "keel.append_events")?,
                was_retry: row.outcome == 1,
            })
        }
        2 => Err(VersionConflict {
            subject: stream.to_string(),
            expected,
            actual: Version::new(to_u64(actual, "version")?),
        }
        .into()),
        3 => Err(EventStoreError::EventIdReused {
            event_id: row
                .conflicting_event_id
                .map_or_else(|| events[0].event_id(), EventId::from_uuid),
            stream_id: stream.clone(),
        }),
        other => Err(EventStoreError::Corrupt(format!(
            "keel.append_events returned unknown outcome {other}"
        ))),
    }
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
            // The pool hands connections out without a ping (one round trip
            // less per append), so a connection that broke while idle is
            // found here. The append is then sent once more on a fresh
            // connection: whether or not the first statement committed, the
            // event ids make the second one either store the events or
            // report them as already stored (`was_retry`).
            let mut lost_connection = false;
            let result = loop {
                let mut conn = self.pool.acquire().await?;
                let attempt = async {
                    match fast_append(&mut conn, stream, expected, &events).await? {
                        Some(result) => Ok(result),
                        // A conflict, a retry or a reused id: let the full
                        // procedure tell which (it is slower, and only runs
                        // on these paths).
                        None => append_once(&mut conn, stream, expected, &events, false, true).await,
                    }
                }
                .await;
                match attempt {
                    Err(EventStoreError::Unavailable(e))
                        if !lost_connection && is_lost_connection(&e) =>
                    {
                        tracing::debug!(error = %e, stream = %stream, "append lost its connection; sending it again");
                        lost_connection = true;
                    }
                    other => break other?,
                }
            };
            // After a lost connection the events may have been stored by the
            // first attempt: wake subscribers either way.
            if !result.was_retry || lost_connection {
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
