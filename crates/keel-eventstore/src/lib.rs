//! An append-only event store for Keel services: PostgreSQL in production,
//! an in-memory twin with the same behaviour for tests.
//!
//! Domain code never calls the store: it calls an
//! [`AggregateRepository`](keel_core::AggregateRepository), which this crate
//! implements as an event-sourced repository. Application and infrastructure
//! code (projections, subscriptions, migrations) use the store's ports
//! directly: [`Appender`], [`StreamReader`], [`GlobalLog`], combined as
//! [`EventStore`].
//!
//! What it guarantees:
//!
//! * **exact optimistic concurrency** per stream, with four expected-version
//!   modes; of two writers expecting the same version exactly one wins, the
//!   other gets a [`VersionConflict`](keel_core::VersionConflict) with the
//!   expected and actual versions;
//! * **idempotent appends** by event id: retrying a stored batch returns the
//!   original result, reusing an id for another event is a typed error;
//! * **a gap-safe global log**: a reader that resumes after the last
//!   [`Position`](keel_core::Position) it saw never skips an event that
//!   committed late and never sees one twice;
//! * **immutability** enforced by the database, **bounded memory** on reads,
//!   typed errors for bad input with nothing half-written.
//!
//! Around the store:
//!
//! * [`Subscription`]: catch-up subscriptions over the global log with
//!   durable checkpoints, live tail (LISTEN/NOTIFY plus polling), at-least-once
//!   delivery and one active consumer per name across processes;
//! * [`ProjectionRunner`]: read models written with exactly-once effect
//!   (the model's rows and the [`Projection`]'s checkpoint commit in one
//!   unit of work), versioned rebuilds that switch readers over once
//!   caught up, poison events retried and parked ([`PoisonAction`]), and
//!   a readiness check with lag and parked counts ([`ProgressCheck`]);
//!   guide: `docs/projections.md`;
//! * [`EventSourcedRepository`]: keel-core's aggregate repository port, with
//!   [`SnapshotPolicy`] snapshots and [`Upcasters`] for schema evolution;
//! * [`SnapshotArchive`]: long-term retention of snapshots: export and
//!   import as NDJSON with their schema versions ([`export_ndjson`],
//!   [`import_ndjson`]), and pruning by a [`SnapshotRetention`] policy;
//! * [`InMemoryEventStore`]: the same behaviour without a server;
//! * units of work: `store.within(tx)` ([`TransactionalStore`]) and
//!   `repository.within(tx)` bind the store and the aggregate repository to
//!   a [`keel_core::uow::Transaction`], so a command's events commit (or roll
//!   back) together with its outbox row, read model and inbox mark.
//!
//! The guide, including why the global order is safe and what it costs, is
//! `docs/event-store.md` in the repository. [`prelude`] imports what most
//! callers need, the [`async_trait`](macro@async_trait) macro included.
//!
//! # Example
//!
//! ```
//! use futures::TryStreamExt;
//! use keel_core::{ExpectedVersion, StreamId, Version};
//! use keel_eventstore::{Appender, GlobalLog, InMemoryEventStore, NewEvent, ReadAll, ReadStream, StreamReader};
//! use serde_json::json;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), keel_eventstore::EventStoreError> {
//! let store = InMemoryEventStore::new();
//! let cart = StreamId::new("Cart-1")?;
//!
//! let written = store
//!     .append(&cart, ExpectedVersion::NoStream, vec![
//!         NewEvent::from_json("cart.item_added", &json!({"sku": "A-1", "quantity": 2})),
//!         NewEvent::from_json("cart.checked_out", &json!({})),
//!     ])
//!     .await?;
//! assert_eq!(written.next_expected_version, Version::new(2));
//!
//! // A writer holding a stale version gets a structured conflict.
//! let stale = store
//!     .append(&cart, ExpectedVersion::Exact(Version::new(1)), vec![NewEvent::from_json("cart.reopened", &json!({}))])
//!     .await
//!     .unwrap_err();
//! assert_eq!(stale.as_conflict().unwrap().actual, Version::new(2));
//!
//! let history: Vec<_> = store.read_stream(&cart, ReadStream::forward()).try_collect().await?;
//! assert_eq!(history[1].event_type, "cart.checked_out");
//!
//! let log: Vec<_> = store.read_all(ReadAll::from_start().category("Cart")).try_collect().await?;
//! assert_eq!(log.len(), 2);
//! # Ok(())
//! # }
//! ```
//!
//! # Units of work
//!
//! ```
//! use keel_core::uow::{MemoryTransactions, TransactionSource};
//! use keel_core::{ExpectedVersion, StreamId};
//! use keel_eventstore::{Appender, InMemoryEventStore, NewEvent, StreamReader};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let store = InMemoryEventStore::new();
//! let cart = StreamId::new("Cart-2")?;
//! let mut tx = MemoryTransactions::new().begin().await?;
//! let view = store.within(&mut *tx);
//! view.append(&cart, ExpectedVersion::NoStream, vec![NewEvent::from_json("cart.opened", &serde_json::json!({}))])
//!     .await?;
//! assert_eq!(view.stream_version(&cart).await?.get(), 1); // seen inside
//! drop(view);
//! assert_eq!(store.stream_version(&cart).await?.get(), 0); // nobody else sees it
//! tx.rollback().await?;
//! assert_eq!(store.stream_version(&cart).await?.get(), 0); // and it is gone
//! # Ok(()) }
//! ```
//!
//! On PostgreSQL the transaction comes from `keel_database::Database` (or the
//! command pipeline's `TransactionalService`) and `PostgresEventStore::within`
//! joins it through `keel_database::UnitOfWork::join`. See "Units of work" in
//! `docs/event-store.md` for conflicts, snapshots and wake-ups.
//!
//! # Feature flags
//!
//! * `postgres` (default): [`PostgresEventStore`], built on sqlx and
//!   keel-database (units of work, error classification). Its tables come
//!   with `keel_eventstore::MIGRATIONS` (applied with `keel_database::migrate`).
//!   Its SQL is checked at compile time against offline data committed in
//!   the crate (`.sqlx/`), so building it needs no database; after changing
//!   a statement or a migration, `scripts/sqlx-prepare` regenerates that
//!   data (see the `postgres` module's source docs).
//! * `testing`: the `testing` module, the contract suite every store
//!   implementation must pass.
//!
//! The in-memory store needs no feature and no server.

mod aggregate;
mod archive;
mod error;
mod event;
mod memory;
#[cfg(feature = "postgres")]
mod postgres;
mod projection;
mod store;
mod subscription;
mod telemetry;
#[cfg(feature = "testing")]
pub mod testing;
mod upcast;

pub use aggregate::{EventSourcedRepository, SnapshotPolicy};
pub use archive::{
    ImportReport, MAX_SNAPSHOT_LINE_BYTES, SNAPSHOT_FORMAT, SNAPSHOT_FORMAT_VERSION,
    SnapshotArchive, SnapshotRecord, SnapshotRetention, SnapshotSelection, export_ndjson,
    import_ndjson,
};
pub use error::{EventStoreError, Result};
pub use event::{
    AppendResult, DEFAULT_HORIZON_MAX_AGE, DEFAULT_MAX_PAYLOAD_BYTES, MAX_EVENT_TYPE_LEN,
    MAX_METADATA_BYTES, NewEvent, ReadAll, ReadDirection, ReadStream, RecordedEvent, StoreConfig,
    StoredMetadata, StreamAppend,
};
pub use memory::InMemoryEventStore;
#[cfg(feature = "postgres")]
pub use postgres::{HorizonHolder, NOTIFY_CHANNEL, PostgresEventStore, ReadHorizon};
pub use projection::{
    LAG_COUNT_LIMIT, Lag, LogLag, ParkedEvent, PoisonAction, ProgressCheck, Projection,
    ProjectionHandle, ProjectionId, ProjectionOptions, ProjectionRunner, ProjectionState,
    ProjectionStatus, ProjectionSupport, RetryBackoff,
};
pub use store::{
    Appender, EventSignal, EventStore, EventStoreBackend, EventStream, GlobalLog, Leadership,
    Snapshot, SnapshotStore, StoreInTransaction, StreamReader, SubscriptionSupport,
    TransactionalStore,
};
pub use subscription::{
    BatchFailure, Delivery, Subscription, SubscriptionHandle, SubscriptionHandler,
    SubscriptionOptions, SubscriptionStatus,
};
pub use upcast::Upcasters;

/// The attribute macro the store's traits are written with, re-exported so
/// that implementing [`SubscriptionHandler`] or [`Projection`] needs no
/// dependency besides this crate: `#[keel_eventstore::async_trait]`.
pub use async_trait::async_trait;

/// What most callers need, in one import: `use keel_eventstore::prelude::*;`.
///
/// The store's traits (so their methods resolve), the option and event
/// types, subscriptions and projections, the `async_trait` macro, and the
/// keel-core ids they take.
///
/// ```
/// use keel_eventstore::prelude::*;
///
/// struct Count(std::sync::atomic::AtomicU64);
///
/// #[async_trait]
/// impl SubscriptionHandler for Count {
///     async fn handle(&self, _event: &RecordedEvent) -> Result<(), BoxError> {
///         self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
///         Ok(())
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), BoxError> {
/// let store = InMemoryEventStore::new();
/// let cart = StreamId::new("Cart-1")?;
/// store
///     .append(&cart, ExpectedVersion::NoStream, vec![NewEvent::from_json("cart.opened", &serde_json::json!({}))])
///     .await?;
/// assert_eq!(store.stream_version(&cart).await?.get(), 1);
/// # Ok(()) }
/// ```
pub mod prelude {
    #[cfg(feature = "postgres")]
    pub use crate::PostgresEventStore;
    pub use crate::{
        Appender, Delivery, EventStore, EventStoreBackend, EventStoreError, GlobalLog,
        InMemoryEventStore, LogLag, NewEvent, PoisonAction, Projection, ProjectionId,
        ProjectionOptions, ProjectionRunner, ProjectionSupport, ReadAll, ReadStream, RecordedEvent,
        SnapshotStore, StreamReader, Subscription, SubscriptionHandler, SubscriptionOptions,
        SubscriptionSupport, TransactionalStore, async_trait,
    };
    pub use keel_core::uow::Transaction;
    pub use keel_core::{BoxError, ExpectedVersion, Position, StreamId, Version};
}

/// The event store's tables and functions (`keel.events`, `keel.streams`,
/// snapshots, checkpoints), applied with
/// [`keel_database::migrate()`] beside the other linked crates' sets.
#[cfg(feature = "postgres")]
pub static MIGRATIONS: keel_database::Migrations =
    keel_database::Migrations::new("keel-eventstore", sqlx::migrate!("./migrations"));
