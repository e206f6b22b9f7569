//! Transactional outbox, relay and inbox: getting integration events from a
//! unit of work onto the bus without losing any, and handling them once on
//! the other side.
//!
//! Services that publish integration events use it so that "the order was
//! saved" and "`OrderPlaced` will be published" are one atomic fact:
//!
//! * [`Outbox`] is the port handler code writes through, inside the
//!   command's transaction: `outbox.within(tx).write(&message)`. A
//!   rolled-back transaction leaves nothing to publish. [`PgOutbox`] keeps
//!   the rows in `keel.outbox` and joins a `keel_database::UnitOfWork`;
//!   [`InMemoryOutbox`] joins a [`MemoryTransaction`](keel_core::uow::MemoryTransaction).
//! * [`Relay`] publishes committed rows through any
//!   [`EventPublisher`](keel_core::EventPublisher) (Keel's Pub/Sub or
//!   in-memory bus), oldest first and in commit order per aggregate, for
//!   either outbox ([`Relay::new`], [`Relay::in_memory`]). Any number of
//!   relays can run at once; they wake on commits, poll as a fallback, retry
//!   failed publishes with backoff, and prune published rows after a
//!   retention period. [`OutboxStats`] reports the backlog, the rows held
//!   by failing publishes and the relay's lag.
//! * [`Inbox`] wraps a consumer's [`InboxHandler`] so that its work and the
//!   mark "event X handled by consumer Y" commit together in one
//!   transaction: a redelivered message is acknowledged without running the
//!   work again. Marks live in an [`InboxStore`]: [`PgInbox`] or
//!   [`InMemoryInbox`].
//! * `EventStoreRelay` (feature `eventstore`) makes an event store its own
//!   outbox: it forwards the store's global log to the bus from a durable
//!   checkpoint, so event-sourced services need no outbox table.
//!
//! Delivery is at-least-once: a relay that dies after publishing and before
//! marking publishes again later. Consumers deduplicate by
//! [`Message::event_id`](keel_core::Message::event_id), which the inbox does
//! for them. The guide, with the design and its reasons, is
//! `docs/outbox.md`.
//!
//! Background handles ([`RelayHandle`], `EventStoreRelayHandle`) follow
//! Keel's rule: `shutdown().await` stops gracefully, `abort().await` stops
//! at once and returns when the task has ended, dropping is an abort that
//! does not wait.
//!
//! # Example
//!
//! ```no_run
//! use std::sync::Arc;
//!
//! use keel_core::uow::TransactionSource;
//! use keel_core::{EventPublisher, Message};
//! use keel_outbox::{Outbox, OutboxMessage, PgOutbox, Relay, RelayConfig};
//! use serde_json::json;
//!
//! # async fn example(db: keel_database::Database, bus: Arc<dyn EventPublisher>) -> Result<(), Box<dyn std::error::Error>> {
//! // Start a relay next to the service (one per replica is fine).
//! let relay = Relay::new(db.pool().clone(), bus, RelayConfig::default())?.spawn();
//!
//! // The business change and the event commit together. In a command
//! // handler, `tx` is the one `TransactionalService` hands it.
//! let outbox: Arc<dyn Outbox> = Arc::new(PgOutbox::new());
//! let mut tx = db.begin().await?;
//! sqlx::query("INSERT INTO orders (id, total) VALUES ($1, $2)")
//!     .bind("o-42")
//!     .bind(1250)
//!     .execute(tx.conn())
//!     .await?;
//! let mut tx: Box<dyn keel_core::uow::Transaction> = Box::new(tx);
//! let placed = Message::new("order.placed", json!({ "order_id": "o-42", "total": 1250 }));
//! outbox
//!     .within(&mut *tx)
//!     .write(&OutboxMessage::new("orders", "Order", "o-42", placed))
//!     .await?;
//! tx.commit().await?; // the relay is notified and publishes within milliseconds
//!
//! relay.shutdown().await; // finishes the batch in flight
//! # Ok(())
//! # }
//! ```
//!
//! Consuming with an inbox:
//!
//! ```no_run
//! use async_trait::async_trait;
//! use keel_core::uow::Transaction;
//! use keel_core::{Delivery, HandlerError};
//! use keel_database::UnitOfWork;
//! use keel_outbox::{Inbox, InboxHandler};
//!
//! struct CountOrders;
//!
//! #[async_trait]
//! impl InboxHandler for CountOrders {
//!     async fn handle(&self, tx: &mut dyn Transaction, _delivery: &Delivery) -> Result<(), HandlerError> {
//!         // Any port's `within(tx)` works here; raw SQL joins the unit of work.
//!         let uow = UnitOfWork::join(tx).map_err(HandlerError::retry)?;
//!         sqlx::query("UPDATE stats SET orders = orders + 1")
//!             .execute(uow.conn())
//!             .await
//!             .map_err(HandlerError::retry)?;
//!         Ok(())
//!     }
//! }
//!
//! # fn example(db: keel_database::Database) -> Result<(), keel_outbox::OutboxError> {
//! // An `EventHandler`: subscribe it to the bus like any other handler.
//! let handler = Inbox::postgres(&db, "stats.count-orders", CountOrders)?;
//! # Ok(())
//! # }
//! ```
//!
//! # Tables
//!
//! `keel.outbox` and `keel.inbox` are created by Keel's migrations
//! (`keel_outbox::MIGRATIONS`, applied with `keel_database::migrate`).
//!
//! Every statement the crate runs on them (the outbox writes, the relay's
//! claim, marks, pruning and statistics, the inbox marks) goes through
//! sqlx's checked macros (`query!`, `query_as!`, `query_scalar!`), so SQL
//! that no longer fits the migrations fails to compile. Building needs no
//! database: the checked descriptions are committed in the crate's `.sqlx/`
//! and its `.env` keeps sqlx offline even when `DATABASE_URL` is set. A
//! contributor who changes a statement or a migration runs
//! `scripts/sqlx-prepare` (PostgreSQL on 127.0.0.1:5432, or
//! `KEEL_SQLX_ADMIN_URL`) and commits the rewritten `.sqlx/`; CI runs
//! `scripts/sqlx-prepare --check` and fails when they disagree.
//!
//! # Feature flags
//!
//! * `eventstore` (off by default): `EventStoreRelay`, which treats a
//!   `keel-eventstore` store as its own outbox and forwards its global log to
//!   the bus from a durable checkpoint. Adds the `keel-eventstore`
//!   dependency.
//! * `testing` (off by default): the contract suite `keel_outbox::testing`,
//!   the rules every outbox, relay and inbox variant keeps, run against
//!   PostgreSQL and in memory.
//!
//! Everything else is always there: the PostgreSQL and in-memory variants,
//! working with any [`EventPublisher`](keel_core::EventPublisher).

mod error;
mod inbox;
mod memory;
mod message;
mod port;
mod relay;
#[cfg(feature = "eventstore")]
mod store_relay;
#[cfg(feature = "testing")]
pub mod testing;
mod writer;

pub use error::{OutboxError, Result};
pub use inbox::{
    InMemoryInbox, Inbox, InboxHandler, InboxIn, InboxMarks, InboxStore, MAX_CONSUMER_BYTES,
    PgInbox,
};
pub use memory::InMemoryOutbox;
pub use message::{
    DEFAULT_MAX_PAYLOAD_BYTES, MAX_NAME_BYTES, MAX_ORDERING_KEY_BYTES, OutboxMessage,
};
pub use port::{Outbox, OutboxWrite};
pub use relay::{OutboxStats, Relay, RelayConfig, RelayHandle, RelayReport};
#[cfg(feature = "eventstore")]
pub use store_relay::{
    DEFAULT_STORE_RELAY_BATCH, EventStoreRelay, EventStoreRelayHandle, MAX_STORE_RELAY_BATCH,
};
pub use writer::{NOTIFY_CHANNEL, PgOutbox};

/// The outbox and inbox tables (`keel.outbox`, `keel.inbox`), applied with
/// [`keel_database::migrate()`] beside the other linked crates' sets.
pub static MIGRATIONS: keel_database::Migrations =
    keel_database::Migrations::new("keel-outbox", sqlx::migrate!("./migrations"));
