//! Shipping's application layer: it consumes Ordering's events through an
//! inbox, keeps [`Shipment`]s in a keel-repository table in the same unit
//! of work as the inbox mark and its own outbox rows, and serves reads
//! through keel-cache.
//!
//! The code is generic over Keel's ports: `Services` decides whether the
//! repository, inbox and outbox are in memory or on PostgreSQL, and whether
//! the cache is in memory or Redis.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use keel_cache::CacheAside;
use keel_core::uow::Transaction;
use keel_core::{Delivery, Entity as _, EntityRepository, EventHandler, HandlerError, Message};
use keel_outbox::{
    InMemoryInbox, InMemoryOutbox, Inbox, InboxHandler, Outbox, OutboxMessage, PgOutbox, Relay,
    RelayConfig, RelayHandle,
};
use keel_repository::{InMemoryRepository, Mapped, PgRepository};
use serde::{Deserialize, Serialize};
use shipping_domain::{Address, Shipment, ShipmentId, ShipmentLine, ShipmentStatus, ShippingEvent};
use tracing::info;

use crate::Services;
use crate::contexts::search::ShipmentSearch;

/// The topic Shipping publishes its events to.
pub const SHIPMENTS_TOPIC: &str = "shipping.shipments";

/// The consumer name of Shipping's subscription to Ordering's events: it
/// names the inbox records and the dead-letter topic.
pub const CONSUMER: &str = "shipping";

/// A shipment as stored: the queryable columns and the domain entity as
/// JSON. The domain crate knows nothing of tables; this is the mapping.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Mapped)]
#[keel(table = "keel_examples_shipments")]
pub struct ShipmentRecord {
    /// The shipment's id, `shp-<order id>`.
    #[keel(id)]
    pub id: String,
    /// The example run, so runs sharing a database stay apart.
    #[keel(filterable)]
    pub run: String,
    /// The order it ships.
    #[keel(filterable)]
    pub order_id: String,
    /// The domain entity.
    pub shipment: serde_json::Value,
}

impl ShipmentRecord {
    fn new(run: &str, shipment: &Shipment) -> Result<Self, HandlerError> {
        Ok(Self {
            id: shipment.id().as_str().to_owned(),
            run: run.to_owned(),
            order_id: shipment.order_id().to_owned(),
            shipment: serde_json::to_value(shipment).map_err(HandlerError::retry)?,
        })
    }

    /// The domain entity.
    ///
    /// # Errors
    ///
    /// When the stored JSON is not a shipment.
    pub fn shipment(&self) -> serde_json::Result<Shipment> {
        serde_json::from_value(self.shipment.clone())
    }
}

/// What Shipping reads of Ordering's events: its own view of them (an
/// anti-corruption layer), not Ordering's types.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum OrderingEvent {
    Placed {
        lines: Vec<PlacedLine>,
        address: Address,
    },
    Paid {},
    Cancelled {
        reason: String,
    },
    Shipped {},
}

#[derive(Debug, Deserialize)]
struct PlacedLine {
    sku: String,
    quantity: u32,
}

/// Handles one of Ordering's events inside the inbox's transaction.
pub struct OrderEventsHandler {
    run: String,
    shipments: Arc<dyn EntityRepository<ShipmentRecord>>,
    outbox: Arc<dyn Outbox>,
    /// Whether payloads of schema version 2 are understood: off until the
    /// run "deploys the upgrade", which makes such a message a poison one
    /// at first and a replayable one afterwards.
    understands_v2: AtomicBool,
    dispatched: AtomicU64,
}

impl std::fmt::Debug for OrderEventsHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OrderEventsHandler")
            .field("run", &self.run)
            .finish_non_exhaustive()
    }
}

impl OrderEventsHandler {
    /// Starts accepting payloads of schema version 2.
    pub fn upgrade_to_v2(&self) {
        self.understands_v2.store(true, Ordering::SeqCst);
    }

    /// Shipments dispatched by this handler (committed or not).
    #[must_use]
    pub fn dispatched(&self) -> u64 {
        self.dispatched.load(Ordering::SeqCst)
    }

    fn publish(
        &self,
        event: &ShippingEvent,
        cause: &Message,
    ) -> Result<OutboxMessage, HandlerError> {
        let (ShippingEvent::Dispatched { shipment_id, .. }
        | ShippingEvent::Cancelled { shipment_id, .. }) = event;
        let mut message = Message::from_event(event)
            .map_err(HandlerError::retry)?
            .with_ordering_key(shipment_id.as_str());
        // The event continues the correlation and trace of the order event
        // that caused it, so one trace runs through both services.
        message.metadata.correlation_id = cause.metadata.correlation_id;
        message.metadata.trace_context = cause.metadata.trace_context.clone();
        message.metadata.causation_id = Some(keel_core::CausationId::from(uuid::Uuid::from(
            cause.event_id,
        )));
        Ok(OutboxMessage::new(
            SHIPMENTS_TOPIC,
            "Shipment",
            shipment_id.as_str(),
            message,
        ))
    }
}

#[async_trait]
impl InboxHandler for OrderEventsHandler {
    async fn handle(
        &self,
        tx: &mut dyn Transaction,
        delivery: &Delivery,
    ) -> Result<(), HandlerError> {
        let message = &delivery.message;
        if message.schema_version > 1 && !self.understands_v2.load(Ordering::SeqCst) {
            return Err(HandlerError::reject(format!(
                "{} schema version {} is not understood yet",
                message.event_type, message.schema_version
            )));
        }
        // The relay uses the order's stream id (`Order-<id>`) as ordering key.
        let order_id = message
            .ordering_key
            .as_deref()
            .and_then(|key| key.strip_prefix("Order-"))
            .ok_or_else(|| HandlerError::reject("an order event without its stream id"))?;
        let event: OrderingEvent = serde_json::from_value(message.payload.clone())
            .map_err(|e| HandlerError::reject(format!("unreadable {}: {e}", message.event_type)))?;
        let id = ShipmentId::for_order(order_id);
        let shipments = self.shipments.within(tx);
        let stored = shipments
            .get(&id.as_str().to_owned())
            .await
            .map_err(HandlerError::retry)?;
        let mut outgoing = Vec::new();
        match (event, stored) {
            (OrderingEvent::Placed { lines, address }, None) => {
                let lines = lines
                    .into_iter()
                    .map(|l| ShipmentLine::new(l.sku, l.quantity))
                    .collect();
                let shipment =
                    Shipment::open(order_id, lines, address).map_err(HandlerError::reject)?;
                shipments
                    .insert(ShipmentRecord::new(&self.run, &shipment)?)
                    .await
                    .map_err(HandlerError::retry)?;
            }
            // A placement redelivered under a new id: the shipment exists.
            (OrderingEvent::Placed { .. } | OrderingEvent::Shipped {}, _) => {}
            (OrderingEvent::Paid {} | OrderingEvent::Cancelled { .. }, None) => {
                // Ordered delivery makes this impossible unless the placement
                // is still on its way: ask again later.
                return Err(HandlerError::retry(format!(
                    "no shipment yet for order {order_id}"
                )));
            }
            (OrderingEvent::Paid {}, Some(stored)) => {
                let mut shipment = stored.entity.shipment().map_err(HandlerError::retry)?;
                if shipment.mark_paid().map_err(HandlerError::reject)? {
                    // This warehouse ships at once: a tracking number from
                    // the shipment id stands in for the carrier's.
                    let tracking = format!("TRK-{}", shipment.order_id());
                    let event = shipment
                        .dispatch(tracking, Utc::now())
                        .map_err(HandlerError::reject)?;
                    shipments
                        .update(ShipmentRecord::new(&self.run, &shipment)?, stored.version)
                        .await
                        .map_err(HandlerError::retry)?;
                    outgoing.push(event);
                    self.dispatched.fetch_add(1, Ordering::SeqCst);
                }
            }
            (OrderingEvent::Cancelled { reason }, Some(stored)) => {
                let mut shipment = stored.entity.shipment().map_err(HandlerError::retry)?;
                if let Some(event) = shipment.cancel(reason).map_err(HandlerError::reject)? {
                    shipments
                        .update(ShipmentRecord::new(&self.run, &shipment)?, stored.version)
                        .await
                        .map_err(HandlerError::retry)?;
                    outgoing.push(event);
                }
            }
        }
        drop(shipments);
        for event in &outgoing {
            self.outbox
                .within(tx)
                .write(&self.publish(event, message)?)
                .await
                .map_err(HandlerError::retry)?;
        }
        info!(order_id, event_type = %message.event_type, attempt = delivery.attempt, "shipping handled");
        Ok(())
    }
}

/// The Shipping context, wired on whichever backends `Services` names.
pub struct Shipping {
    /// Ordering's events enter here: the inbox around the handler, with
    /// cache eviction after each commit.
    pub consumer: Arc<ShippingConsumer>,
    /// Shipments as stored.
    pub shipments: Arc<dyn EntityRepository<ShipmentRecord>>,
    /// Cached shipment reads.
    pub cache: CacheAside,
    /// The search read model, when configured.
    pub search: Option<ShipmentSearch>,
    relay: RelayHandle,
}

impl std::fmt::Debug for Shipping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shipping").finish_non_exhaustive()
    }
}

/// The subscription's handler: the inbox (dedup by event id, in the unit
/// of work of the change) followed by eviction of the cached shipment.
pub struct ShippingConsumer {
    /// The inbox around [`OrderEventsHandler`].
    pub inbox: Inbox<OrderEventsHandler>,
    cache: CacheAside,
    shipments: Arc<dyn EntityRepository<ShipmentRecord>>,
    search: Option<ShipmentSearch>,
    delivered: AtomicU64,
}

impl std::fmt::Debug for ShippingConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShippingConsumer").finish_non_exhaustive()
    }
}

impl ShippingConsumer {
    /// Deliveries seen, whatever their outcome.
    #[must_use]
    pub fn delivered(&self) -> u64 {
        self.delivered.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl EventHandler for ShippingConsumer {
    async fn handle(&self, delivery: &Delivery) -> Result<(), HandlerError> {
        self.delivered.fetch_add(1, Ordering::SeqCst);
        self.inbox.handle(delivery).await?;
        // Committed: the cached read is stale now.
        if let Some(order_id) = delivery
            .message
            .ordering_key
            .as_deref()
            .and_then(|k| k.strip_prefix("Order-"))
        {
            self.cache
                .invalidate(order_id)
                .await
                .map_err(HandlerError::retry)?;
            if let Some(search) = &self.search {
                // The read model follows what was committed; a failure here
                // redelivers the message, which the inbox then skips and
                // this step repeats.
                let id = ShipmentId::for_order(order_id).as_str().to_owned();
                if let Some(stored) = self.shipments.get(&id).await.map_err(HandlerError::retry)? {
                    let shipment = stored.entity.shipment().map_err(HandlerError::retry)?;
                    search.index(&shipment).await.map_err(HandlerError::retry)?;
                }
            }
        }
        Ok(())
    }
}

/// What Shipping is wired from: its backends and settings. The tour builds
/// it from [`Services`]; the `shipping-service` binary from its
/// configuration.
pub struct ShippingWiring {
    /// Names this deployment's rows (`run` column), the relay and the cache
    /// prefix.
    pub run: String,
    /// PostgreSQL for shipments, inbox and outbox; in memory when `None`.
    pub database: Option<keel_database::Database>,
    /// The cache backend for shipment reads.
    pub cache: Arc<dyn keel_cache::Backend>,
    /// Where the outbox relay publishes.
    pub publisher: Arc<dyn keel_core::EventPublisher>,
    /// The search read model, when the deployment keeps one.
    pub search: Option<ShipmentSearch>,
    /// Whether order events of schema version 2 are understood from the
    /// start (the fix deployed).
    pub accept_schema_v2: bool,
    /// How often the outbox relay polls when idle.
    pub relay_poll_interval: Duration,
}

impl std::fmt::Debug for ShippingWiring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShippingWiring")
            .field("run", &self.run)
            .field("postgres", &self.database.is_some())
            .field("search", &self.search.is_some())
            .field("accept_schema_v2", &self.accept_schema_v2)
            .finish_non_exhaustive()
    }
}

impl Shipping {
    /// Wires Shipping for this run of the tour and starts its outbox relay.
    ///
    /// # Errors
    ///
    /// When a backend cannot be reached or a table cannot be created.
    pub async fn start(
        services: &Services,
        publisher: Arc<dyn keel_core::EventPublisher>,
    ) -> crate::Result<Self> {
        Self::wire(ShippingWiring {
            run: services.scope("contexts"),
            database: services.database().cloned(),
            cache: services.cache_backend().await?,
            publisher,
            search: None,
            accept_schema_v2: false,
            relay_poll_interval: Duration::from_millis(50),
        })
        .await
    }

    /// Wires Shipping on `wiring` and starts its outbox relay. On
    /// PostgreSQL the shipments table is created when missing (Keel's own
    /// tables come from the crates' migrations, applied beforehand).
    ///
    /// # Errors
    ///
    /// When a backend cannot be reached or a table cannot be created.
    pub async fn wire(wiring: ShippingWiring) -> crate::Result<Self> {
        let ShippingWiring {
            run,
            database,
            cache: backend,
            publisher,
            search,
            accept_schema_v2,
            relay_poll_interval,
        } = wiring;
        let config = RelayConfig::default()
            .with_name(format!("shipping-{run}"))
            .with_poll_interval(relay_poll_interval);
        let cache = CacheAside::builder_shared(backend, format!("shipments-{run}"))
            .ttl(Duration::from_secs(60))
            .negative_ttl(Duration::from_secs(1))
            .build()
            .await?;
        let (shipments, outbox, inbox, relay): (
            Arc<dyn EntityRepository<ShipmentRecord>>,
            Arc<dyn Outbox>,
            _,
            _,
        ) = match &database {
            Some(db) => {
                let create = ShipmentRecord::mapping().create_table_if_not_exists_sql();
                sqlx::query(&create).execute(db.pool()).await?;
                let shipments: Arc<dyn EntityRepository<ShipmentRecord>> =
                    Arc::new(PgRepository::<ShipmentRecord>::new(db.pool().clone())?);
                let outbox: Arc<dyn Outbox> = Arc::new(PgOutbox::new());
                let handler = handler(&run, &shipments, &outbox, accept_schema_v2);
                let inbox = Inbox::postgres(db, CONSUMER, handler)?;
                let relay = Relay::new(db.pool().clone(), publisher, config)?.spawn();
                (shipments, outbox, inbox, relay)
            }
            None => {
                let memory = InMemoryOutbox::new();
                let shipments: Arc<dyn EntityRepository<ShipmentRecord>> =
                    Arc::new(InMemoryRepository::<ShipmentRecord>::new()?);
                let outbox: Arc<dyn Outbox> = Arc::new(memory.clone());
                let handler = handler(&run, &shipments, &outbox, accept_schema_v2);
                let inbox = Inbox::in_memory(&InMemoryInbox::new(), CONSUMER, handler)?;
                let relay = Relay::in_memory(&memory, publisher, config)?.spawn();
                (shipments, outbox, inbox, relay)
            }
        };
        drop(outbox);
        Ok(Self {
            consumer: Arc::new(ShippingConsumer {
                inbox,
                cache: cache.clone(),
                shipments: Arc::clone(&shipments),
                search: search.clone(),
                delivered: AtomicU64::new(0),
            }),
            shipments,
            cache,
            search,
            relay,
        })
    }

    /// The shipment of `order_id`, through the cache.
    ///
    /// # Errors
    ///
    /// When the repository or the cache fails.
    pub async fn shipment(&self, order_id: &str) -> keel_core::Result<Option<Shipment>> {
        let shipments = Arc::clone(&self.shipments);
        let id = ShipmentId::for_order(order_id).as_str().to_owned();
        self.cache
            .get_or_load_optional(order_id, || async move {
                match shipments.get(&id).await? {
                    Some(stored) => Ok(Some(stored.entity.shipment().map_err(|e| {
                        keel_core::Error::internal("a stored shipment is unreadable", e)
                    })?)),
                    None => Ok(None),
                }
            })
            .await
    }

    /// Writes every stored shipment of this run into the search read
    /// model (nothing without one) and returns how many: what a start does
    /// so that a crash between a commit and its index write heals.
    ///
    /// # Errors
    ///
    /// When the repository or the search engine fails.
    pub async fn reindex(&self) -> crate::Result<usize> {
        let Some(search) = &self.search else {
            return Ok(0);
        };
        let mut page = keel_core::PageRequest::first(500);
        let mut count = 0;
        loop {
            let found = self
                .shipments
                .list(&keel_core::ListQuery::new(page))
                .await?;
            let shipments = found
                .items
                .iter()
                .map(|stored| stored.entity.shipment())
                .collect::<Result<Vec<_>, _>>()?;
            search.index_many(&shipments).await?;
            count += shipments.len();
            match found.next {
                Some(cursor) => page = keel_core::PageRequest::after(cursor, 500),
                None => return Ok(count),
            }
        }
    }

    /// Stops the outbox relay.
    pub async fn shutdown(self) {
        self.relay.shutdown().await;
    }
}

fn handler(
    run: &str,
    shipments: &Arc<dyn EntityRepository<ShipmentRecord>>,
    outbox: &Arc<dyn Outbox>,
    accept_schema_v2: bool,
) -> OrderEventsHandler {
    OrderEventsHandler {
        run: run.to_owned(),
        shipments: Arc::clone(shipments),
        outbox: Arc::clone(outbox),
        understands_v2: AtomicBool::new(accept_schema_v2),
        dispatched: AtomicU64::new(0),
    }
}

/// Whether `shipment` is dispatched.
#[must_use]
pub fn is_dispatched(shipment: &Shipment) -> bool {
    shipment.status() == ShipmentStatus::Dispatched
}
