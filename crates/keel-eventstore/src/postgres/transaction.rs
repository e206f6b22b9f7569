//! The store inside a caller's unit of work (`within(tx)`).

use async_trait::async_trait;
use futures::TryStreamExt;
use keel_core::uow::Transaction;
use keel_core::{ExpectedVersion, StreamId, Version};
use keel_database::UnitOfWork;
use sqlx::Connection;
use tokio::sync::Mutex;

use super::PostgresEventStore;
use super::read::{stream_batch, stream_version_on};
use super::snapshots::{load_snapshot_on, save_snapshot_on};
use crate::error::{EventStoreError, Result};
use crate::event::{AppendResult, NewEvent, ReadDirection, ReadStream, StreamAppend};
use crate::store::{
    Appender, EventStream, Snapshot, SnapshotStore, StoreInTransaction, StreamReader,
    TransactionalStore,
};
use crate::telemetry::Appending;

impl PostgresEventStore {
    /// This store bound to `tx`, a unit of work begun by
    /// `keel_database::Database` (joined with `UnitOfWork::join`): appends
    /// and snapshots written through the view commit or roll back with
    /// everything else written in `tx` (an outbox row, a read model, an
    /// inbox mark); reads through the view see them.
    ///
    /// An append through the view runs the store's full append procedure
    /// in the caller's transaction: conflicts, idempotent retries and
    /// reused ids are answered as outside one and leave the transaction
    /// usable. The versions it stores stay claimed until `tx` ends: another
    /// writer of the same stream waits for it, then conflicts (or moves
    /// on, without an exact expectation), so keep such transactions short.
    /// The wake-up notification for subscriptions is sent inside `tx`, so
    /// it is delivered only if and when `tx` commits.
    ///
    /// ```no_run
    /// use keel_core::uow::TransactionSource;
    /// use keel_core::{ExpectedVersion, StreamId};
    /// use keel_eventstore::{Appender, NewEvent, PostgresEventStore};
    ///
    /// # async fn demo(db: keel_database::Database) -> Result<(), Box<dyn std::error::Error>> {
    /// let store = PostgresEventStore::new(db.pool().clone());
    /// let mut tx = TransactionSource::begin(&db).await?;
    /// store
    ///     .within(&mut *tx)
    ///     .append(
    ///         &StreamId::new("Cart-1")?,
    ///         ExpectedVersion::NoStream,
    ///         vec![NewEvent::from_json("cart.opened", &serde_json::json!({}))],
    ///     )
    ///     .await?;
    /// // ... more writes through `&mut *tx` ...
    /// tx.commit().await?;
    /// # Ok(()) }
    /// ```
    pub fn within<'t>(&'t self, tx: &'t mut dyn Transaction) -> Box<dyn StoreInTransaction + 't> {
        Box::new(InTransaction {
            store: self,
            tx: Mutex::new(tx),
        })
    }
}

impl TransactionalStore for PostgresEventStore {
    fn within<'t>(&'t self, tx: &'t mut dyn Transaction) -> Box<dyn StoreInTransaction + 't> {
        PostgresEventStore::within(self, tx)
    }
}

struct InTransaction<'t> {
    store: &'t PostgresEventStore,
    tx: Mutex<&'t mut dyn Transaction>,
}

#[async_trait]
impl Appender for InTransaction<'_> {
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
        let result = async {
            let mut guard = self.tx.lock().await;
            let uow = UnitOfWork::join(&mut **guard)?;
            self.store
                .append_multi_with(uow.conn(), appends, self.store.config.notify_on_append)
                .await
        }
        .await;
        appending.finish(&self.store.metrics.0, result)
    }
}

#[async_trait]
impl StreamReader for InTransaction<'_> {
    fn read_stream<'a>(&'a self, stream: &'a StreamId, options: ReadStream) -> EventStream<'a> {
        let batch = i64::from(options.page(&self.store.config));
        Box::pin(async_stream::try_stream! {
            let mut guard = self.tx.lock().await;
            let uow = UnitOfWork::join(&mut **guard).map_err(EventStoreError::from)?;
            let (mut from, mut remaining) = options.bounds();
            while remaining > 0 {
                let take = remaining.min(batch);
                // One batch at a time: the connection is the transaction's,
                // and the caller may interleave other statements on it.
                let rows: Vec<_> =
                    stream_batch(uow.conn(), stream, options.direction(), from, take)
                        .try_collect()
                        .await?;
                let n = rows.len() as i64;
                let events = rows
                    .into_iter()
                    .map(|row| row.into_event(stream.clone()))
                    .collect::<Result<Vec<_>>>()?;
                for e in events {
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
        let mut guard = self.tx.lock().await;
        let uow = UnitOfWork::join(&mut **guard)?;
        stream_version_on(uow.conn(), stream).await
    }
}

#[async_trait]
impl SnapshotStore for InTransaction<'_> {
    async fn load_snapshot(&self, stream: &StreamId) -> Result<Option<Snapshot>> {
        let mut guard = self.tx.lock().await;
        let uow = UnitOfWork::join(&mut **guard)?;
        load_snapshot_on(uow.conn(), stream).await
    }

    /// Stores the snapshot in the transaction, inside a savepoint: a
    /// failure loses only the snapshot and leaves the transaction usable.
    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<()> {
        let mut guard = self.tx.lock().await;
        let uow = UnitOfWork::join(&mut **guard)?;
        let mut savepoint = uow.conn().begin().await?;
        match save_snapshot_on(&mut *savepoint, &snapshot).await {
            Ok(()) => Ok(savepoint.commit().await?),
            Err(e) => {
                savepoint.rollback().await?;
                Err(e)
            }
        }
    }
}
