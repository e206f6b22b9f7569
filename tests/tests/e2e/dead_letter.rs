//! The poison message: an `order.paid` of schema version 2, published to
//! Ordering's topic by a producer that upgraded early, is dead-lettered by
//! the Shipping process; after Shipping restarts with the fix configured,
//! the dead letter is replayed through keel-eventbus's replay API against
//! the emulator and handled exactly once.

use std::time::Duration;

use keel_core::{EventPublisher as _, Message};
use keel_eventbus::{EventBus as _, Naming, PubSubBus, PubSubConfig};
use keel_examples::contexts::ordering::ORDERS_TOPIC;
use keel_examples::contexts::shipping::CONSUMER;
use keel_tests::services::{Error, ServiceStack, StackOptions};

use crate::common::{ONE_STACK_AT_A_TIME, PRICE, place_and_pay, pool, wait_all_shipped, wait_for};

/// The first half, which the emulator shows reliably: the poison message is
/// dead-lettered with its reason, and Shipping's state is untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_poison_message_is_dead_lettered_with_its_reason() -> Result<(), Error> {
    poison(false).await
}

/// The whole story, replay included. Ignored on the emulator: Shipping
/// subscribes in order, and the emulator keeps an ordering key bound to
/// the stream that first received it. After the restart, the replayed
/// message (the poisoned order's key) went to the ended process's stream
/// and was never delivered, while canary orders on new keys shipped
/// (2026-12-06, CI and a rerun; it had passed once before). Real Pub/Sub
/// moves a key to a live stream. Run it with
/// `cargo test -p keel-tests --test e2e -- --ignored dead_letter`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "the emulator keeps an ordering key bound to the stream of a stopped process; see the doc comment"]
async fn a_poison_message_is_dead_lettered_then_replayed_once_after_the_fix() -> Result<(), Error> {
    poison(true).await
}

async fn poison(replay: bool) -> Result<(), Error> {
    let _one = ONE_STACK_AT_A_TIME.lock().await;
    let mut stack = ServiceStack::start(StackOptions::default()).await?;
    let ordering = stack.ordering_client()?;
    let order_id = place_and_pay(&ordering, "customer-poison", "Ada Lovelace").await?;
    wait_all_shipped(
        &ordering,
        std::slice::from_ref(&order_id),
        Duration::from_secs(90),
    )
    .await?;

    // The operator's bus client: the services' project and names.
    let bus = PubSubBus::connect(
        PubSubConfig::emulator("keel-tests", stack.pubsub_host())?
            .with_naming(Naming::with_prefix(stack.prefix())?)
            .with_dead_letter_listing_waits(Duration::from_secs(2), Duration::from_millis(300)),
    )
    .await?;

    // The same payment again, from a producer already on schema version 2.
    let mut poison = Message::new(
        "order.paid",
        serde_json::json!({
            "type": "paid",
            "amount": { "currency_code": "EUR", "amount_minor": PRICE },
            "payment_reference": format!("psp-{order_id}"),
        }),
    )
    .with_ordering_key(format!("Order-{order_id}"));
    poison.schema_version = 2;
    let poison_id = poison.event_id;
    bus.publish(ORDERS_TOPIC, &[poison]).await?;

    let letter = wait_for("the dead letter", Duration::from_secs(60), || {
        let bus = &bus;
        async move {
            let letters = bus.dead_letters(ORDERS_TOPIC, CONSUMER, 10).await?;
            Ok(letters
                .into_iter()
                .find(|l| l.event_id() == Some(poison_id)))
        }
    })
    .await?;
    let reason = letter.reason.clone().unwrap_or_default();
    assert!(
        reason.contains("schema version 2"),
        "the reason says why: {reason:?}"
    );

    let shipping_db = pool(&stack.shipping_db.url()).await?;
    let marks = || {
        let db = shipping_db.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM keel.inbox WHERE consumer = $1 AND event_id = $2",
            )
            .bind(CONSUMER)
            .bind(*poison_id.as_uuid())
            .fetch_one(&db)
            .await
        }
    };
    let shipment_version = || {
        let db = shipping_db.clone();
        let order_id = order_id.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT version FROM keel_examples_shipments WHERE order_id = $1",
            )
            .bind(order_id)
            .fetch_one(&db)
            .await
        }
    };
    assert_eq!(
        marks().await?,
        0,
        "a rejected message is not marked handled"
    );
    let version_before = shipment_version().await?;
    if !replay {
        bus.close().await;
        stack.terminate().await?;
        shipping_db.close().await;
        return Ok(());
    }

    // The fix is deployed: Shipping restarts understanding schema 2.
    stack.shipping.terminate().await?;
    stack
        .shipping
        .set_env("KEEL_SHIPPING__ACCEPT_SCHEMA_V2", "true");
    stack.shipping.start().await?;

    // Before replaying, the operator checks the new deployment consumes: a
    // canary order must ship. The emulator can keep routing messages for a
    // while to the stream of the process that just ended, where they are
    // lost (see restart.rs; real Pub/Sub redelivers them after the ack
    // deadline), so a canary may need to be repeated.
    let mut live = false;
    for n in 0..5 {
        let canary = place_and_pay(&ordering, &format!("customer-canary-{n}"), "Canary").await?;
        if wait_all_shipped(
            &ordering,
            std::slice::from_ref(&canary),
            Duration::from_secs(20),
        )
        .await
        .is_ok()
        {
            live = true;
            break;
        }
    }
    assert!(live, "the restarted Shipping never consumed a canary order");

    // The operator replays it, once; a second replay finds nothing.
    assert_eq!(
        bus.replay_dead_letters(ORDERS_TOPIC, CONSUMER, &[poison_id])
            .await?,
        1
    );
    wait_for(
        "the replayed message handled",
        Duration::from_secs(60),
        || {
            let marks = marks();
            async move { Ok((marks.await? == 1).then_some(())) }
        },
    )
    .await?;
    assert_eq!(
        bus.replay_dead_letters(ORDERS_TOPIC, CONSUMER, &[poison_id])
            .await?,
        0
    );
    let left = bus.dead_letters(ORDERS_TOPIC, CONSUMER, 10).await?;
    assert!(
        left.iter().all(|l| l.event_id() != Some(poison_id)),
        "the replayed letter left the dead-letter queue"
    );

    // Handled exactly once in effect: the second payment of a shipped order
    // changes nothing, and nothing was dispatched again.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(marks().await?, 1);
    assert_eq!(
        shipment_version().await?,
        version_before,
        "the shipment was not written again"
    );
    let dispatches: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM keel.outbox WHERE event_type = 'shipment.dispatched' AND aggregate_id = $1",
    )
    .bind(format!("shp-{order_id}"))
    .fetch_one(&shipping_db)
    .await?;
    assert_eq!(dispatches, 1, "dispatched once");

    bus.close().await;
    stack.terminate().await?;
    shipping_db.close().await;
    Ok(())
}
