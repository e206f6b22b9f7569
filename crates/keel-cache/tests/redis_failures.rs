//! Redis down or slow: reads fall back to the loader, failures are counted,
//! nothing fails; the connection comes back by itself. Each test runs its own
//! throwaway `redis-server`.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{OwnRedis, SilentServer, closed_port};
use keel_cache::{CacheAside, CacheError, InvalidationHandler, RedisCache, RedisConfig};
use keel_core::{Delivery, EventHandler, HandlerError, Message};

fn config(url: String) -> RedisConfig {
    RedisConfig::new(url)
        .key_prefix("failures:")
        .connect_timeout(Duration::from_millis(200))
        .response_timeout(Duration::from_millis(500))
        .reconnect_attempts(1)
}

async fn load(loads: &AtomicUsize, value: u64) -> Result<u64, keel_core::Error> {
    loads.fetch_add(1, Ordering::SeqCst);
    Ok(value)
}

/// Fails the test instead of hanging it if a call never returns.
async fn bounded<T>(f: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(20), f)
        .await
        .expect("a cache call hung")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_fall_back_to_the_loader_while_redis_is_down_and_recover() {
    let mut server = OwnRedis::start().await;
    let redis = RedisCache::connect(config(server.url())).await.unwrap();
    let cache = CacheAside::builder(redis.clone(), "down")
        .timeout(Duration::from_millis(200))
        .build()
        .await
        .unwrap();
    let loads = AtomicUsize::new(0);
    assert_eq!(cache.get_or_load("k", || load(&loads, 1)).await.unwrap(), 1);
    assert_eq!(cache.get_or_load("k", || load(&loads, 2)).await.unwrap(), 1);
    assert_eq!(loads.load(Ordering::SeqCst), 1);
    assert_eq!(cache.stats().errors, 0);

    server.kill().await;
    for i in 0..5 {
        let v = bounded(cache.get_or_load("k", || load(&loads, 10 + i)))
            .await
            .unwrap();
        assert_eq!(v, 10 + i, "the loader answers while Redis is down");
    }
    assert_eq!(loads.load(Ordering::SeqCst), 6);
    let stats = cache.stats();
    assert!(stats.errors >= 5, "failures are counted: {stats:?}");
    // Plain reads are misses, not errors.
    assert_eq!(bounded(cache.get::<u64>("k")).await.unwrap(), None);
    // Writes report the failure.
    let e = bounded(cache.set("k", &3u64)).await.unwrap_err();
    assert!(e.is_backend_failure(), "{e}");
    let e = bounded(cache.invalidate("k")).await.unwrap_err();
    assert!(e.is_backend_failure(), "{e}");

    // Redis comes back (empty: it keeps nothing on disk); the same
    // connection manager reconnects and caching resumes.
    server.restart().await;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if cache.set("k", &4u64).await.is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "the connection never came back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before = loads.load(Ordering::SeqCst);
    assert_eq!(cache.get_or_load("k", || load(&loads, 5)).await.unwrap(), 4);
    assert_eq!(
        loads.load(Ordering::SeqCst),
        before,
        "served from Redis again"
    );
    redis.ping().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_redis_is_abandoned_after_the_timeout() {
    let server = OwnRedis::start().await;
    let redis = RedisCache::connect(config(server.url()).response_timeout(Duration::from_secs(10)))
        .await
        .unwrap();
    let cache = CacheAside::builder(redis, "slow")
        .timeout(Duration::from_millis(100))
        .build()
        .await
        .unwrap();
    let loads = AtomicUsize::new(0);
    cache.set("k", &1u64).await.unwrap();

    // Redis stops answering anyone for 5 s.
    server.command(&["CLIENT", "PAUSE", "5000", "ALL"]).await;
    let started = Instant::now();
    let v = bounded(cache.get_or_load("k", || load(&loads, 2)))
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(v, 2, "the loader answered");
    // Functional check of the timeout (not a performance figure): the call
    // must not have waited for the pause to end.
    assert!(
        took < Duration::from_secs(4),
        "waited {took:?} for a paused Redis"
    );
    assert!(cache.stats().errors >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_starts_while_redis_is_down() {
    let url = format!("redis://127.0.0.1:{}", closed_port());
    let e = RedisCache::connect(config(url.clone())).await.unwrap_err();
    assert!(
        matches!(
            e,
            CacheError::Backend {
                backend: "redis",
                ..
            } | CacheError::Timeout { .. }
        ),
        "{e}"
    );
    let core: keel_core::Error = e.into();
    assert!(core.is_retryable());

    let redis = RedisCache::connect_lazy(config(url)).unwrap();
    let cache = bounded(
        CacheAside::builder(redis, "lazy")
            .local_tier(Duration::from_secs(1), 10)
            .build(),
    )
    .await
    .unwrap();
    let loads = AtomicUsize::new(0);
    assert_eq!(
        bounded(cache.get_or_load("k", || load(&loads, 7)))
            .await
            .unwrap(),
        7
    );
    assert!(cache.stats().errors >= 1);

    assert!(matches!(
        RedisCache::connect_lazy(RedisConfig::new("not a url")),
        Err(CacheError::Config(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_copies_are_dropped_when_invalidations_may_be_lost() {
    let mut server = OwnRedis::start().await;
    let redis = RedisCache::connect(config(server.url())).await.unwrap();
    let cache = CacheAside::builder(redis, "tiers")
        .local_tier(Duration::from_secs(300), 100)
        .timeout(Duration::from_millis(200))
        .build()
        .await
        .unwrap();
    cache.set("k", &1u64).await.unwrap();
    assert_eq!(cache.get::<u64>("k").await.unwrap(), Some(1));
    assert!(cache.stats().local_hits >= 1);

    // With the subscription gone, other processes' invalidations cannot
    // arrive: the local copy must not outlive that.
    server.kill().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while bounded(cache.get::<u64>("k")).await.unwrap().is_some() {
        assert!(
            Instant::now() < deadline,
            "a local copy outlived its invalidation channel"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidation_asks_for_redelivery_while_redis_is_down() {
    let mut server = OwnRedis::start().await;
    let redis = RedisCache::connect(config(server.url())).await.unwrap();
    let orders = CacheAside::builder(redis, "orders")
        .timeout(Duration::from_millis(200))
        .build()
        .await
        .unwrap();
    orders.set("o-1", "pending").await.unwrap();
    let handler = InvalidationHandler::new().evict_field("order.shipped", &orders, "/order_id");
    let delivery = Delivery::new(
        Message::new("order.shipped", serde_json::json!({ "order_id": "o-1" })),
        1,
        "cache",
    );

    server.kill().await;
    let outcome = bounded(handler.handle(&delivery)).await;
    assert!(
        matches!(outcome, Err(HandlerError::Retry(_))),
        "{outcome:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_reads_during_an_outage_all_succeed() {
    let mut server = OwnRedis::start().await;
    let redis = RedisCache::connect(config(server.url())).await.unwrap();
    let cache = CacheAside::builder(redis, "outage")
        .timeout(Duration::from_millis(150))
        .build()
        .await
        .unwrap();
    server.kill().await;
    let loads = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let cache = cache.clone();
            let loads = loads.clone();
            tokio::spawn(async move {
                let key = format!("k{}", i % 5);
                cache
                    .get_or_load(&key, || async move {
                        loads.fetch_add(1, Ordering::SeqCst);
                        Ok::<_, keel_core::Error>(i % 5)
                    })
                    .await
            })
        })
        .collect();
    for (i, task) in tasks.into_iter().enumerate() {
        assert_eq!(bounded(task).await.unwrap().unwrap(), (i % 5) as i32);
    }
    // Single flight still holds per key while Redis is down, so at most one
    // load per key at a time; never more loads than calls.
    let loads = loads.load(Ordering::SeqCst);
    assert!((5..=50).contains(&loads), "{loads}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_errors_name_the_server_but_not_the_password() {
    let port = closed_port();
    let address = format!("127.0.0.1:{port}");
    let url = format!("redis://app:s3cret-pw@{address}/0");
    let e = bounded(RedisCache::connect(config(url))).await.unwrap_err();
    assert!(
        matches!(
            e,
            CacheError::Backend {
                backend: "redis",
                ..
            }
        ),
        "{e}"
    );
    let shown = e.to_string();
    assert!(shown.contains(&address), "{shown}");
    assert!(!format!("{e:?}").contains("s3cret-pw"), "{e:?}");
    assert!(!shown.contains("s3cret-pw"), "{shown}");
    // Still there once converted for the service's own error type.
    let core: keel_core::Error = e.into();
    assert!(core.is_retryable());
    let shown = core.to_string();
    assert!(shown.contains(&address), "{shown}");
    assert!(!shown.contains("s3cret-pw"), "{shown}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_never_answers_is_named_when_connecting() {
    let server = SilentServer::start().await;
    let e = bounded(RedisCache::connect(
        config(server.url()).response_timeout(Duration::from_millis(200)),
    ))
    .await
    .unwrap_err();
    assert!(e.is_backend_failure(), "{e}");
    let shown = e.to_string();
    assert!(
        shown.contains(&format!("127.0.0.1:{}", server.port)),
        "{shown}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_from_a_server_that_stalls_fall_back_to_the_loader() {
    let server = SilentServer::start().await;
    // Redis's own limits are far longer than the cache's: the cache's
    // timeout must be the one that ends each read.
    let redis = RedisCache::connect_lazy(
        config(server.url())
            .connect_timeout(Duration::from_secs(30))
            .response_timeout(Duration::from_secs(30)),
    )
    .unwrap();
    let cache = bounded(
        CacheAside::builder(redis, "stalled")
            .timeout(Duration::from_millis(100))
            .build(),
    )
    .await
    .unwrap();
    let loads = AtomicUsize::new(0);
    for i in 0..3 {
        let v = bounded(cache.get_or_load("k", || load(&loads, i)))
            .await
            .unwrap();
        assert_eq!(v, i, "the loader answered");
    }
    assert_eq!(loads.load(Ordering::SeqCst), 3);
    assert!(cache.stats().errors >= 3, "{:?}", cache.stats());
}

/// Redis set up to bound every read by itself (no reconnect retries, a
/// connect plus response timeout within the cache's): the cache sets no
/// timer of its own on reads, and a stalled server must still be given up.
fn self_bounded(url: String) -> RedisConfig {
    RedisConfig::new(url)
        .key_prefix("failures:")
        .connect_timeout(Duration::from_millis(100))
        .response_timeout(Duration::from_millis(100))
        .reconnect_attempts(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_self_bounded_redis_that_never_answers_falls_back_to_the_loader() {
    let server = SilentServer::start().await;
    let redis = RedisCache::connect_lazy(self_bounded(server.url())).unwrap();
    let cache = bounded(
        CacheAside::builder(redis, "stalled-bounded")
            .timeout(Duration::from_millis(300))
            .build(),
    )
    .await
    .unwrap();
    let loads = AtomicUsize::new(0);
    for i in 0..3 {
        let v = bounded(cache.get_or_load("k", || load(&loads, i)))
            .await
            .unwrap();
        assert_eq!(v, i, "the loader answered");
    }
    assert_eq!(loads.load(Ordering::SeqCst), 3);
    assert!(cache.stats().errors >= 3, "{:?}", cache.stats());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_self_bounded_redis_that_pauses_falls_back_to_the_loader() {
    let server = OwnRedis::start().await;
    let redis = RedisCache::connect(self_bounded(server.url()))
        .await
        .unwrap();
    let cache = CacheAside::builder(redis, "paused-bounded")
        .timeout(Duration::from_millis(300))
        .build()
        .await
        .unwrap();
    let loads = AtomicUsize::new(0);
    cache.set("k", &1u64).await.unwrap();
    assert_eq!(cache.get_or_load("k", || load(&loads, 2)).await.unwrap(), 1);

    // Redis stops answering anyone for 5 s: the connection stays up, the
    // answer never comes in time.
    server.command(&["CLIENT", "PAUSE", "5000", "ALL"]).await;
    let started = Instant::now();
    let v = bounded(cache.get_or_load("k", || load(&loads, 3)))
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(v, 3, "the loader answered");
    // Functional check of the bound (not a performance figure): the call
    // did not wait for the pause to end.
    assert!(
        took < Duration::from_secs(4),
        "waited {took:?} for a paused Redis"
    );
    assert!(cache.stats().errors >= 1);
}
