//! Shared setup for keel-outbox's integration tests: a migrated database per
//! test, the in-memory bus, and a subscriber that records what it receives.

#![allow(dead_code, unreachable_pub)] // each test binary uses a different part

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use keel_core::uow::TransactionSource;
use keel_core::{Delivery, EventHandler, EventId, EventPublisher, HandlerError, Message};
use keel_database::{Database, DatabaseConfig};
use keel_eventbus::{EventBus, InMemoryBus, Subscription, SubscriptionConfig};
use keel_outbox::{Outbox, OutboxMessage, PgOutbox};
use keel_testkit::TestDatabase;
use serde_json::json;
use sqlx::PgPool;

pub async fn database() -> TestDatabase {
    TestDatabase::create(&keel_outbox::MIGRATIONS)
        .await
        .expect("a migrated test database (is PostgreSQL running on 127.0.0.1:5432?)")
}

/// A `keel_database::Database` on the test database, for units of work.
pub fn connect(db: &TestDatabase) -> Database {
    Database::connect_lazy(
        DatabaseConfig::builder()
            .connect_options(db.connect_options())
            .min_connections(0)
            .max_connections(20)
            .build()
            .expect("a valid database config"),
    )
}

/// The `seq`-th event of aggregate `Order`/`aggregate`, for `topic`.
pub fn event(topic: &str, aggregate: &str, seq: u64) -> OutboxMessage {
    OutboxMessage::new(
        topic,
        "Order",
        aggregate,
        Message::new(
            "order.changed",
            json!({ "aggregate": aggregate, "seq": seq }),
        ),
    )
}

/// A `keel_database::Database` on the same database as `pool`.
pub fn database_of(pool: &PgPool) -> Database {
    Database::connect_lazy(
        DatabaseConfig::builder()
            .connect_options((*pool.connect_options()).clone())
            .min_connections(0)
            .max_connections(4)
            .build()
            .expect("a valid database config"),
    )
}

/// Writes `messages` in one committed unit of work.
pub async fn commit(pool: &PgPool, messages: &[OutboxMessage]) {
    let db = database_of(pool);
    let mut tx = TransactionSource::begin(&db).await.unwrap();
    PgOutbox::new()
        .within(&mut *tx)
        .write_all(messages)
        .await
        .unwrap();
    tx.commit().await.unwrap();
}

/// Polls `check` until it holds, failing the test after `limit`.
pub async fn eventually<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if check().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn unpublished(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM keel.outbox WHERE published_at IS NULL")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Records every delivery it handles, in handling order.
#[derive(Clone, Default)]
pub struct Recorder {
    seen: Arc<Mutex<Vec<Delivery>>>,
}

#[async_trait]
impl EventHandler for Recorder {
    async fn handle(&self, delivery: &Delivery) -> Result<(), HandlerError> {
        self.seen.lock().unwrap().push(delivery.clone());
        Ok(())
    }
}

impl Recorder {
    pub fn deliveries(&self) -> Vec<Delivery> {
        self.seen.lock().unwrap().clone()
    }

    pub fn len(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    /// How many times each event id was delivered.
    pub fn counts(&self) -> HashMap<EventId, usize> {
        let mut counts = HashMap::new();
        for d in self.seen.lock().unwrap().iter() {
            *counts.entry(d.message.event_id).or_default() += 1;
        }
        counts
    }

    /// The `seq` values received per aggregate, in handling order.
    pub fn sequences(&self) -> HashMap<String, Vec<u64>> {
        sequences(self.seen.lock().unwrap().iter().map(|d| &d.message))
    }
}

/// Subscribes an ordered consumer to `topic` on `bus`.
pub async fn subscribe(
    bus: &InMemoryBus,
    topic: &str,
    consumer: &str,
    handler: Arc<dyn EventHandler>,
) -> Subscription {
    let config = SubscriptionConfig::new(consumer)
        .with_ordered(true)
        .with_backoff(Duration::from_millis(10), Duration::from_millis(50))
        .with_max_concurrent_handlers(16)
        .with_max_delivery_attempts(100);
    bus.subscribe(topic, &config, handler).await.unwrap()
}

/// A publisher that forwards to a real bus and then reports failure for the
/// first `failures` calls: the messages were published, the relay believes
/// they were not, exactly like a crash between publish and mark.
pub struct FailAfterPublish {
    pub inner: Arc<dyn EventPublisher>,
    pub failures: Mutex<usize>,
}

#[async_trait]
impl EventPublisher for FailAfterPublish {
    async fn publish(&self, topic: &str, messages: &[Message]) -> keel_core::Result<()> {
        self.inner.publish(topic, messages).await?;
        let mut left = self.failures.lock().unwrap();
        if *left > 0 {
            *left -= 1;
            return Err(keel_core::Error::unavailable(
                "bus",
                "connection lost before the acknowledgement",
                std::io::Error::other("reset"),
            ));
        }
        Ok(())
    }
}

/// A publisher whose topics can be broken and healed: a broken topic refuses
/// every publish, like a topic deleted by mistake.
pub struct Switchboard {
    pub inner: Arc<dyn EventPublisher>,
    pub broken: Mutex<Vec<String>>,
}

#[async_trait]
impl EventPublisher for Switchboard {
    async fn publish(&self, topic: &str, messages: &[Message]) -> keel_core::Result<()> {
        if self.broken.lock().unwrap().iter().any(|t| t == topic) {
            return Err(keel_core::Error::not_found(format!("topic {topic}")));
        }
        self.inner.publish(topic, messages).await
    }
}

/// Passes publishes on to `inner` and keeps every published message, in
/// the order the publish calls were made.
pub struct Tape {
    pub inner: Arc<dyn EventPublisher>,
    pub published: Mutex<Vec<Message>>,
}

impl Tape {
    pub fn new(inner: Arc<dyn EventPublisher>) -> Self {
        Self {
            inner,
            published: Mutex::default(),
        }
    }

    /// The `seq` values published per aggregate, in publish order.
    pub fn sequences(&self) -> HashMap<String, Vec<u64>> {
        sequences(self.published.lock().unwrap().iter())
    }
}

#[async_trait]
impl EventPublisher for Tape {
    async fn publish(&self, topic: &str, messages: &[Message]) -> keel_core::Result<()> {
        self.inner.publish(topic, messages).await?;
        self.published.lock().unwrap().extend_from_slice(messages);
        Ok(())
    }
}

/// The `seq` values of [`event`]s per aggregate, in the given order.
fn sequences<'a>(messages: impl Iterator<Item = &'a Message>) -> HashMap<String, Vec<u64>> {
    let mut by_aggregate: HashMap<String, Vec<u64>> = HashMap::new();
    for m in messages {
        let aggregate = m.payload["aggregate"].as_str().unwrap().to_owned();
        let seq = m.payload["seq"].as_u64().unwrap();
        by_aggregate.entry(aggregate).or_default().push(seq);
    }
    by_aggregate
}
