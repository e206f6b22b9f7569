//! Cache-aside in front of a repository read, with keel-cache.
//!
//! A [`CacheAside`] is one logical cache (a namespace) with its own policy,
//! on a shared backend: Redis in production, memory in tests. Reads go
//! through [`get_or_load_optional`](CacheAside::get_or_load_optional): the
//! cached value when there is one, else the loader (here, the customers
//! repository), whose answer is cached, including "not found" for a short
//! while. Writers invalidate what they made stale, directly or through an
//! [`InvalidationHandler`] subscribed to their events. A burst of misses for
//! one key runs the loader once. An optional in-process tier saves the round
//! trip for hot keys and is kept coherent across replicas. And a cache never
//! takes the service down: if Redis fails, reads fall back to the loader.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::future::join_all;
use keel_cache::{Backend, CacheAside, InvalidationHandler};
use keel_core::{Delivery, EntityRepository, EventHandler, Message};
use serde_json::json;
use tracing::info;
use uuid::Uuid;

use crate::examples::repository::{Customer, customers};
use crate::examples::within;
use crate::{Result, Services, ensure};

/// The read the cache sits in front of, counting how often it really runs.
#[derive(Clone)]
struct CustomerReads {
    repository: Arc<dyn EntityRepository<Customer>>,
    loads: Arc<AtomicU64>,
}

impl CustomerReads {
    async fn load(&self, id: Uuid) -> keel_core::Result<Option<Customer>> {
        self.loads.fetch_add(1, Ordering::SeqCst);
        // Long enough for concurrent callers to pile up behind one load.
        tokio::time::sleep(Duration::from_millis(50)).await;
        Ok(self.repository.get(&id).await?.map(|stored| stored.entity))
    }

    fn loads(&self) -> u64 {
        self.loads.load(Ordering::SeqCst)
    }
}

/// A cached customer read: what a request handler calls.
async fn customer(
    cache: &CacheAside,
    reads: &CustomerReads,
    id: Uuid,
) -> keel_core::Result<Option<Customer>> {
    cache
        .get_or_load_optional(&id.to_string(), || reads.load(id))
        .await
}

/// Runs the example.
///
/// # Errors
///
/// A failing repository or cache, or a broken invariant: a hit that ran the
/// loader, a stale value after invalidation, a stampede that loaded more
/// than once.
pub async fn run(services: &Services) -> Result {
    let repository = customers(services).await?;
    let reads = CustomerReads {
        repository: repository.clone(),
        loads: Arc::default(),
    };
    // One backend (one Redis connection) per service; one CacheAside per
    // kind of data, each with its own policy.
    let backend = services.cache_backend().await?;
    let cache = CacheAside::builder_shared(backend.clone(), "customers")
        .ttl(Duration::from_secs(300))
        .negative_ttl(Duration::from_secs(30))
        .build()
        .await?;

    let stored = repository
        .insert(Customer::numbered(services.run(), 1))
        .await?;
    let id = stored.entity.id;

    // Miss, then hit.
    let first = customer(&cache, &reads, id).await?;
    let second = customer(&cache, &reads, id).await?;
    info!(loads = reads.loads(), stats = ?cache.stats(), "two reads of one customer");
    ensure(
        first.is_some() && first == second && reads.loads() == 1,
        "the second read is served by the cache",
    )?;

    // "Not found" is cached too (briefly), so a scan for missing ids does
    // not reach the database every time.
    let nobody = Uuid::now_v7();
    let missing = customer(&cache, &reads, nobody).await?;
    let missing_again = customer(&cache, &reads, nobody).await?;
    ensure(
        missing.is_none() && missing_again.is_none() && reads.loads() == 2,
        "a missing customer is looked up once",
    )?;

    // A write, then invalidation. Here the writer publishes
    // `customer.upgraded`, and an InvalidationHandler (subscribed to the
    // bus in a service; called directly here) evicts the entry in every
    // process sharing the cache.
    let mut upgraded = stored.entity.clone();
    upgraded.tier = 3;
    repository.update(upgraded, stored.version).await?;
    let invalidation = InvalidationHandler::new().evict_field("customer.upgraded", &cache, "/id");
    let event = Message::new(
        "customer.upgraded",
        json!({ "id": id.to_string(), "tier": 3 }),
    );
    invalidation
        .handle(&Delivery::new(event, 1, "customer-cache"))
        .await?;
    let fresh = customer(&cache, &reads, id).await?;
    ensure(
        fresh.as_ref().is_some_and(|c| c.tier == 3) && reads.loads() == 3,
        "after invalidation the next read loads the new tier",
    )?;

    // A stampede: the entry is gone and 50 requests want it at once. They
    // share one load (in this process by single flight; across processes
    // by a short Redis lock).
    cache.invalidate(&id.to_string()).await?;
    let before = reads.loads();
    let answers = join_all((0..50).map(|_| customer(&cache, &reads, id))).await;
    let stampede_loads = reads.loads() - before;
    info!(requests = answers.len(), loads = stampede_loads, "stampede");
    ensure(
        answers.iter().all(|a| {
            a.as_ref()
                .is_ok_and(|c| c.as_ref().is_some_and(|c| c.tier == 3))
        }),
        "every request got the customer",
    )?;
    ensure(
        stampede_loads == 1,
        format!("50 concurrent misses load once, not {stampede_loads} times"),
    )?;

    two_tier_replicas(backend, &fresh.ok_or("the customer vanished")?).await?;

    let stats = cache.stats();
    info!(
        hits = stats.hits,
        misses = stats.misses,
        loads = stats.loads,
        errors = stats.errors,
        hit_ratio = ?stats.hit_ratio(),
        "cache stats"
    );
    ensure(
        stats.loads == reads.loads() && stats.errors == 0,
        "the cache's counters agree with the loader's, and the backend never failed",
    )?;
    Ok(())
}

/// Two replicas of a service, each with a small in-process tier in front of
/// the shared backend. A hit in the local tier costs no round trip; a write
/// by one replica is broadcast over the backend's channel and evicts the
/// other's local copy, so local copies stay coherent (within their short
/// TTL if a broadcast is ever lost).
async fn two_tier_replicas(backend: Arc<dyn Backend>, customer: &Customer) -> Result {
    let replica = || {
        CacheAside::builder_shared(backend.clone(), "profiles")
            .ttl(Duration::from_secs(300))
            .local_tier(Duration::from_secs(5), 1_000)
            .build()
    };
    let (a, b) = (replica().await?, replica().await?);
    let key = customer.id.to_string();

    a.set(&key, customer).await?;
    // a's write is also broadcast to b. On a real backend that message can
    // arrive after b's first read and evict the copy b just kept, so b reads
    // twice until the second read is a local hit: once the broadcast has
    // passed, b's local copy stays until the next write.
    within("replica b to serve a read from its local tier", async {
        loop {
            let before = b.stats().local_hits;
            let seen: Option<Customer> = b.get(&key).await?; // backend (or local)
            let again: Option<Customer> = b.get(&key).await?; // local, unless evicted
            if seen.as_ref() != Some(customer) || again != seen {
                return Err(format!("replica b read {seen:?} then {again:?}").into());
            }
            if b.stats().local_hits > before {
                return Ok::<_, Box<dyn std::error::Error + Send + Sync>>(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await??;

    let mut renamed = customer.clone();
    renamed.name = "Renamed by replica a".into();
    a.set(&key, &renamed).await?;
    within("replica b to see replica a's write", async {
        loop {
            if b.get::<Customer>(&key).await?.as_ref() == Some(&renamed) {
                return Ok::<_, keel_cache::CacheError>(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await??;
    info!(
        local_hits = b.stats().local_hits,
        "replica b's local copy was evicted by a's write"
    );
    Ok(())
}
