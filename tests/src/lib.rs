//! Tests that cross Keel's crates.
//!
//! The one suite here proves the promise a command handler relies on: the
//! aggregate repository, an entity repository, the outbox and the inbox
//! all write through one unit of work, so a command's events, its
//! read-model row, its integration event and the mark of the message that
//! caused it commit together or not at all. Each rule runs against
//! [`Ports`] built on PostgreSQL and on the in-memory variants
//! (`tests/unit_of_work.rs`), and both must keep it.
//!
//! [`services`] runs the example services as real processes for the
//! process tests (`tests/services_*.rs`) and the load bench
//! (`benches/load/`), whose measuring pieces are in [`load`].

pub mod load;
pub mod services;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use async_trait::async_trait;
use keel_core::command::{
    Command, CommandEnvelope, Handled, PipelineError, TransactionalHandler, TransactionalService,
};
use keel_core::uow::{Transaction, TransactionSource};
use keel_core::{
    Aggregate, AggregateRepository, AggregateRoot, CommandError, DomainError, DomainEvent,
    EntityRepository, EventId, Message, Version,
};
use keel_outbox::{InboxStore, Outbox, OutboxMessage};
use keel_repository::Mapped;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tower::ServiceExt;
use uuid::Uuid;

/// The consumer name the handler records its inbox marks under.
pub const CONSUMER: &str = "orders.place-from-cart";

/// A boxed future, for the backend hooks in [`Ports`].
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Makes the backend abort a transaction with a transaction conflict.
pub type ConflictHook = Box<
    dyn for<'a> Fn(&'a mut dyn Transaction) -> BoxFuture<'a, keel_core::Result<()>> + Send + Sync,
>;

/// An order, event-sourced.
#[derive(Debug, Default)]
pub struct Order {
    total: i64,
}

/// What happens to an order.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum OrderEvent {
    /// The order was placed.
    Placed {
        /// Its total, in cents.
        total: i64,
    },
}

impl DomainEvent for OrderEvent {
    fn event_type(&self) -> &'static str {
        "order.placed"
    }
}

impl Aggregate for Order {
    const TYPE: &'static str = "Order";
    type Id = String;
    type Event = OrderEvent;
    type Command = i64;
    type Error = DomainError;

    fn apply(&mut self, event: &OrderEvent) {
        let OrderEvent::Placed { total } = event;
        self.total = *total;
    }

    fn handle(&self, total: i64) -> Result<Vec<OrderEvent>, DomainError> {
        if self.total != 0 {
            return Err(DomainError::new(
                "order.placed",
                "the order was placed already",
            ));
        }
        Ok(vec![OrderEvent::Placed { total }])
    }
}

/// The read model row a placed order gets.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Mapped)]
#[keel(table = "keel_tests_order_summaries")]
pub struct OrderSummary {
    /// The order's id.
    #[keel(id)]
    pub id: String,
    /// Its total, in cents.
    pub total: i64,
}

/// Every port a command writes through, on one backend, plus the hooks the
/// suite needs to look at what was stored.
pub struct Ports {
    /// Begins the units of work.
    pub transactions: Arc<dyn TransactionSource>,
    /// The event-sourced orders.
    pub orders: Arc<dyn AggregateRepository<Order>>,
    /// The read model.
    pub summaries: Arc<dyn EntityRepository<OrderSummary>>,
    /// The outbox.
    pub outbox: Arc<dyn Outbox>,
    /// The inbox marks.
    pub inbox: Arc<dyn InboxStore>,
    /// How many outbox rows wait to be published.
    pub pending_outbox: Box<dyn Fn() -> BoxFuture<'static, u64> + Send + Sync>,
    /// Makes the backend abort `tx` with a transaction conflict, the way
    /// it really would: PostgreSQL raises SQLSTATE 40001.
    pub conflict: ConflictHook,
}

impl fmt::Debug for Ports {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ports")
            .field("transactions", &self.transactions)
            .finish_non_exhaustive()
    }
}

/// The command: place an order that came in as a message.
#[derive(Debug)]
pub struct PlaceOrder {
    /// The order's id.
    pub id: String,
    /// Its total, in cents.
    pub total: i64,
    /// The message that asked for it (its id is the inbox mark).
    pub message: Message,
    /// Refuse the command after every write was made.
    pub refuse_at_the_end: bool,
    /// The backend aborts this many attempts with a transaction conflict,
    /// after every write was made.
    pub conflicts: u32,
}

impl PlaceOrder {
    /// A command for order `id` that will be accepted.
    #[must_use]
    pub fn new(id: impl Into<String>, total: i64) -> Self {
        let id = id.into();
        let message = Message::new("cart.checked_out", json!({ "order": id, "total": total }));
        Self {
            id,
            total,
            message,
            refuse_at_the_end: false,
            conflicts: 0,
        }
    }
}

impl Command for PlaceOrder {
    fn command_type(&self) -> &'static str {
        "order.place"
    }
}

/// Writes through all four ports, then answers as the command says.
pub struct PlaceOrderHandler {
    ports: Arc<Ports>,
    attempts: AtomicU32,
}

impl fmt::Debug for PlaceOrderHandler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PlaceOrderHandler").finish_non_exhaustive()
    }
}

impl PlaceOrderHandler {
    /// How many times the handler ran.
    #[must_use]
    pub fn attempts(&self) -> u32 {
        self.attempts.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl TransactionalHandler<PlaceOrder> for PlaceOrderHandler {
    type Output = Version;

    async fn handle(
        &self,
        tx: &mut dyn Transaction,
        envelope: &CommandEnvelope<PlaceOrder>,
    ) -> Result<Handled<Version>, PipelineError> {
        let attempt = self.attempts.fetch_add(1, Ordering::SeqCst) + 1;
        let command = &envelope.command;
        let ports = &self.ports;

        let first_time = ports
            .inbox
            .within(tx)
            .record(CONSUMER, &command.message)
            .await?;
        if !first_time {
            return Err(CommandError::Rejected(DomainError::new(
                "message.handled",
                "this message was handled already",
            )));
        }
        let version = {
            let orders = ports.orders.within(tx);
            let mut order = orders
                .load(&command.id)
                .await?
                .unwrap_or_else(|| AggregateRoot::new(command.id.clone()));
            order
                .execute(command.total)
                .map_err(CommandError::Rejected)?;
            orders.save(&mut order, &envelope.event_metadata()).await?
        };
        ports
            .summaries
            .within(tx)
            .upsert(OrderSummary {
                id: command.id.clone(),
                total: command.total,
            })
            .await?;
        let placed = Message::new(
            "order.placed",
            json!({ "order": command.id, "total": command.total }),
        );
        ports
            .outbox
            .within(tx)
            .write(&OutboxMessage::new("orders", "Order", &command.id, placed))
            .await?;

        if attempt <= command.conflicts {
            (ports.conflict)(tx).await?;
        }
        if command.refuse_at_the_end {
            return Err(CommandError::Rejected(DomainError::new(
                "order.refused",
                "a last check refused the order",
            )));
        }
        Ok(Handled::new(version).with_events(["order.placed"]))
    }
}

/// What is stored for one order, looked at outside any transaction.
#[derive(Debug, PartialEq, Eq)]
pub struct Stored {
    /// The order's version in the event store (0: no events).
    pub version: u64,
    /// Whether the read model has its row.
    pub summary: bool,
    /// Whether the inbox holds the mark of its message.
    pub marked: bool,
}

impl Stored {
    /// Everything a committed command leaves.
    pub const ALL: Stored = Stored {
        version: 1,
        summary: true,
        marked: true,
    };
    /// What a rolled-back command leaves.
    pub const NOTHING: Stored = Stored {
        version: 0,
        summary: false,
        marked: false,
    };
}

/// Looks at what is stored for order `id` and the message `message_id`
/// that asked for it.
///
/// # Panics
///
/// When a port fails.
pub async fn stored(ports: &Ports, id: &str, message_id: EventId) -> Stored {
    let version = ports
        .orders
        .load(&id.to_owned())
        .await
        .expect("load")
        .map_or(0, |root| root.version().get());
    let summary = ports
        .summaries
        .get(&id.to_owned())
        .await
        .expect("get")
        .is_some();
    let marked = ports
        .inbox
        .has_handled(CONSUMER, message_id)
        .await
        .expect("has_handled");
    Stored {
        version,
        summary,
        marked,
    }
}

/// The same order asked for again by the same message (a redelivery).
fn redelivery(command: &PlaceOrder) -> PlaceOrder {
    let mut again = PlaceOrder::new(command.id.clone(), command.total);
    again.message = again.message.with_event_id(command.message.event_id);
    again
}

fn service(
    ports: &Arc<Ports>,
) -> (
    TransactionalService<PlaceOrderHandler>,
    Arc<PlaceOrderHandler>,
) {
    let handler = Arc::new(PlaceOrderHandler {
        ports: Arc::clone(ports),
        attempts: AtomicU32::new(0),
    });
    let service =
        TransactionalService::from_parts(Arc::clone(&ports.transactions), Arc::clone(&handler));
    (service, handler)
}

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", Uuid::now_v7().simple())
}

/// A command that fails after writing through every port leaves nothing;
/// the same command accepted leaves everything; the message cannot be
/// handled twice.
///
/// # Panics
///
/// When the rule is broken.
pub async fn a_command_commits_everything_or_nothing(ports: Arc<Ports>) {
    let (service, _) = service(&ports);
    let outbox_before = (ports.pending_outbox)().await;

    let mut refused = PlaceOrder::new(unique("order"), 1250);
    refused.refuse_at_the_end = true;
    let (id, message_id) = (refused.id.clone(), refused.message.event_id);
    let retry = redelivery(&refused);
    let err = service
        .clone()
        .oneshot(CommandEnvelope::new(refused))
        .await
        .unwrap_err();
    assert_eq!(
        err.as_rejection().map(DomainError::code),
        Some("order.refused")
    );
    // Nothing of it: no events, no row, no mark, no outbox row.
    assert_eq!(stored(&ports, &id, message_id).await, Stored::NOTHING);
    assert_eq!((ports.pending_outbox)().await, outbox_before);

    // The same message, accepted this time: everything.
    let duplicate = redelivery(&retry);
    let handled = service
        .clone()
        .oneshot(CommandEnvelope::new(retry))
        .await
        .unwrap();
    assert_eq!(handled.output, Version::new(1));
    assert_eq!(stored(&ports, &id, message_id).await, Stored::ALL);
    assert_eq!((ports.pending_outbox)().await, outbox_before + 1);

    // Delivered again: refused by the inbox, and nothing more is written.
    let err = service
        .oneshot(CommandEnvelope::new(duplicate))
        .await
        .unwrap_err();
    assert_eq!(
        err.as_rejection().map(DomainError::code),
        Some("message.handled")
    );
    assert_eq!(stored(&ports, &id, message_id).await, Stored::ALL);
    assert_eq!((ports.pending_outbox)().await, outbox_before + 1);
}

/// A transaction conflict runs the whole command again: the attempts that
/// lost leave nothing, the one that wins stores everything once.
///
/// # Panics
///
/// When the rule is broken.
pub async fn a_transaction_conflict_is_retried_as_a_whole(ports: Arc<Ports>) {
    let outbox_before = (ports.pending_outbox)().await;
    let (service, handler) = service(&ports);
    let mut command = PlaceOrder::new(unique("order"), 990);
    command.conflicts = 2;
    let (id, message_id) = (command.id.clone(), command.message.event_id);
    let handled = service
        .max_attempts(3)
        .oneshot(CommandEnvelope::new(command))
        .await
        .unwrap();
    assert_eq!(handled.output, Version::new(1));
    assert_eq!(handler.attempts(), 3);
    assert_eq!(stored(&ports, &id, message_id).await, Stored::ALL);
    assert_eq!((ports.pending_outbox)().await, outbox_before + 1);

    // Past the limit: a typed, retryable conflict and nothing stored.
    let (service, handler) = self::service(&ports);
    let mut command = PlaceOrder::new(unique("order"), 990);
    command.conflicts = 10;
    let (id, message_id) = (command.id.clone(), command.message.event_id);
    let err = service
        .max_attempts(2)
        .oneshot(CommandEnvelope::new(command))
        .await
        .unwrap_err();
    let err = err.as_infrastructure().expect("an infrastructure error");
    assert!(err.is_transaction_conflict(), "{err}");
    assert!(err.is_retryable());
    assert_eq!(handler.attempts(), 2);
    assert_eq!(stored(&ports, &id, message_id).await, Stored::NOTHING);
    assert_eq!((ports.pending_outbox)().await, outbox_before + 1);
}

/// Many commands at once, a fifth of them refused at the end and some
/// delivered twice: afterwards every accepted command left everything
/// exactly once and every refused one nothing.
///
/// # Panics
///
/// When the rule is broken.
pub async fn concurrent_commands_commit_exactly_what_was_accepted(ports: Arc<Ports>) {
    const TASKS: usize = 8;
    const PER_TASK: usize = 10;
    let outbox_before = (ports.pending_outbox)().await;
    let (service, _) = service(&ports);
    let mut tasks = Vec::new();
    for task in 0..TASKS {
        let service = service.clone();
        tasks.push(tokio::spawn(async move {
            let mut outcomes = Vec::new();
            for n in 0..PER_TASK {
                let refuse = (task * PER_TASK + n).is_multiple_of(5);
                let mut command = PlaceOrder::new(unique("order"), 100 + n as i64);
                command.refuse_at_the_end = refuse;
                let duplicate = redelivery(&command);
                let (id, message_id) = (command.id.clone(), command.message.event_id);
                let accepted = service
                    .clone()
                    .oneshot(CommandEnvelope::new(command))
                    .await
                    .is_ok();
                assert_eq!(accepted, !refuse);
                // A redelivery of an accepted command's message is refused
                // and changes nothing.
                if accepted && n % 3 == 0 {
                    let again = service
                        .clone()
                        .oneshot(CommandEnvelope::new(duplicate))
                        .await;
                    assert!(again.is_err());
                }
                outcomes.push((id, message_id, accepted));
            }
            outcomes
        }));
    }
    let mut accepted_count = 0;
    for task in tasks {
        for (id, message_id, accepted) in task.await.expect("task") {
            let expected = if accepted {
                Stored::ALL
            } else {
                Stored::NOTHING
            };
            assert_eq!(stored(&ports, &id, message_id).await, expected);
            accepted_count += u64::from(accepted);
        }
    }
    assert_eq!(accepted_count, (TASKS * PER_TASK * 4 / 5) as u64);
    assert_eq!(
        (ports.pending_outbox)().await,
        outbox_before + accepted_count
    );
}
