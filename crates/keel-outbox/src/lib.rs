//! Transactional outbox, relay and inbox: getting integration events from a
//! PostgreSQL transaction onto the bus without losing any, and handling them
//! once on the other side.
//!
//! Services that publish integration events use it so that "the order was
//! saved" and "`OrderPlaced` will be published" are one atomic fact:
//!
//! * [`OutboxWriter`] writes [`OutboxMessage`]s into `keel.outbox` on the
//!   caller's `&mut PgConnection`, inside the transaction that makes the
//!   business change. A rolled-back transaction leaves nothing to publish.
//! * [`Relay`] publishes committed rows through any
//!   [`EventPublisher`](keel_core::EventPublisher) (Keel's Pub/Sub or
//!   in-memory bus), oldest first and in commit order per aggregate. Any
//!   number of relays can run at once; they wake on `LISTEN/NOTIFY`, poll as
//!   a fallback, retry failed publishes with backoff, and prune published
//!   rows after a retention period. [`OutboxStats`] reports the backlog, the
//!   rows held by failing publishes and the relay's lag.
//! * [`Inbox`] wraps a consumer's [`InboxHandler`] so that its database work
//!   and the record "event X handled by consumer Y" commit together: a
//!   redelivered message is acknowledged without running the work again.
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
//! # Example
//!
//! ```no_run
//! use std::sync::Arc;
//!
//! use keel_core::{EventPublisher, Message};
//! use keel_outbox::{OutboxMessage, OutboxWriter, Relay, RelayConfig};
//! use serde_json::json;
//!
//! # async fn example(pool: sqlx::PgPool, bus: Arc<dyn EventPublisher>) -> Result<(), Box<dyn std::error::Error>> {
//! // Start a relay next to the service (one per replica is fine).
//! let relay = Relay::new(pool.clone(), bus, RelayConfig::default())?.spawn();
//!
//! // The business change and the event commit together.
//! let writer = OutboxWriter::new();
//! let mut tx = pool.begin().await?;
//! sqlx::query("INSERT INTO orders (id, total) VALUES ($1, $2)")
//!     .bind("o-42")
//!     .bind(1250)
//!     .execute(&mut *tx)
//!     .await?;
//! let placed = Message::new("order.placed", json!({ "order_id": "o-42", "total": 1250 }));
//! writer
//!     .write(&mut tx, &OutboxMessage::new("orders", "Order", "o-42", placed))
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
//! use keel_core::{Delivery, HandlerError};
//! use keel_outbox::{Inbox, InboxHandler};
//! use sqlx::PgConnection;
//!
//! struct CountOrders;
//!
//! #[async_trait]
//! impl InboxHandler for CountOrders {
//!     async fn handle(&self, tx: &mut PgConnection, _delivery: &Delivery) -> Result<(), HandlerError> {
//!         sqlx::query("UPDATE stats SET orders = orders + 1")
//!             .execute(tx)
//!             .await
//!             .map_err(HandlerError::retry)?;
//!         Ok(())
//!     }
//! }
//!
//! # fn example(pool: sqlx::PgPool) -> Result<(), keel_outbox::OutboxError> {
//! // An `EventHandler`: subscribe it to the bus like any other handler.
//! let handler = Inbox::new(pool, "stats.count-orders", CountOrders)?;
//! # Ok(())
//! # }
//! ```
//!
//! # Tables
//!
//! `keel.outbox` and `keel.inbox` are created by Keel's migrations
//! (`keel_database::MIGRATOR`).
//!
//! # Feature flags
//!
//! * `eventstore` (off by default): `EventStoreRelay`, which treats a
//!   `keel-eventstore` store as its own outbox and forwards its global log to
//!   the bus from a durable checkpoint. Adds the `keel-eventstore`
//!   dependency.
//!
//! Everything else is always there: the outbox needs PostgreSQL (via sqlx)
//! and works with any [`EventPublisher`](keel_core::EventPublisher).

mod error;
mod inbox;
mod relay;
#[cfg(feature = "eventstore")]
mod store_relay;
mod writer;

pub use error::{OutboxError, Result};
pub use inbox::{Inbox, InboxHandler, record};
pub use relay::{OutboxStats, Relay, RelayConfig, RelayHandle, RelayReport};
#[cfg(feature = "eventstore")]
pub use store_relay::{EventStoreRelay, EventStoreRelayHandle};
pub use writer::{NOTIFY_CHANNEL, OutboxMessage, OutboxWriter};

/// The outbox and inbox tables (`keel.outbox`, `keel.inbox`), applied with
/// [`keel_database::migrate`] beside the other linked crates' sets.
pub static MIGRATIONS: keel_database::Migrations =
    keel_database::Migrations::new("keel-outbox", sqlx::migrate!("./migrations"));
