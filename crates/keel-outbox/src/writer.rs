//! The PostgreSQL outbox: rows in `keel.outbox`, written in the caller's
//! unit of work.

use async_trait::async_trait;
use keel_core::uow::Transaction;
use keel_database::UnitOfWork;
use sqlx::PgConnection;
use tokio::sync::Mutex;

use crate::error::{OutboxError, Result};
use crate::message::{DEFAULT_MAX_PAYLOAD_BYTES, OutboxMessage, Prepared, prepare};
use crate::port::{Outbox, OutboxWrite};

/// The channel writers notify and relays listen on.
pub const NOTIFY_CHANNEL: &str = "keel_outbox";

/// The first key of the advisory locks writers take per aggregate
/// (`'keel'` in ASCII). The two-key lock space never overlaps the one-key
/// space applications usually use.
pub(crate) const AGGREGATE_LOCK_CLASS: i32 = 0x6B65_656C;

/// The [`Outbox`] kept in PostgreSQL's `keel.outbox`: rows written in the
/// caller's unit of work (`outbox.within(tx)`, `tx` a
/// `keel_database::UnitOfWork`), so they commit or roll back with the
/// business change made in the same transaction.
///
/// Cheap to clone; build one at start-up and share it.
///
/// Each write also
/// * takes a transaction-scoped advisory lock per aggregate (sorted, so one
///   call never deadlocks with another), which makes an aggregate's outbox
///   rows commit in id order even when the caller's own locking does not
///   serialize them; see [`lock_aggregates`](Self::lock_aggregates);
/// * sends a `NOTIFY` on [`NOTIFY_CHANNEL`], which PostgreSQL delivers at
///   commit (never after a rollback) to every relay, in every process.
#[derive(Clone, Debug)]
pub struct PgOutbox {
    max_payload_bytes: usize,
    lock_aggregates: bool,
}

impl Default for PgOutbox {
    fn default() -> Self {
        Self::new()
    }
}

impl PgOutbox {
    /// The default payload limit, [`DEFAULT_MAX_PAYLOAD_BYTES`](crate::DEFAULT_MAX_PAYLOAD_BYTES).
    pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = DEFAULT_MAX_PAYLOAD_BYTES;

    /// An outbox with the default payload limit and per-aggregate locking on.
    #[must_use]
    pub fn new() -> Self {
        Self {
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
            lock_aggregates: true,
        }
    }

    /// Sets the largest payload accepted, in bytes of serialized JSON.
    #[must_use]
    pub fn with_max_payload_bytes(mut self, limit: usize) -> Self {
        self.max_payload_bytes = limit;
        self
    }

    /// The largest payload accepted, in bytes of serialized JSON.
    #[must_use]
    pub fn max_payload_bytes(&self) -> usize {
        self.max_payload_bytes
    }

    /// Whether to take the per-aggregate advisory lock (default: yes).
    ///
    /// Turn it off only when every transaction that writes an aggregate's
    /// outbox rows already holds a lock on that aggregate (e.g. it updated
    /// the aggregate's row first): then rows commit in id order anyway. With
    /// the lock off and no such discipline, two transactions writing the same
    /// aggregate may commit out of id order, and the relay may publish them
    /// in id order instead of commit order.
    #[must_use]
    pub fn with_lock_aggregates(mut self, on: bool) -> Self {
        self.lock_aggregates = on;
        self
    }

    /// Whether writes take the per-aggregate advisory lock.
    #[must_use]
    pub fn lock_aggregates(&self) -> bool {
        self.lock_aggregates
    }

    /// Writes checked rows on `conn`, in one round trip for the rows (plus
    /// one for the locks and the notification).
    async fn insert(&self, conn: &mut PgConnection, messages: &[OutboxMessage]) -> Result<()> {
        if messages.is_empty() {
            return Ok(());
        }
        let rows = prepare(messages, self.max_payload_bytes)?;
        let columns = Columns::from(&rows);

        if self.lock_aggregates {
            // Sorted by lock key so that concurrent writers of overlapping
            // aggregate sets take their locks in the same order. The
            // notification rides along; PostgreSQL delivers it at commit.
            sqlx::query!(
                "SELECT pg_notify($3, '') AS notified, \
                        (SELECT count(pg_advisory_xact_lock($2, k)) \
                         FROM (SELECT DISTINCT hashtext(a) AS k FROM unnest($1::text[]) a ORDER BY 1) s) \
                        AS locked",
                &columns.lock_keys[..],
                AGGREGATE_LOCK_CLASS,
                NOTIFY_CHANNEL,
            )
            .fetch_one(&mut *conn)
            .await?;
        } else {
            sqlx::query!("SELECT pg_notify($1, '') AS notified", NOTIFY_CHANNEL)
                .fetch_one(&mut *conn)
                .await?;
        }

        let inserted = sqlx::query!(
            "INSERT INTO keel.outbox (event_id, topic, aggregate_type, aggregate_id, event_type, \
                                      schema_version, payload, metadata, ordering_key) \
             SELECT e, t, at, ai, et, sv, p::jsonb, m::jsonb, k \
             FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], \
                         $6::int4[], $7::text[], $8::text[], $9::text[]) \
                  WITH ORDINALITY AS r(e, t, at, ai, et, sv, p, m, k, n) \
             ORDER BY n",
            &columns.event_ids[..],
            &columns.topics[..],
            &columns.aggregate_types[..],
            &columns.aggregate_ids[..],
            &columns.event_types[..],
            &columns.schema_versions[..],
            &columns.payloads[..],
            &columns.metadata[..],
            &columns.ordering_keys[..],
        )
        .execute(&mut *conn)
        .await;

        match inserted {
            Ok(_) => Ok(()),
            Err(e) if keel_database::is_unique_violation(&e, Some("outbox_event_id_key")) => {
                // Which id collided is only in the error's detail (the
                // transaction is aborted, so it cannot be asked); with one
                // message it is that one.
                let event_id = messages[0].message().event_id;
                let event_id = if messages.len() == 1 {
                    event_id
                } else {
                    duplicate_from_detail(&e, &rows).unwrap_or(event_id)
                };
                Err(OutboxError::DuplicateEvent { event_id })
            }
            Err(e) => Err(e.into()),
        }
    }
}

impl Outbox for PgOutbox {
    fn within<'t>(&'t self, tx: &'t mut dyn Transaction) -> Box<dyn OutboxWrite + 't> {
        Box::new(PgOutboxIn {
            outbox: self,
            tx: Mutex::new(tx),
        })
    }
}

/// A [`PgOutbox`] bound to a unit of work.
struct PgOutboxIn<'t> {
    outbox: &'t PgOutbox,
    tx: Mutex<&'t mut dyn Transaction>,
}

#[async_trait]
impl OutboxWrite for PgOutboxIn<'_> {
    async fn write_all(&self, messages: &[OutboxMessage]) -> keel_core::Result<()> {
        let mut tx = self.tx.lock().await;
        let uow = UnitOfWork::join(&mut **tx)?;
        self.outbox
            .insert(uow.conn(), messages)
            .await
            .map_err(Into::into)
    }
}

/// PostgreSQL's detail for a unique violation is `Key (event_id)=(<uuid>)
/// already exists.`; the uuid is data, not message text, so matching it
/// against the batch's own ids is safe. Falls back to the first id.
fn duplicate_from_detail(e: &sqlx::Error, rows: &[Prepared]) -> Option<keel_core::EventId> {
    let detail = e
        .as_database_error()?
        .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()?
        .detail()?;
    rows.iter()
        .map(Prepared::event_id)
        .find(|id| detail.contains(&id.to_string()))
}

/// The rows as one array per column, for `unnest`.
struct Columns {
    lock_keys: Vec<String>,
    event_ids: Vec<uuid::Uuid>,
    topics: Vec<String>,
    aggregate_types: Vec<String>,
    aggregate_ids: Vec<String>,
    event_types: Vec<String>,
    schema_versions: Vec<i32>,
    payloads: Vec<String>,
    metadata: Vec<String>,
    ordering_keys: Vec<String>,
}

impl From<&Vec<Prepared>> for Columns {
    fn from(rows: &Vec<Prepared>) -> Self {
        Self {
            lock_keys: rows.iter().map(Prepared::aggregate_key).collect(),
            event_ids: rows.iter().map(|r| *r.event_id().as_uuid()).collect(),
            topics: rows.iter().map(|r| r.topic.clone()).collect(),
            aggregate_types: rows.iter().map(|r| r.aggregate_type.clone()).collect(),
            aggregate_ids: rows.iter().map(|r| r.aggregate_id.clone()).collect(),
            event_types: rows.iter().map(|r| r.message.event_type.clone()).collect(),
            schema_versions: rows.iter().map(|r| r.schema_version).collect(),
            payloads: rows.iter().map(|r| r.payload_json.clone()).collect(),
            metadata: rows.iter().map(|r| r.metadata_json.clone()).collect(),
            ordering_keys: rows.iter().map(|r| r.ordering_key.clone()).collect(),
        }
    }
}
