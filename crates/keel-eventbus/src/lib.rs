//! Keel's event bus: integration events between bounded contexts, on Google
//! Cloud Pub/Sub or in memory.
//!
//! Services publish [`Message`](keel_core::Message)s through the
//! [`EventPublisher`](keel_core::EventPublisher) port and handle them with an
//! [`EventHandler`](keel_core::EventHandler). This crate provides both sides
//! and the machinery around them, the same way on every backend:
//!
//! * **At-least-once delivery**: a message is acked only after its handler
//!   succeeded. A failure ([`HandlerError::Retry`](keel_core::HandlerError),
//!   a panic, a timeout) means redelivery with exponential backoff; the
//!   handler sees the [delivery attempt](keel_core::Delivery::attempt).
//!   Handlers deduplicate on the event id, never on the broker's message id.
//! * **Dead letters**: after the configured attempts (5 to 100), or at once
//!   when the handler [rejects](keel_core::HandlerError::Reject) a message or
//!   the message is malformed, it moves to the consumer's dead-letter topic,
//!   whose subscription keeps it. [`EventBus::dead_letters`] lists them and
//!   [`EventBus::replay_dead_letters`] republishes chosen ones.
//! * **Ordering**: on a subscription with [`ordered`](SubscriptionConfig::ordered),
//!   messages with the same [ordering key](keel_core::Message::ordering_key)
//!   (usually the stream id) are handled one at a time, in publish order.
//! * **Provisioning**: topics and subscriptions are created on first use,
//!   idempotently, under a documented [naming convention](naming); switch
//!   auto-creation off in production and provision them ahead.
//! * **Flow control and shutdown**: a bounded number of concurrent handlers,
//!   lease extension for slow handlers, and a graceful
//!   [`Subscription::shutdown`] that loses nothing.
//! * **Typed handlers**: [`EventRouter`] decodes each message into the type
//!   registered for its event type and schema version, and rejects unknown
//!   ones (or skips them, if told to).
//! * **Telemetry without decorators**: both buses record Keel's standard
//!   bus metrics (`keel.bus.publish.*`, acks, nacks, dead letters by reason,
//!   handler duration; see `docs/telemetry.md`) through the global meter
//!   provider or [`InMemoryBus::with_metrics`], and write the current span's
//!   trace context into every published message that carries none. With
//!   Pub/Sub, `PubSubBus::readiness_check` is the health check.
//!
//! Messages travel as JSON data, or per topic as a protobuf
//! `keel.v1.EventEnvelope` ([`WireFormats`], on
//! [`InMemoryBus::with_wire_formats`] and `PubSubConfig::with_wire_formats`),
//! with attributes for the content type, event type, id, schema version,
//! correlation and causation ids, trace context, actor and tenant.
//! Consumers read both formats; see [`codec`].
//!
//! The guide is `docs/event-bus.md` in the repository.
//!
//! # Example
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//!
//! use async_trait::async_trait;
//! use keel_core::{Delivery, EventHandler, EventPublisher, HandlerError, Message};
//! use keel_eventbus::{EventBus, InMemoryBus, SubscriptionConfig};
//! use serde_json::json;
//! use tokio::sync::mpsc;
//!
//! struct SendInvoice(mpsc::UnboundedSender<String>);
//!
//! #[async_trait]
//! impl EventHandler for SendInvoice {
//!     async fn handle(&self, delivery: &Delivery) -> Result<(), HandlerError> {
//!         let order = delivery.message.payload["order"].as_str().unwrap_or_default();
//!         self.0.send(order.to_owned()).map_err(HandlerError::retry)
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let bus = InMemoryBus::new();
//! let (tx, mut rx) = mpsc::unbounded_channel();
//! let config = SubscriptionConfig::new("billing")
//!     .with_backoff(Duration::from_millis(100), Duration::from_secs(5));
//! let subscription = bus.subscribe("orders", &config, Arc::new(SendInvoice(tx))).await?;
//!
//! let placed = Message::new("order.placed", json!({ "order": "o-42" }))
//!     .with_ordering_key("Order-o-42");
//! bus.publish("orders", &[placed]).await?;
//!
//! assert_eq!(rx.recv().await.as_deref(), Some("o-42"));
//! subscription.shutdown().await;
//! # Ok(())
//! # }
//! ```
//!
//! With Pub/Sub (feature `pubsub`), only the construction differs:
//!
//! ```no_run
//! # #[cfg(feature = "pubsub")]
//! # async fn f() -> Result<(), keel_eventbus::EventBusError> {
//! use keel_eventbus::{Naming, PubSubBus, PubSubConfig};
//!
//! // Uses PUBSUB_EMULATOR_HOST when set, else application default credentials.
//! let bus = PubSubBus::connect(
//!     PubSubConfig::from_env("my-project")?.with_naming(Naming::with_prefix("prod")?),
//! )
//! .await?;
//! # Ok(()) }
//! ```
//!
//! # Feature flags
//!
//! * `pubsub` (default): the Google Cloud Pub/Sub backend, `PubSubBus`, on
//!   the official `google-cloud-pubsub` client, with TLS through rustls and
//!   the `ring` provider (never OpenSSL). Without it the crate has only the
//!   in-memory bus and no gRPC or TLS dependency.
//! * `testing`: the contract suite (module `testing`) every bus implementation must
//!   pass, for this crate's tests and for other implementations.

mod bus;
pub mod codec;
mod config;
mod dispatch;
mod error;
mod memory;
pub mod naming;
#[cfg(feature = "pubsub")]
mod pubsub;
mod router;
#[cfg(feature = "testing")]
pub mod testing;

pub use bus::{DeadLetter, EventBus, Subscription};
pub use codec::{MalformedMessage, PROTOBUF_CONTENT_TYPE, RawMessage, WireFormat, WireFormats};
pub use config::{ACK_DEADLINE, DELIVERY_ATTEMPTS, MAX_BACKOFF, SubscriptionConfig};
pub use error::{EventBusError, Result};
pub use memory::InMemoryBus;
pub use naming::Naming;
#[cfg(feature = "pubsub")]
pub use pubsub::{
    DEFAULT_PUBSUB_CONNECT_TIMEOUT, DEFAULT_PUBSUB_DEGRADED_AFTER, DEFAULT_PUBSUB_HEALTH_TIMEOUT,
    EMULATOR_HOST_VAR, PubSubBus, PubSubConfig, PubSubReadiness,
};
pub use router::{EventRouter, TypedHandler};
