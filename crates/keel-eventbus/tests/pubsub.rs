//! The contract suite and reliability tests against the Pub/Sub emulator.
#![cfg(feature = "pubsub")]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use keel_core::{Delivery, EventHandler, EventPublisher, HandlerError, Message};
use keel_eventbus::testing::{Recorder, dead_letters_settled, fast_config, unique, wait_until};
use keel_eventbus::{EventBus, PubSubBus, PubSubConfig};
use serde_json::json;

/// The configuration of a bus on the shared emulator, in a project of its
/// own.
async fn emulator_config() -> PubSubConfig {
    let host = keel_testkit::services::pubsub_emulator_host()
        .await
        .expect("the Pub/Sub emulator is available");
    PubSubConfig::emulator(unique("keel"), &host)
        .unwrap()
        .with_dead_letter_listing_waits(Duration::from_secs(2), Duration::from_millis(300))
}

/// A bus on the shared emulator, in a project of its own.
async fn emulator_bus() -> PubSubBus {
    PubSubBus::connect(emulator_config().await).await.unwrap()
}

bus_contract_tests! {
    factory: || async { (emulator_bus().await, ()) },
    tests: [
        round_trip_keeps_every_field,
        both_wire_formats_are_read,
        failed_handler_is_retried_with_attempts,
        poison_message_is_dead_lettered_after_max_attempts,
        rejected_message_is_dead_lettered_at_once,
        panicking_handler_is_retried,
        malformed_messages_are_dead_lettered,
        ordering_key_order_is_kept,
        dead_letters_can_be_listed_and_replayed,
        graceful_shutdown_finishes_in_flight,
        abort_returns_after_handlers_ended,
        competing_consumers_share_and_fan_out,
        missing_resources_without_auto_create,
        invalid_settings_are_refused,
        many_messages_with_random_failures_are_accounted_for,
    ],
}

/// The contract's crash test, on the emulator. Real Pub/Sub redelivers a
/// message whose subscriber died once its ack deadline passes; the emulator
/// (0.8.x) keeps a message leased to a streaming pull that has ended and may
/// never hand it out again, so this test cannot pass reliably here.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "the emulator keeps messages leased to an ended stream and may never redeliver them; \
            real Pub/Sub redelivers after the ack deadline; crash redelivery is covered on the \
            in-memory bus by tests/memory.rs killed_subscriber_message_is_redelivered and \
            aborted_or_dropped_subscriber_messages_are_redelivered_unless_acked"]
async fn killed_subscriber_message_is_redelivered() {
    keel_eventbus::testing::killed_subscriber_message_is_redelivered(emulator_bus().await).await;
}

/// A handler slower than the ack deadline keeps its lease: the message is
/// not redelivered while it runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_handler_keeps_its_lease() {
    let bus = emulator_bus().await;
    let topic = unique("lease");
    let runs = Arc::new(AtomicUsize::new(0));
    struct Slow(Arc<AtomicUsize>);
    #[async_trait]
    impl EventHandler for Slow {
        async fn handle(&self, _: &Delivery) -> Result<(), HandlerError> {
            self.0.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_secs(14)).await;
            Ok(())
        }
    }
    let config = fast_config("slow").with_ack_deadline(Duration::from_secs(10));
    let sub = bus
        .subscribe(&topic, &config, Arc::new(Slow(runs.clone())))
        .await
        .unwrap();
    bus.publish(&topic, &[Message::new("t.slow", json!(1))])
        .await
        .unwrap();
    wait_until("the handler started", || runs.load(Ordering::SeqCst) == 1).await;
    // Past the 10 s deadline and the handler's 14 s: one run only.
    tokio::time::sleep(Duration::from_secs(17)).await;
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "the lease expired mid-handler"
    );
    sub.shutdown().await;
}

/// `ensure_subscription` updates retry and dead-letter settings of an
/// existing subscription.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ensure_subscription_updates_settings() {
    let bus = emulator_bus().await;
    let topic = unique("update");
    bus.ensure_subscription(&topic, &fast_config("c").with_max_delivery_attempts(5))
        .await
        .unwrap();
    bus.ensure_subscription(&topic, &fast_config("c").with_max_delivery_attempts(7))
        .await
        .unwrap();
    let rec = Recorder::new(|_| Err(HandlerError::retry("always")));
    let sub = bus
        .subscribe(
            &topic,
            &fast_config("c").with_max_delivery_attempts(7),
            rec.clone(),
        )
        .await
        .unwrap();
    let m = Message::new("t.x", json!(1));
    bus.publish(&topic, std::slice::from_ref(&m)).await.unwrap();
    wait_until("seven attempts", || rec.attempts_of(m.event_id).len() == 7).await;
    let dead = bus.dead_letters(&topic, "c", 5).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].attempts, Some(7));
    sub.shutdown().await;
}

#[tokio::test]
async fn config_from_env_and_validation() {
    assert!(PubSubConfig::emulator("p", "").is_err());
    assert!(PubSubConfig::emulator("p", "http://x:1").is_err());
    assert!(PubSubConfig::new("").is_err());
    let c = PubSubConfig::new("my-project").unwrap();
    assert_eq!(c.endpoint(), None);
    assert_eq!(c.project(), "my-project");
}

/// Dead letters a bus listed (and so held) are released by its `close`: a
/// bus opened afterwards lists them on its first listing, not once their
/// leases have run out.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "the emulator never ends a streaming pull the client closed: the closed \
            reader's stream keeps taking the released dead letters (docs/event-bus.md, Testing)"]
async fn dead_letters_listed_before_close_are_listed_again_by_the_next_bus() {
    // One listing of the second bus must see them: a first wait long enough
    // for the emulator to redeliver released messages to a new stream.
    let config = emulator_config()
        .await
        .with_dead_letter_listing_waits(Duration::from_secs(6), Duration::from_millis(500));
    let bus = PubSubBus::connect(config.clone()).await.unwrap();
    let topic = unique("release");
    let rec = Recorder::new(|_| Err(HandlerError::reject("never handled")));
    let sub = bus
        .subscribe(&topic, &fast_config("c"), rec.clone())
        .await
        .unwrap();
    let messages: Vec<Message> = (0..3)
        .map(|n| Message::new("t.dead", json!({ "n": n })))
        .collect();
    bus.publish(&topic, &messages).await.unwrap();
    wait_until("every message rejected", || {
        messages
            .iter()
            .all(|m| !rec.attempts_of(m.event_id).is_empty())
    })
    .await;
    sub.shutdown().await;
    let listed = dead_letters_settled(&bus, &topic, "c", messages.len()).await;
    let mut listed: Vec<_> = listed
        .iter()
        .filter_map(keel_eventbus::DeadLetter::event_id)
        .collect();
    listed.sort();
    let mut want: Vec<_> = messages.iter().map(|m| m.event_id).collect();
    want.sort();
    assert_eq!(listed, want);
    bus.close().await;

    let next = PubSubBus::connect(config).await.unwrap();
    let mut again: Vec<_> = next
        .dead_letters(&topic, "c", 10)
        .await
        .unwrap()
        .iter()
        .filter_map(keel_eventbus::DeadLetter::event_id)
        .collect();
    again.sort();
    again.sort();
    assert_eq!(again, want, "the closed bus still holds dead letters");
    next.close().await;
}

/// Nothing listening at the endpoint: connecting fails within its timeout
/// with an error naming the endpoint, instead of a bus whose first calls
/// retry for half a minute.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connecting_to_a_dead_endpoint_fails_with_the_endpoint_named() {
    // A port nobody listens on: bound by us, then released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = PubSubConfig::emulator(unique("keel"), &format!("127.0.0.1:{port}"))
        .unwrap()
        .with_connect_timeout(Duration::from_secs(1));
    let err = PubSubBus::connect(config).await.unwrap_err();
    match &err {
        keel_eventbus::EventBusError::Unreachable {
            endpoint, waited, ..
        } => {
            assert_eq!(endpoint, &format!("http://127.0.0.1:{port}"));
            assert_eq!(*waited, Duration::from_secs(1));
        }
        other => panic!("expected Unreachable, got {other:?}"),
    }
    assert!(
        err.to_string().contains(&format!("127.0.0.1:{port}")),
        "{err}"
    );
    assert!(err.is_retryable());

    let zero = PubSubConfig::emulator("p", "127.0.0.1:1")
        .unwrap()
        .with_connect_timeout(Duration::ZERO);
    assert!(matches!(
        PubSubBus::connect(zero).await,
        Err(keel_eventbus::EventBusError::InvalidConfig {
            field: "connect_timeout",
            ..
        })
    ));
}
