//! The two-context run (Ordering and Shipping) on in-memory adapters,
//! checked from the outside through the summary it returns. The run checks
//! its own invariants too (it reads both contexts' state); this test pins
//! the numbers a reader of the summary relies on.

use keel_examples::Services;
use keel_examples::contexts::{self, ORDERS, Summary};

/// A fresh database with the event store's and the outbox's migrations,
/// and a pool of up to 20 connections on it (keep the first alive while
/// the pool is in use: dropping it drops the database).
async fn postgres() -> (keel_testkit::TestDatabase, keel_database::Database) {
    let test_database = keel_testkit::TestDatabase::create(&[
        &keel_eventstore::MIGRATIONS,
        &keel_outbox::MIGRATIONS,
    ])
    .await
    .expect("a PostgreSQL database from keel-testkit");
    let config = keel_database::DatabaseConfig::builder()
        .url(test_database.url())
        .min_connections(1)
        .max_connections(20)
        .build()
        .expect("a valid pool configuration");
    let database = keel_database::Database::connect(config)
        .await
        .expect("a pool");
    (test_database, database)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_paid_order_ships_once_and_the_poison_message_is_dead_lettered_then_replayed() {
    let summary = contexts::run(&Services::in_memory())
        .await
        .unwrap_or_else(|e| panic!("the contexts run failed: {e}"));
    assert_counts(&summary, ORDERS);
}

/// The numbers every run's summary must show for `orders` orders.
fn assert_counts(summary: &Summary, orders: usize) {
    let paid = orders - 1;
    assert_eq!(summary.placed, orders);
    assert_eq!(summary.paid, paid);
    assert_eq!(summary.cancelled, 1);
    // Shipped in both contexts, and dispatched exactly once each although
    // the replayed dead letter paid the first order a second time.
    assert_eq!(summary.shipped, paid);
    assert_eq!(summary.dispatches, paid as u64);
    assert_eq!(summary.dead_letters, 1);
    assert_eq!(summary.replayed, 1);
    // placed, paid and shipped events, plus one cancellation.
    assert_eq!(summary.events, orders + 2 * paid + 1);
    // Every stored order event reached Shipping, and the poison message at
    // least twice (rejected, then replayed).
    assert!(
        summary.deliveries >= summary.events as u64 + 2,
        "{summary:?}"
    );
    // The order summary was rebuilt: readers read version 1 during the
    // rebuild and version 2 after it (every read complete, or the run
    // fails), and version 2 is not behind the log.
    assert_eq!(summary.projection_version, 2);
    let (reads_v1, reads_v2) = summary.projection_reads;
    assert!(reads_v1 >= 1 && reads_v2 >= 3, "{summary:?}");
    assert_eq!(summary.projection_lag, 0);
    // The relay published everything before it stopped.
    assert_eq!(summary.relay_lag, 0);
    // A dispatch follows its payment; Ordering hears of it later still.
    assert!(
        summary.max_payment_to_dispatch > std::time::Duration::ZERO
            && summary.max_payment_to_dispatch <= summary.max_payment_to_shipped,
        "{summary:?}"
    );
}

/// A longer run, as `KEEL_CONTEXTS_ORDERS` asks for: the same invariants
/// hold for every order, and the rebuild reads many more events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_longer_run_keeps_every_invariant() {
    let summary = contexts::run_orders(&Services::in_memory(), 60)
        .await
        .unwrap_or_else(|e| panic!("the contexts run failed: {e}"));
    assert_counts(&summary, 60);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_of_fewer_than_two_orders_is_refused() {
    for orders in [0, 1] {
        let refused = contexts::run_orders(&Services::in_memory(), orders).await;
        assert!(
            refused.is_err_and(|e| e.to_string().contains("at least 2 orders")),
            "{orders} orders"
        );
    }
}

/// The whole run on PostgreSQL, Redis and the Pub/Sub emulator, the order
/// summary's two versions in tables; the same numbers as in memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_summary_holds_on_real_services() {
    let (_test_database, database) = postgres().await;
    let services = Services::in_memory()
        .with_database(database.clone())
        .with_redis(
            keel_testkit::services::redis_url()
                .await
                .expect("Redis from keel-testkit"),
        )
        .with_pubsub_emulator(
            keel_testkit::services::pubsub_emulator_host()
                .await
                .expect("the Pub/Sub emulator from keel-testkit"),
        );
    let summary = contexts::run(&services)
        .await
        .unwrap_or_else(|e| panic!("the contexts run failed: {e}"));
    assert_counts(&summary, ORDERS);

    // Version 1's rows are gone with it; version 2's table holds the run.
    let count = |table: &'static str| {
        let pool = database.pool().clone();
        let run = services.run().to_owned();
        async move {
            sqlx::query_scalar::<_, i64>(&format!("SELECT count(*) FROM {table} WHERE run = $1"))
                .bind(run)
                .fetch_one(&pool)
                .await
                .expect("the table answers")
        }
    };
    assert_eq!(count("keel_examples_order_summary_v1").await, 0);
    assert_eq!(count("keel_examples_order_summary_v2").await, ORDERS as i64);
    database.close().await;
}

/// Version 2's answer per customer, from a hand-made model.
#[test]
fn per_customer_counts_orders_shipments_and_totals() {
    use contexts::projection::{CustomerSummary, OrderRow, per_customer};

    let row = |customer: &str, status: &str, total: i64| OrderRow {
        status: status.to_owned(),
        customer_id: Some(customer.to_owned()),
        total_minor: Some(total),
    };
    let rows = [
        ("a", row("c1", "shipped", 100)),
        ("b", row("c1", "cancelled", 50)),
        ("c", row("c1", "paid", 7)),
        ("d", row("c2", "shipped", 9)),
        // A version-1 row has no customer: not counted.
        (
            "e",
            OrderRow {
                status: "shipped".to_owned(),
                ..OrderRow::default()
            },
        ),
    ]
    .into_iter()
    .map(|(id, row)| (id.to_owned(), row))
    .collect();
    let customers = per_customer(&rows);
    assert_eq!(customers.len(), 2);
    assert_eq!(
        customers["c1"],
        CustomerSummary {
            orders: 3,
            shipped: 1,
            total_minor: 107
        }
    );
    assert_eq!(
        customers["c2"],
        CustomerSummary {
            orders: 1,
            shipped: 1,
            total_minor: 9
        }
    );
}

/// Shipping's consumer on its own. Under concurrent redelivery, many copies of one
/// `order.paid` (same event id, as a broker redelivers) and of the same
/// payment re-published under new ids, all at once. The shipment is
/// updated exactly once: inserted at version 1, dispatched at version 2.
mod shipping_consumer {
    use std::sync::Arc;

    use futures::future::join_all;
    use keel_core::{Delivery, EntityRepository, EventHandler, EventPublisher, Message, Version};
    use keel_eventbus::InMemoryBus;
    use keel_examples::Services;
    use keel_examples::contexts::shipping::{ShipmentRecord, Shipping};
    use ordering_domain::{Address, Money, OrderEvent, OrderLine};
    use shipping_domain::{ShipmentId, ShipmentStatus};

    fn delivery(order_id: &str, event: &OrderEvent) -> Message {
        Message::from_event(event)
            .expect("an order event encodes")
            .with_ordering_key(format!("Order-{order_id}"))
    }

    async fn redeliver_concurrently(services: &Services) {
        let bus = InMemoryBus::new();
        let publisher: Arc<dyn EventPublisher> = Arc::new(bus);
        let shipping = Shipping::start(services, publisher)
            .await
            .expect("shipping starts");
        let order_id = format!("{}-race", services.run());
        let placed = delivery(
            &order_id,
            &OrderEvent::Placed {
                customer_id: "c".to_owned(),
                lines: vec![OrderLine::new("SKU", 1, Money::new("EUR", 5))],
                address: Address::example(),
                total: Money::new("EUR", 5),
            },
        );
        let paid = delivery(
            &order_id,
            &OrderEvent::Paid {
                amount: Money::new("EUR", 5),
                payment_reference: "psp".to_owned(),
            },
        );
        shipping
            .consumer
            .handle(&Delivery::new(placed, 1, "shipping"))
            .await
            .expect("the placement is handled");

        // 16 copies with the same event id and 8 re-published under new ids.
        let mut copies: Vec<Message> = (0..16).map(|_| paid.clone()).collect();
        copies.extend((0..8).map(|_| paid.clone().with_event_id(keel_core::EventId::new())));
        let consumer = &shipping.consumer;
        let outcomes = join_all(copies.iter().map(|m| async move {
            consumer
                .handle(&Delivery::new(m.clone(), 1, "shipping"))
                .await
        }))
        .await;
        // Losers of a race may ask for a retry; redeliver those until done,
        // as the bus would.
        for (message, outcome) in copies.iter().zip(outcomes) {
            if outcome.is_err() {
                let mut attempt = 2;
                while let Err(e) = consumer
                    .handle(&Delivery::new(message.clone(), attempt, "shipping"))
                    .await
                {
                    assert!(attempt < 20, "a redelivery keeps failing: {e}");
                    attempt += 1;
                }
            }
        }

        let repo: &Arc<dyn EntityRepository<ShipmentRecord>> = &shipping.shipments;
        let stored = repo
            .get(&ShipmentId::for_order(&order_id).as_str().to_owned())
            .await
            .expect("the repository answers")
            .expect("the shipment exists");
        assert_eq!(
            stored.version,
            Version::new(2),
            "inserted once and dispatched once, however often the payment came"
        );
        let shipment = stored.entity.shipment().expect("a readable shipment");
        assert_eq!(shipment.status(), ShipmentStatus::Dispatched);
        for message in &copies {
            assert!(
                consumer
                    .inbox
                    .has_handled(message.event_id)
                    .await
                    .expect("the inbox answers"),
                "every copy is marked handled"
            );
        }
        shipping.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn in_memory() {
        redeliver_concurrently(&Services::in_memory()).await;
    }

    /// Bad input is refused with the right kind of error and writes nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn malformed_and_early_messages_are_refused_and_write_nothing() {
        use keel_core::HandlerError;

        let services = Services::in_memory();
        let publisher: Arc<dyn EventPublisher> = Arc::new(InMemoryBus::new());
        let shipping = Shipping::start(&services, publisher)
            .await
            .expect("shipping starts");
        let consumer = &shipping.consumer;
        let handle = |message: Message| async move {
            consumer
                .handle(&Delivery::new(message, 1, "shipping"))
                .await
        };
        let paid = OrderEvent::Paid {
            amount: Money::new("EUR", 5),
            payment_reference: "psp".to_owned(),
        };

        // No stream id to tell which order: never handleable.
        let keyless = Message::from_event(&paid).expect("encodes");
        assert!(matches!(
            handle(keyless).await,
            Err(HandlerError::Reject(_))
        ));
        // A payload that is not an order event.
        let garbage = Message::new(
            "order.placed",
            serde_json::json!({ "type": "placed", "lines": "many" }),
        )
        .with_ordering_key("Order-x");
        assert!(matches!(
            handle(garbage).await,
            Err(HandlerError::Reject(_))
        ));
        // A placement Shipping cannot ship (no lines): a domain rule, rejected.
        let empty = delivery(
            "empty",
            &OrderEvent::Placed {
                customer_id: "c".to_owned(),
                lines: vec![],
                address: Address::example(),
                total: Money::new("EUR", 0),
            },
        );
        assert!(matches!(handle(empty).await, Err(HandlerError::Reject(_))));
        // A payment before its placement arrived: retry later, not reject.
        let early = delivery("early", &paid);
        let early_id = early.event_id;
        assert!(matches!(handle(early).await, Err(HandlerError::Retry(_))));
        assert!(
            !consumer
                .inbox
                .has_handled(early_id)
                .await
                .expect("inbox answers"),
            "a failed delivery is not marked handled"
        );
        for order in ["x", "empty", "early"] {
            let id = ShipmentId::for_order(order).as_str().to_owned();
            assert!(
                shipping
                    .shipments
                    .get(&id)
                    .await
                    .expect("answers")
                    .is_none(),
                "nothing was written for {order}"
            );
        }
        shipping.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn on_postgres() {
        let (_test_database, database) = super::postgres().await;
        redeliver_concurrently(&Services::in_memory().with_database(database.clone())).await;
        database.close().await;
    }
}
