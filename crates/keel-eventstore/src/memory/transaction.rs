//! The in-memory store inside a [`MemoryTransaction`].

use async_trait::async_trait;
use keel_core::uow::{MemoryTransaction, Transaction, join};
use keel_core::{StreamId, Version};
use tokio::sync::Mutex;

use super::{
    InMemoryEventStore, Plan, StreamCursor, append_all, check_multi, plan_all, version_of,
};
use crate::error::{EventStoreError, Result};
use crate::event::{AppendResult, NewEvent, ReadStream, StreamAppend};
use crate::store::{
    Appender, EventStream, Snapshot, SnapshotStore, StoreInTransaction, StreamReader,
    TransactionalStore,
};
use crate::telemetry::Appending;

impl InMemoryEventStore {
    /// This store bound to `tx`, a [`MemoryTransaction`]: appends and
    /// snapshots written through the view are published when `tx` commits
    /// (their global positions are final then) and vanish if it rolls
    /// back; reads through the view see them at once, nobody else does.
    ///
    /// Two transactions appending to one stream with the same expectation:
    /// the first to commit wins, the other's commit fails with
    /// [`keel_core::Error::Conflict`] (or its append does, when the first
    /// committed before it). A refused append (a conflict, a reused id,
    /// bad input) leaves the transaction usable, as on PostgreSQL.
    ///
    /// ```
    /// use keel_core::uow::{MemoryTransaction, Transaction};
    /// use keel_core::{ExpectedVersion, StreamId};
    /// use keel_eventstore::{Appender, InMemoryEventStore, NewEvent, StreamReader};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let store = InMemoryEventStore::new();
    /// let cart = StreamId::new("Cart-1")?;
    /// let mut tx = MemoryTransaction::new();
    /// store
    ///     .within(&mut tx)
    ///     .append(&cart, ExpectedVersion::NoStream, vec![NewEvent::from_json("cart.opened", &serde_json::json!({}))])
    ///     .await?;
    /// assert_eq!(store.stream_version(&cart).await?.get(), 0); // not committed yet
    /// Box::new(tx).commit().await?;
    /// assert_eq!(store.stream_version(&cart).await?.get(), 1);
    /// # Ok(()) }
    /// ```
    pub fn within<'t>(&'t self, tx: &'t mut dyn Transaction) -> Box<dyn StoreInTransaction + 't> {
        Box::new(InTransaction {
            store: self,
            tx: Mutex::new(tx),
        })
    }
}

impl TransactionalStore for InMemoryEventStore {
    fn within<'t>(&'t self, tx: &'t mut dyn Transaction) -> Box<dyn StoreInTransaction + 't> {
        InMemoryEventStore::within(self, tx)
    }
}

struct InTransaction<'t> {
    store: &'t InMemoryEventStore,
    tx: Mutex<&'t mut dyn Transaction>,
}

impl InTransaction<'_> {
    async fn append_unrecorded(&self, appends: Vec<StreamAppend>) -> Result<Vec<AppendResult>> {
        check_multi(&appends, self.store.inner.config.max_payload_bytes)?;
        let mut guard = self.tx.lock().await;
        let tx = join::<MemoryTransaction>(&mut **guard)?;
        let log = &self.store.inner.log;
        // Plan on the transaction's view first: a refused append is
        // returned as it is and leaves the transaction usable (PostgreSQL's
        // procedure answers those without failing a statement).
        let plans = log.read_in(tx, |log| plan_all(log, &appends))?;
        if plans.iter().all(|p| matches!(p, Plan::Retry(_))) {
            return Ok(plans
                .into_iter()
                .filter_map(|p| match p {
                    Plan::Retry(r) => Some(r),
                    Plan::Append { .. } => None,
                })
                .collect());
        }
        // Runs now on the transaction's copy, and again at commit if the
        // log changed meanwhile: a version taken by then fails the commit
        // with a typed conflict.
        log.write_in(tx, move |log| append_all(log, &appends))
    }
}

#[async_trait]
impl Appender for InTransaction<'_> {
    async fn append(
        &self,
        stream: &StreamId,
        expected: keel_core::ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendResult> {
        self.append_multi(vec![StreamAppend::new(stream.clone(), expected, events)])
            .await
            .map(|mut r| r.remove(0))
    }

    async fn append_multi(&self, mut appends: Vec<StreamAppend>) -> Result<Vec<AppendResult>> {
        let appending = Appending::start(appends.iter_mut().map(|a| (&a.stream_id, &mut a.events)));
        let result = self.append_unrecorded(appends).await;
        appending.finish(&self.store.metrics.0, result)
    }
}

#[async_trait]
impl StreamReader for InTransaction<'_> {
    fn read_stream<'a>(&'a self, stream: &'a StreamId, options: ReadStream) -> EventStream<'a> {
        let batch = options.page(&self.store.inner.config) as usize;
        Box::pin(async_stream::try_stream! {
            let mut cursor = StreamCursor::new(&options);
            loop {
                let chunk = {
                    let mut guard = self.tx.lock().await;
                    let tx = join::<MemoryTransaction>(&mut **guard).map_err(EventStoreError::from)?;
                    self.store.inner.log.read_in(tx, |log| cursor.next_chunk(log, stream, batch))
                };
                if chunk.is_empty() { break; }
                for e in chunk { yield e; }
            }
        })
    }

    async fn stream_version(&self, stream: &StreamId) -> Result<Version> {
        let mut guard = self.tx.lock().await;
        let tx = join::<MemoryTransaction>(&mut **guard)?;
        Ok(self
            .store
            .inner
            .log
            .read_in(tx, |log| version_of(log, stream)))
    }
}

#[async_trait]
impl SnapshotStore for InTransaction<'_> {
    async fn load_snapshot(&self, stream: &StreamId) -> Result<Option<Snapshot>> {
        let mut guard = self.tx.lock().await;
        let tx = join::<MemoryTransaction>(&mut **guard)?;
        Ok(self
            .store
            .inner
            .snapshots
            .read_in(tx, |s| super::latest_snapshot(s, stream)))
    }

    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<()> {
        crate::archive::validate_snapshot(&snapshot)?;
        let mut guard = self.tx.lock().await;
        let tx = join::<MemoryTransaction>(&mut **guard)?;
        let now = chrono::Utc::now();
        self.store.inner.snapshots.write_in(tx, move |s| {
            super::keep_snapshot(s, snapshot.clone(), now);
            Ok::<_, EventStoreError>(())
        })
    }
}
