//! The event-sourced aggregate repository: keel-core's
//! [`AggregateRepository`] port on top of an event store.

use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;

use async_trait::async_trait;
use futures::TryStreamExt;
use keel_core::uow::Transaction;
use keel_core::{
    Aggregate, AggregateRepository, AggregateRoot, ExpectedVersion, Metadata, Version,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::event::{NewEvent, ReadStream};
use crate::store::{
    Appender, EventStore, Snapshot, SnapshotStore, StoreInTransaction, StreamReader,
    TransactionalStore,
};
use crate::upcast::Upcasters;

/// When to store a snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapshotPolicy {
    every: u64,
}

impl SnapshotPolicy {
    /// A snapshot whenever a save carries the stream across a multiple of
    /// `n` events (`n` is at least 1).
    #[must_use]
    pub fn every(n: u64) -> Self {
        Self { every: n.max(1) }
    }

    /// Whether a save from `before` to `after` should store a snapshot.
    #[must_use]
    pub fn is_due(&self, before: Version, after: Version) -> bool {
        after.get() / self.every > before.get() / self.every
    }
}

struct SnapshotConfig<A> {
    policy: SnapshotPolicy,
    schema_version: u32,
    encode: fn(&A) -> serde_json::Result<String>,
    decode: fn(&str) -> serde_json::Result<A>,
}

fn encode<A: Serialize>(a: &A) -> serde_json::Result<String> {
    serde_json::to_string(a)
}

fn decode<A: DeserializeOwned>(s: &str) -> serde_json::Result<A> {
    serde_json::from_str(s)
}

/// Loads aggregates from their streams (latest snapshot plus later events,
/// upcast on the way) and saves their new events with the loaded version as
/// the expected version.
///
/// ```
/// use std::sync::Arc;
/// use keel_core::{Aggregate, AggregateRepository, DomainError, DomainEvent, Metadata};
/// use keel_eventstore::{EventSourcedRepository, InMemoryEventStore, SnapshotPolicy};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Default, Debug, Serialize, Deserialize)]
/// struct Counter { value: i64 }
///
/// #[derive(Clone, Debug, Serialize, Deserialize)]
/// enum CounterEvent { Added(i64) }
/// impl DomainEvent for CounterEvent {
///     fn event_type(&self) -> &'static str { "counter.added" }
/// }
///
/// impl Aggregate for Counter {
///     const TYPE: &'static str = "Counter";
///     type Id = u32;
///     type Event = CounterEvent;
///     type Command = i64;
///     type Error = DomainError;
///     fn apply(&mut self, CounterEvent::Added(n): &CounterEvent) { self.value += n; }
///     fn handle(&self, n: i64) -> Result<Vec<CounterEvent>, DomainError> {
///         Ok(vec![CounterEvent::Added(n)])
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let store = Arc::new(InMemoryEventStore::new());
/// let repo = EventSourcedRepository::<Counter, _>::new(store)
///     .with_snapshots(SnapshotPolicy::every(100), 1);
/// repo.execute(&7, 5, &Metadata::new()).await.unwrap();
/// repo.execute(&7, 3, &Metadata::new()).await.unwrap();
/// let counter = repo.load(&7).await.unwrap().unwrap();
/// assert_eq!(counter.state().value, 8);
/// assert_eq!(counter.version().get(), 2);
/// # }
/// ```
pub struct EventSourcedRepository<A: Aggregate, S: ?Sized> {
    store: Arc<S>,
    upcasters: Upcasters,
    snapshots: Option<SnapshotConfig<A>>,
    _aggregate: PhantomData<fn() -> A>,
}

impl<A: Aggregate, S: ?Sized> fmt::Debug for EventSourcedRepository<A, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventSourcedRepository")
            .field("aggregate", &A::TYPE)
            .field("upcasters", &self.upcasters)
            .field(
                "snapshots",
                &self
                    .snapshots
                    .as_ref()
                    .map(|s| (s.policy, s.schema_version)),
            )
            .finish_non_exhaustive()
    }
}

impl<A, S> EventSourcedRepository<A, S>
where
    A: Aggregate,
    S: EventStore + SnapshotStore + ?Sized,
{
    /// A repository without snapshots or upcasters.
    pub fn new(store: Arc<S>) -> Self {
        Self {
            store,
            upcasters: Upcasters::new(),
            snapshots: None,
            _aggregate: PhantomData,
        }
    }

    /// Applies these upcasters to events as they are loaded.
    #[must_use]
    pub fn with_upcasters(mut self, upcasters: Upcasters) -> Self {
        self.upcasters = upcasters;
        self
    }

    /// Stores snapshots by `policy`, tagged with `schema_version` (the
    /// version of the state's shape). Snapshots with another schema version,
    /// or that no longer decode, are ignored with a warning and the state is
    /// rebuilt from events; bump the version whenever the state's shape
    /// changes.
    #[must_use]
    pub fn with_snapshots(mut self, policy: SnapshotPolicy, schema_version: u32) -> Self
    where
        A: Serialize + DeserializeOwned,
    {
        self.snapshots = Some(SnapshotConfig {
            policy,
            schema_version,
            encode: encode::<A>,
            decode: decode::<A>,
        });
        self
    }

    /// The state to replay from: the latest usable snapshot, or the start.
    async fn snapshot_start<T: SnapshotStore + ?Sized>(
        &self,
        target: &T,
        stream: &keel_core::StreamId,
    ) -> keel_core::Result<(A, Version)> {
        let Some(cfg) = &self.snapshots else {
            return Ok((A::default(), Version::INITIAL));
        };
        let Some(snapshot) = target.load_snapshot(stream).await? else {
            return Ok((A::default(), Version::INITIAL));
        };
        if snapshot.schema_version != cfg.schema_version {
            tracing::warn!(
                stream = %stream,
                stored = snapshot.schema_version,
                current = cfg.schema_version,
                "ignoring an outdated snapshot; rebuilding from events"
            );
            return Ok((A::default(), Version::INITIAL));
        }
        match (cfg.decode)(&snapshot.state) {
            Ok(state) => Ok((state, snapshot.version)),
            Err(error) => {
                tracing::warn!(
                    stream = %stream,
                    %error,
                    "ignoring an unreadable snapshot; rebuilding from events"
                );
                Ok((A::default(), Version::INITIAL))
            }
        }
    }

    /// Loads through `target`: the store itself, or the store bound to a
    /// transaction.
    async fn load_from<T: StreamReader + SnapshotStore + ?Sized>(
        &self,
        target: &T,
        id: &A::Id,
    ) -> keel_core::Result<Option<AggregateRoot<A>>> {
        let stream = A::stream_id(id)?;
        let (mut state, mut version) = self.snapshot_start(target, &stream).await?;
        let mut events = target.read_stream(&stream, ReadStream::forward().from(version.next()));
        while let Some(recorded) = events.try_next().await? {
            let at = recorded.version;
            let envelope = self.upcasters.decode::<A::Event>(recorded)?;
            state.apply(&envelope.payload);
            version = at;
        }
        if version == Version::INITIAL {
            return Ok(None);
        }
        Ok(Some(AggregateRoot::from_parts(id.clone(), version, state)))
    }

    /// Saves through `target`; a snapshot due is written through it too, so
    /// inside a transaction it commits or rolls back with the events.
    async fn save_to<T: Appender + SnapshotStore + ?Sized>(
        &self,
        target: &T,
        root: &mut AggregateRoot<A>,
        metadata: &Metadata,
    ) -> keel_core::Result<Version> {
        if root.pending().is_empty() {
            return Ok(root.version());
        }
        let stream = A::stream_id(root.id())?;
        // The ids were fixed when the events were recorded: saving this root
        // again after an unclear failure is an idempotent retry.
        let events = root
            .pending()
            .iter()
            .zip(root.pending_event_ids())
            .map(|(e, id)| {
                NewEvent::from_domain(e).map(|n| n.with_id(*id).with_metadata(metadata.clone()))
            })
            .collect::<crate::Result<Vec<_>>>()?;
        let before = root.version();
        let written = target
            .append(&stream, ExpectedVersion::Exact(before), events)
            .await?;
        root.mark_saved(written.next_expected_version);
        if let Some(cfg) = &self.snapshots
            && cfg.policy.is_due(before, written.next_expected_version)
        {
            match (cfg.encode)(root.state()) {
                Ok(state) => {
                    let snapshot = Snapshot::new(
                        stream.clone(),
                        written.next_expected_version,
                        cfg.schema_version,
                        state,
                    );
                    // The events are stored; a failed snapshot only costs a
                    // longer replay next time (inside a transaction it is
                    // written in a savepoint, so its failure leaves the
                    // transaction usable).
                    if let Err(error) = target.save_snapshot(snapshot).await {
                        tracing::warn!(stream = %stream, %error, "could not store a snapshot");
                    }
                }
                Err(error) => {
                    tracing::warn!(stream = %stream, %error, "could not serialize a snapshot");
                }
            }
        }
        Ok(written.next_expected_version)
    }
}

#[async_trait]
impl<A, S> AggregateRepository<A> for EventSourcedRepository<A, S>
where
    A: Aggregate,
    S: EventStore + SnapshotStore + TransactionalStore + ?Sized + 'static,
{
    async fn load(&self, id: &A::Id) -> keel_core::Result<Option<AggregateRoot<A>>> {
        self.load_from(&*self.store, id).await
    }

    async fn save(
        &self,
        root: &mut AggregateRoot<A>,
        metadata: &Metadata,
    ) -> keel_core::Result<Version> {
        self.save_to(&*self.store, root, metadata).await
    }

    /// This repository bound to `tx`: `load` reads the stream (and the
    /// snapshot) as the transaction sees it, `save` appends in it with the
    /// loaded version as the expected version.
    ///
    /// Snapshots due on a save are written inside the transaction too, so a
    /// snapshot of events that roll back never survives them.
    fn within<'t>(&'t self, tx: &'t mut dyn Transaction) -> Box<dyn AggregateRepository<A> + 't> {
        Box::new(InTransaction {
            repo: self,
            store: self.store.within(tx),
        })
    }
}

/// An [`EventSourcedRepository`] bound to one transaction.
struct InTransaction<'t, A: Aggregate, S: ?Sized> {
    repo: &'t EventSourcedRepository<A, S>,
    store: Box<dyn StoreInTransaction + 't>,
}

#[async_trait]
impl<A, S> AggregateRepository<A> for InTransaction<'_, A, S>
where
    A: Aggregate,
    S: EventStore + SnapshotStore + TransactionalStore + ?Sized + 'static,
{
    async fn load(&self, id: &A::Id) -> keel_core::Result<Option<AggregateRoot<A>>> {
        self.repo.load_from(&*self.store, id).await
    }

    async fn save(
        &self,
        root: &mut AggregateRoot<A>,
        metadata: &Metadata,
    ) -> keel_core::Result<Version> {
        self.repo.save_to(&*self.store, root, metadata).await
    }

    fn within<'u>(&'u self, tx: &'u mut dyn Transaction) -> Box<dyn AggregateRepository<A> + 'u> {
        self.repo.within(tx)
    }
}
