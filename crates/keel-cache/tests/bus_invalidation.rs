//! End to end: an event published on the bus evicts, through the
//! invalidation handler, what the write made stale, in Redis and in another
//! process's local tier.

use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_cache::{CacheAside, InvalidationHandler, RedisCache, RedisConfig};
use keel_core::{EventPublisher, Message};
use keel_eventbus::{EventBus, InMemoryBus, SubscriptionConfig};
use serde_json::json;

async fn redis(prefix: &str) -> RedisCache {
    let url = keel_testkit::services::redis_url()
        .await
        .expect("these tests need Redis");
    RedisCache::connect(RedisConfig::new(url).key_prefix(prefix))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_event_on_the_bus_evicts_the_stale_entries_everywhere() {
    let prefix = format!("keel-cache-test:{}:", uuid::Uuid::new_v4().simple());
    // Process one serves reads with a local tier; process two (a worker)
    // consumes the events.
    let api = CacheAside::builder(redis(&prefix).await, "products")
        .local_tier(Duration::from_secs(300), 1000)
        .build()
        .await
        .unwrap();
    let worker = CacheAside::builder(redis(&prefix).await, "products")
        .build()
        .await
        .unwrap();
    for sku in ["A-1", "B-2"] {
        api.set(sku, &100u32).await.unwrap();
        assert_eq!(api.get::<u32>(sku).await.unwrap(), Some(100));
    }
    assert!(api.stats().local_hits >= 2);

    let bus = InMemoryBus::new();
    let handler = InvalidationHandler::new().evict_field("product.repriced", &worker, "/sku");
    let subscription = bus
        .subscribe(
            "catalog-events",
            &SubscriptionConfig::new("products-cache")
                .with_backoff(Duration::from_millis(10), Duration::from_millis(100)),
            Arc::new(handler),
        )
        .await
        .unwrap();

    // The write side publishes what happened.
    bus.publish(
        "catalog-events",
        &[Message::new(
            "product.repriced",
            json!({ "sku": "A-1", "price": 120 }),
        )],
    )
    .await
    .unwrap();

    let deadline = Instant::now() + Duration::from_secs(10);
    while api.get::<u32>("A-1").await.unwrap().is_some() {
        assert!(Instant::now() < deadline, "the event never evicted A-1");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        worker.get::<u32>("A-1").await.unwrap(),
        None,
        "gone from Redis too"
    );
    assert_eq!(
        api.get::<u32>("B-2").await.unwrap(),
        Some(100),
        "others untouched"
    );
    subscription.shutdown().await;
}
