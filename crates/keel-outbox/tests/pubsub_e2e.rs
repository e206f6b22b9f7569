//! End to end on the Pub/Sub emulator: outbox → relay → Pub/Sub → inbox.
//!
//! Needs the emulator (`PUBSUB_EMULATOR_HOST`, or one on 127.0.0.1:8085).

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use common::*;
use keel_core::{Delivery, EventId, HandlerError};
use keel_eventbus::testing::unique;
use keel_eventbus::{EventBus, PubSubBus, PubSubConfig, SubscriptionConfig};
use keel_outbox::{Inbox, InboxHandler, Relay, RelayConfig};

const WAIT: Duration = Duration::from_secs(90);

async fn emulator_bus() -> PubSubBus {
    let host = keel_testkit::services::pubsub_emulator_host()
        .await
        .expect("the Pub/Sub emulator (set PUBSUB_EMULATOR_HOST or start it on 127.0.0.1:8085)");
    let config = PubSubConfig::emulator(unique("keel-outbox"), &host).unwrap();
    PubSubBus::connect(config).await.unwrap()
}

/// Applies an order change in the inbox's transaction and remembers the
/// order in which each aggregate's events were applied.
#[derive(Default)]
struct Apply {
    calls: AtomicUsize,
    applied: Mutex<HashMap<String, Vec<u64>>>,
}

#[async_trait]
impl InboxHandler for Apply {
    async fn handle(
        &self,
        tx: &mut dyn keel_core::uow::Transaction,
        delivery: &Delivery,
    ) -> Result<(), HandlerError> {
        let tx = keel_database::UnitOfWork::join(tx)
            .map_err(HandlerError::retry)?
            .conn();
        self.calls.fetch_add(1, Ordering::SeqCst);
        sqlx::query("INSERT INTO effects (event_id) VALUES ($1)")
            .bind(delivery.message.event_id.as_uuid())
            .execute(&mut *tx)
            .await
            .map_err(HandlerError::retry)?;
        let aggregate = delivery.message.payload["aggregate"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let seq = delivery.message.payload["seq"].as_u64().unwrap_or_default();
        self.applied
            .lock()
            .unwrap()
            .entry(aggregate)
            .or_default()
            .push(seq);
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_relay_failing_after_publish_duplicates_on_pubsub_and_the_inbox_applies_once_in_order() {
    let db = database().await;
    sqlx::query("CREATE TABLE effects (event_id uuid PRIMARY KEY)")
        .execute(db.pool())
        .await
        .unwrap();
    let bus = emulator_bus().await;
    let topic = unique("orders");

    let recorder = Recorder::default();
    let config = |consumer: &str| {
        SubscriptionConfig::new(consumer)
            .with_ordered(true)
            .with_backoff(Duration::from_millis(100), Duration::from_millis(500))
            .with_ack_deadline(Duration::from_secs(10))
    };
    let raw = bus
        .subscribe(&topic, &config("raw"), Arc::new(recorder.clone()))
        .await
        .unwrap();
    let inbox = Arc::new(
        Inbox::postgres(&database_of(db.pool()), "billing.apply", Apply::default()).unwrap(),
    );
    let billing = bus
        .subscribe(&topic, &config("billing"), inbox.clone())
        .await
        .unwrap();

    let written: Vec<_> = (1..=24)
        .map(|n| event(&topic, &format!("agg-{}", n % 4), n))
        .collect();
    commit(db.pool(), &written).await;

    // The first publish reaches Pub/Sub but the relay is told it failed, as
    // if it lost its connection before marking the rows.
    let flaky = Arc::new(FailAfterPublish {
        inner: Arc::new(bus.clone()),
        failures: Mutex::new(1),
    });
    let relay_config = RelayConfig::default()
        .with_batch_size(12)
        .with_poll_interval(Duration::from_millis(100))
        .with_retry_backoff(Duration::from_millis(50), Duration::from_millis(200));
    let relay = Relay::new(db.pool().clone(), flaky, relay_config)
        .unwrap()
        .spawn();
    eventually("every row published", WAIT, || async {
        unpublished(db.pool()).await == 0
    })
    .await;
    relay.shutdown().await;

    let effects = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM effects")
            .fetch_one(db.pool())
            .await
            .unwrap()
    };
    eventually("the inbox consumer to apply all 24", WAIT, || async {
        effects().await == 24
    })
    .await;
    eventually("the raw consumer to see the duplicates", WAIT, || async {
        recorder.counts().len() == 24 && recorder.len() >= 36
    })
    .await;
    // Let redeliveries of the duplicates settle, then check nothing changed.
    tokio::time::sleep(Duration::from_secs(2)).await;
    raw.shutdown().await;
    billing.shutdown().await;

    let counts = recorder.counts();
    let duplicated: Vec<&EventId> = counts
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(id, _)| id)
        .collect();
    assert!(
        duplicated.len() >= 12,
        "the failed batch went out twice: {} duplicated",
        duplicated.len()
    );
    assert_eq!(effects().await, 24, "the inbox applied each event once");
    let inbox_rows: i64 =
        sqlx::query_scalar("SELECT count(*) FROM keel.inbox WHERE consumer = 'billing.apply'")
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert_eq!(inbox_rows, 24);
    for (aggregate, seqs) in inbox.handler().applied.lock().unwrap().iter() {
        let want: Vec<u64> = (1..=24)
            .filter(|n| format!("agg-{}", n % 4) == *aggregate)
            .collect();
        assert_eq!(seqs, &want, "{aggregate} applied once each, in order");
    }
}
