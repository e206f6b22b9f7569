//! Rules on racing work: an atomic swap under concurrent searches, and
//! concurrent writers.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use super::{Subject, WAIT, doc};
use crate::engine::Wait;
use crate::error::SearchError;
use crate::filter::Filter;
use crate::query::{Document, SearchRequest};
use crate::settings::IndexSettings;

/// A swap exchanges documents and settings at once: concurrent searches see
/// either all of the old contents or all of the new, never a mixture.
pub async fn swap_is_atomic(s: Subject) {
    let live = s.create("live").await;
    let next = s.create("next").await;
    let old: Vec<Document> = (0..30)
        .map(|i| doc(json!({"id": format!("old{i}"), "gen": "old"})))
        .collect();
    let new: Vec<Document> = (0..40)
        .map(|i| doc(json!({"id": format!("new{i}"), "gen": "new"})))
        .collect();
    s.engine.upsert_documents(&live, old, WAIT).await.unwrap();
    s.engine
        .apply_settings(&next, &IndexSettings::new().filterable(["gen"]), WAIT)
        .await
        .unwrap();
    s.engine.upsert_documents(&next, new, WAIT).await.unwrap();

    let engine = Arc::clone(&s.engine);
    let reader_index = live.clone();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop_reader = Arc::clone(&stop);
    let reader = tokio::spawn(async move {
        let mut seen = BTreeSet::new();
        while !stop_reader.load(std::sync::atomic::Ordering::Relaxed) {
            let r = engine
                .search(&reader_index, &SearchRequest::new("").offset(0, 100))
                .await
                .expect("search during swap");
            let count = r.total.hits();
            assert!(count == 30 || count == 40, "mixed contents: {count} hits");
            let gens: BTreeSet<String> = r
                .hits
                .iter()
                .map(|h| h.document["gen"].as_str().unwrap_or_default().to_owned())
                .collect();
            assert_eq!(gens.len(), 1, "mixed generations {gens:?}");
            seen.extend(gens);
            tokio::task::yield_now().await;
        }
        seen
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    s.engine.swap_indexes(&live, &next, WAIT).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let seen = reader.await.expect("reader");
    assert!(
        seen.contains("new"),
        "the reader never saw the new contents"
    );

    assert_eq!(s.engine.document_count(&live).await.unwrap(), 40);
    assert_eq!(s.engine.document_count(&next).await.unwrap(), 30);
    assert_eq!(
        s.engine
            .settings(&live)
            .await
            .unwrap()
            .filterable_attributes,
        vec!["gen".to_owned()]
    );
    assert_eq!(s.filtered(&live, Filter::eq("gen", "new")).await.len(), 40);
    let missing = s.index("never_created");
    let r = s.engine.swap_indexes(&live, &missing, WAIT).await;
    assert!(matches!(r, Err(SearchError::IndexNotFound { .. })), "{r:?}");
    assert_eq!(s.engine.document_count(&live).await.unwrap(), 40);
    s.cleanup().await;
}

/// Many concurrent writers: every document lands, none twice.
pub async fn concurrent_writers_all_land(s: Subject) {
    let index = s.create("concurrent").await;
    let mut tasks = Vec::new();
    for writer in 0..8 {
        let engine = Arc::clone(&s.engine);
        let index = index.clone();
        tasks.push(tokio::spawn(async move {
            let mut receipts = Vec::new();
            for batch in 0..5 {
                let docs = (0..5)
                    .map(|i| {
                        doc(json!({"id": format!("w{writer}-b{batch}-{i}"), "writer": writer}))
                    })
                    .collect();
                receipts.push(
                    engine
                        .upsert_documents(&index, docs, Wait::Enqueued)
                        .await
                        .expect("enqueue"),
                );
            }
            // The same documents again: idempotent by id.
            let again = (0..5)
                .map(|i| doc(json!({"id": format!("w{writer}-b0-{i}"), "writer": writer})))
                .collect();
            receipts.push(
                engine
                    .upsert_documents(&index, again, Wait::Enqueued)
                    .await
                    .expect("enqueue"),
            );
            receipts
        }));
    }
    for t in tasks {
        for receipt in t.await.expect("writer") {
            s.engine
                .wait_for(receipt, Duration::from_secs(60))
                .await
                .expect("applied");
        }
    }
    assert_eq!(s.engine.document_count(&index).await.unwrap(), 200);
    s.cleanup().await;
}
