//! Keel's Meilisearch adapter against the SDK used directly, in the same
//! run on the same server: indexing throughput (documents/s) and search
//! latency (p50/p99).
//!
//! Needs a Meilisearch server: `MEILISEARCH_URL` (and `MEILISEARCH_KEY`),
//! or `MEILISEARCH_BIN` for the test kit to start one. Without one it says
//! so and exits.
//!
//! ```text
//! MEILISEARCH_BIN=/path/to/meilisearch cargo bench -p keel-search --bench search
//! ```
//!
//! Knobs: `BENCH_DOCS` (documents per indexing round, default 20000),
//! `BENCH_ROUNDS` (indexing rounds per contender, default 3),
//! `BENCH_SEARCHES` (searches per contender, default 2000).

#![allow(
    clippy::print_stdout,
    reason = "a benchmark reports on standard output"
)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_search::meilisearch::MeilisearchEngine;
use keel_search::meilisearch::sdk::client::Client;
use keel_search::meilisearch::sdk::search::MatchingStrategies;
use keel_search::{
    Filter, IndexAdmin, IndexName, IndexSettings, SearchIndex, SearchRequest, SortBy, Wait,
};
use keel_security::Secret;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Product {
    id: String,
    title: String,
    description: String,
    category: String,
    price: u32,
    tags: Vec<String>,
}

const WORDS: [&str; 16] = [
    "kettle",
    "lamp",
    "chair",
    "desk",
    "steel",
    "blue",
    "red",
    "garden",
    "hose",
    "knife",
    "paper",
    "mesh",
    "warm",
    "light",
    "porcelain",
    "plastic",
];
const CATEGORIES: [&str; 4] = ["kitchen", "garden", "office", "outdoor"];

fn products(n: usize) -> Vec<Product> {
    (0..n)
        .map(|i| {
            let w = |k: usize| WORDS[(i * 7 + k * 13) % WORDS.len()];
            Product {
                id: format!("p{i}"),
                title: format!("{} {} {}", w(0), w(1), w(2)),
                description: format!(
                    "A {} {} for the {} with {} and {}",
                    w(3),
                    w(4),
                    w(5),
                    w(6),
                    w(7)
                ),
                category: CATEGORIES[i % CATEGORIES.len()].to_owned(),
                price: ((i * 37) % 500) as u32,
                tags: vec![w(8).to_owned(), w(9).to_owned()],
            }
        })
        .collect()
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn settings() -> IndexSettings {
    IndexSettings::new()
        .searchable(["title", "description", "tags"])
        .filterable(["category", "price"])
        .sortable(["price"])
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

const POLL: Duration = Duration::from_millis(10);
const BATCH: usize = 1000;

async fn index_with_sdk(client: &Client, uid: &str, docs: &[Product]) -> Duration {
    let index = client.index(uid);
    let started = Instant::now();
    let mut last = None;
    for batch in docs.chunks(BATCH) {
        last = Some(
            index
                .add_or_replace(batch, Some("id"))
                .await
                .expect("sdk add"),
        );
    }
    let task = last.expect("a batch");
    let done = client
        .wait_for_task(task, Some(POLL), Some(Duration::from_secs(600)))
        .await
        .expect("sdk wait");
    assert!(done.is_success(), "{done:?}");
    started.elapsed()
}

async fn index_with_keel(
    engine: &MeilisearchEngine,
    index: &SearchIndex<Product>,
    docs: &[Product],
) -> Duration {
    let started = Instant::now();
    let mut last = None;
    for batch in docs.chunks(BATCH) {
        last = Some(
            index
                .upsert_many(batch, Wait::Enqueued)
                .await
                .expect("keel upsert"),
        );
    }
    engine
        .wait_for(last.expect("a batch"), Duration::from_secs(600))
        .await
        .expect("keel wait");
    started.elapsed()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let endpoint = match keel_testkit::services::meilisearch().await {
        Ok(e) => e,
        Err(e) => {
            println!("search benchmark SKIPPED: no Meilisearch server.\n{e}");
            return;
        }
    };
    let docs_n = env_usize("BENCH_DOCS", 20_000);
    let rounds = env_usize("BENCH_ROUNDS", 3);
    let searches = env_usize("BENCH_SEARCHES", 2000);
    let client = Client::new(endpoint.url.clone(), endpoint.key.clone()).expect("sdk client");
    let engine = MeilisearchEngine::new(&endpoint.url, endpoint.key.clone().map(Secret::from))
        .expect("engine")
        .with_poll_interval(POLL);
    let shared: Arc<dyn keel_search::SearchEngine> = Arc::new(engine.clone());
    let docs = products(docs_n);
    let run = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let wait = Wait::applied(Duration::from_secs(600));
    println!(
        "Meilisearch at {} ({:?}); {docs_n} documents per round in batches of {BATCH}, {rounds} rounds each",
        endpoint.url, endpoint.source
    );

    // Indexing: alternate SDK and Keel rounds, each into a fresh index with
    // the same settings.
    let mut sdk_rates = Vec::new();
    let mut keel_rates = Vec::new();
    for round in 0..rounds {
        for keel in [round % 2 == 1, round % 2 == 0] {
            let name = IndexName::new(format!(
                "bench_{run}_{}_{round}",
                if keel { "keel" } else { "sdk" }
            ))
            .expect("name");
            engine
                .create_index(&name, "id", wait)
                .await
                .expect("create");
            engine
                .apply_settings(&name, &settings(), wait)
                .await
                .expect("settings");
            let took = if keel {
                let index = SearchIndex::with_name(Arc::clone(&shared), name.clone());
                index_with_keel(&engine, &index, &docs).await
            } else {
                index_with_sdk(&client, name.as_str(), &docs).await
            };
            let rate = docs_n as f64 / took.as_secs_f64();
            if keel {
                keel_rates.push(rate);
            } else {
                sdk_rates.push(rate);
            }
            engine.delete_index(&name, wait).await.expect("delete");
        }
    }
    let sdk = median(sdk_rates.clone());
    let keel = median(keel_rates.clone());
    println!("\n| indexing | docs/s (median) | rounds |");
    println!("|---|---|---|");
    println!("| SDK `add_or_replace` | {sdk:.0} | {sdk_rates:.0?} |");
    println!("| Keel `upsert_many` | {keel:.0} | {keel_rates:.0?} |");
    println!("| ratio Keel ÷ SDK | {:.3}x | |", keel / sdk);

    // Search latency on one loaded index.
    let name = IndexName::new(format!("bench_{run}_search")).expect("name");
    engine
        .create_index(&name, "id", wait)
        .await
        .expect("create");
    engine
        .apply_settings(&name, &settings(), wait)
        .await
        .expect("settings");
    let typed: SearchIndex<Product> = SearchIndex::with_name(Arc::clone(&shared), name.clone());
    typed.upsert_many(&docs, wait).await.expect("load");
    let queries: Vec<(&str, &str, u32)> = (0..32)
        .map(|i| {
            (
                WORDS[i % WORDS.len()],
                CATEGORIES[i % CATEGORIES.len()],
                100 + (i as u32 * 13) % 400,
            )
        })
        .collect();
    let sdk_index = client.index(name.as_str());
    let mut sdk_lat = Vec::with_capacity(searches);
    let mut keel_lat = Vec::with_capacity(searches);
    // Warm up both paths.
    for (q, c, p) in queries.iter().take(8) {
        let request = SearchRequest::new(*q)
            .filter(Filter::eq("category", *c).and(Filter::lt("price", *p)))
            .sort(SortBy::asc("price"))
            .offset(0, 20);
        typed.search(&request).await.expect("keel search");
    }
    for block in 0..(searches / 100).max(1) {
        for keel in [block % 2 == 0, block % 2 == 1] {
            for i in 0..100 {
                let (q, c, p) = queries[(block * 100 + i) % queries.len()];
                let started = Instant::now();
                if keel {
                    let request = SearchRequest::new(q)
                        .filter(Filter::eq("category", c).and(Filter::lt("price", p)))
                        .sort(SortBy::asc("price"))
                        .offset(0, 20);
                    let r = typed.search(&request).await.expect("keel search");
                    std::hint::black_box(r);
                    keel_lat.push(started.elapsed());
                } else {
                    let filter = format!("(category = \"{c}\") AND (price < {p})");
                    let r = sdk_index
                        .search()
                        .with_query(q)
                        .with_filter(&filter)
                        .with_sort(&["price:asc"])
                        .with_matching_strategy(MatchingStrategies::ALL)
                        .with_offset(0)
                        .with_limit(20)
                        .execute::<Product>()
                        .await
                        .expect("sdk search");
                    std::hint::black_box(r);
                    sdk_lat.push(started.elapsed());
                }
            }
        }
    }
    sdk_lat.sort();
    keel_lat.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let (s50, s99) = (percentile(&sdk_lat, 0.5), percentile(&sdk_lat, 0.99));
    let (k50, k99) = (percentile(&keel_lat, 0.5), percentile(&keel_lat, 0.99));
    println!("\n| search ({} each) | p50 µs | p99 µs |", sdk_lat.len());
    println!("|---|---|---|");
    println!(
        "| SDK `search().execute` | {:.0} | {:.0} |",
        us(s50),
        us(s99)
    );
    println!(
        "| Keel `SearchIndex::search` | {:.0} | {:.0} |",
        us(k50),
        us(k99)
    );
    println!(
        "| added by Keel | {:+.0} | {:+.0} |",
        us(k50) - us(s50),
        us(k99) - us(s99)
    );
    engine.delete_index(&name, wait).await.expect("delete");
}
