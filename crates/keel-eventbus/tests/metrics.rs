//! What the buses record themselves (no decorator): publishes, acks, nacks,
//! dead letters by reason and handler durations, read back through the
//! OpenTelemetry SDK's in-memory exporter; and the trace context written on
//! publish. Against the in-memory bus and the Pub/Sub emulator.

use keel_core::{EventPublisher, HandlerError, Message, Metadata, TraceContext};
use keel_eventbus::testing::{Recorder, fast_config, unique, wait_until};
use keel_eventbus::{EventBus, InMemoryBus};
use keel_telemetry::metrics::names::{
    ATTR_OUTCOME, ATTR_REASON, ATTR_SUBSCRIPTION, ATTR_TOPIC, BUS_ACKS, BUS_DEAD_LETTERS,
    BUS_HANDLER_DURATION, BUS_NACKS, BUS_PUBLISH_DURATION, BUS_PUBLISHED_MESSAGES,
};
use keel_telemetry::testing::MetricsProbe;
use opentelemetry::Context;
use opentelemetry::context::FutureExt as _;
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId};
use serde_json::json;

/// One message of each fate: handled at once, handled on its second
/// attempt, rejected, and failing on every one of its five attempts.
async fn every_outcome_is_recorded<B: EventBus + 'static>(bus: B, probe: &MetricsProbe) {
    let topic = unique("metrics");
    let config = fast_config("counter").with_max_delivery_attempts(5);
    let rec = Recorder::new(|d| match d.message.payload["fate"].as_str() {
        Some("retry-once") if d.attempt == 1 => Err(HandlerError::retry("not yet")),
        Some("reject") => Err(HandlerError::reject("unprocessable")),
        Some("poison") => Err(HandlerError::retry("never")),
        _ => Ok(()),
    });
    let sub = bus.subscribe(&topic, &config, rec.clone()).await.unwrap();
    let fates = ["ok", "retry-once", "reject", "poison"];
    let messages: Vec<Message> = fates
        .iter()
        .map(|f| Message::new("test.fate", json!({ "fate": f })))
        .collect();
    bus.publish(&topic, &messages).await.unwrap();

    let subscription = format!("{topic}.counter");
    let sub_attr = (ATTR_SUBSCRIPTION, subscription.as_str());
    // 1 + 2 + 1 + 5 handler runs; each is recorded once its handler returns.
    wait_until("every handler run recorded", || {
        probe.value(BUS_HANDLER_DURATION, &[sub_attr]) >= 9.0
    })
    .await;
    sub.shutdown().await;

    let topic_ok = [(ATTR_TOPIC, topic.as_str()), (ATTR_OUTCOME, "ok")];
    assert_eq!(probe.value(BUS_PUBLISHED_MESSAGES, &topic_ok), 4.0);
    assert_eq!(
        probe.value(BUS_PUBLISH_DURATION, &topic_ok),
        1.0,
        "one call"
    );
    assert_eq!(probe.value(BUS_ACKS, &[sub_attr]), 2.0);
    // retry-once's first attempt and the poison's first four.
    assert_eq!(probe.value(BUS_NACKS, &[sub_attr]), 5.0);
    assert_eq!(
        probe.value(BUS_DEAD_LETTERS, &[sub_attr, (ATTR_REASON, "rejected")]),
        1.0
    );
    assert_eq!(
        probe.value(
            BUS_DEAD_LETTERS,
            &[sub_attr, (ATTR_REASON, "attempts_exhausted")]
        ),
        1.0
    );
    let runs = |outcome| probe.value(BUS_HANDLER_DURATION, &[sub_attr, (ATTR_OUTCOME, outcome)]);
    assert_eq!(runs("ok"), 2.0);
    assert_eq!(runs("retry"), 6.0, "five poison runs and one early failure");
    assert_eq!(runs("reject"), 1.0);
    // Invariant 5, as the metrics show it.
    assert_eq!(
        probe.value(BUS_PUBLISHED_MESSAGES, &topic_ok),
        probe.value(BUS_ACKS, &[sub_attr]) + probe.value(BUS_DEAD_LETTERS, &[sub_attr])
    );
}

fn remote_parent() -> (Context, String) {
    let trace_id = TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap();
    let span_id = SpanId::from_hex("00f067aa0ba902b7").unwrap();
    let cx = Context::new().with_remote_span_context(SpanContext::new(
        trace_id,
        span_id,
        TraceFlags::SAMPLED,
        true,
        Default::default(),
    ));
    (
        cx,
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned(),
    )
}

/// Published inside an active trace, a message without a trace context
/// carries that trace to its consumer; one with its own keeps it; outside
/// any trace nothing is added.
async fn publish_writes_the_current_trace<B: EventBus + 'static>(bus: B) {
    let topic = unique("traced");
    let rec = Recorder::accepting();
    let sub = bus
        .subscribe(&topic, &fast_config("tracer"), rec.clone())
        .await
        .unwrap();
    let own = TraceContext::new(
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        None,
    )
    .unwrap();
    let plain = Message::new("test.plain", json!({}));
    let carried = Message::new("test.carried", json!({}))
        .with_metadata(Metadata::new().with_trace_context(own.clone()));
    let outside = Message::new("test.outside", json!({}));
    let (cx, traceparent) = remote_parent();
    bus.publish(&topic, &[plain.clone(), carried.clone()])
        .with_context(cx)
        .await
        .unwrap();
    bus.publish(&topic, std::slice::from_ref(&outside))
        .await
        .unwrap();
    wait_until("three deliveries", || rec.handled().len() == 3).await;
    sub.shutdown().await;

    let trace_of = |id| {
        rec.handled()
            .into_iter()
            .find(|d| d.message.event_id == id)
            .unwrap()
            .message
            .metadata
            .trace_context
    };
    assert_eq!(
        trace_of(plain.event_id).map(|tc| tc.traceparent().to_owned()),
        Some(traceparent)
    );
    assert_eq!(trace_of(carried.event_id), Some(own));
    assert_eq!(trace_of(outside.event_id), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_memory_bus_records_every_outcome() {
    let probe = MetricsProbe::new();
    let bus = InMemoryBus::new().with_metrics(probe.metrics());
    every_outcome_is_recorded(bus, &probe).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_memory_bus_writes_the_current_trace() {
    publish_writes_the_current_trace(InMemoryBus::new()).await;
}

#[tokio::test]
async fn in_memory_failed_publish_is_counted_as_an_error() {
    let probe = MetricsProbe::new();
    let bus = InMemoryBus::new()
        .with_auto_create(false)
        .with_metrics(probe.metrics());
    let err = bus
        .publish("nowhere", &[Message::new("test.lost", json!({}))])
        .await;
    assert!(err.is_err());
    assert_eq!(
        probe.value(
            BUS_PUBLISHED_MESSAGES,
            &[(ATTR_TOPIC, "nowhere"), (ATTR_OUTCOME, "error")]
        ),
        1.0
    );
    assert_eq!(
        probe.value(BUS_PUBLISHED_MESSAGES, &[(ATTR_OUTCOME, "ok")]),
        0.0
    );
}

#[cfg(feature = "pubsub")]
mod pubsub {
    use std::time::Duration;

    use keel_eventbus::{PubSubBus, PubSubConfig};

    use super::*;

    async fn emulator_bus() -> PubSubBus {
        let host = keel_testkit::services::pubsub_emulator_host()
            .await
            .expect("the Pub/Sub emulator is available");
        let config = PubSubConfig::emulator(unique("keel"), &host)
            .unwrap()
            .with_dead_letter_listing_waits(Duration::from_secs(2), Duration::from_millis(300));
        PubSubBus::connect(config).await.unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn pubsub_bus_records_every_outcome() {
        let probe = MetricsProbe::new();
        let bus = emulator_bus().await.with_metrics(probe.metrics());
        every_outcome_is_recorded(bus, &probe).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn pubsub_bus_writes_the_current_trace() {
        publish_writes_the_current_trace(emulator_bus().await).await;
    }

    /// A topic admin client of the test's own on the emulator, to break the
    /// bus's dead-letter topic behind its back.
    async fn topic_admin() -> google_cloud_pubsub::client::TopicAdmin {
        let host = keel_testkit::services::pubsub_emulator_host()
            .await
            .expect("the Pub/Sub emulator is available");
        google_cloud_pubsub::client::TopicAdmin::builder()
            .with_endpoint(format!("http://{host}"))
            .with_credentials(google_cloud_auth::credentials::anonymous::Builder::new().build())
            .build()
            .await
            .unwrap()
    }

    /// A dead letter whose publish to the dead-letter topic fails goes round
    /// again (nacked, redelivered, rejected anew) and is counted once, when
    /// it finally reaches the dead-letter topic.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_failed_dead_letter_publish_is_not_counted() {
        let probe = MetricsProbe::new();
        let bus = emulator_bus().await.with_metrics(probe.metrics());
        let topic = unique("dlq-down");
        let config = fast_config("c").with_max_delivery_attempts(50);
        bus.ensure_subscription(&topic, &config).await.unwrap();
        // The dead-letter topic goes away; without auto-creation nothing
        // brings it back until the test does.
        let admin = topic_admin().await;
        let dlq_topic = format!(
            "projects/{}/topics/{}",
            bus.project(),
            keel_eventbus::Naming::new()
                .dead_letter_topic(&topic, "c")
                .unwrap()
        );
        admin
            .delete_topic()
            .set_topic(&dlq_topic)
            .send()
            .await
            .unwrap();
        let rec = Recorder::new(|_| Err(HandlerError::reject("unprocessable")));
        let sub = bus
            .with_auto_create(false)
            .subscribe(&topic, &config, rec.clone())
            .await
            .unwrap();
        let m = Message::new("test.rejected", json!({}));
        bus.publish(&topic, std::slice::from_ref(&m)).await.unwrap();

        let subscription = format!("{topic}.c");
        let dead = || {
            probe.value(
                BUS_DEAD_LETTERS,
                &[
                    (ATTR_SUBSCRIPTION, subscription.as_str()),
                    (ATTR_REASON, "rejected"),
                ],
            )
        };
        // A second delivery means the first dead-letter publish failed.
        wait_until("a redelivery after the failed dead-letter publish", || {
            rec.attempts_of(m.event_id).len() >= 2
        })
        .await;
        assert_eq!(dead(), 0.0, "nothing reached the dead-letter topic yet");

        admin
            .create_topic()
            .set_name(&dlq_topic)
            .send()
            .await
            .unwrap();
        wait_until("the dead letter published", || dead() >= 1.0).await;
        sub.shutdown().await;
        let rounds = rec.attempts_of(m.event_id).len();
        assert!(rounds >= 2, "{rounds}");
        assert_eq!(dead(), 1.0, "one dead letter after {rounds} rounds");
    }
}
