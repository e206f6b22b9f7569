//! The contract of [`CacheAside`](crate::CacheAside) on every backend: loading, single flight,
//! negative caching, namespaces, tiers and invalidation.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use keel_core::{Delivery, ErrorKind, EventHandler, HandlerError, Message};
use serde_json::json;

use crate::{CacheError, InvalidationHandler};

use super::{Subject, eventually};

fn counting_loader(
    loads: &Arc<AtomicUsize>,
    value: u64,
    delay: Duration,
) -> impl FnOnce() -> std::pin::Pin<Box<dyn Future<Output = Result<u64, keel_core::Error>> + Send>>
+ Send
+ 'static {
    let loads = loads.clone();
    move || {
        Box::pin(async move {
            loads.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(delay).await;
            Ok(value)
        })
    }
}

/// A loaded value is cached: the next call does not load.
pub async fn get_or_load_caches(s: Subject) {
    let cache = s.aside("products").build().await.unwrap();
    let loads = Arc::new(AtomicUsize::new(0));
    let v: u64 = cache
        .get_or_load("p1", counting_loader(&loads, 7, Duration::ZERO))
        .await
        .unwrap();
    assert_eq!(v, 7);
    let v: u64 = cache
        .get_or_load("p1", counting_loader(&loads, 8, Duration::ZERO))
        .await
        .unwrap();
    assert_eq!(v, 7, "second call must come from the cache");
    assert_eq!(loads.load(Ordering::SeqCst), 1);
    assert_eq!(cache.get::<u64>("p1").await.unwrap(), Some(7));
    let stats = cache.stats();
    assert_eq!(
        (stats.loads, stats.hits, stats.misses),
        (1, 2, 1),
        "{stats:?}"
    );
    // Invalidation makes the next call load again.
    cache.invalidate("p1").await.unwrap();
    let v: u64 = cache
        .get_or_load("p1", counting_loader(&loads, 9, Duration::ZERO))
        .await
        .unwrap();
    assert_eq!(v, 9);
    // `set` writes through.
    cache.set("p1", &10u64).await.unwrap();
    assert_eq!(cache.get::<u64>("p1").await.unwrap(), Some(10));
}

/// Many concurrent misses for one key run the loader once.
pub async fn single_flight_loads_once(s: Subject) {
    let cache = s.aside("hot").build().await.unwrap();
    let loads = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let cache = cache.clone();
            let load = counting_loader(&loads, 42, Duration::from_millis(100));
            tokio::spawn(async move { cache.get_or_load::<u64, _, _, _>("key", load).await })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap().unwrap(), 42);
    }
    assert_eq!(
        loads.load(Ordering::SeqCst),
        1,
        "the loader ran more than once"
    );
    assert_eq!(cache.stats().loads, 1);
}

/// Callers that wait for another caller's load are counted as `joined`,
/// not as misses: one miss (the leader) and one `joined` per follower.
pub async fn joined_callers_are_counted_apart(s: Subject) {
    const CALLERS: u64 = 10;
    let cache = s.aside("joined").build().await.unwrap();
    let loads = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..CALLERS)
        .map(|_| {
            let cache = cache.clone();
            let observer = cache.clone();
            let loads = loads.clone();
            tokio::spawn(async move {
                cache
                    .get_or_load::<u64, keel_core::Error, _, _>("k", || async move {
                        loads.fetch_add(1, Ordering::SeqCst);
                        // Answer only once every other caller has joined.
                        let all_joined = eventually(Duration::from_secs(10), || async {
                            observer.stats().joined >= CALLERS - 1
                        })
                        .await;
                        assert!(all_joined, "not every caller joined the load");
                        Ok(7)
                    })
                    .await
            })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap().unwrap(), 7);
    }
    assert_eq!(loads.load(Ordering::SeqCst), 1);
    let stats = cache.stats();
    assert_eq!(
        (stats.hits, stats.misses, stats.joined, stats.loads),
        (0, 1, CALLERS - 1, 1),
        "{stats:?}"
    );
    assert_eq!(stats.hit_ratio(), Some(0.0));
    // A later call is a hit; the counts of the flight stay as they were.
    let v: u64 = cache
        .get_or_load("k", counting_loader(&loads, 8, Duration::ZERO))
        .await
        .unwrap();
    assert_eq!(v, 7);
    let stats = cache.stats();
    assert_eq!(
        (stats.hits, stats.misses, stats.joined),
        (1, 1, CALLERS - 1)
    );
}

/// Concurrent misses in two processes run the loader once in all.
pub async fn cross_process_stampede_loads_once(s: Subject) {
    // A generous time limit: a lock call slower than the default 100 ms (a
    // loaded machine) would rightly fall back to loading without the lock.
    let one = s
        .aside("shared")
        .timeout(Duration::from_secs(5))
        .lock_poll_interval(Duration::from_millis(5))
        .build()
        .await
        .unwrap();
    let two = s
        .peer_aside("shared")
        .timeout(Duration::from_secs(5))
        .lock_poll_interval(Duration::from_millis(5))
        .build()
        .await
        .unwrap();
    let loads = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..100)
        .map(|i| {
            let cache = if i % 2 == 0 { one.clone() } else { two.clone() };
            let load = counting_loader(&loads, 5, Duration::from_millis(300));
            tokio::spawn(async move { cache.get_or_load::<u64, _, _, _>("key", load).await })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap().unwrap(), 5);
    }
    assert_eq!(
        loads.load(Ordering::SeqCst),
        1,
        "the loader ran in both processes"
    );
    // Without the lock, each process loads once.
    let three = s
        .aside("unlocked")
        .no_distributed_lock()
        .build()
        .await
        .unwrap();
    let four = s
        .peer_aside("unlocked")
        .no_distributed_lock()
        .build()
        .await
        .unwrap();
    let unlocked = Arc::new(AtomicUsize::new(0));
    let (a, b) = tokio::join!(
        three.get_or_load::<u64, _, _, _>(
            "key",
            counting_loader(&unlocked, 1, Duration::from_millis(200))
        ),
        four.get_or_load::<u64, _, _, _>(
            "key",
            counting_loader(&unlocked, 1, Duration::from_millis(200))
        ),
    );
    assert_eq!((a.unwrap(), b.unwrap()), (1, 1));
    assert_eq!(unlocked.load(Ordering::SeqCst), 2);
}

/// With a negative TTL, "not found" is cached (and expires); without, not.
pub async fn negative_caching(s: Subject) {
    let with = s
        .aside("negative")
        .negative_ttl(Duration::from_millis(300))
        .build()
        .await
        .unwrap();
    let loads = Arc::new(AtomicUsize::new(0));
    let missing = || {
        let loads = loads.clone();
        move || async move {
            loads.fetch_add(1, Ordering::SeqCst);
            Ok::<Option<String>, keel_core::Error>(None)
        }
    };
    assert_eq!(
        with.get_or_load_optional("ghost", missing()).await.unwrap(),
        None
    );
    assert_eq!(
        with.get_or_load_optional("ghost", missing()).await.unwrap(),
        None
    );
    assert_eq!(loads.load(Ordering::SeqCst), 1, "not found was not cached");
    // A plain get_or_load does not take a cached "not found" for an answer.
    let found: String = with
        .get_or_load("ghost", || async {
            Ok::<_, keel_core::Error>("now exists".to_owned())
        })
        .await
        .unwrap();
    assert_eq!(found, "now exists");
    assert_eq!(
        with.get::<String>("ghost").await.unwrap().as_deref(),
        Some("now exists")
    );
    // The negative entry expires.
    with.get_or_load_optional("ghost2", missing())
        .await
        .unwrap();
    let reloaded = eventually(Duration::from_secs(3), || {
        let with = with.clone();
        let missing = missing();
        async move {
            let before = with.stats().loads;
            with.get_or_load_optional("ghost2", missing).await.unwrap();
            with.stats().loads > before
        }
    })
    .await;
    assert!(reloaded, "negative entry never expired");

    let without = s.aside("no-negative").build().await.unwrap();
    let loads_before = loads.load(Ordering::SeqCst);
    without
        .get_or_load_optional("ghost", missing())
        .await
        .unwrap();
    without
        .get_or_load_optional("ghost", missing())
        .await
        .unwrap();
    assert_eq!(loads.load(Ordering::SeqCst) - loads_before, 2);
}

/// The same key in two namespaces is two entries.
pub async fn namespaces_are_isolated(s: Subject) {
    let users = s.aside("users").build().await.unwrap();
    let teams = s.aside("teams").build().await.unwrap();
    users.set("1", "ada").await.unwrap();
    teams.set("1", "core").await.unwrap();
    assert_eq!(
        users.get::<String>("1").await.unwrap().as_deref(),
        Some("ada")
    );
    assert_eq!(
        teams.get::<String>("1").await.unwrap().as_deref(),
        Some("core")
    );
    teams.invalidate_all().await.unwrap();
    assert_eq!(teams.get::<String>("1").await.unwrap(), None);
    assert_eq!(
        users.get::<String>("1").await.unwrap().as_deref(),
        Some("ada")
    );
}

/// Bumping a namespace version invalidates all its keys, in every process:
/// at once over pub/sub, or after the version refresh interval.
pub async fn version_bump_invalidates_everywhere(s: Subject) {
    let writer = s.aside("catalog").build().await.unwrap();
    // Gets the bump over pub/sub only (it would not re-read for an hour).
    let pushed = s
        .peer_aside("catalog")
        .version_refresh(Duration::from_secs(3600))
        .local_tier(Duration::from_secs(60), 100)
        .build()
        .await
        .unwrap();
    // Re-reads the version often; no local tier.
    let polled = s
        .peer_aside("catalog")
        .version_refresh(Duration::from_millis(50))
        .build()
        .await
        .unwrap();
    for i in 0..20u32 {
        writer.set(&format!("item-{i}"), &i).await.unwrap();
    }
    assert_eq!(pushed.get::<u32>("item-3").await.unwrap(), Some(3));
    assert_eq!(polled.get::<u32>("item-3").await.unwrap(), Some(3));
    writer.invalidate_all().await.unwrap();
    for i in 0..20u32 {
        assert_eq!(writer.get::<u32>(&format!("item-{i}")).await.unwrap(), None);
    }
    for reader in [&pushed, &polled] {
        let gone = eventually(Duration::from_secs(5), || async {
            reader.get::<u32>("item-3").await.unwrap().is_none()
        })
        .await;
        assert!(gone, "{reader:?} still sees the old version");
    }
    // New writes are visible to all under the new version.
    writer.set("item-3", &33u32).await.unwrap();
    assert_eq!(polled.get::<u32>("item-3").await.unwrap(), Some(33));
}

/// Two-tier: local copies serve reads, and writes or invalidations in one
/// process evict the other's local copy.
pub async fn two_tier_invalidation_across_processes(s: Subject) {
    let local_ttl = Duration::from_secs(60);
    let one = s
        .aside("profiles")
        .local_tier(local_ttl, 1000)
        .build()
        .await
        .unwrap();
    let two = s
        .peer_aside("profiles")
        .local_tier(local_ttl, 1000)
        .build()
        .await
        .unwrap();
    one.set("u1", "v1").await.unwrap();
    // The set is also broadcast to process two, and may arrive after two's
    // first read kept a local copy (evicting it): read in pairs until the
    // second read of a pair is served locally.
    let served_locally = eventually(Duration::from_secs(5), || async {
        let before = two.stats().local_hits;
        for _ in 0..2 {
            assert_eq!(
                two.get::<String>("u1").await.unwrap().as_deref(),
                Some("v1")
            );
        }
        two.stats().local_hits > before
    })
    .await;
    assert!(served_locally, "{:?}", two.stats());

    one.set("u1", "v2").await.unwrap();
    let updated = eventually(Duration::from_secs(5), || async {
        two.get::<String>("u1").await.unwrap().as_deref() == Some("v2")
    })
    .await;
    assert!(updated, "process two kept serving its stale local copy");

    one.invalidate("u1").await.unwrap();
    let evicted = eventually(Duration::from_secs(5), || async {
        two.get::<String>("u1").await.unwrap().is_none()
    })
    .await;
    assert!(
        evicted,
        "an invalidation did not reach process two's local tier"
    );
}

/// A cached value that no longer decodes is a miss: it is removed, the
/// loader runs, and the fresh value replaces it.
pub async fn undecodable_values_are_misses(s: Subject) {
    let cache = s.aside("typed").build().await.unwrap();
    // Key layout `{namespace}:v{version}:{key}`; the version is 0 until the
    // first bump.
    s.cache
        .write("typed:v0:k", b"\x01{not json", None)
        .await
        .unwrap();
    assert_eq!(cache.get::<u64>("k").await.unwrap(), None);
    assert_eq!(
        s.cache.read("typed:v0:k").await.unwrap(),
        None,
        "not removed"
    );

    cache.set("k", "a string").await.unwrap();
    let loads = Arc::new(AtomicUsize::new(0));
    let v: u64 = cache
        .get_or_load("k", counting_loader(&loads, 3, Duration::ZERO))
        .await
        .unwrap();
    assert_eq!(v, 3, "a value of another type must be reloaded");
    assert_eq!(loads.load(Ordering::SeqCst), 1);
    assert_eq!(cache.get::<u64>("k").await.unwrap(), Some(3));
    assert_eq!(cache.stats().invalid_values, 2);
}

/// A failing load reaches every waiting caller once, and nothing is cached.
pub async fn load_errors_are_shared_and_not_cached(s: Subject) {
    let cache = s.aside("flaky").build().await.unwrap();
    let loads = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let cache = cache.clone();
            let loads = loads.clone();
            tokio::spawn(async move {
                let observer = cache.clone();
                cache
                    .get_or_load::<u64, keel_core::Error, _, _>("k", || async move {
                        loads.fetch_add(1, Ordering::SeqCst);
                        // Fail only once every caller has missed (and so
                        // joined this load): a caller arriving after the
                        // failure would rightly load again.
                        let all_joined = eventually(Duration::from_secs(10), || async {
                            let stats = observer.stats();
                            stats.misses + stats.joined >= 20
                        })
                        .await;
                        assert!(all_joined, "not every caller reached the cache");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        Err(keel_core::Error::unavailable(
                            "postgres",
                            "db down",
                            std::io::Error::other("refused"),
                        ))
                    })
                    .await
            })
        })
        .collect();
    let mut own = 0;
    let mut shared = 0;
    for task in tasks {
        match task.await.unwrap() {
            Err(keel_core::Error::Unavailable {
                service, message, ..
            }) => {
                if service == "postgres" {
                    own += 1;
                } else {
                    assert_eq!(service, "cache loader");
                    assert!(message.contains("db down"), "{message}");
                    shared += 1;
                }
            }
            other => panic!("expected the load error, got {other:?}"),
        }
    }
    assert_eq!(loads.load(Ordering::SeqCst), 1);
    assert_eq!((own, shared), (1, 19));
    assert_eq!(cache.stats().load_errors, 1);
    let v: u64 = cache
        .get_or_load("k", counting_loader(&loads, 1, Duration::ZERO))
        .await
        .unwrap();
    assert_eq!(v, 1, "the error must not be cached");
}

/// Bad keys and values are refused with typed errors.
pub async fn cache_aside_bad_input(s: Subject) {
    let cache = s
        .aside("strict")
        .max_key_len(16)
        .max_value_len(64)
        .build()
        .await
        .unwrap();
    assert!(matches!(
        cache.get::<u8>("").await,
        Err(CacheError::EmptyKey)
    ));
    assert!(matches!(
        cache.set(&"k".repeat(17), &1u8).await,
        Err(CacheError::KeyTooLong { len: 17, max: 16 })
    ));
    assert!(matches!(
        cache.set("big", &"x".repeat(100)).await,
        Err(CacheError::ValueTooLarge { .. })
    ));
    assert_eq!(cache.get::<String>("big").await.unwrap(), None);
    let loads = Arc::new(AtomicUsize::new(0));
    let e = cache
        .get_or_load::<u64, keel_core::Error, _, _>("", counting_loader(&loads, 1, Duration::ZERO))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    assert_eq!(loads.load(Ordering::SeqCst), 0, "no load for a refused key");
    // A loaded value over the limit is returned, just not cached.
    let big: String = cache
        .get_or_load("big", || async {
            Ok::<_, keel_core::Error>("y".repeat(100))
        })
        .await
        .unwrap();
    assert_eq!(big.len(), 100);
    assert_eq!(cache.get::<String>("big").await.unwrap(), None);
}

/// Domain events delivered to the invalidation handler evict what they made
/// stale, in this process and in others' local tiers.
pub async fn invalidation_handler_evicts_on_events(s: Subject) {
    let orders = s.aside("orders").build().await.unwrap();
    let catalog = s.aside("catalog").build().await.unwrap();
    let remote_orders = s
        .peer_aside("orders")
        .local_tier(Duration::from_secs(60), 100)
        .build()
        .await
        .unwrap();
    for id in ["o-1", "o-2", "7"] {
        orders.set(id, "pending").await.unwrap();
    }
    catalog.set("sku-1", &100u32).await.unwrap();
    assert!(remote_orders.get::<String>("o-1").await.unwrap().is_some());

    let handler = InvalidationHandler::new()
        .evict_field("order.shipped", &orders, "/order_id")
        .evict("orders.merged", &orders, |m| {
            m.payload["ids"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .evict_all("catalog.reimported", &catalog);
    let deliver = |event_type: &str, payload: serde_json::Value| {
        Delivery::new(Message::new(event_type, payload), 1, "cache-invalidation")
    };

    handler
        .handle(&deliver("order.shipped", json!({ "order_id": "o-1" })))
        .await
        .unwrap();
    assert_eq!(orders.get::<String>("o-1").await.unwrap(), None);
    assert!(orders.get::<String>("o-2").await.unwrap().is_some());
    let evicted = eventually(Duration::from_secs(5), || async {
        remote_orders.get::<String>("o-1").await.unwrap().is_none()
    })
    .await;
    assert!(evicted, "the other process's local copy survived");

    handler
        .handle(&deliver("order.shipped", json!({ "order_id": 7 })))
        .await
        .unwrap();
    assert_eq!(
        orders.get::<String>("7").await.unwrap(),
        None,
        "numeric ids work"
    );
    handler
        .handle(&deliver("orders.merged", json!({ "ids": ["o-2"] })))
        .await
        .unwrap();
    assert_eq!(orders.get::<String>("o-2").await.unwrap(), None);

    // Events nobody mapped are acknowledged and change nothing.
    handler
        .handle(&deliver("user.renamed", json!({})))
        .await
        .unwrap();
    assert_eq!(catalog.get::<u32>("sku-1").await.unwrap(), Some(100));

    // An event without the field cannot be handled, ever.
    let bad = handler
        .handle(&deliver("order.shipped", json!({ "id": "o-1" })))
        .await;
    assert!(matches!(bad, Err(HandlerError::Reject(_))), "{bad:?}");

    handler
        .handle(&deliver("catalog.reimported", json!({})))
        .await
        .unwrap();
    assert_eq!(catalog.get::<u32>("sku-1").await.unwrap(), None);
}

/// A loader that reports when it has read its value and then waits to be
/// let go: the test changes the cache in between, deterministically.
struct Gate {
    read: Arc<tokio::sync::Notify>,
    release: Arc<tokio::sync::Notify>,
}

impl Gate {
    fn new() -> Self {
        Self {
            read: Arc::new(tokio::sync::Notify::new()),
            release: Arc::new(tokio::sync::Notify::new()),
        }
    }

    /// Starts `get_or_load_optional(key)` on `cache` in a task, with a
    /// loader that returns `value` once released; returns after the
    /// loader has produced `value` (and before it returns it).
    async fn blocked_load(
        &self,
        cache: &crate::CacheAside,
        key: &'static str,
        value: &'static str,
    ) -> tokio::task::JoinHandle<Option<String>> {
        let (cache, read, release) = (cache.clone(), self.read.clone(), self.release.clone());
        let task = tokio::spawn(async move {
            cache
                .get_or_load_optional(key, || async move {
                    let loaded = value.to_owned();
                    read.notify_one();
                    release.notified().await;
                    Ok::<_, keel_core::Error>(Some(loaded))
                })
                .await
                .unwrap()
        });
        self.read.notified().await;
        task
    }

    /// Lets the blocked load return and waits for its caller's answer.
    async fn finish(&self, task: tokio::task::JoinHandle<Option<String>>) -> Option<String> {
        self.release.notify_one();
        task.await.unwrap()
    }
}

/// Loads "new" (counting nothing): what the database says after a write.
async fn read_now(cache: &crate::CacheAside, key: &str, now: &'static str) -> Option<String> {
    tokio::time::timeout(
        Duration::from_secs(10),
        cache.get_or_load_optional(key, || async move {
            Ok::<_, keel_core::Error>(Some(now.to_owned()))
        }),
    )
    .await
    .expect("the read hung: it joined a load that began before the eviction")
    .unwrap()
}

/// A value loaded before an eviction of its key is not cached after it:
/// a load reads "old", the key is invalidated (`invalidate`,
/// `invalidate_many`, `set` or `invalidate_all`) while the load is still
/// running, and after the load ends the cache answers with the new state,
/// with or without a local tier. A caller arriving after the eviction does
/// not join the old load either.
pub async fn eviction_during_a_load_wins(s: Subject) {
    for local in [false, true] {
        let mut builder = s.aside(if local { "race-local" } else { "race" });
        if local {
            builder = builder.local_tier(Duration::from_secs(60), 100);
        }
        let cache = builder.ttl(Duration::from_secs(60)).build().await.unwrap();
        let gate = Gate::new();

        let reader = gate.blocked_load(&cache, "k1", "old").await;
        cache.invalidate("k1").await.unwrap();
        // Joining the load in flight would hang (it is blocked) and
        // return "old".
        assert_eq!(read_now(&cache, "k1", "new").await.as_deref(), Some("new"));
        assert_eq!(gate.finish(reader).await.as_deref(), Some("old"));
        assert_eq!(
            read_now(&cache, "k1", "newer").await.as_deref(),
            Some("new"),
            "local: {local}: the post-eviction load's value must be the cached one"
        );

        let reader = gate.blocked_load(&cache, "k2", "old").await;
        cache.invalidate_many(&["other", "k2"]).await.unwrap();
        assert_eq!(gate.finish(reader).await.as_deref(), Some("old"));
        assert_eq!(read_now(&cache, "k2", "new").await.as_deref(), Some("new"));

        let reader = gate.blocked_load(&cache, "k3", "old").await;
        cache.set("k3", "written").await.unwrap();
        assert_eq!(gate.finish(reader).await.as_deref(), Some("old"));
        assert_eq!(
            read_now(&cache, "k3", "new").await.as_deref(),
            Some("written"),
            "local: {local}: a stale fill overwrote a write-through"
        );

        let reader = gate.blocked_load(&cache, "k4", "old").await;
        cache.invalidate_all().await.unwrap();
        assert_eq!(gate.finish(reader).await.as_deref(), Some("old"));
        assert_eq!(read_now(&cache, "k4", "new").await.as_deref(), Some("new"));

        assert_eq!(cache.stats().stale_fills, 4, "local: {local}");
        // Without an eviction, a load is cached as before.
        assert_eq!(read_now(&cache, "k5", "v").await.as_deref(), Some("v"));
        assert_eq!(read_now(&cache, "k5", "w").await.as_deref(), Some("v"));
        assert_eq!(cache.stats().stale_fills, 4);
    }
}

/// The same across processes: one process loads "old", the other evicts
/// (or writes, or bumps the namespace) meanwhile, and afterwards both
/// processes see the new state.
pub async fn eviction_by_another_process_during_a_load_wins(s: Subject) {
    let one = s
        .aside("race-shared")
        .ttl(Duration::from_secs(60))
        .build()
        .await
        .unwrap();
    let two = s
        .peer_aside("race-shared")
        .ttl(Duration::from_secs(60))
        .build()
        .await
        .unwrap();
    let gate = Gate::new();

    let reader = gate.blocked_load(&one, "k1", "old").await;
    two.invalidate("k1").await.unwrap();
    assert_eq!(gate.finish(reader).await.as_deref(), Some("old"));
    assert_eq!(read_now(&two, "k1", "new").await.as_deref(), Some("new"));
    assert_eq!(read_now(&one, "k1", "newer").await.as_deref(), Some("new"));

    let reader = gate.blocked_load(&one, "k2", "old").await;
    two.set("k2", "written").await.unwrap();
    assert_eq!(gate.finish(reader).await.as_deref(), Some("old"));
    assert_eq!(
        read_now(&one, "k2", "new").await.as_deref(),
        Some("written")
    );
    assert_eq!(
        read_now(&two, "k2", "new").await.as_deref(),
        Some("written")
    );

    let reader = gate.blocked_load(&one, "k3", "old").await;
    two.invalidate_all().await.unwrap();
    assert_eq!(gate.finish(reader).await.as_deref(), Some("old"));
    // `one` may still use the old version for a moment (pub/sub), but the
    // old version's key never got the stale value either.
    assert_eq!(read_now(&one, "k3", "new").await.as_deref(), Some("new"));
    assert_eq!(read_now(&two, "k3", "new").await.as_deref(), Some("new"));

    // At least the three refused fills; a fill by `one` still on the old
    // version after the bump is refused too.
    assert!(one.stats().stale_fills >= 3, "{:?}", one.stats());
}

/// Many tasks in two processes read a key through the cache while others
/// change the "database" and invalidate it; once everything has stopped,
/// a read through either process returns the last value written.
pub async fn concurrent_reads_and_invalidations_converge(s: Subject) {
    use std::sync::atomic::AtomicU64;
    let one = s
        .aside("churn")
        .ttl(Duration::from_secs(60))
        .local_tier(Duration::from_secs(60), 100)
        .build()
        .await
        .unwrap();
    let two = s
        .peer_aside("churn")
        .ttl(Duration::from_secs(60))
        .timeout(Duration::from_secs(5))
        .build()
        .await
        .unwrap();
    let database = Arc::new(AtomicU64::new(0));
    let load = |database: Arc<AtomicU64>| {
        move || async move {
            let value = database.load(Ordering::SeqCst);
            // Give writers room to commit and evict before this returns.
            for _ in 0..3 {
                tokio::task::yield_now().await;
            }
            Ok::<_, keel_core::Error>(value)
        }
    };
    for round in 0..5 {
        let mut tasks = Vec::new();
        for i in 0..16 {
            let cache = if i % 2 == 0 { one.clone() } else { two.clone() };
            let database = database.clone();
            tasks.push(tokio::spawn(async move {
                for _ in 0..30 {
                    if i % 4 == 3 {
                        database.fetch_add(1, Ordering::SeqCst);
                        cache.invalidate("k").await.unwrap();
                    } else {
                        let _: u64 = cache
                            .get_or_load("k", load(database.clone()))
                            .await
                            .unwrap();
                    }
                    tokio::task::yield_now().await;
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        let last = database.load(Ordering::SeqCst);
        for (name, cache) in [("one", &one), ("two", &two)] {
            let ours = eventually(Duration::from_secs(5), || async {
                cache
                    .get_or_load::<u64, _, _, _>("k", load(database.clone()))
                    .await
                    .unwrap()
                    == last
            })
            .await;
            // The local tier of `one` hears of `two`'s evictions over
            // pub/sub; the backend itself must be right at once.
            assert!(ours, "round {round}: {name} never returned the last write");
        }
        assert_eq!(
            two.get_or_load::<u64, _, _, _>("k", load(database.clone()))
                .await
                .unwrap(),
            last,
            "round {round}: the backend keeps a value older than the last write"
        );
    }
}
