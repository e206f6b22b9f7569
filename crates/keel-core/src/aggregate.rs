//! Aggregates and the aggregate repository port.

use std::fmt::{Debug, Display};

use async_trait::async_trait;

use crate::error::{CommandError, Result};
use crate::event::{DomainEvent, Metadata};
use crate::id::{EventId, StreamId};
use crate::version::Version;

/// A consistency boundary: state rebuilt from its events, and a decision
/// function that turns commands into new events or a domain error.
///
/// `handle` decides and never mutates; `apply` mutates and never fails. Keel
/// calls `apply` both when replaying history and after `handle` succeeded, so
/// the two paths cannot drift apart.
///
/// ```
/// use keel_core::{Aggregate, AggregateRoot, DomainError, DomainEvent};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Default, Debug)]
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
///         if self.value + n < 0 {
///             return Err(DomainError::new("counter.negative", "would go below zero"));
///         }
///         Ok(vec![CounterEvent::Added(n)])
///     }
/// }
///
/// let mut root = AggregateRoot::<Counter>::new(7);
/// root.execute(5).unwrap();
/// assert!(root.execute(-9).is_err());
/// assert_eq!(root.state().value, 5);
/// assert_eq!(root.pending().len(), 1);
/// ```
pub trait Aggregate: Default + Debug + Send + Sync + 'static {
    /// The aggregate type's stable name; also the category of its streams
    /// (`TYPE-id`). ASCII letters and digits only.
    const TYPE: &'static str;

    /// The aggregate's identity.
    type Id: Display + Debug + Clone + Send + Sync + 'static;

    /// The events this aggregate records.
    type Event: DomainEvent;

    /// The commands it accepts.
    type Command: Send + 'static;

    /// Its domain error: a broken business rule.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Folds one event into the state. Must not fail: events are facts.
    fn apply(&mut self, event: &Self::Event);

    /// Decides what happens for a command, given the current state.
    fn handle(&self, command: Self::Command) -> std::result::Result<Vec<Self::Event>, Self::Error>;

    /// The stream that holds the events of aggregate `id`.
    fn stream_id(id: &Self::Id) -> Result<StreamId> {
        StreamId::for_aggregate(Self::TYPE, id)
    }
}

/// An aggregate instance being worked on: its id, the version it was loaded
/// at, its current state, and the events recorded since loading.
#[derive(Debug)]
pub struct AggregateRoot<A: Aggregate> {
    id: A::Id,
    version: Version,
    state: A,
    pending: Vec<A::Event>,
    pending_ids: Vec<EventId>,
}

impl<A: Aggregate> AggregateRoot<A> {
    /// A new, empty aggregate that has never been stored.
    pub fn new(id: A::Id) -> Self {
        Self {
            id,
            version: Version::INITIAL,
            state: A::default(),
            pending: Vec::new(),
            pending_ids: Vec::new(),
        }
    }

    /// Rebuilds a root from stored parts; used by repositories.
    pub fn from_parts(id: A::Id, version: Version, state: A) -> Self {
        Self {
            id,
            version,
            state,
            pending: Vec::new(),
            pending_ids: Vec::new(),
        }
    }

    /// The aggregate's id.
    pub fn id(&self) -> &A::Id {
        &self.id
    }

    /// The version it had in storage when loaded (or after the last save).
    pub fn version(&self) -> Version {
        self.version
    }

    /// The current state, including pending events.
    pub fn state(&self) -> &A {
        &self.state
    }

    /// Events recorded but not yet saved.
    pub fn pending(&self) -> &[A::Event] {
        &self.pending
    }

    /// The ids the pending events will be stored under, one per pending
    /// event. They are fixed when the event is recorded, so saving the same
    /// root again after an unclear failure (a timeout, a dropped connection)
    /// is an idempotent retry rather than a second copy or a conflict.
    pub fn pending_event_ids(&self) -> &[EventId] {
        &self.pending_ids
    }

    /// Handles a command: on success the new events are applied to the state
    /// and queued for saving (each with a new [`EventId`]), and a copy of
    /// them is returned.
    pub fn execute(&mut self, command: A::Command) -> std::result::Result<Vec<A::Event>, A::Error> {
        let events = self.state.handle(command)?;
        for e in &events {
            self.state.apply(e);
        }
        self.pending.extend(events.iter().cloned());
        self.pending_ids
            .extend(events.iter().map(|_| EventId::new()));
        Ok(events)
    }

    /// Applies an already stored event while rebuilding; used by repositories.
    pub fn replay(&mut self, event: &A::Event, version: Version) {
        self.state.apply(event);
        self.version = version;
    }

    /// Takes the pending events out, leaving none; used by repositories.
    pub fn take_pending(&mut self) -> Vec<A::Event> {
        self.pending_ids.clear();
        std::mem::take(&mut self.pending)
    }

    /// Records that the pending events were stored at `version`.
    pub fn mark_saved(&mut self, version: Version) {
        self.pending.clear();
        self.pending_ids.clear();
        self.version = version;
    }
}

/// The port domain code uses to load and save aggregates. The event store
/// implements it as an event-sourced repository; domain code never sees the
/// store itself.
#[async_trait]
pub trait AggregateRepository<A: Aggregate>: Send + Sync {
    /// Loads an aggregate, or `None` when it has no events.
    async fn load(&self, id: &A::Id) -> Result<Option<AggregateRoot<A>>>;

    /// Saves the pending events with the loaded version as the expected
    /// version, so a concurrent writer causes a version conflict instead of a
    /// lost update. Returns the new version.
    async fn save(&self, root: &mut AggregateRoot<A>, metadata: &Metadata) -> Result<Version>;

    /// This repository bound to `tx`: [`save`](Self::save) appends in the
    /// transaction (so the events commit or roll back with everything else
    /// written through it), and [`load`](Self::load) sees events saved
    /// earlier in it.
    ///
    /// A PostgreSQL repository joins a `keel_database::UnitOfWork`, an
    /// in-memory one a [`MemoryTransaction`](crate::uow::MemoryTransaction);
    /// given the other kind, every call fails with
    /// [`Error::Internal`](crate::Error::Internal) and writes nothing.
    ///
    /// ```text
    /// orders.within(tx).save(&mut order, &metadata).await?;
    /// ```
    fn within<'t>(
        &'t self,
        tx: &'t mut dyn crate::uow::Transaction,
    ) -> Box<dyn AggregateRepository<A> + 't>;

    /// Loads (or starts) the aggregate, handles one command, and saves the
    /// result. Returns the new events.
    async fn execute(
        &self,
        id: &A::Id,
        command: A::Command,
        metadata: &Metadata,
    ) -> std::result::Result<Vec<A::Event>, CommandError<A::Error>> {
        let mut root = match self.load(id).await? {
            Some(root) => root,
            None => AggregateRoot::new(id.clone()),
        };
        let events = root.execute(command).map_err(CommandError::Rejected)?;
        if !events.is_empty() {
            self.save(&mut root, metadata).await?;
        }
        Ok(events)
    }
}
