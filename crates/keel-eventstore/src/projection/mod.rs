//! Projections with a lifecycle: read models written with exactly-once
//! effect, versioned rebuilds without downtime, poison events parked
//! instead of stopping silently, and health.
//!
//! A [`Projection`] turns events into read-model writes through the unit
//! of work it is handed. The [`ProjectionRunner`] reads the global log and
//! commits each batch's read-model writes and the projection's checkpoint
//! in one transaction, so a crash (or a lost connection, or a second
//! runner) never applies an event twice and never loses one. See
//! `docs/projections.md` for the whole guide.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use keel_core::uow::Transaction;
use keel_core::{BoxError, EventId, Position, StreamId, Version};

use crate::error::{EventStoreError, Result};
use crate::event::{ReadAll, RecordedEvent};

mod health;
mod runner;

pub(crate) use health::SubscriptionSource;
pub use health::{LAG_COUNT_LIMIT, Lag, LogLag, ProgressCheck};
pub use runner::{ProjectionHandle, ProjectionRunner, ProjectionStatus};

/// Applies events to a read model, inside the runner's unit of work.
///
/// Every write must go through `tx` (for PostgreSQL, join it with
/// `keel_database::UnitOfWork::join(tx)` and run statements on
/// `uow.conn()`; in memory, write a [`MemoryCell`](keel_core::uow::MemoryCell)
/// with `write_in`): the runner commits those writes together with the
/// projection's checkpoint, so each event's effect is committed exactly
/// once. A write made anywhere else is not covered by that guarantee.
///
/// An error rolls the transaction back; the runner retries the event as
/// [`ProjectionOptions::retry`] says, then parks it.
#[async_trait]
pub trait Projection: Send + Sync {
    /// Applies one event.
    async fn apply(
        &self,
        event: &RecordedEvent,
        tx: &mut dyn Transaction,
    ) -> std::result::Result<(), BoxError>;
}

#[async_trait]
impl<T: Projection + ?Sized> Projection for Arc<T> {
    async fn apply(
        &self,
        event: &RecordedEvent,
        tx: &mut dyn Transaction,
    ) -> std::result::Result<(), BoxError> {
        (**self).apply(event, tx).await
    }
}

/// A projection's identity: its name and the version of its read model.
///
/// Each version has its own checkpoint and parked events, so version 2 can
/// be built from the start of the log beside version 1. Table-backed models
/// put the version into their table (or schema) names, e.g.
/// `format!("order_summary_v{}", id.version())`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ProjectionId {
    name: String,
    version: u32,
}

impl ProjectionId {
    /// Projection `name` at `version`.
    ///
    /// # Errors
    ///
    /// [`EventStoreError::Invalid`] when the name is empty or longer than
    /// 200 bytes, or the version is 0 (or above `i32::MAX`).
    pub fn new(name: impl Into<String>, version: u32) -> Result<Self> {
        let name = name.into();
        if name.is_empty() || name.len() > 200 {
            return Err(EventStoreError::invalid(
                "projection",
                "the name must be 1 to 200 bytes long",
            ));
        }
        if version == 0 || i32::try_from(version).is_err() {
            return Err(EventStoreError::invalid(
                "projection",
                "the version must be between 1 and 2147483647",
            ));
        }
        Ok(Self { name, version })
    }

    /// The projection's name.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The read model's version.
    #[must_use]
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The name the runner leads under (one active runner per version).
    pub(crate) fn leadership_name(&self) -> String {
        format!("projection:{}@{}", self.name, self.version)
    }
}

impl std::fmt::Display for ProjectionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@v{}", self.name, self.version)
    }
}

/// What the runner does with an event the handler still fails on after
/// every retry. Either way the event is parked (listed by
/// [`ProjectionSupport::parked_events`], replayable with
/// [`ProjectionRunner::replay_parked`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum PoisonAction {
    /// Stop the runner with [`EventStoreError::Parked`]; the checkpoint
    /// stays before the event, so nothing after it is applied until the
    /// event is replayed or handled on a restart (the default: no event is
    /// left out of the model unnoticed).
    #[default]
    Halt,
    /// Move the checkpoint past the event and go on with the next one.
    SkipAndContinue,
}

/// Retries of a failing event: `attempts` in all, waiting `initial`, then
/// twice as long each time, at most `max`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryBackoff {
    /// Attempts in all, the first included (at least 1).
    pub attempts: u32,
    /// The wait after the first failure.
    pub initial: Duration,
    /// The longest wait.
    pub max: Duration,
}

impl RetryBackoff {
    /// The wait after failed attempt `attempt` (1-based).
    #[must_use]
    pub fn delay(&self, attempt: u32) -> Duration {
        let factor = 2u32.saturating_pow(attempt.saturating_sub(1).min(16));
        self.initial.saturating_mul(factor).min(self.max)
    }
}

impl Default for RetryBackoff {
    fn default() -> Self {
        Self {
            attempts: 5,
            initial: Duration::from_millis(100),
            max: Duration::from_secs(10),
        }
    }
}

/// How a projection runner reads, retries and switches readers over.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ProjectionOptions {
    /// The projection's name and version.
    pub id: ProjectionId,
    /// Which events it receives (the start position is ignored: the
    /// checkpoint decides).
    pub filter: ReadAll,
    /// Events read, applied and committed per transaction (default 100).
    pub batch_size: u64,
    /// Retries of a failing event.
    pub retry: RetryBackoff,
    /// What happens once the retries are used up.
    pub on_poison: PoisonAction,
    /// Whether the runner makes its version the active one (the one readers
    /// use) when it first catches up, unless a newer version is active
    /// already (default true). Off: switch with
    /// [`ProjectionSupport::activate_projection`].
    pub activate_when_caught_up: bool,
    /// How long a caught-up runner waits for a notification before polling
    /// (default 500 ms).
    pub poll_interval: Duration,
    /// How often a follower tries to take over, and how long the runner
    /// waits after a store error before resuming (default 1 s).
    pub leadership_retry: Duration,
}

impl ProjectionOptions {
    /// Options with defaults for projection `id`.
    #[must_use]
    pub fn new(id: ProjectionId) -> Self {
        Self {
            id,
            filter: ReadAll::from_start(),
            batch_size: 100,
            retry: RetryBackoff::default(),
            on_poison: PoisonAction::default(),
            activate_when_caught_up: true,
            poll_interval: Duration::from_millis(500),
            leadership_retry: Duration::from_secs(1),
        }
    }

    /// Receive only events passing this filter.
    #[must_use]
    pub fn filter(mut self, filter: ReadAll) -> Self {
        self.filter = filter;
        self
    }

    /// Events per transaction (at least 1).
    #[must_use]
    pub fn batch_size(mut self, n: u64) -> Self {
        self.batch_size = n.max(1);
        self
    }

    /// `attempts` in all for a failing event (at least 1), waiting
    /// `initial`, doubling up to `max` between them.
    #[must_use]
    pub fn retry(mut self, attempts: u32, initial: Duration, max: Duration) -> Self {
        self.retry = RetryBackoff {
            attempts: attempts.max(1),
            initial,
            max: max.max(initial),
        };
        self
    }

    /// What to do once a failing event's retries are used up.
    #[must_use]
    pub fn on_poison(mut self, action: PoisonAction) -> Self {
        self.on_poison = action;
        self
    }

    /// Whether to make this version active when it first catches up.
    #[must_use]
    pub fn activate_when_caught_up(mut self, yes: bool) -> Self {
        self.activate_when_caught_up = yes;
        self
    }

    /// The polling fallback interval.
    #[must_use]
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// How often a follower tries to take over.
    #[must_use]
    pub fn leadership_retry(mut self, interval: Duration) -> Self {
        self.leadership_retry = interval;
        self
    }
}

/// An event a projection's handler kept failing on.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ParkedEvent {
    /// The event's position in the global log.
    pub position: Position,
    /// The event's id.
    pub event_id: EventId,
    /// Its stream.
    pub stream_id: StreamId,
    /// Its version in the stream.
    pub stream_version: Version,
    /// Its type.
    pub event_type: String,
    /// Attempts made, over all runs.
    pub attempts: u32,
    /// The handler's last error, as text.
    pub error: String,
    /// Whether the checkpoint moved past it ([`PoisonAction::SkipAndContinue`])
    /// or stays before it ([`PoisonAction::Halt`]).
    pub skipped: bool,
    /// When it was (last) parked.
    pub parked_at: DateTime<Utc>,
}

impl ParkedEvent {
    pub(crate) fn of(event: &RecordedEvent, attempts: u32, error: &str, skipped: bool) -> Self {
        Self {
            position: event.position,
            event_id: event.event_id,
            stream_id: event.stream_id.clone(),
            stream_version: event.version,
            event_type: event.event_type.clone(),
            attempts,
            error: error.to_owned(),
            skipped,
            parked_at: Utc::now(),
        }
    }
}

/// What a projection version has stored.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ProjectionState {
    /// The projection.
    pub id: ProjectionId,
    /// The position of the last event applied (committed).
    pub checkpoint: Position,
    /// When it first caught up with the log, if it has.
    pub caught_up_at: Option<DateTime<Utc>>,
}

/// What projections need from a store, besides the log: checkpoints moved
/// inside the runner's unit of work, parked events, and the active-version
/// record readers consult.
///
/// Implemented by both stores; the operations taking `tx` join it as the
/// store's `within(tx)` does (a PostgreSQL unit of work, a
/// [`MemoryTransaction`](keel_core::uow::MemoryTransaction)).
#[async_trait]
pub trait ProjectionSupport: Send + Sync {
    /// Registers projection `id` (at the start of the log) unless it
    /// exists; returns its state.
    async fn register_projection(&self, id: &ProjectionId) -> Result<ProjectionState>;

    /// The stored state of projection `id`, if registered.
    async fn projection_state(&self, id: &ProjectionId) -> Result<Option<ProjectionState>>;

    /// Inside `tx`: moves the checkpoint of `id` from `from` to `to`, and
    /// clears the halted (not skipped) parked events in between, which are
    /// now applied.
    ///
    /// # Errors
    ///
    /// A retryable [`keel_core::Error::TransactionConflict`] (as
    /// [`EventStoreError::Core`]) when the checkpoint is not at `from`:
    /// someone else moved it (or the version was retired), so this
    /// transaction's writes must not commit.
    async fn advance_projection(
        &self,
        tx: &mut dyn Transaction,
        id: &ProjectionId,
        from: Position,
        to: Position,
    ) -> Result<()>;

    /// Inside `tx`: parks an event (or, if parked already, adds to its
    /// attempts and replaces its error and `skipped`).
    async fn park_event(
        &self,
        tx: &mut dyn Transaction,
        id: &ProjectionId,
        parked: &ParkedEvent,
    ) -> Result<()>;

    /// Inside `tx`: removes the parked event at `position` and returns it,
    /// or `None` when there is none (replayed by someone else).
    async fn unpark_event(
        &self,
        tx: &mut dyn Transaction,
        id: &ProjectionId,
        position: Position,
    ) -> Result<Option<ParkedEvent>>;

    /// The parked events of `id`, in log order.
    async fn parked_events(&self, id: &ProjectionId) -> Result<Vec<ParkedEvent>>;

    /// Records that `id` has caught up with the log (once; later calls
    /// keep the first time).
    async fn mark_caught_up(&self, id: &ProjectionId) -> Result<()>;

    /// The version of projection `name` readers should use, if any.
    async fn active_projection_version(&self, name: &str) -> Result<Option<u32>>;

    /// Makes `id` the version readers use, atomically. With `newer_only`,
    /// leaves a newer active version in place (returns `false` then).
    ///
    /// # Errors
    ///
    /// [`EventStoreError::Invalid`] when `id` has not caught up yet (its
    /// model is incomplete); [`keel_core::Error::NotFound`] (as
    /// [`EventStoreError::Core`]) when it is not registered.
    async fn activate_projection(&self, id: &ProjectionId, newer_only: bool) -> Result<bool>;

    /// Forgets version `id`: its checkpoint and parked events. Stop its
    /// runner first (a running one would start over from the beginning),
    /// and drop its tables yourself.
    ///
    /// # Errors
    ///
    /// [`EventStoreError::Invalid`] when `id` is the active version.
    async fn retire_projection(&self, id: &ProjectionId) -> Result<()>;
}

/// Shorthand for the retryable conflict of a checkpoint that moved.
pub(crate) fn moved(id: &ProjectionId) -> EventStoreError {
    EventStoreError::Core(keel_core::Error::TransactionConflict {
        message: format!(
            "the checkpoint of projection {id} moved (another runner, or it was retired)"
        ),
        source: None,
    })
}

/// Shorthand for activating a version that has not caught up.
pub(crate) fn not_caught_up(id: &ProjectionId) -> EventStoreError {
    EventStoreError::invalid(
        "projection",
        format!("projection {id} has not caught up with the log yet"),
    )
}

/// Shorthand for retiring the active version.
pub(crate) fn still_active(id: &ProjectionId) -> EventStoreError {
    EventStoreError::invalid(
        "projection",
        format!("projection {id} is the active version; activate another one first"),
    )
}

/// Shorthand for a projection that is not registered.
pub(crate) fn unknown(id: &ProjectionId) -> EventStoreError {
    EventStoreError::Core(keel_core::Error::not_found(format!("projection {id}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_refuse_empty_names_and_version_zero() {
        assert!(ProjectionId::new("", 1).is_err());
        assert!(ProjectionId::new("x".repeat(201), 1).is_err());
        assert!(ProjectionId::new("orders", 0).is_err());
        assert!(ProjectionId::new("orders", u32::MAX).is_err());
        let id = ProjectionId::new("orders", 2).unwrap();
        assert_eq!((id.name(), id.version()), ("orders", 2));
        assert_eq!(id.to_string(), "orders@v2");
    }

    #[test]
    fn backoff_doubles_up_to_the_ceiling() {
        let b = RetryBackoff {
            attempts: 10,
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
        };
        let delays: Vec<_> = (1..=6).map(|a| b.delay(a).as_millis()).collect();
        assert_eq!(delays, vec![100, 200, 400, 800, 1000, 1000]);
        assert_eq!(b.delay(u32::MAX), Duration::from_secs(1));
        let opts = ProjectionOptions::new(ProjectionId::new("p", 1).unwrap()).retry(
            0,
            Duration::from_secs(2),
            Duration::from_secs(1),
        );
        assert_eq!(opts.retry.attempts, 1, "at least one attempt");
        assert_eq!(
            opts.retry.max,
            Duration::from_secs(2),
            "max never below initial"
        );
    }
}
