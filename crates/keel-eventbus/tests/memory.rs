//! The contract suite against the in-memory bus, plus in-memory specifics.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use keel_core::{EventId, EventPublisher, HandlerError, Message};
use keel_eventbus::testing::{Recorder, Tracker, fast_config, unique, wait_until};
use keel_eventbus::{EventBus, InMemoryBus, Naming};
use serde_json::json;

mod common;

bus_contract_tests! {
    factory: || async { (InMemoryBus::new(), ()) },
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
        killed_subscriber_message_is_redelivered,
        competing_consumers_share_and_fan_out,
        missing_resources_without_auto_create,
        invalid_settings_are_refused,
        many_messages_with_random_failures_are_accounted_for,
    ],
}

#[tokio::test]
async fn backoff_spaces_out_redeliveries() {
    let bus = InMemoryBus::new();
    let topic = unique("backoff");
    let config = fast_config("slowpoke")
        .with_backoff(Duration::from_millis(200), Duration::from_millis(200))
        .with_max_delivery_attempts(5);
    let stamps = Arc::new(std::sync::Mutex::new(Vec::new()));
    let stamps2 = stamps.clone();
    let rec = Recorder::new(move |d| {
        stamps2.lock().unwrap().push(tokio::time::Instant::now());
        if d.attempt < 3 {
            Err(HandlerError::retry("later"))
        } else {
            Ok(())
        }
    });
    let sub = bus.subscribe(&topic, &config, rec.clone()).await.unwrap();
    bus.publish(&topic, &[Message::new("t.x", json!(1))])
        .await
        .unwrap();
    wait_until("handled", || rec.handled().len() == 1).await;
    let stamps = stamps.lock().unwrap().clone();
    assert_eq!(stamps.len(), 3);
    for pair in stamps.windows(2) {
        // The gap is at least the configured backoff (a lower bound, not a
        // timing assertion on speed).
        assert!(pair[1] - pair[0] >= Duration::from_millis(200));
    }
    sub.shutdown().await;
}

#[tokio::test]
async fn prefix_names_topics_and_subscriptions() {
    let bus = InMemoryBus::new().with_naming(Naming::with_prefix("staging").unwrap());
    let topic = unique("named");
    let rec = Recorder::accepting();
    let sub = bus
        .subscribe(&topic, &fast_config("billing"), rec.clone())
        .await
        .unwrap();
    assert_eq!(sub.name(), format!("staging.{topic}.billing"));
    // The unprefixed view of the same broker does not see the topic.
    let plain = bus.with_naming(Naming::new()).with_auto_create(false);
    assert!(
        plain
            .publish(&topic, &[Message::new("t.x", json!(1))])
            .await
            .is_err()
    );
    assert_eq!(bus.backlog(&topic, "billing").unwrap(), 0);
    sub.shutdown().await;
}

#[tokio::test]
async fn handler_timeout_counts_as_failure() {
    let bus = InMemoryBus::new();
    let topic = unique("timeout");
    let config = fast_config("sleepy").with_handler_timeout(Duration::from_millis(50));
    struct Sleepy;
    #[async_trait::async_trait]
    impl keel_core::EventHandler for Sleepy {
        async fn handle(&self, d: &keel_core::Delivery) -> Result<(), HandlerError> {
            if d.attempt == 1 {
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
            Ok(())
        }
    }
    let sub = bus
        .subscribe(&topic, &config, Arc::new(Sleepy))
        .await
        .unwrap();
    bus.publish(&topic, &[Message::new("t.x", json!(1))])
        .await
        .unwrap();
    wait_until("drained after the timeout and a retry", || {
        bus.backlog(&topic, "sleepy").unwrap() == 0
    })
    .await;
    assert!(
        bus.dead_letters(&topic, "sleepy", 5)
            .await
            .unwrap()
            .is_empty()
    );
    sub.shutdown().await;
}

#[tokio::test]
async fn shutdown_timeout_releases_stuck_messages() {
    let bus = InMemoryBus::new();
    let topic = unique("stuck");
    let config = fast_config("stuck").with_shutdown_timeout(Duration::from_millis(100));
    let rec_started = Arc::new(tokio::sync::Notify::new());
    struct Stuck(Arc<tokio::sync::Notify>);
    #[async_trait::async_trait]
    impl keel_core::EventHandler for Stuck {
        async fn handle(&self, _: &keel_core::Delivery) -> Result<(), HandlerError> {
            self.0.notify_one();
            std::future::pending::<()>().await;
            Ok(())
        }
    }
    let sub = bus
        .subscribe(&topic, &config, Arc::new(Stuck(rec_started.clone())))
        .await
        .unwrap();
    bus.publish(&topic, &[Message::new("t.x", json!(1))])
        .await
        .unwrap();
    rec_started.notified().await;
    sub.shutdown().await;
    // Released, not lost: it waits for the next subscriber.
    assert_eq!(bus.backlog(&topic, "stuck").unwrap(), 1);
    let rec = Recorder::accepting();
    let next = bus.subscribe(&topic, &config, rec.clone()).await.unwrap();
    wait_until("handled by the next subscriber", || {
        rec.handled().len() == 1
    })
    .await;
    assert_eq!(rec.handled()[0].attempt, 2);
    next.shutdown().await;
}

/// Crash redelivery, exactly: after `abort` (and after a drop), the next
/// subscriber of the consumer gets every message whose handler had not
/// finished, and none that had (those were acked). The Pub/Sub emulator
/// cannot show this (it keeps messages leased to an ended stream), so the
/// in-memory bus proves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn aborted_or_dropped_subscriber_messages_are_redelivered_unless_acked() {
    for drop_it in [false, true] {
        let bus = InMemoryBus::new();
        let topic = unique("crash");
        let config = fast_config("crashy").with_max_concurrent_handlers(8);
        // Thirty calls finish (and are acked), then every handler hangs
        // until the crash.
        let tracker = Tracker::hanging_after(Duration::from_millis(5), 30);
        let sub = bus
            .subscribe(&topic, &config, tracker.clone())
            .await
            .unwrap();
        let messages: Vec<Message> = (0..100)
            .map(|n| Message::new("t.crash", json!(n)))
            .collect();
        bus.publish(&topic, &messages).await.unwrap();
        wait_until("thirty handled, eight hanging", || {
            tracker.finished().len() == 30 && tracker.running() == 8
        })
        .await;
        if drop_it {
            drop(sub);
            wait_until("dropped handlers ended", || tracker.running() == 0).await;
        } else {
            sub.abort().await;
        }
        let acked: HashSet<EventId> = tracker.finished().into_iter().collect();
        assert_eq!(acked.len(), tracker.finished().len(), "handled twice");
        assert_eq!(acked.len(), 30);

        let survivor = Recorder::accepting();
        let next = bus
            .subscribe(&topic, &config, survivor.clone())
            .await
            .unwrap();
        let expected: HashSet<EventId> = messages
            .iter()
            .map(|m| m.event_id)
            .filter(|id| !acked.contains(id))
            .collect();
        wait_until("the unacked messages redelivered", || {
            survivor.handled().len() >= expected.len()
        })
        .await;
        next.shutdown().await;
        let redelivered: Vec<EventId> = survivor
            .handled()
            .iter()
            .map(|d| d.message.event_id)
            .collect();
        let unique_ids: HashSet<EventId> = redelivered.iter().copied().collect();
        assert_eq!(unique_ids.len(), redelivered.len(), "redelivered twice");
        assert_eq!(unique_ids, expected, "drop: {drop_it}");
        assert_eq!(bus.backlog(&topic, "crashy").unwrap(), 0);
    }
}
