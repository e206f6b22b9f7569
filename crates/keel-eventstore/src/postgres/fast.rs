//! The one-statement fast path of an autocommit append: check the
//! expectation and insert the events in a single statement, which is its
//! own transaction (no `BEGIN`, no `COMMIT`, one round trip).

use keel_core::{ExpectedVersion, StreamId, Version};
use keel_database::is_unique_violation;
use sqlx::PgConnection;

use super::append::{
    EVENT_ID_CONSTRAINT, EventColumns, STREAM_VERSION_CONSTRAINT, expected_args, metadata_json,
    positions_of,
};
use super::to_u64;
use crate::error::Result;
use crate::event::{AppendResult, NewEvent};

/// The row a fast append returns: the version the batch follows (none when
/// the statement wrote nothing), and the stored events' positions and commit
/// keys in version order.
struct FastAppended {
    prev: Option<i64>,
    positions: Option<Vec<i64>>,
    commits: Option<Vec<i64>>,
}

/// The row a single-event fast append returns.
struct OneAppended {
    position: i64,
    commit: i64,
    version: i64,
}

/// The values of one event, as a single-event append binds them: stream,
/// event id, type, schema version, payload, metadata.
type OneEvent<'a> = (&'a str, uuid::Uuid, &'a str, i32, &'a str, &'a str);

/// Inserts a single event (the most common append) after `head`, as a
/// plain `INSERT`: no CTE, no arrays, one row back or none.
///
/// * no stream (or exact 0): `VALUES` at version 1, which the unique index
///   refuses if the stream exists;
/// * exact `v`: a `SELECT` whose one-time filter checks that version `v` is
///   stored (the index refuses `v + 1` if a later version is);
/// * any / stream exists: after the stream's newest version (if there is
///   one).
///
/// The commit key is taken in the row's target list, so only when the
/// filter let the row through, after the statement's snapshot saw the head.
async fn insert_one(
    conn: &mut PgConnection,
    head: Head,
    expected: i64,
    (stream, id, event_type, schema, payload, metadata): OneEvent<'_>,
) -> std::result::Result<FastAppended, sqlx::Error> {
    let row = match head {
        Head::NoStream => {
            sqlx::query_as!(
                OneAppended,
                r#"INSERT INTO keel.events
                       (commit, event_id, stream_id, version, event_type, schema_version, payload,
                        metadata)
                   VALUES (keel.take_commit(), $2, $1, 1, $3, $4, $5::text::json, $6::text::json)
                   RETURNING position, commit, version"#,
                stream,
                id,
                event_type,
                schema,
                payload,
                metadata,
            )
            .fetch_optional(conn)
            .await?
        }
        Head::Exact => {
            sqlx::query_as!(
                OneAppended,
                r#"INSERT INTO keel.events
                       (commit, event_id, stream_id, version, event_type, schema_version, payload,
                        metadata)
                   SELECT keel.take_commit(), $2, $1, $7::int8 + 1, $3, $4, $5::text::json,
                          $6::text::json
                   WHERE EXISTS (SELECT 1 FROM keel.events WHERE stream_id = $1 AND version = $7)
                   RETURNING position, commit, version"#,
                stream,
                id,
                event_type,
                schema,
                payload,
                metadata,
                expected,
            )
            .fetch_optional(conn)
            .await?
        }
        Head::Any => {
            sqlx::query_as!(
                OneAppended,
                r#"INSERT INTO keel.events
                       (commit, event_id, stream_id, version, event_type, schema_version, payload,
                        metadata)
                   SELECT keel.take_commit(), $2, $1, h.prev + 1, $3, $4, $5::text::json,
                          $6::text::json
                   FROM (SELECT coalesce(max(version), 0) AS prev
                         FROM keel.events WHERE stream_id = $1) h
                   RETURNING position, commit, version"#,
                stream,
                id,
                event_type,
                schema,
                payload,
                metadata,
            )
            .fetch_optional(conn)
            .await?
        }
        Head::StreamExists => {
            sqlx::query_as!(
                OneAppended,
                r#"INSERT INTO keel.events
                       (commit, event_id, stream_id, version, event_type, schema_version, payload,
                        metadata)
                   SELECT keel.take_commit(), $2, $1, h.prev + 1, $3, $4, $5::text::json,
                          $6::text::json
                   FROM (SELECT max(version) AS prev FROM keel.events WHERE stream_id = $1
                         HAVING max(version) IS NOT NULL) h
                   RETURNING position, commit, version"#,
                stream,
                id,
                event_type,
                schema,
                payload,
                metadata,
            )
            .fetch_optional(conn)
            .await?
        }
    };
    Ok(match row {
        Some(r) => FastAppended {
            prev: Some(r.version - 1),
            positions: Some(vec![r.position]),
            commits: Some(vec![r.commit]),
        },
        None => FastAppended {
            prev: None,
            positions: None,
            commits: None,
        },
    })
}

/// How a fast append finds the version its batch follows.
#[derive(Clone, Copy)]
enum Head {
    Any,
    NoStream,
    StreamExists,
    Exact,
}

/// One row a batch's fast append returns: a stored event's position,
/// commit key and version.
struct BatchRow {
    position: i64,
    commit: i64,
    version: i64,
}

/// Runs the fast append statement of a batch after the head that `$head`
/// selects. The arguments are $1 the stream and $2..$6 the event columns as
/// arrays (inserted with `UNNEST … WITH ORDINALITY`); the exact head adds
/// $7, the expected version.
///
/// Each statement is a plain `INSERT … SELECT … RETURNING`, one row back per
/// stored event and none when the expectation fails: no CTE, no
/// aggregation (measured: the CTE that gathered the rows into arrays cost
/// about 1.3 microseconds of server time per event more than this). The
/// statements differ only in the head; each is spelled out (and so checked)
/// as its own literal.
macro_rules! insert_batch {
    ($conn:expr, $head:expr, ($($arg:expr),+), $expected:expr) => {
        match $head {
            // any: after whatever is stored
            Head::Any => sqlx::query_as!(
                BatchRow,
                r#"INSERT INTO keel.events
                       (commit, event_id, stream_id, version, event_type, schema_version, payload,
                        metadata)
                   SELECT (SELECT keel.take_commit()), n.event_id, $1, h.prev + n.ord,
                          n.event_type, n.schema_version, n.payload::json, n.metadata::json
                   FROM (SELECT coalesce(max(version), 0) AS prev
                         FROM keel.events WHERE stream_id = $1) h,
                        unnest($2::uuid[], $3::text[], $4::int4[], $5::text[], $6::text[])
                          WITH ORDINALITY AS n(event_id, event_type, schema_version, payload,
                                               metadata, ord)
                   RETURNING position, commit, version"#,
                $($arg),+
            )
            .fetch_all($conn)
            .await,
            // no stream: from the start (the index refuses version 1 if stored)
            Head::NoStream => sqlx::query_as!(
                BatchRow,
                r#"INSERT INTO keel.events
                       (commit, event_id, stream_id, version, event_type, schema_version, payload,
                        metadata)
                   SELECT (SELECT keel.take_commit()), n.event_id, $1, n.ord, n.event_type,
                          n.schema_version, n.payload::json, n.metadata::json
                   FROM unnest($2::uuid[], $3::text[], $4::int4[], $5::text[], $6::text[])
                          WITH ORDINALITY AS n(event_id, event_type, schema_version, payload,
                                               metadata, ord)
                   RETURNING position, commit, version"#,
                $($arg),+
            )
            .fetch_all($conn)
            .await,
            // stream exists: after the newest stored version, if there is one
            Head::StreamExists => sqlx::query_as!(
                BatchRow,
                r#"INSERT INTO keel.events
                       (commit, event_id, stream_id, version, event_type, schema_version, payload,
                        metadata)
                   SELECT (SELECT keel.take_commit()), n.event_id, $1, h.prev + n.ord,
                          n.event_type, n.schema_version, n.payload::json, n.metadata::json
                   FROM (SELECT max(version) AS prev FROM keel.events WHERE stream_id = $1
                         HAVING max(version) IS NOT NULL) h,
                        unnest($2::uuid[], $3::text[], $4::int4[], $5::text[], $6::text[])
                          WITH ORDINALITY AS n(event_id, event_type, schema_version, payload,
                                               metadata, ord)
                   RETURNING position, commit, version"#,
                $($arg),+
            )
            .fetch_all($conn)
            .await,
            // exact: after the expected version, if it is stored (the index
            // refuses the insert if a later one is)
            Head::Exact => sqlx::query_as!(
                BatchRow,
                r#"INSERT INTO keel.events
                       (commit, event_id, stream_id, version, event_type, schema_version, payload,
                        metadata)
                   SELECT (SELECT keel.take_commit()), n.event_id, $1, $7::int8 + n.ord,
                          n.event_type, n.schema_version, n.payload::json, n.metadata::json
                   FROM unnest($2::uuid[], $3::text[], $4::int4[], $5::text[], $6::text[])
                          WITH ORDINALITY AS n(event_id, event_type, schema_version, payload,
                                               metadata, ord)
                   WHERE EXISTS (SELECT 1 FROM keel.events WHERE stream_id = $1 AND version = $7)
                   RETURNING position, commit, version"#,
                $($arg),+,
                $expected
            )
            .fetch_all($conn)
            .await,
        }
    };
}

/// The rows of a batch's fast append as the version the batch follows and
/// its positions in version order (`prev` is `None` when nothing was
/// stored).
fn batch_appended(mut rows: Vec<BatchRow>) -> FastAppended {
    // Rows come back in insertion order, which is version order; sorting
    // makes that an explicit step rather than an assumption.
    rows.sort_unstable_by_key(|r| r.version);
    let Some(first) = rows.first() else {
        return FastAppended {
            prev: None,
            positions: None,
            commits: None,
        };
    };
    FastAppended {
        prev: Some(first.version - 1),
        positions: Some(rows.iter().map(|r| r.position).collect()),
        commits: Some(rows.iter().map(|r| r.commit).collect()),
    }
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
/// The commit key comes from `keel.take_commit()` (the publication of
/// `keel.next_commit()` without its per-transaction bookkeeping, which a
/// statement that is its own transaction does not need). A batch calls it
/// as `(SELECT keel.take_commit())`, an uncorrelated subquery the server
/// evaluates once, when the first row is inserted: one key for the whole
/// batch, taken after the statement's snapshot saw the
/// head the batch follows (so a later version always gets a larger key), and
/// none at all when the expectation fails. See docs/event-store.md ("The
/// read horizon").
pub(super) async fn fast_append(
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
        insert_one(
            conn,
            head,
            expected_at,
            (
                stream.as_str(),
                id,
                event.event_type(),
                schema,
                event.payload_json(),
                metadata.as_str(),
            ),
        )
        .await
    } else {
        let columns = EventColumns::new(events)?;
        insert_batch!(
            &mut *conn,
            head,
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
        .map(batch_appended)
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
