//! Publishing account events to other bounded contexts: the event store as
//! its own outbox, the event bus, and an idempotent consumer.
//!
//! An event-sourced service already commits its events atomically with the
//! change, so it needs no separate outbox table: keel-outbox's
//! [`EventStoreRelay`] follows the store's global log from a durable
//! checkpoint and publishes each event with its stored id (consumers
//! deduplicate on it) and its stream id as ordering key. (For state-based
//! entities, see the `outbox` example.)
//!
//! On the other side, a consumer subscribes to the topic. Delivery is at
//! least once: a message is acknowledged only after its handler succeeded;
//! a transient failure is redelivered with backoff; a message that can
//! never be handled goes to the consumer's dead-letter topic. The example
//! provokes all three on purpose:
//!
//! * the relay "crashes after publishing" one event, so it is published
//!   twice: the projection applies it once;
//! * the projection's store "times out" on one delivery: it asks for a
//!   retry and handles the redelivery;
//! * another producer publishes a malformed event: the projection rejects
//!   it and it is dead-lettered, with the reason, for an operator to see.
//!
//! At the end: every stored event was applied exactly once, and every
//! message published was either handled or dead-lettered.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::TryStreamExt;
use keel_core::{
    AggregateRepository, CorrelationId, Delivery, EventHandler, EventId, EventPublisher,
    HandlerError, Message, Metadata,
};
use keel_eventbus::SubscriptionConfig;
use keel_eventstore::{EventSourcedRepository, EventStoreBackend, ReadAll, SubscriptionOptions};
use keel_outbox::EventStoreRelay;
use serde_json::json;
use tracing::info;

use crate::domain::{Account, AccountCommand, AccountEvent};
use crate::examples::{wait_until, within};
use crate::{Result, Services, ensure};

/// The topic account events are published to.
const TOPIC: &str = "accounts";

/// The consuming component: it names the bus subscription and its
/// dead-letter topic.
const CONSUMER: &str = "statements";

/// What the statement projection has done, for the checks at the end.
#[derive(Debug, Default)]
struct Tally {
    /// Event ids applied; the dedup set. A real projection keeps it in its
    /// database, in the transaction that updates the view (keel-outbox's
    /// `Inbox` does exactly that on PostgreSQL).
    applied: HashSet<EventId>,
    /// Balance per account stream, the view itself.
    balances: BTreeMap<String, i64>,
    /// Deliveries acknowledged (applied, or skipped as duplicates).
    acked: u64,
    /// Deliveries skipped because the event id was already applied.
    duplicates: u64,
    /// Deliveries that asked for a retry.
    retries: u64,
    /// Deliveries rejected as unusable.
    rejected: u64,
    /// Whether the simulated outage has happened yet.
    outage_done: bool,
}

/// A projection of balances, consuming account events from the bus.
#[derive(Debug, Default)]
struct StatementProjection {
    tally: Mutex<Tally>,
}

impl StatementProjection {
    fn tally<T>(&self, f: impl FnOnce(&mut Tally) -> T) -> T {
        // A poisoned lock means a handler panicked mid-update; the bus
        // already treats the panic as a failed delivery.
        let mut guard = self
            .tally
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut guard)
    }
}

#[async_trait]
impl EventHandler for StatementProjection {
    async fn handle(&self, delivery: &Delivery) -> std::result::Result<(), HandlerError> {
        let message = &delivery.message;
        // `?` turns a payload that does not decode (invalid input) into a
        // rejection: retrying cannot fix it, so it is dead-lettered at once.
        let event: AccountEvent = message.decode().inspect_err(|e| {
            self.tally(|t| t.rejected += 1);
            tracing::warn!(event_id = %message.event_id, error = %e, "rejecting an unreadable event");
        })?;
        let stream = message.ordering_key.clone().unwrap_or_default();
        self.tally(|t| {
            if t.applied.contains(&message.event_id) {
                t.duplicates += 1;
                t.acked += 1;
                info!(event_id = %message.event_id, attempt = delivery.attempt, "duplicate; already applied");
                return Ok(());
            }
            if matches!(event, AccountEvent::Withdrawn { .. }) && !t.outage_done {
                // Pretend the view's database timed out: ask for redelivery.
                t.outage_done = true;
                t.retries += 1;
                info!(event_id = %message.event_id, "view store unavailable; asking for a retry");
                return Err(HandlerError::retry("view store timed out"));
            }
            let balance = t.balances.entry(stream.clone()).or_default();
            match event {
                AccountEvent::Deposited { amount } => *balance += amount,
                AccountEvent::Withdrawn { amount } => *balance -= amount,
                AccountEvent::Opened { .. } | AccountEvent::Closed => {}
            }
            t.applied.insert(message.event_id);
            t.acked += 1;
            info!(
                %stream,
                event_type = %message.event_type,
                attempt = delivery.attempt,
                correlation_id = ?message.metadata.correlation_id.map(|c| c.to_string()),
                "projected"
            );
            Ok(())
        })
    }
}

/// Runs the example.
///
/// # Errors
///
/// A failing store or bus, a message that does not arrive in time, or a
/// broken invariant: an event applied twice or never, no retry or no dead
/// letter where one was provoked, an event id neither handled nor
/// dead-lettered.
pub async fn run(services: &Services) -> Result {
    let store = services.event_store();
    let bus = services.event_bus().await?;
    let run = services.scope("pub");

    // Consumers subscribe before producers publish: a subscription only
    // receives what is published after it exists. Short backoffs keep the
    // example quick; production keeps the defaults (10 s to 10 min).
    let projection = Arc::new(StatementProjection::default());
    let config = SubscriptionConfig::new(CONSUMER)
        .with_ordered(true)
        .with_max_delivery_attempts(5)
        .with_backoff(Duration::from_millis(100), Duration::from_millis(500))
        .with_shutdown_timeout(Duration::from_secs(10));
    let subscription = bus
        .port
        .subscribe(TOPIC, &config, projection.clone())
        .await?;

    // The relay: this run's account streams go to the `accounts` topic;
    // anything else in the log would stay inside the service (`None`).
    let publisher: Arc<dyn EventPublisher> = bus.port.clone();
    let account_streams = format!("Account-{run}-");
    let relay_options = SubscriptionOptions::new(format!("accounts-to-bus-{run}"))
        .filter(ReadAll::from_start().stream_prefix(account_streams.clone()))
        .poll_interval(Duration::from_millis(100));
    let mut relay = EventStoreRelay::new(publisher, |event| {
        (event.stream_id.category() == "Account").then(|| TOPIC.to_owned())
    })
    .retry_backoff(Duration::from_millis(100), Duration::from_secs(2))
    .spawn(store.clone(), relay_options)?;

    // Business as usual: the service only executes commands.
    let accounts = EventSourcedRepository::<Account, dyn EventStoreBackend>::new(store.clone());
    // The relay copies metadata onto the message, so the consumer sees the
    // correlation id of the request that caused the event.
    let metadata = Metadata::new()
        .with_correlation_id(CorrelationId::new())
        .with_actor("clerk:publishing-example");
    let alan = format!("{run}-alan");
    let joan = format!("{run}-joan");
    for (id, owner) in [(&alan, "Alan"), (&joan, "Joan")] {
        accounts
            .execute(
                id,
                AccountCommand::Open {
                    owner: owner.into(),
                },
                &metadata,
            )
            .await?;
        accounts
            .execute(id, AccountCommand::Deposit { amount: 1_000 }, &metadata)
            .await?;
    }
    accounts
        .execute(&alan, AccountCommand::Withdraw { amount: 300 }, &metadata)
        .await?;
    accounts
        .execute(&joan, AccountCommand::Deposit { amount: 250 }, &metadata)
        .await?;
    let stored: Vec<_> = store
        .read_all(ReadAll::from_start().stream_prefix(account_streams))
        .try_collect()
        .await?;
    let stored_count = stored.len() as u64;

    within("the relay", relay.wait_for(|s| s.handled >= stored_count)).await?;
    wait_until("every stored event projected", || {
        projection.tally(|t| t.applied.len() as u64 == stored_count)
    })
    .await?;
    info!(
        events = stored_count,
        "relay published the log; projection caught up"
    );

    // A relay that dies between publishing and storing its checkpoint
    // publishes again on restart. Simulate it: the same event, same id.
    let first = &stored[0];
    let mut again = Message::new(first.event_type.clone(), first.payload_value()?)
        .with_event_id(first.event_id)
        .with_ordering_key(first.stream_id.as_str());
    again.schema_version = first.schema_version;
    bus.port.publish(TOPIC, &[again]).await?;

    // Another producer gets the schema wrong: `amount` is not a number.
    let poison = Message::new(
        "account.deposited",
        json!({ "type": "deposited", "amount": "a lot" }),
    )
    .with_ordering_key(format!("Account-{run}-mallory"));
    let poison_id = poison.event_id;
    bus.port.publish(TOPIC, &[poison]).await?;

    wait_until("the duplicate and the poison message", || {
        projection.tally(|t| t.duplicates >= 1 && t.rejected >= 1)
    })
    .await?;
    // Pub/Sub needs a moment to route a dead letter; poll the listing.
    let mut dead = Vec::new();
    within("the dead letter", async {
        loop {
            dead = bus.port.dead_letters(TOPIC, CONSUMER, 10).await?;
            if !dead.is_empty() {
                return Ok::<_, keel_eventbus::EventBusError>(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await??;
    for letter in &dead {
        info!(
            event_id = ?letter.event_id(),
            attempts = ?letter.attempts,
            reason = letter.reason.as_deref().unwrap_or("-"),
            "dead letter"
        );
    }

    subscription.shutdown().await;
    relay.shutdown().await?;
    bus.close().await;

    // The checks: exactly once in effect, and nothing unaccounted for. The
    // bus may deliver any message more than once, so the accounting is by
    // event id, the identity consumers deduplicate on: every id published
    // was either handled or dead-lettered, never both.
    let mut published: HashSet<EventId> = stored.iter().map(|e| e.event_id).collect();
    published.insert(poison_id);
    let dead_ids: HashSet<EventId> = dead.iter().filter_map(|d| d.event_id()).collect();
    projection.tally(|t| {
        for (stream, balance) in &t.balances {
            info!(%stream, balance, "statement balance");
        }
        info!(
            published = published.len(),
            handled = t.applied.len(),
            dead_lettered = dead_ids.len(),
            deliveries_acked = t.acked,
            duplicates_skipped = t.duplicates,
            "accounting"
        );
        ensure(
            t.applied.len() as u64 == stored_count
                && stored.iter().all(|e| t.applied.contains(&e.event_id)),
            "every stored event applied, each once",
        )?;
        ensure(
            t.duplicates >= 1,
            "the duplicate was recognised by its event id",
        )?;
        ensure(t.retries == 1, "the simulated outage asked for one retry")?;
        ensure(
            t.balances.get(&format!("Account-{alan}")) == Some(&700)
                && t.balances.get(&format!("Account-{joan}")) == Some(&1_250),
            "balances 700 and 1250",
        )?;
        ensure(
            dead_ids == HashSet::from([poison_id]),
            "the poison message, and only it, was dead-lettered",
        )?;
        ensure(
            t.applied.is_disjoint(&dead_ids)
                && t.applied.union(&dead_ids).copied().collect::<HashSet<_>>() == published,
            format!(
                "published ({}) = handled ({}) + dead-lettered ({})",
                published.len(),
                t.applied.len(),
                dead_ids.len()
            ),
        )
    })
}
