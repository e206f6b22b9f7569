//! Ordering's application layer: command handlers on a
//! [`TransactionalService`], the event-sourced order repository, and the
//! relay that publishes order events to the bus on ordering keys.
//!
//! Everything here is generic over Keel's ports: the same code runs on the
//! in-memory event store and bus and on PostgreSQL and Pub/Sub.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::TryStreamExt;
use keel_core::command::{
    Command, CommandEnvelope, Handled, PipelineError, TransactionalHandler, TransactionalService,
};
use keel_core::uow::Transaction;
use keel_core::{
    Aggregate, AggregateRef, AggregateRepository, AggregateRoot, CausationId, CommandError,
    Delivery, DomainError, EventHandler, EventPublisher, ExpectedVersion, HandlerError, Metadata,
    TransactionSource, Version, VersionConflict,
};
use keel_eventstore::{
    EventSourcedRepository, EventStoreBackend, ReadAll, ReadStream, SnapshotPolicy,
    SubscriptionOptions,
};
use keel_outbox::{EventStoreRelay, EventStoreRelayHandle};
use ordering_domain::{Order, OrderCommand, OrderError, OrderEvent};
use serde::Deserialize;

/// The topic Ordering publishes its order events to.
pub const ORDERS_TOPIC: &str = "ordering.orders";

/// One command for one order: what the transport (gRPC later) hands in.
#[derive(Debug)]
pub struct OrderRequest {
    /// The order's id.
    pub order_id: String,
    /// What to do with it.
    pub command: OrderCommand,
    /// The version the caller last saw; a different current version
    /// refuses the command with a version conflict.
    pub expected_version: Option<u64>,
}

impl Command for OrderRequest {
    fn command_type(&self) -> &'static str {
        match self.command {
            OrderCommand::Place { .. } => "order.place",
            OrderCommand::Pay { .. } => "order.pay",
            OrderCommand::Cancel { .. } => "order.cancel",
            OrderCommand::MarkShipped { .. } => "order.mark_shipped",
        }
    }

    fn target(&self) -> Option<AggregateRef> {
        Some(AggregateRef::new(
            ordering_domain::AGGREGATE_TYPE,
            &self.order_id,
        ))
    }
}

/// What an accepted order command did.
#[derive(Clone, Debug, PartialEq)]
pub struct OrderOutcome {
    /// The events it recorded (none when it was a retry).
    pub events: Vec<OrderEvent>,
    /// The order stream's version after it.
    pub version: u64,
    /// Whether this command id had already been handled, so nothing new
    /// was recorded: the caller retried a command that succeeded.
    pub replayed: bool,
}

/// Executes order commands on the event-sourced repository joined to the
/// command's transaction. It never begins, commits or rolls back itself.
///
/// A command whose id already caused events in the order's stream is a
/// retry: it is answered from the stored events and records nothing. The
/// gRPC edge uses the caller's `request_id` as the command id, which makes
/// every command idempotent by it.
#[derive(Clone)]
pub struct OrderHandler {
    orders: Arc<dyn AggregateRepository<Order>>,
    store: Arc<dyn EventStoreBackend>,
}

impl std::fmt::Debug for OrderHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OrderHandler").finish_non_exhaustive()
    }
}

#[async_trait]
impl TransactionalHandler<OrderRequest> for OrderHandler {
    type Output = OrderOutcome;

    async fn handle(
        &self,
        tx: &mut dyn Transaction,
        envelope: &CommandEnvelope<OrderRequest>,
    ) -> Result<Handled<OrderOutcome>, PipelineError> {
        let request = &envelope.command;
        if let Some(version) = self.handled_before(envelope).await? {
            return Ok(Handled::new(OrderOutcome {
                events: Vec::new(),
                version,
                replayed: true,
            }));
        }
        let metadata = envelope.event_metadata();
        let orders = self.orders.within(tx);
        let mut root = match orders.load(&request.order_id).await? {
            Some(root) => root,
            None => AggregateRoot::new(request.order_id.clone()),
        };
        if let Some(expected) = request.expected_version
            && expected != root.version().get()
        {
            return Err(CommandError::Infrastructure(keel_core::Error::Conflict(
                VersionConflict {
                    subject: Order::stream_id(&request.order_id)?.as_str().to_owned(),
                    expected: ExpectedVersion::Exact(Version::new(expected)),
                    actual: root.version(),
                },
            )));
        }
        let events = root
            .execute(request.command.clone())
            .map_err(|rule| domain_error(CommandError::Rejected(rule)))?;
        let version = if events.is_empty() {
            root.version()
        } else {
            orders.save(&mut root, &metadata).await?
        };
        let types: Vec<&'static str> = events
            .iter()
            .map(keel_core::DomainEvent::event_type)
            .collect();
        Ok(Handled::new(OrderOutcome {
            events,
            version: version.get(),
            replayed: false,
        })
        .with_events(types))
    }
}

impl OrderHandler {
    /// The stream version of the last event this envelope's command id
    /// caused, when it caused any: the command is then a retry.
    async fn handled_before(
        &self,
        envelope: &CommandEnvelope<OrderRequest>,
    ) -> keel_core::Result<Option<u64>> {
        let stream = Order::stream_id(&envelope.command.order_id)?;
        let causation = CausationId::from(envelope.command_id);
        let events: Vec<_> = self
            .store
            .read_stream(&stream, ReadStream::forward())
            .try_collect()
            .await?;
        Ok(events
            .iter()
            .rev()
            .find(|e| e.metadata.get().causation_id == Some(causation))
            .map(|e| e.version.get()))
    }
}

fn domain_error(e: CommandError<OrderError>) -> PipelineError {
    match e {
        CommandError::Rejected(rule) => CommandError::Rejected(DomainError::from(rule)),
        CommandError::Infrastructure(e) => CommandError::Infrastructure(e),
    }
}

/// The Ordering context, wired: its command service, its repository (for
/// reads) and its relay to the bus.
pub struct Ordering {
    /// The innermost command service: one transaction per command.
    pub commands: TransactionalService<OrderHandler>,
    /// Loads orders, for reads and checks.
    pub orders: Arc<dyn AggregateRepository<Order>>,
    relay: EventStoreRelayHandle,
}

impl std::fmt::Debug for Ordering {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ordering").finish_non_exhaustive()
    }
}

impl Ordering {
    /// Wires Ordering on `store`, taking a snapshot every `snapshot_every`
    /// events, and starts the relay publishing the streams under
    /// `stream_prefix` (e.g. `Order-<run>`) to [`ORDERS_TOPIC`], each with
    /// its stream id as ordering key.
    ///
    /// # Errors
    ///
    /// When the relay cannot start.
    pub fn start(
        store: Arc<dyn EventStoreBackend>,
        transactions: Arc<dyn TransactionSource>,
        publisher: Arc<dyn EventPublisher>,
        relay_name: &str,
        stream_prefix: &str,
        snapshot_every: u64,
    ) -> crate::Result<Self> {
        let store_for_handler = Arc::clone(&store);
        let orders: Arc<dyn AggregateRepository<Order>> = Arc::new(
            EventSourcedRepository::<Order, dyn EventStoreBackend>::new(store.clone())
                .with_snapshots(SnapshotPolicy::every(snapshot_every), 1),
        );
        let options = SubscriptionOptions::new(relay_name)
            .filter(ReadAll::from_start().stream_prefix(stream_prefix))
            .poll_interval(Duration::from_millis(50));
        let relay = EventStoreRelay::new(publisher, |event| {
            (event.stream_id.category() == ordering_domain::AGGREGATE_TYPE)
                .then(|| ORDERS_TOPIC.to_owned())
        })
        .retry_backoff(Duration::from_millis(50), Duration::from_secs(1))
        .spawn(store, options)?;
        Ok(Self {
            commands: TransactionalService::new(
                transactions,
                OrderHandler {
                    orders: Arc::clone(&orders),
                    store: store_for_handler,
                },
            ),
            orders,
            relay,
        })
    }

    /// Stops the relay after what it is publishing.
    ///
    /// # Errors
    ///
    /// When the relay ended with an error.
    pub async fn shutdown(self) -> crate::Result {
        self.relay.shutdown().await?;
        Ok(())
    }
}

/// What Ordering reads of Shipping's `shipment.dispatched` event.
#[derive(Debug, Deserialize)]
struct Dispatched {
    order_id: String,
    tracking_number: String,
}

/// Consumes Shipping's events: a dispatched shipment marks its order
/// shipped. An order already shipped makes a redelivery a no-op, so the
/// aggregate itself is the idempotency check here.
pub struct ShipmentListener {
    orders: Arc<dyn AggregateRepository<Order>>,
}

impl std::fmt::Debug for ShipmentListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShipmentListener").finish_non_exhaustive()
    }
}

impl ShipmentListener {
    /// A listener marking orders of `ordering` shipped.
    #[must_use]
    pub fn new(ordering: &Ordering) -> Self {
        Self {
            orders: Arc::clone(&ordering.orders),
        }
    }
}

#[async_trait]
impl EventHandler for ShipmentListener {
    async fn handle(&self, delivery: &Delivery) -> Result<(), HandlerError> {
        let message = &delivery.message;
        if message.event_type != "shipment.dispatched" {
            return Ok(());
        }
        let event: Dispatched = serde_json::from_value(message.payload.clone())
            .map_err(|e| HandlerError::reject(format!("unreadable shipment.dispatched: {e}")))?;
        // The dispatch continues the trace and correlation of the order
        // that caused it.
        let mut metadata = Metadata::new().with_actor("service:ordering");
        metadata.correlation_id = message.metadata.correlation_id;
        metadata.trace_context = message.metadata.trace_context.clone();
        match self
            .orders
            .execute(
                &event.order_id,
                OrderCommand::MarkShipped {
                    tracking_number: event.tracking_number,
                },
                &metadata,
            )
            .await
        {
            Ok(_) | Err(CommandError::Rejected(OrderError::AlreadyShipped)) => Ok(()),
            Err(CommandError::Rejected(rule)) => Err(HandlerError::reject(rule)),
            // A version conflict or an outage: try again later.
            Err(CommandError::Infrastructure(e)) => Err(HandlerError::retry(e)),
        }
    }
}
