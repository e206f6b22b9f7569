//! Two bounded contexts end to end, in one process: Ordering (event-sourced,
//! [`ordering`]) and Shipping (state-based, [`shipping`]), talking only
//! through the event bus.
//!
//! The run places orders, pays most of them and cancels one. Ordering's
//! events leave through the event-store relay on ordering keys; Shipping
//! consumes them through its inbox, ships each paid order and publishes
//! `shipment.dispatched` through its outbox; Ordering marks the order
//! shipped. On the way, an early-upgraded payments producer publishes an
//! `order.paid` in a schema Shipping does not understand yet: it is
//! dead-lettered, Shipping "deploys" the upgrade, and the dead letter is
//! replayed. Shipping must not ship that order twice.
//!
//! The domain rules live in the `ordering-domain` and `shipping-domain`
//! crates, which depend on `keel-core` alone.

pub mod ordering;
pub mod search;
pub mod shipping;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures::TryStreamExt;
use keel_core::command::CommandEnvelope;
use keel_core::{EventId, EventPublisher, Message};
use keel_eventbus::SubscriptionConfig;
use keel_eventstore::ReadAll;
use ordering_domain::{Address, Money, OrderCommand, OrderLine, OrderStatus};
use tower::{Service, ServiceExt};
use tracing::info;

use crate::examples::{wait_until, within};
use crate::{Result, Services, ensure};
use ordering::{ORDERS_TOPIC, OrderRequest, Ordering, ShipmentListener};
use shipping::{CONSUMER, SHIPMENTS_TOPIC, Shipping};

/// How many orders the run places.
pub const ORDERS: usize = 6;

/// What the run did, for the summary line and for tests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Orders placed.
    pub placed: usize,
    /// Orders paid.
    pub paid: usize,
    /// Orders cancelled.
    pub cancelled: usize,
    /// Paid orders whose shipment is dispatched and that Ordering shows
    /// shipped.
    pub shipped: usize,
    /// Shipments dispatched by Shipping's handler (more than `paid` would
    /// mean an order shipped twice).
    pub dispatches: u64,
    /// Events in Ordering's store for this run.
    pub events: usize,
    /// Deliveries to Shipping's consumer, duplicates and retries included.
    pub deliveries: u64,
    /// Messages dead-lettered.
    pub dead_letters: usize,
    /// Dead letters replayed and then handled.
    pub replayed: usize,
}

/// Runs both contexts and checks the outcome.
///
/// # Errors
///
/// A failing backend, a message that does not arrive in time, or a broken
/// invariant: a paid order not shipped or shipped twice, a cancelled order
/// shipped, the poison message not dead-lettered or not handled after its
/// replay.
pub async fn run(services: &Services) -> Result<Summary> {
    let scope = services.scope("contexts");
    let bus = services.event_bus().await?;
    let publisher: Arc<dyn EventPublisher> = bus.port.clone();
    let store = services.event_store();

    // Consumers subscribe before producers publish. Shipping reads orders in
    // stream order; five attempts (Pub/Sub's least) and short backoffs keep the run quick.
    let shipping = Shipping::start(services, publisher.clone()).await?;
    let config = SubscriptionConfig::new(CONSUMER)
        .with_ordered(true)
        .with_max_delivery_attempts(5)
        .with_backoff(Duration::from_millis(50), Duration::from_millis(300))
        .with_shutdown_timeout(Duration::from_secs(10));
    let shipping_sub = bus
        .port
        .subscribe(ORDERS_TOPIC, &config, shipping.consumer.clone())
        .await?;

    let mut ordering = Ordering::start(
        store.clone(),
        services.transactions(),
        publisher,
        &format!("ordering-{scope}"),
        &format!("Order-{scope}-"),
        3,
    )?;
    let listener = Arc::new(ShipmentListener::new(&ordering));
    let ordering_sub = bus
        .port
        .subscribe(
            SHIPMENTS_TOPIC,
            &SubscriptionConfig::new("ordering")
                .with_backoff(Duration::from_millis(50), Duration::from_millis(300))
                .with_shutdown_timeout(Duration::from_secs(10)),
            listener,
        )
        .await?;

    // Place every order, pay all but the last, cancel the last.
    let ids: Vec<String> = (1..=ORDERS).map(|n| format!("{scope}-{n}")).collect();
    let mut summary = Summary::default();
    for (n, id) in ids.iter().enumerate() {
        let quantity = u32::try_from(n + 1)?;
        let place = OrderCommand::Place {
            customer_id: format!("customer-{n}"),
            lines: vec![OrderLine::new("SKU-TEA", quantity, Money::new("EUR", 450))],
            address: Address::example(),
        };
        command(&mut ordering, id, place).await?;
        summary.placed += 1;
    }
    let (last, to_pay) = ids.split_last().ok_or("no orders")?;
    for (n, id) in to_pay.iter().enumerate() {
        let amount = Money::new("EUR", 450 * i64::try_from(n + 1)?);
        let pay = OrderCommand::Pay {
            amount,
            payment_reference: format!("psp-{n}"),
        };
        command(&mut ordering, id, pay).await?;
        summary.paid += 1;
    }
    // A rule broken on purpose: paying the wrong amount is refused and
    // changes nothing.
    let refused = command(
        &mut ordering,
        last,
        OrderCommand::Pay {
            amount: Money::new("EUR", 1),
            payment_reference: "psp-bad".to_owned(),
        },
    )
    .await;
    ensure(refused.is_err(), "a wrong payment amount is refused")?;
    let cancel = OrderCommand::Cancel {
        reason: "customer changed their mind".to_owned(),
    };
    command(&mut ordering, last, cancel).await?;
    summary.cancelled += 1;

    // The poison message: the first order's payment again, from a producer
    // already on schema version 2. Shipping rejects it; it is dead-lettered.
    let first = &ids[0];
    let mut poison = Message::new(
        "order.paid",
        serde_json::json!({ "type": "paid", "amount": { "currency_code": "EUR", "amount_minor": 450 }, "payment_reference": "psp-0" }),
    )
    .with_ordering_key(format!("Order-{first}"));
    poison.schema_version = 2;
    let poison_id = poison.event_id;
    bus.port.publish(ORDERS_TOPIC, &[poison]).await?;

    // Every paid order ends up shipped in both contexts.
    wait_until("every paid order shipped", || {
        shipping.consumer.inbox.handler().dispatched() >= to_pay.len() as u64
    })
    .await?;
    let mut dead = Vec::new();
    within("the dead letter", async {
        loop {
            dead = bus.port.dead_letters(ORDERS_TOPIC, CONSUMER, 10).await?;
            if !dead.is_empty() {
                return Ok::<_, keel_eventbus::EventBusError>(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await??;
    let dead_ids: HashSet<EventId> = dead.iter().filter_map(|d| d.event_id()).collect();
    summary.dead_letters = dead_ids.len();
    ensure(
        dead_ids == HashSet::from([poison_id]),
        "the poison message, and only it, was dead-lettered",
    )?;
    for letter in &dead {
        info!(event_id = ?letter.event_id(), reason = letter.reason.as_deref().unwrap_or("-"), "dead letter");
    }

    // The fix is deployed; the operator replays the dead letter.
    shipping.consumer.inbox.handler().upgrade_to_v2();
    let replayed = bus
        .port
        .replay_dead_letters(ORDERS_TOPIC, CONSUMER, &[poison_id])
        .await?;
    ensure(replayed == 1, "one dead letter replayed")?;
    within("the replayed message handled", async {
        while !shipping.consumer.inbox.has_handled(poison_id).await? {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok::<_, keel_core::Error>(())
    })
    .await??;
    summary.replayed = replayed;

    // Ordering learns of every dispatch.
    within("every order marked shipped", async {
        loop {
            let mut shipped = 0;
            for id in to_pay {
                if let Some(root) = ordering.orders.load(id).await?
                    && root.state().status() == OrderStatus::Shipped
                {
                    shipped += 1;
                }
            }
            if shipped == to_pay.len() {
                return Ok::<_, keel_core::Error>(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await??;

    // The checks, by reading both contexts' own state.
    for id in to_pay {
        let shipment = shipping
            .shipment(id)
            .await?
            .ok_or("a paid order has no shipment")?;
        ensure(
            shipping::is_dispatched(&shipment)
                && shipment.tracking_number() == Some(format!("TRK-{id}").as_str()),
            format!("order {id} is dispatched with its tracking number"),
        )?;
        summary.shipped += 1;
    }
    let cancelled = shipping
        .shipment(last)
        .await?
        .ok_or("the cancelled order has no shipment")?;
    ensure(
        cancelled.status() == shipping_domain::ShipmentStatus::Cancelled,
        "the cancelled order's shipment is cancelled",
    )?;
    summary.dispatches = shipping.consumer.inbox.handler().dispatched();
    ensure(
        summary.dispatches == to_pay.len() as u64,
        format!(
            "each paid order dispatched once ({} dispatches for {} orders)",
            summary.dispatches,
            to_pay.len()
        ),
    )?;
    let events: Vec<_> = store
        .read_all(ReadAll::from_start().stream_prefix(format!("Order-{scope}-")))
        .try_collect()
        .await?;
    summary.events = events.len();
    // placed x6, paid x5, cancelled x1, shipped x5.
    ensure(
        summary.events == ORDERS + 2 * to_pay.len() + 1,
        format!("{} events in Ordering's store", summary.events),
    )?;
    summary.deliveries = shipping.consumer.delivered();

    shipping_sub.shutdown().await;
    ordering_sub.shutdown().await;
    ordering.shutdown().await?;
    shipping.shutdown().await;
    bus.close().await;

    info!(
        orders = summary.placed,
        paid = summary.paid,
        cancelled = summary.cancelled,
        shipped = summary.shipped,
        events = summary.events,
        messages = summary.deliveries,
        dead_letters = summary.dead_letters,
        replayed = summary.replayed,
        "summary"
    );
    Ok(summary)
}

/// Sends one command through Ordering's transactional service.
async fn command(ordering: &mut Ordering, id: &str, command: OrderCommand) -> Result {
    let request = OrderRequest {
        order_id: id.to_owned(),
        command,
        expected_version: None,
    };
    ordering
        .commands
        .ready()
        .await?
        .call(CommandEnvelope::new(request))
        .await?;
    Ok(())
}
