//! Cache hits through keel-cache against a raw Redis `GET` on the same
//! connection, in the same run; and in-process tier hits.
//!
//! Run with `cargo bench -p keel-cache`; Redis comes from `REDIS_URL` or
//! 127.0.0.1:6379 (the Redis groups are skipped when none answers). Figures
//! are recorded in `docs/benchmarks-cache.md`.

// `criterion_group!` generates an undocumented function.
#![allow(missing_docs)]

use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use futures::future::join_all;
use keel_cache::{CacheAside, MemoryCache, RedisCache, RedisConfig};
use serde::{Deserialize, Serialize};
use tokio::runtime::Runtime;

#[derive(Clone, Serialize, Deserialize, PartialEq, Debug)]
struct Product {
    sku: String,
    name: String,
    price_cents: u64,
    tags: Vec<String>,
}

fn product() -> Product {
    Product {
        sku: "SKU-000042".into(),
        name: "Stainless steel water bottle, 750 ml".into(),
        price_cents: 2490,
        tags: vec!["kitchen".into(), "outdoor".into(), "bestseller".into()],
    }
}

async fn never_called() -> Result<Product, keel_core::Error> {
    unreachable!("every lookup in these benchmarks is a hit")
}

/// Concurrent requests per iteration in the `concurrent` variants.
const CONCURRENCY: usize = 64;

fn redis_hits(c: &mut Criterion, rt: &Runtime) {
    let Ok(url) = rt.block_on(keel_testkit::services::redis_url()) else {
        eprintln!("no Redis: skipping the Redis benchmarks");
        return;
    };
    let prefix = format!("keel-cache-bench:{}:", uuid::Uuid::new_v4().simple());
    let (redis, cache, raw_key) = rt.block_on(async {
        // The default Redis configuration (retries on, 1 s timeouts): the
        // cache keeps its own timer on reads. See docs/benchmarks-cache.md
        // for a run with `reconnect_attempts(0)` and 50 ms timeouts.
        let config = RedisConfig::new(url).key_prefix(prefix.clone());
        let redis = RedisCache::connect(config)
            .await
            .expect("cannot connect to Redis");
        let cache = CacheAside::builder(redis.clone(), "bench")
            .ttl(Duration::from_secs(600))
            .build()
            .await
            .unwrap();
        cache.set("product-42", &product()).await.unwrap();
        // The same entry, as raw Redis sees it (key layout
        // `{prefix}{namespace}:v{version}:{key}`).
        let raw_key = format!("{prefix}bench:v0:product-42");
        (redis, cache, raw_key)
    });
    // The raw baseline runs on keel-cache's own ConnectionManager.
    let conn = redis.connection();
    paired(rt, &conn, &raw_key, &cache);

    let mut group = c.benchmark_group("redis_hit");
    group.throughput(Throughput::Elements(1));
    group.bench_function(BenchmarkId::new("raw_get", "sequential"), |b| {
        b.to_async(rt).iter(|| {
            let mut conn = conn.clone();
            let key = raw_key.clone();
            async move {
                let bytes: Option<Vec<u8>> = redis::cmd("GET")
                    .arg(key)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                assert!(bytes.is_some());
            }
        });
    });
    // What a caller of the raw GET would still have to do: decode it.
    group.bench_function(BenchmarkId::new("raw_get_and_decode", "sequential"), |b| {
        b.to_async(rt).iter(|| {
            let mut conn = conn.clone();
            let key = raw_key.clone();
            async move {
                let bytes: Vec<u8> = redis::cmd("GET")
                    .arg(key)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                let p: Product = serde_json::from_slice(&bytes[1..]).unwrap();
                assert_eq!(p.price_cents, 2490);
            }
        });
    });
    group.bench_function(BenchmarkId::new("keel_cache", "sequential"), |b| {
        b.to_async(rt).iter(|| async {
            let p: Product = cache.get_or_load("product-42", never_called).await.unwrap();
            assert_eq!(p.price_cents, 2490);
        });
    });
    group.throughput(Throughput::Elements(CONCURRENCY as u64));
    group.bench_function(BenchmarkId::new("raw_get", "concurrent"), |b| {
        b.to_async(rt).iter(|| {
            let futures = (0..CONCURRENCY).map(|_| {
                let mut conn = conn.clone();
                let key = raw_key.clone();
                async move {
                    let bytes: Option<Vec<u8>> = redis::cmd("GET")
                        .arg(key)
                        .query_async(&mut conn)
                        .await
                        .unwrap();
                    assert!(bytes.is_some());
                }
            });
            join_all(futures)
        });
    });
    group.bench_function(BenchmarkId::new("keel_cache", "concurrent"), |b| {
        b.to_async(rt).iter(|| {
            let futures = (0..CONCURRENCY).map(|_| {
                let cache = cache.clone();
                async move {
                    let p: Product = cache.get_or_load("product-42", never_called).await.unwrap();
                    assert_eq!(p.price_cents, 2490);
                }
            });
            join_all(futures)
        });
    });
    group.finish();

    let mut group = c.benchmark_group("local_tier_hit");
    group.throughput(Throughput::Elements(1));
    let two_tier = rt.block_on(async {
        let cache = CacheAside::builder(redis.clone(), "bench-local")
            .local_tier(Duration::from_secs(60), 10_000)
            .build()
            .await
            .unwrap();
        cache.set("product-42", &product()).await.unwrap();
        cache
    });
    group.bench_function("redis_backed", |b| {
        b.to_async(rt).iter(|| async {
            let p: Product = two_tier
                .get_or_load("product-42", never_called)
                .await
                .unwrap();
            assert_eq!(p.price_cents, 2490);
        });
    });
    group.finish();
}

/// Raw GETs, raw GETs plus decoding, and keel-cache hits in rotating
/// rounds, so that load from other processes (which drifts over seconds)
/// hits every side alike; prints the median and quartiles of the per-round
/// throughput ratios.
fn paired(rt: &Runtime, conn: &redis::aio::ConnectionManager, raw_key: &str, cache: &CacheAside) {
    const ROUNDS: usize = 60;
    const SIDES: usize = 3;
    // Side 0: raw GET; 1: raw GET and JSON decode; 2: keel-cache.
    let run = |side: usize, concurrency: usize| {
        let futures = (0..concurrency).map(move |_| {
            let mut conn = conn.clone();
            async move {
                if side == 2 {
                    let p: Product = cache.get_or_load("product-42", never_called).await.unwrap();
                    assert_eq!(p.price_cents, 2490);
                    return;
                }
                let bytes: Vec<u8> = redis::cmd("GET")
                    .arg(raw_key)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                if side == 1 {
                    let p: Product = serde_json::from_slice(&bytes[1..]).unwrap();
                    assert_eq!(p.price_cents, 2490);
                }
            }
        });
        join_all(futures)
    };
    for (label, concurrency, batches) in [("sequential", 1, 100), ("concurrent (64)", 64, 10)] {
        let mut vs_raw = Vec::with_capacity(ROUNDS);
        let mut vs_decoded = Vec::with_capacity(ROUNDS);
        rt.block_on(async {
            for round in 0..ROUNDS {
                let mut took = [Duration::ZERO; SIDES];
                for k in 0..SIDES {
                    // Rotate which side goes first.
                    let side = (round + k) % SIDES;
                    let started = Instant::now();
                    for _ in 0..batches {
                        run(side, concurrency).await;
                    }
                    took[side] = started.elapsed();
                }
                // keel-cache throughput ÷ the other side's throughput.
                vs_raw.push(took[0].as_secs_f64() / took[2].as_secs_f64());
                vs_decoded.push(took[1].as_secs_f64() / took[2].as_secs_f64());
            }
        });
        for (baseline, ratios) in [
            ("raw GET", &mut vs_raw),
            ("raw GET + decode", &mut vs_decoded),
        ] {
            ratios.sort_by(f64::total_cmp);
            eprintln!(
                "paired {label}: keel-cache / {baseline} throughput, median {:.2}x (quartiles {:.2}x to {:.2}x) over {ROUNDS} rotating rounds",
                ratios[ROUNDS / 2],
                ratios[ROUNDS / 4],
                ratios[3 * ROUNDS / 4],
            );
        }
    }
}

fn memory_hits(c: &mut Criterion, rt: &Runtime) {
    let cache = rt.block_on(async {
        let cache = CacheAside::builder(MemoryCache::new(), "bench")
            .build()
            .await
            .unwrap();
        cache.set("product-42", &product()).await.unwrap();
        cache
    });
    // The same cache recording its hits on a real OpenTelemetry SDK meter
    // provider (in-memory exporter), to show what `keel.cache.hits` costs
    // per hit once a service has installed one; `cache_aside` above records
    // on the API's no-op instruments, as before `init`.
    let probe = keel_telemetry::testing::MetricsProbe::new();
    let recorded = rt.block_on(async {
        let cache = CacheAside::builder(MemoryCache::new(), "bench-metrics")
            .metrics(probe.metrics())
            .build()
            .await
            .unwrap();
        cache.set("product-42", &product()).await.unwrap();
        cache
    });
    let mut group = c.benchmark_group("memory_hit");
    group.throughput(Throughput::Elements(1));
    group.bench_function("cache_aside", |b| {
        b.to_async(rt).iter(|| async {
            let p: Product = cache.get_or_load("product-42", never_called).await.unwrap();
            assert_eq!(p.price_cents, 2490);
        });
    });
    group.bench_function("cache_aside_sdk_metrics", |b| {
        b.to_async(rt).iter(|| async {
            let p: Product = recorded
                .get_or_load("product-42", never_called)
                .await
                .unwrap();
            assert_eq!(p.price_cents, 2490);
        });
    });
    group.finish();
    let hits = probe.value(
        keel_telemetry::metrics::names::CACHE_HITS,
        &[(keel_telemetry::metrics::names::ATTR_CACHE, "bench-metrics")],
    );
    assert!(hits > 0.0, "the SDK saw the hits");
}

fn benches(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    redis_hits(c, &rt);
    memory_hits(c, &rt);
}

criterion_group! {
    name = cache;
    config = Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    targets = benches
}
criterion_main!(cache);
