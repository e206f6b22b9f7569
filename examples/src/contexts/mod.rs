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
//! Meanwhile Ordering's read model, an order summary ([`projection`]), is
//! kept by a projection runner; at the end it is rebuilt as version 2 beside
//! version 1 and readers switch over once it has caught up, never seeing a
//! half-built model.
//!
//! The domain rules live in the `ordering-domain` and `shipping-domain`
//! crates, which depend on `keel-core` alone.

pub mod ordering;
pub mod projection;
pub mod search;
pub mod shipping;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};
use std::time::Duration;

use futures::TryStreamExt;
use keel_core::command::CommandEnvelope;
use keel_core::{EventId, EventPublisher, Message};
use keel_eventbus::SubscriptionConfig;
use keel_eventstore::ReadAll;
use ordering_domain::{Address, Money, OrderCommand, OrderLine, OrderStatus};
use tower::{Service, ServiceExt};
use tracing::info;

use crate::examples::{PATIENCE, within};
use crate::progress::Reporter;
use crate::{Result, Services, ensure};
use ordering::{ORDERS_TOPIC, OrderRequest, Ordering, ShipmentListener};
use shipping::{CONSUMER, SHIPMENTS_TOPIC, Shipping};

/// How many orders the run places unless told otherwise.
pub const ORDERS: usize = 6;

/// The variable that sets how many orders the run places (at least 2; the
/// default is [`ORDERS`]): a few thousand make a long run to watch.
pub const ORDERS_VAR: &str = "KEEL_CONTEXTS_ORDERS";

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
    /// The order summary's version readers use at the end (2: rebuilt).
    pub projection_version: u32,
    /// Reads of the order summary during its rebuild, every one of them
    /// complete: of version 1, then of version 2.
    pub projection_reads: (usize, usize),
    /// Events the order summary is behind Ordering's log at the end.
    pub projection_lag: u64,
    /// Events Ordering's relay had not published at the end.
    pub relay_lag: u64,
    /// The longest a paid order waited for its shipment to be dispatched
    /// (payment recorded in Ordering to dispatch recorded in Shipping).
    pub max_payment_to_dispatch: Duration,
    /// The longest from payment to Ordering showing the order shipped: the
    /// round trip through both contexts and the bus, twice.
    pub max_payment_to_shipped: Duration,
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
    let orders = match std::env::var(ORDERS_VAR) {
        Ok(n) => n
            .trim()
            .parse::<usize>()
            .ok()
            .filter(|n| *n >= 2)
            .ok_or_else(|| format!("{ORDERS_VAR}={n:?}: expected a whole number of at least 2"))?,
        Err(_) => ORDERS,
    };
    run_orders(services, orders).await
}

/// [`run`] with `orders` orders (at least 2): all paid but the last, which
/// is cancelled.
///
/// # Errors
///
/// As [`run`]; fewer than 2 orders is refused.
pub async fn run_orders(services: &Services, orders: usize) -> Result<Summary> {
    ensure(orders >= 2, "the run needs at least 2 orders")?;
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

    let stream_prefix = format!("Order-{scope}-");
    let relay_name = format!("ordering-{scope}");
    let transactions = services.transactions();
    let mut ordering = Ordering::start(
        store.clone(),
        Arc::clone(&transactions),
        publisher,
        &relay_name,
        &stream_prefix,
        3,
    )?;
    // Ordering's read model, version 1, follows the log from the start.
    let (summary_v1, summary_handle, summary_id) = projection::start(
        services,
        store.clone(),
        Arc::clone(&transactions),
        &projection::projection_name(&scope),
        &stream_prefix,
        1,
        100,
    )
    .await?;
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

    // What a person watching a long run sees.
    let counts = Arc::new(Counts::default());
    let reporter = {
        let (counts, consumer) = (Arc::clone(&counts), Arc::clone(&shipping.consumer));
        Reporter::spawn(
            move || {
                format!(
                    "orders {} placed, {} paid, {} shipped | {} messages | {} dead letters",
                    counts.placed.load(AtomicOrdering::Relaxed),
                    counts.paid.load(AtomicOrdering::Relaxed),
                    consumer.inbox.handler().dispatched(),
                    consumer.delivered(),
                    counts.dead_letters.load(AtomicOrdering::Relaxed),
                )
            },
            Duration::from_secs(2),
        )
    };

    // Place every order, pay all but the last, cancel the last.
    let ids: Vec<String> = (1..=orders).map(|n| format!("{scope}-{n}")).collect();
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
        counts.placed.fetch_add(1, AtomicOrdering::Relaxed);
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
        counts.paid.fetch_add(1, AtomicOrdering::Relaxed);
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
    // A long run may take minutes: fail only when nothing moves for a while.
    wait_moving("every paid order shipped", to_pay.len() as u64, || {
        shipping.consumer.inbox.handler().dispatched()
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
    counts
        .dead_letters
        .store(summary.dead_letters, AtomicOrdering::Relaxed);
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
    let mut waiting: Vec<&String> = to_pay.iter().collect();
    let mut since = tokio::time::Instant::now();
    while !waiting.is_empty() {
        let before = waiting.len();
        let mut still = Vec::with_capacity(before);
        for id in waiting {
            let shipped = ordering
                .orders
                .load(id)
                .await?
                .is_some_and(|root| root.state().status() == OrderStatus::Shipped);
            if !shipped {
                still.push(id);
            }
        }
        waiting = still;
        if waiting.len() < before {
            since = tokio::time::Instant::now();
        } else if since.elapsed() > PATIENCE {
            return Err(format!(
                "{} orders not marked shipped after {PATIENCE:?}",
                waiting.len()
            )
            .into());
        }
        if !waiting.is_empty() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

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
    // Each order placed, each paid one paid and shipped, the last cancelled.
    ensure(
        summary.events == orders + 2 * to_pay.len() + 1,
        format!("{} events in Ordering's store", summary.events),
    )?;
    summary.deliveries = shipping.consumer.delivered();
    reporter.finish().await;

    // Lag: how long payments waited for their dispatch.
    let paid_at: HashMap<&str, _> = events
        .iter()
        .filter(|e| e.event_type == "order.paid")
        .map(|e| (e.stream_id.as_str(), e.recorded_at))
        .collect();
    for event in events.iter().filter(|e| e.event_type == "order.shipped") {
        let stream = event.stream_id.as_str();
        let Some(paid) = paid_at.get(stream) else {
            return Err(format!("{stream} shipped without a payment").into());
        };
        let id = stream.strip_prefix("Order-").unwrap_or(stream);
        let dispatched = shipping
            .shipment(id)
            .await?
            .and_then(|s| s.dispatched_at())
            .ok_or("a shipped order has no dispatch time")?;
        let delay =
            |later: chrono::DateTime<chrono::Utc>| (later - *paid).to_std().unwrap_or_default();
        summary.max_payment_to_dispatch = summary.max_payment_to_dispatch.max(delay(dispatched));
        summary.max_payment_to_shipped =
            summary.max_payment_to_shipped.max(delay(event.recorded_at));
    }

    // The order summary rebuilt as version 2 while it is being read.
    let expected: BTreeMap<String, String> = ids
        .iter()
        .map(|id| {
            let status = if id == last { "cancelled" } else { "shipped" };
            (id.clone(), status.to_owned())
        })
        .collect();
    let current = projection::Current {
        summary: summary_v1,
        handle: summary_handle,
        id: summary_id,
    };
    let rebuilt = projection::rebuild(
        services,
        store.clone(),
        transactions,
        current,
        &stream_prefix,
        &expected,
    )
    .await?;
    ensure(
        rebuilt.active == 2,
        "readers use version 2 of the order summary",
    )?;
    ensure(
        rebuilt.customers.len() == orders
            && rebuilt.customers.values().map(|c| c.shipped).sum::<usize>() == to_pay.len(),
        "version 2 knows every customer's orders",
    )?;
    summary.projection_version = rebuilt.active;
    summary.projection_reads = (rebuilt.reads_v1, rebuilt.reads_v2);
    summary.projection_lag = rebuilt.lag_events;

    shipping_sub.shutdown().await;
    ordering_sub.shutdown().await;
    ordering.shutdown().await?;
    shipping.shutdown().await;
    bus.close().await;
    // The relay saved its checkpoint as it stopped: what it left unpublished.
    let relayed = store
        .load_checkpoint(&relay_name)
        .await?
        .unwrap_or_default();
    let filter = ReadAll::from_start().stream_prefix(stream_prefix.clone());
    summary.relay_lag = store.lag_after(relayed, &filter).await?.events;

    info!(
        orders = summary.placed,
        paid = summary.paid,
        cancelled = summary.cancelled,
        shipped = summary.shipped,
        events = summary.events,
        messages = summary.deliveries,
        dead_letters = summary.dead_letters,
        replayed = summary.replayed,
        projection_version = summary.projection_version,
        projection_lag = summary.projection_lag,
        relay_lag = summary.relay_lag,
        max_payment_to_dispatch = ?summary.max_payment_to_dispatch,
        max_payment_to_shipped = ?summary.max_payment_to_shipped,
        "summary"
    );
    Ok(summary)
}

/// Polls `count` until it reaches `target`, failing with `what` when it
/// stays put for [`PATIENCE`].
async fn wait_moving(what: &str, target: u64, count: impl Fn() -> u64) -> Result {
    let (mut last, mut since) = (count(), tokio::time::Instant::now());
    while last < target {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = count();
        if now != last {
            (last, since) = (now, tokio::time::Instant::now());
        } else if since.elapsed() > PATIENCE {
            return Err(format!("{what}: stuck at {last} of {target} for {PATIENCE:?}").into());
        }
    }
    Ok(())
}

/// What the run has done so far, for the progress line.
#[derive(Debug, Default)]
struct Counts {
    placed: AtomicUsize,
    paid: AtomicUsize,
    dead_letters: AtomicUsize,
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
