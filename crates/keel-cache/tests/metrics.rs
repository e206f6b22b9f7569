//! What a `CacheAside` records in `keel.cache.hits` / `keel.cache.misses`,
//! read back through the OpenTelemetry SDK's in-memory exporter: the
//! in-memory backend, and real Redis with an in-process tier.

use std::time::Duration;

use keel_cache::{CacheAside, MemoryCache, RedisCache, RedisConfig};
use keel_telemetry::metrics::names::{ATTR_CACHE, ATTR_CACHE_TIER, CACHE_HITS, CACHE_MISSES};
use keel_telemetry::testing::MetricsProbe;

async fn load(v: u64) -> Result<u64, keel_core::Error> {
    Ok(v)
}

#[tokio::test]
async fn hits_and_misses_are_counted_by_namespace() {
    let probe = MetricsProbe::new();
    let prices = CacheAside::builder(MemoryCache::new(), "prices")
        .metrics(probe.metrics())
        .build()
        .await
        .unwrap();
    let stock = CacheAside::builder(MemoryCache::new(), "stock")
        .metrics(probe.metrics())
        .build()
        .await
        .unwrap();

    assert_eq!(prices.get::<u64>("a").await.unwrap(), None); // miss
    assert_eq!(prices.get_or_load("a", || load(1)).await.unwrap(), 1); // miss, load
    assert_eq!(prices.get_or_load("a", || load(2)).await.unwrap(), 1); // hit
    assert_eq!(prices.get::<u64>("a").await.unwrap(), Some(1)); // hit
    assert_eq!(stock.get_or_load("x", || load(9)).await.unwrap(), 9); // miss

    let prices_attr = (ATTR_CACHE, "prices");
    assert_eq!(probe.value(CACHE_MISSES, &[prices_attr]), 2.0);
    assert_eq!(
        probe.value(CACHE_HITS, &[prices_attr, (ATTR_CACHE_TIER, "remote")]),
        2.0,
        "without an in-process tier every hit comes from the shared backend"
    );
    assert_eq!(
        probe.value(CACHE_HITS, &[prices_attr, (ATTR_CACHE_TIER, "local")]),
        0.0
    );
    assert_eq!(probe.value(CACHE_MISSES, &[(ATTR_CACHE, "stock")]), 1.0);
    assert_eq!(probe.value(CACHE_HITS, &[(ATTR_CACHE, "stock")]), 0.0);
    // The metrics agree with the cache's own counters.
    let stats = prices.stats();
    assert_eq!((stats.hits, stats.misses), (2, 2));
}

#[tokio::test]
async fn redis_hits_are_told_apart_from_local_tier_hits() {
    let url = keel_testkit::services::redis_url()
        .await
        .expect("these tests need Redis");
    let prefix = format!("keel-cache-metrics:{}:", uuid::Uuid::new_v4().simple());
    let redis = RedisCache::connect(RedisConfig::new(url).key_prefix(prefix))
        .await
        .unwrap();
    let probe = MetricsProbe::new();
    let writer = CacheAside::builder(redis.clone(), "users")
        .build()
        .await
        .unwrap();
    let reader = CacheAside::builder(redis, "users")
        .local_tier(Duration::from_secs(60), 100)
        .metrics(probe.metrics())
        .build()
        .await
        .unwrap();

    assert_eq!(reader.get::<String>("42").await.unwrap(), None);
    writer.set("42", "Ada").await.unwrap();
    // First read comes from Redis and fills the local tier; the next two
    // are answered in-process.
    for _ in 0..3 {
        assert_eq!(
            reader.get::<String>("42").await.unwrap().as_deref(),
            Some("Ada")
        );
    }

    let users = (ATTR_CACHE, "users");
    assert_eq!(probe.value(CACHE_MISSES, &[users]), 1.0);
    assert_eq!(
        probe.value(CACHE_HITS, &[users, (ATTR_CACHE_TIER, "remote")]),
        1.0
    );
    assert_eq!(
        probe.value(CACHE_HITS, &[users, (ATTR_CACHE_TIER, "local")]),
        2.0
    );
}
