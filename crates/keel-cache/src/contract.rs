//! The contract suite: what every [`Backend`] must do, and what
//! [`CacheAside`] must do on every backend.
//!
//! Each function takes a fresh [`Subject`] and panics on a violation. Run
//! them all with `keel_testkit::contract_tests!`:
//!
//! ```ignore
//! keel_testkit::contract_tests! {
//!     factory: || async { (keel_cache::contract::Subject::memory(), ()) },
//!     suite: keel_cache::contract,
//!     tests: [get_set_delete, missing_keys, /* … */],
//! }
//! ```
//!
//! Subjects must use the default size limits
//! ([`DEFAULT_MAX_KEY_BYTES`](crate::DEFAULT_MAX_KEY_BYTES),
//! [`DEFAULT_MAX_VALUE_BYTES`](crate::DEFAULT_MAX_VALUE_BYTES)) and a key
//! prefix of their own (no other test may use it).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use keel_core::{Cache, Delivery, ErrorKind, EventHandler, HandlerError, Message};
use serde_json::json;

use crate::{
    Backend, CacheAside, CacheError, DEFAULT_MAX_KEY_BYTES, DEFAULT_MAX_VALUE_BYTES,
    InvalidationHandler, MemoryCache, Notice,
};

/// What a contract test runs against: one store seen from two "processes",
/// and a neighbour on the same server under another key prefix.
#[derive(Clone)]
pub struct Subject {
    /// The backend under test ("process one").
    pub cache: Arc<dyn Backend>,
    /// The same store through keel-core's port.
    pub port: Arc<dyn Cache>,
    /// The same keys through a separate connection ("process two").
    pub peer: Arc<dyn Backend>,
    /// The same server under a different key prefix.
    pub neighbour: Arc<dyn Backend>,
}

impl std::fmt::Debug for Subject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subject")
            .field("cache", &self.cache)
            .field("peer", &self.peer)
            .field("neighbour", &self.neighbour)
            .finish_non_exhaustive()
    }
}

impl Subject {
    /// A subject from a backend, a second connection to the same keys, and
    /// a third under another prefix.
    pub fn new<B: Backend + Cache + Clone>(cache: B, peer: B, neighbour: B) -> Self {
        Self {
            port: Arc::new(cache.clone()),
            cache: Arc::new(cache),
            peer: Arc::new(peer),
            neighbour: Arc::new(neighbour),
        }
    }

    /// A subject on a fresh [`MemoryCache`] (clones share entries, so a clone
    /// is the second "process").
    #[must_use]
    pub fn memory() -> Self {
        let store = MemoryCache::new();
        let cache = store.with_prefix("a:");
        Self::new(cache.clone(), cache, store.with_prefix("b:"))
    }

    fn aside(&self, namespace: &str) -> crate::CacheAsideBuilder {
        CacheAside::builder_shared(self.cache.clone(), namespace)
    }

    fn peer_aside(&self, namespace: &str) -> crate::CacheAsideBuilder {
        CacheAside::builder_shared(self.peer.clone(), namespace)
    }
}

/// Polls `check` every 10 ms until it holds or `within` passes.
async fn eventually<F, Fut>(within: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn kind(e: &keel_core::Error) -> ErrorKind {
    e.kind()
}

// ---------------------------------------------------------------------------
// Backend and port
// ---------------------------------------------------------------------------

/// Values written can be read back and deleted, through the port.
pub async fn get_set_delete(s: Subject) {
    s.port.set("user:1", b"ada", None).await.unwrap();
    assert_eq!(s.port.get("user:1").await.unwrap(), Some(b"ada".to_vec()));
    assert_eq!(s.cache.read("user:1").await.unwrap(), Some(b"ada".to_vec()));
    assert!(s.port.delete("user:1").await.unwrap());
    assert_eq!(s.port.get("user:1").await.unwrap(), None);
    assert!(
        !s.port.delete("user:1").await.unwrap(),
        "second delete finds nothing"
    );
}

/// Absent keys read as `None` and delete as "not present".
pub async fn missing_keys(s: Subject) {
    assert_eq!(s.port.get("never-written").await.unwrap(), None);
    assert!(!s.port.delete("never-written").await.unwrap());
    assert_eq!(s.cache.remove(&["x", "y"]).await.unwrap(), 0);
    assert_eq!(s.cache.remove(&[]).await.unwrap(), 0);
}

/// Entries disappear after their TTL; entries without one stay.
pub async fn ttl_expiry(s: Subject) {
    s.port
        .set("short", b"1", Some(Duration::from_millis(150)))
        .await
        .unwrap();
    s.port.set("forever", b"2", None).await.unwrap();
    assert_eq!(s.port.get("short").await.unwrap(), Some(b"1".to_vec()));
    let gone = eventually(Duration::from_secs(3), || async {
        s.port.get("short").await.unwrap().is_none()
    })
    .await;
    assert!(gone, "an entry with a 150 ms TTL was still there after 3 s");
    assert_eq!(s.port.get("forever").await.unwrap(), Some(b"2".to_vec()));
}

/// Writing again replaces both the value and the expiry.
pub async fn overwrite_replaces_value_and_expiry(s: Subject) {
    s.port
        .set("k", b"old", Some(Duration::from_millis(150)))
        .await
        .unwrap();
    s.port.set("k", b"new", None).await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(s.port.get("k").await.unwrap(), Some(b"new".to_vec()));
}

/// Any bytes round-trip: every byte value, invalid UTF-8, empty values.
pub async fn binary_values(s: Subject) {
    let all: Vec<u8> = (0..=255).collect();
    s.port.set("all-bytes", &all, None).await.unwrap();
    assert_eq!(s.port.get("all-bytes").await.unwrap(), Some(all));
    s.port
        .set("invalid-utf8", &[0xff, 0xfe, 0x00, 0xc3], None)
        .await
        .unwrap();
    assert_eq!(
        s.port.get("invalid-utf8").await.unwrap(),
        Some(vec![0xff, 0xfe, 0x00, 0xc3])
    );
    s.port.set("empty", b"", None).await.unwrap();
    assert_eq!(s.port.get("empty").await.unwrap(), Some(Vec::new()));
    // Keys are UTF-8 and may contain spaces and punctuation.
    s.port
        .set("naïve key/with spaces:é", b"v", None)
        .await
        .unwrap();
    assert_eq!(
        s.port.get("naïve key/with spaces:é").await.unwrap(),
        Some(b"v".to_vec())
    );
}

/// A 4 MiB value round-trips intact.
pub async fn large_values(s: Subject) {
    let big: Vec<u8> = (0..4 * 1024 * 1024)
        .map(|i: u32| (i * 31 % 251) as u8)
        .collect();
    s.port.set("big", &big, None).await.unwrap();
    let back = s.port.get("big").await.unwrap().unwrap();
    assert_eq!(back.len(), big.len());
    assert!(back == big, "large value changed on the way");
}

/// Key prefixes separate users of one server; a second connection with the
/// same prefix sees the same keys.
pub async fn key_namespacing(s: Subject) {
    s.port.set("shared-name", b"mine", None).await.unwrap();
    assert_eq!(s.neighbour.read("shared-name").await.unwrap(), None);
    s.neighbour
        .write("shared-name", b"theirs", None)
        .await
        .unwrap();
    assert_eq!(
        s.port.get("shared-name").await.unwrap(),
        Some(b"mine".to_vec())
    );
    assert_eq!(
        s.peer.read("shared-name").await.unwrap(),
        Some(b"mine".to_vec())
    );
    assert_eq!(s.neighbour.remove(&["shared-name"]).await.unwrap(), 1);
    assert_eq!(
        s.port.get("shared-name").await.unwrap(),
        Some(b"mine".to_vec())
    );
}

/// Empty and long keys, large values and zero TTLs are refused with typed
/// errors, and nothing is written.
pub async fn bad_input(s: Subject) {
    assert!(matches!(s.cache.read("").await, Err(CacheError::EmptyKey)));
    assert!(matches!(
        s.cache.write("", b"v", None).await,
        Err(CacheError::EmptyKey)
    ));
    let long = "k".repeat(DEFAULT_MAX_KEY_BYTES + 1);
    assert!(matches!(
        s.cache.write(&long, b"v", None).await,
        Err(CacheError::KeyTooLong { .. })
    ));
    let huge = vec![0u8; DEFAULT_MAX_VALUE_BYTES + 1];
    assert!(matches!(
        s.cache.write("huge", &huge, None).await,
        Err(CacheError::ValueTooLarge { len, max }) if len == huge.len() && max == DEFAULT_MAX_VALUE_BYTES
    ));
    assert_eq!(
        s.cache.read("huge").await.unwrap(),
        None,
        "nothing half-written"
    );
    assert!(matches!(
        s.cache.write("zero", b"v", Some(Duration::ZERO)).await,
        Err(CacheError::InvalidArgument { field: "ttl", .. })
    ));
    assert_eq!(s.cache.read("zero").await.unwrap(), None);
    // Through the port, the same refusals are keel-core invalid input.
    let e = s.port.set("", b"v", None).await.unwrap_err();
    assert_eq!(kind(&e), ErrorKind::InvalidInput);
    let e = s.port.get(&long).await.unwrap_err();
    assert_eq!(kind(&e), ErrorKind::InvalidInput);
}

/// `write_if_absent` is atomic: of many concurrent writers (in two
/// processes), exactly one wins; it expires like any entry.
pub async fn write_if_absent_has_one_winner(s: Subject) {
    let mut tasks = Vec::new();
    for i in 0..64u32 {
        let backend = if i % 2 == 0 {
            s.cache.clone()
        } else {
            s.peer.clone()
        };
        tasks.push(tokio::spawn(async move {
            backend
                .write_if_absent("lock", &i.to_be_bytes(), Duration::from_millis(300))
                .await
                .unwrap()
        }));
    }
    let mut winners = 0;
    for task in tasks {
        if task.await.unwrap() {
            winners += 1;
        }
    }
    assert_eq!(winners, 1);
    let gone = eventually(Duration::from_secs(3), || async {
        s.cache.read("lock").await.unwrap().is_none()
    })
    .await;
    assert!(gone, "the lock did not expire");
    assert!(
        s.cache
            .write_if_absent("lock", b"again", Duration::from_secs(5))
            .await
            .unwrap()
    );
}

/// `remove_if_equals` removes only the expected value.
pub async fn remove_if_equals(s: Subject) {
    s.cache.write("lock", b"token-a", None).await.unwrap();
    assert!(!s.cache.remove_if_equals("lock", b"token-b").await.unwrap());
    assert_eq!(
        s.cache.read("lock").await.unwrap(),
        Some(b"token-a".to_vec())
    );
    assert!(s.peer.remove_if_equals("lock", b"token-a").await.unwrap());
    assert_eq!(s.cache.read("lock").await.unwrap(), None);
    assert!(!s.cache.remove_if_equals("lock", b"token-a").await.unwrap());
}

/// Many keys go in one call, counting only those present.
pub async fn delete_many(s: Subject) {
    for k in ["a", "b", "c"] {
        s.port.set(k, b"v", None).await.unwrap();
    }
    assert_eq!(s.port.delete_many(&["a", "b", "zzz"]).await.unwrap(), 2);
    assert_eq!(s.port.get("a").await.unwrap(), None);
    assert_eq!(s.port.get("c").await.unwrap(), Some(b"v".to_vec()));
}

/// What one process publishes, another receives; other prefixes do not.
pub async fn publish_reaches_other_processes(s: Subject) {
    let mut theirs = s.peer.subscribe().unwrap();
    let mut neighbour = s.neighbour.subscribe().unwrap();
    assert!(theirs.wait_ready(Duration::from_secs(5)).await);
    assert!(neighbour.wait_ready(Duration::from_secs(5)).await);
    s.cache.publish(b"hello").await.unwrap();
    let received = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match theirs.recv().await {
                Some(Notice::Message(m)) => return m,
                Some(_) => {}
                None => panic!("subscription closed"),
            }
        }
    })
    .await
    .expect("no message within 5 s");
    assert_eq!(&*received, b"hello");
    // Nothing for the neighbour (skip its own subscription notices).
    let stray = tokio::time::timeout(Duration::from_millis(200), async {
        loop {
            if let Some(Notice::Message(m)) = neighbour.recv().await {
                return m;
            }
        }
    })
    .await;
    assert!(stray.is_err(), "a message crossed key prefixes");
}

// ---------------------------------------------------------------------------
// CacheAside
// ---------------------------------------------------------------------------

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
