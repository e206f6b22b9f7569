//! A cache built without `.metrics(..)` records through the global meter
//! provider, as in a service that called `keel_telemetry::init` first. The
//! provider is process-wide, hence a test binary of its own.

use keel_cache::{CacheAside, MemoryCache};
use keel_telemetry::metrics::names::{ATTR_CACHE, ATTR_CACHE_TIER, CACHE_HITS, CACHE_MISSES};
use keel_telemetry::testing::MetricsProbe;

#[tokio::test]
async fn a_cache_built_after_the_provider_is_installed_records_into_it() {
    let probe = MetricsProbe::new();
    probe.install_global();
    let cache = CacheAside::builder(MemoryCache::new(), "catalog")
        .build()
        .await
        .unwrap();
    let v = cache
        .get_or_load("sku-1", || async { Ok::<_, keel_core::Error>(7_u32) })
        .await
        .unwrap();
    assert_eq!(v, 7);
    assert_eq!(cache.get::<u32>("sku-1").await.unwrap(), Some(7));

    let catalog = (ATTR_CACHE, "catalog");
    assert_eq!(probe.value(CACHE_MISSES, &[catalog]), 1.0);
    assert_eq!(
        probe.value(CACHE_HITS, &[catalog, (ATTR_CACHE_TIER, "remote")]),
        1.0
    );
}
