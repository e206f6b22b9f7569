//! Finding a Meilisearch server for the tests, and saying so when there is
//! none.

#![allow(
    dead_code,
    unreachable_pub,
    reason = "each test binary uses part of it"
)]

use std::collections::BTreeSet;
use std::io::Write as _;
use std::sync::Mutex;

use keel_search::meilisearch::MeilisearchEngine;
use keel_security::Secret;

/// Writes straight to the process's standard error, which the test harness
/// does not capture, so a skip is visible in `cargo test` output.
pub fn notice(text: &str) {
    let _ = writeln!(std::io::stderr(), "{text}");
}

/// The Meilisearch engine the tests use, or `None` (after printing why,
/// once per test binary) when no server is available.
pub async fn meilisearch(
    suite: &str,
) -> Option<(
    MeilisearchEngine,
    keel_testkit::services::MeilisearchEndpoint,
)> {
    static SAID: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());
    let first = SAID
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .insert(suite.to_owned());
    match keel_testkit::services::meilisearch().await {
        Ok(endpoint) => {
            if first {
                notice(&format!(
                    "keel-search: running the {suite} against Meilisearch at {} ({:?})",
                    endpoint.url, endpoint.source
                ));
            }
            let engine =
                MeilisearchEngine::new(&endpoint.url, endpoint.key.clone().map(Secret::from))
                    .expect("engine");
            Some((engine, endpoint))
        }
        Err(e) => {
            if first {
                notice(&format!(
                    "keel-search: SKIPPED the {suite} against Meilisearch: no server available.\n\
                     Set MEILISEARCH_URL (and MEILISEARCH_KEY), or MEILISEARCH_BIN to a meilisearch \
                     binary the test kit can start.\n{e}"
                ));
            }
            None
        }
    }
}
