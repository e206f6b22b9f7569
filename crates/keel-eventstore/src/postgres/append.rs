//! Appends: the `Appender` implementation, the `keel.append_events`
//! procedure for the rare paths, and the caller's-transaction variants.
//! The one-statement fast path is in `fast`.

use async_trait::async_trait;
use keel_core::{EventId, ExpectedVersion, Position, StreamId, Version, VersionConflict};
use keel_database::is_unique_violation;
use sqlx::PgConnection;

use super::fast::fast_append;
use super::{PostgresEventStore, to_u64};
use crate::error::{EventStoreError, Result};
use crate::event::{AppendResult, NewEvent, StreamAppend, validate_batch};
use crate::store::Appender;
use crate::telemetry::Appending;

pub(super) const EVENT_ID_CONSTRAINT: &str = "events_event_id_key";
/// The unique index that lets one writer, and only one, store a version.
pub(super) const STREAM_VERSION_CONSTRAINT: &str = "events_stream_version_key";

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

pub(super) fn expected_args(expected: ExpectedVersion) -> (i16, i64) {
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

pub(super) enum CallError {
    Raced,
    Other(EventStoreError),
}

impl From<EventStoreError> for CallError {
    fn from(e: EventStoreError) -> Self {
        Self::Other(e)
    }
}

pub(super) async fn call_append_function(
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

/// Whether `e` broke the connection an append ran on (not a pool that is
/// closed or timed out, which a second try would meet again).
fn is_lost_connection(e: &sqlx::Error) -> bool {
    keel_database::is_connection_error(e) && !matches!(e, sqlx::Error::PoolClosed)
}

/// An event's metadata as the JSON text the `metadata` column stores.
pub(super) fn metadata_json(event: &NewEvent) -> Result<String> {
    serde_json::to_string(event.metadata()).map_err(|source| EventStoreError::Serialize {
        event_type: event.event_type().to_owned(),
        source,
    })
}

/// A batch of events as the column arrays the append statements take.
pub(super) struct EventColumns<'a> {
    pub(super) ids: Vec<uuid::Uuid>,
    pub(super) types: Vec<&'a str>,
    pub(super) schemas: Vec<i32>,
    pub(super) payloads: Vec<&'a str>,
    pub(super) metadata: Vec<String>,
}

impl<'a> EventColumns<'a> {
    pub(super) fn new(events: &'a [NewEvent]) -> Result<Self> {
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
pub(super) struct Outcome {
    /// 0 appended, 1 idempotent retry, 2 version conflict, 3 reused id.
    pub(super) outcome: i16,
    pub(super) actual_version: i64,
    pub(super) first_version: Option<i64>,
    pub(super) positions: Option<Vec<i64>>,
    pub(super) commits: Option<Vec<i64>>,
    pub(super) conflicting_event_id: Option<uuid::Uuid>,
}

/// The positions of appended events from their commit keys and positions,
/// which `what` returned (`None` when it returned no arrays).
pub(super) fn positions_of(
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
