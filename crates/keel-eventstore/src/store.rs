//! The store's ports: small traits, combined by [`EventStore`].

use std::fmt::Debug;
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;
use keel_core::uow::Transaction;
use keel_core::{ExpectedVersion, Position, StreamId, Version};

use crate::error::Result;
use crate::event::{AppendResult, NewEvent, ReadAll, ReadStream, RecordedEvent, StreamAppend};

/// A stream of stored events, fetched in bounded batches.
pub type EventStream<'a> = BoxStream<'a, Result<RecordedEvent>>;

/// Writes events.
#[async_trait]
pub trait Appender: Send + Sync {
    /// Appends `events` to `stream` if it is at `expected`, atomically.
    ///
    /// Fails with [`Conflict`](crate::EventStoreError::Conflict) when it is
    /// not; returns the original result when the same events (same ids,
    /// types, schema versions and payloads) were stored by an earlier append.
    async fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendResult>;

    /// Appends to several streams in one transaction: all or nothing.
    async fn append_multi(&self, appends: Vec<StreamAppend>) -> Result<Vec<AppendResult>>;
}

/// Reads one stream.
#[async_trait]
pub trait StreamReader: Send + Sync {
    /// Reads a stream in the given direction; a missing stream reads empty.
    fn read_stream<'a>(&'a self, stream: &'a StreamId, options: ReadStream) -> EventStream<'a>;

    /// The stream's current version ([`Version::INITIAL`] when missing).
    async fn stream_version(&self, stream: &StreamId) -> Result<Version>;
}

/// Reads the global log in gap-safe order.
pub trait GlobalLog: Send + Sync {
    /// Reads the log strictly after `options.start()`, in position order.
    ///
    /// Only events that can no longer be preceded by a late commit are
    /// returned, so a reader that resumes after the last position it saw
    /// never skips an event and never sees one twice.
    fn read_all(&self, options: ReadAll) -> EventStream<'_>;
}

/// The whole event store: append, read streams, read the global log.
pub trait EventStore: Appender + StreamReader + GlobalLog {}

impl<T: Appender + StreamReader + GlobalLog + ?Sized> EventStore for T {}

/// A stored aggregate snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Snapshot {
    /// The aggregate's stream.
    pub stream_id: StreamId,
    /// The stream version the state reflects.
    pub version: Version,
    /// The version of the state's shape; a mismatch makes it ignored.
    pub schema_version: u32,
    /// The state as JSON text.
    pub state: String,
}

impl Snapshot {
    /// Builds a snapshot.
    #[must_use]
    pub fn new(stream_id: StreamId, version: Version, schema_version: u32, state: String) -> Self {
        Self {
            stream_id,
            version,
            schema_version,
            state,
        }
    }
}

/// Stores snapshots and loads the latest per stream.
///
/// Every saved snapshot is kept (one per stream version) until a
/// [`SnapshotRetention`](crate::SnapshotRetention) policy prunes it; see
/// [`SnapshotArchive`](crate::SnapshotArchive).
#[async_trait]
pub trait SnapshotStore: Send + Sync {
    /// The latest snapshot of a stream (the one at its highest version), if
    /// any.
    async fn load_snapshot(&self, stream: &StreamId) -> Result<Option<Snapshot>>;

    /// Stores a snapshot unless one at a higher version is stored already;
    /// one at the same version is replaced.
    ///
    /// # Errors
    ///
    /// [`EventStoreError::Invalid`](crate::EventStoreError::Invalid) for
    /// version 0, a schema version beyond `i32::MAX` or state that is not
    /// JSON; nothing is stored then.
    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<()>;
}

/// A held leadership of a named subscription; dropping it lets go.
#[async_trait]
pub trait Leadership: Send + Debug {
    /// Whether leadership is still held (for PostgreSQL: whether the session
    /// holding the advisory lock is alive).
    async fn is_held(&mut self) -> bool;
}

/// Wakes a caught-up subscription when new events may have been appended.
#[async_trait]
pub trait EventSignal: Send + Debug {
    /// Returns when new events may exist, or after `timeout` at the latest.
    async fn wait(&mut self, timeout: Duration);
}

/// What subscriptions need from a store: durable checkpoints, one leader per
/// subscription name, and a wake-up signal.
#[async_trait]
pub trait SubscriptionSupport: Send + Sync {
    /// The stored checkpoint of a subscription.
    async fn load_checkpoint(&self, name: &str) -> Result<Option<Position>>;

    /// Stores a checkpoint; a checkpoint never moves backwards.
    async fn save_checkpoint(&self, name: &str, position: Position) -> Result<()>;

    /// Waits until this process leads subscription `name`, polling every
    /// `retry` while another consumer leads.
    async fn acquire_leadership(&self, name: &str, retry: Duration) -> Result<Box<dyn Leadership>>;

    /// A fresh wake-up signal.
    async fn event_signal(&self) -> Result<Box<dyn EventSignal>>;

    /// The furthest position subscription `name` has started delivering
    /// (saved before a batch is handed to the handler), for
    /// [`Delivery::is_redelivery`](crate::Delivery::is_redelivery). The
    /// default remembers nothing: no delivery is flagged.
    async fn load_delivered(&self, name: &str) -> Result<Option<Position>> {
        let _ = name;
        Ok(None)
    }

    /// Records that subscription `name` is about to deliver events up to
    /// `position`; never moves backwards.
    async fn save_delivered(&self, name: &str, position: Position) -> Result<()> {
        let _ = (name, position);
        Ok(())
    }
}

/// The store bound to one unit of work, as
/// [`TransactionalStore::within`] returns it: appends (single and
/// multi-stream, every expected-version mode, idempotent by event id) and
/// snapshots written through it commit or roll back with the transaction;
/// stream reads and snapshot loads see the transaction's own writes.
///
/// Nothing appended through it is visible to other readers, the global log
/// or subscriptions before the transaction commits, and nothing is left
/// after a rollback.
pub trait StoreInTransaction: Appender + StreamReader + SnapshotStore {}

impl<T: Appender + StreamReader + SnapshotStore + ?Sized> StoreInTransaction for T {}

/// A store that joins units of work: `store.within(tx)`.
///
/// [`PostgresEventStore`](crate::PostgresEventStore) joins the unit of work
/// a `keel_database::Database` began; [`InMemoryEventStore`](crate::InMemoryEventStore)
/// joins a [`MemoryTransaction`](keel_core::uow::MemoryTransaction). Handed
/// the other kind, every operation of the view fails with
/// [`keel_core::Error::Internal`] naming both backends (as
/// [`EventStoreError::Core`](crate::EventStoreError::Core)) and writes
/// nothing.
pub trait TransactionalStore: Send + Sync {
    /// This store bound to `tx`.
    fn within<'t>(&'t self, tx: &'t mut dyn Transaction) -> Box<dyn StoreInTransaction + 't>;
}

/// Everything a complete backend offers: the store, snapshots, units of
/// work, subscription and projection support. Lets a composition root hold one
/// `Arc<dyn EventStoreBackend>` and hand it to
/// [`EventSourcedRepository`](crate::EventSourcedRepository) and
/// [`Subscription`](crate::Subscription) alike.
pub trait EventStoreBackend:
    EventStore
    + SnapshotStore
    + SubscriptionSupport
    + TransactionalStore
    + crate::ProjectionSupport
    + crate::LogLag
{
}

impl<T> EventStoreBackend for T where
    T: EventStore
        + SnapshotStore
        + SubscriptionSupport
        + TransactionalStore
        + crate::ProjectionSupport
        + crate::LogLag
        + ?Sized
{
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use futures::TryStreamExt;
    use keel_core::{ExpectedVersion, StreamId};

    use super::*;
    use crate::{InMemoryEventStore, NewEvent, ReadAll};

    #[tokio::test]
    async fn the_ports_work_as_trait_objects() {
        let backend: Arc<dyn EventStoreBackend> = Arc::new(InMemoryEventStore::new());
        let store: Arc<dyn EventStore> = Arc::new(InMemoryEventStore::new());
        for s in [&*store as &dyn EventStore, &*backend as &dyn EventStore] {
            let id = StreamId::new("Dyn-1").unwrap();
            s.append(
                &id,
                ExpectedVersion::NoStream,
                vec![NewEvent::from_json("t", &serde_json::json!(1))],
            )
            .await
            .unwrap();
            let all: Vec<_> = s
                .read_all(ReadAll::from_start())
                .try_collect()
                .await
                .unwrap();
            assert_eq!(all.len(), 1);
        }
        let handle = crate::Subscription::spawn(
            backend.clone(),
            crate::SubscriptionOptions::new("dyn"),
            Counter,
        );
        handle.shutdown().await.unwrap();
        let mut projection = crate::ProjectionRunner::spawn(
            backend.clone(),
            Arc::new(keel_core::uow::MemoryTransactions::new()),
            crate::ProjectionOptions::new(crate::ProjectionId::new("dyn", 1).unwrap()),
            Nothing,
        );
        projection.wait_for(|s| s.caught_up).await;
        projection.shutdown().await.unwrap();
        assert_eq!(
            backend.active_projection_version("dyn").await.unwrap(),
            Some(1)
        );
        assert!(
            backend
                .load_snapshot(&StreamId::new("Dyn-1").unwrap())
                .await
                .unwrap()
                .is_none()
        );
    }

    struct Counter;

    struct Nothing;

    #[async_trait]
    impl crate::Projection for Nothing {
        async fn apply(
            &self,
            _: &crate::RecordedEvent,
            _: &mut dyn Transaction,
        ) -> Result<(), keel_core::BoxError> {
            Ok(())
        }
    }

    #[async_trait]
    impl crate::SubscriptionHandler for Counter {
        async fn handle(&self, _: &crate::RecordedEvent) -> Result<(), keel_core::BoxError> {
            Ok(())
        }
    }
}
