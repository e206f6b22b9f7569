//! The contract rules, one function each.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use super::{Subject, WAIT, catalog_settings, doc, id_of, set};
use crate::engine::Wait;
use crate::error::SearchError;
use crate::filter::Filter;
use crate::names::DocumentId;
use crate::query::{Document, Highlight, SearchRequest, SortBy, TotalHits};
use crate::settings::IndexSettings;

/// Creating an index twice and deleting a missing one are typed errors.
pub async fn create_and_delete_indexes(s: Subject) {
    let index = s.create("admin").await;
    assert!(s.engine.index_exists(&index).await.unwrap());
    assert_eq!(s.engine.primary_key(&index).await.unwrap(), "id");
    assert_eq!(s.engine.document_count(&index).await.unwrap(), 0);
    let again = s.engine.create_index(&index, "id", WAIT).await;
    assert!(
        matches!(again, Err(SearchError::IndexAlreadyExists { .. })),
        "{again:?}"
    );
    s.engine.delete_index(&index, WAIT).await.unwrap();
    assert!(!s.engine.index_exists(&index).await.unwrap());
    let gone = s.engine.delete_index(&index, WAIT).await;
    assert!(
        matches!(gone, Err(SearchError::IndexNotFound { .. })),
        "{gone:?}"
    );
    let bad_key = s
        .engine
        .create_index(&s.index("pk"), "id field", WAIT)
        .await;
    assert!(
        matches!(bad_key, Err(SearchError::InvalidField { .. })),
        "{bad_key:?}"
    );
    s.cleanup().await;
}

/// Writes into a missing index are refused.
pub async fn missing_index_is_refused(s: Subject) {
    let index = s.index("missing");
    let up = s
        .engine
        .upsert_documents(&index, vec![doc(json!({"id": "a"}))], WAIT)
        .await;
    assert!(
        matches!(up, Err(SearchError::IndexNotFound { .. })),
        "{up:?}"
    );
    let get = s
        .engine
        .get_document(&index, &DocumentId::new("a").unwrap())
        .await;
    assert!(
        matches!(get, Err(SearchError::IndexNotFound { .. })),
        "{get:?}"
    );
    let search = s.engine.search(&index, &SearchRequest::new("")).await;
    assert!(
        matches!(search, Err(SearchError::IndexNotFound { .. })),
        "{search:?}"
    );
    let settings = s
        .engine
        .apply_settings(&index, &IndexSettings::new(), WAIT)
        .await;
    assert!(
        matches!(settings, Err(SearchError::IndexNotFound { .. })),
        "{settings:?}"
    );
    assert!(!s.engine.index_exists(&index).await.unwrap());
}

/// Bad ids anywhere in a batch refuse the whole batch; nothing is written.
pub async fn bad_documents_write_nothing(s: Subject) {
    let index = s.create("bad_docs").await;
    let batches = [
        vec![doc(json!({"id": "ok-1"})), doc(json!({"id": "not ok"}))],
        vec![doc(json!({"id": "ok-1"})), doc(json!({"id": "a/../b"}))],
        vec![doc(json!({"id": "ok-1"})), doc(json!({"sku": "no-id"}))],
        vec![doc(json!({"id": "ok-1"})), doc(json!({"id": -3}))],
        vec![
            doc(json!({"id": "ok-1"})),
            doc(json!({"id": "x".repeat(600)})),
        ],
        vec![doc(json!({"id": "ok-1"})), doc(json!({"id": ""}))],
    ];
    for batch in batches {
        let r = s.engine.upsert_documents(&index, batch, WAIT).await;
        assert!(
            matches!(r, Err(SearchError::InvalidDocumentId { .. })),
            "{r:?}"
        );
    }
    assert_eq!(s.engine.document_count(&index).await.unwrap(), 0);
    s.cleanup().await;
}

/// An oversize document or batch is refused before anything is written.
pub async fn oversize_writes_are_refused(s: Subject) {
    let index = s.create("oversize").await;
    let limits = s.engine.limits();
    let big = doc(json!({"id": "big", "text": "x".repeat(limits.max_document_bytes + 1)}));
    let r = s
        .engine
        .upsert_documents(&index, vec![doc(json!({"id": "small"})), big], WAIT)
        .await;
    assert!(
        matches!(r, Err(SearchError::DocumentTooLarge { position: 1, .. })),
        "{r:?}"
    );
    let many: Vec<Document> = (0..=limits.max_batch_documents)
        .map(|i| doc(json!({"id": format!("d{i}")})))
        .collect();
    let r = s.engine.upsert_documents(&index, many, WAIT).await;
    assert!(
        matches!(
            r,
            Err(SearchError::BatchTooLarge {
                unit: "documents",
                ..
            })
        ),
        "{r:?}"
    );
    let ids: Vec<DocumentId> = (0..=limits.max_batch_documents)
        .map(|i| DocumentId::new(format!("d{i}")).unwrap())
        .collect();
    let r = s.engine.delete_documents(&index, &ids, WAIT).await;
    assert!(matches!(r, Err(SearchError::BatchTooLarge { .. })), "{r:?}");
    assert_eq!(s.engine.document_count(&index).await.unwrap(), 0);
    s.cleanup().await;
}

/// Upserts replace whole documents; reads see the last write.
pub async fn upsert_replaces_documents(s: Subject) {
    let index = s.create("upsert").await;
    let a = DocumentId::new("a").unwrap();
    s.engine
        .upsert_documents(
            &index,
            vec![doc(json!({"id": "a", "v": 1, "old": true}))],
            WAIT,
        )
        .await
        .unwrap();
    s.engine
        .upsert_documents(&index, vec![doc(json!({"id": "a", "v": 2}))], WAIT)
        .await
        .unwrap();
    assert_eq!(
        s.engine.get_document(&index, &a).await.unwrap(),
        Some(doc(json!({"id": "a", "v": 2})))
    );
    // Integer ids read back as they were written.
    s.engine
        .upsert_documents(&index, vec![doc(json!({"id": 7, "v": 3}))], WAIT)
        .await
        .unwrap();
    let seven = s
        .engine
        .get_document(&index, &DocumentId::new("7").unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(seven["v"], 3);
    assert_eq!(
        s.engine
            .get_document(&index, &DocumentId::new("nope").unwrap())
            .await
            .unwrap(),
        None
    );
    assert_eq!(s.engine.document_count(&index).await.unwrap(), 2);
    s.cleanup().await;
}

/// Deletes: one, many (missing ids ignored), all.
pub async fn deletes_single_batched_and_all(s: Subject) {
    let index = s.catalog("deletes").await;
    let id = |s: &str| DocumentId::new(s).unwrap();
    s.engine
        .delete_documents(&index, &[id("p01")], WAIT)
        .await
        .unwrap();
    s.engine
        .delete_documents(&index, &[id("p02"), id("p03"), id("nope")], WAIT)
        .await
        .unwrap();
    assert_eq!(s.engine.document_count(&index).await.unwrap(), 9);
    assert_eq!(
        s.engine.get_document(&index, &id("p02")).await.unwrap(),
        None
    );
    let kitchen = s.filtered(&index, Filter::eq("category", "kitchen")).await;
    assert_eq!(kitchen, set(&["p09", "p11"]));
    s.engine.delete_all_documents(&index, WAIT).await.unwrap();
    assert_eq!(s.engine.document_count(&index).await.unwrap(), 0);
    // Settings survive deleting the documents.
    assert_eq!(
        s.engine.settings(&index).await.unwrap(),
        catalog_settings().normalized()
    );
    s.cleanup().await;
}

/// Settings read back as applied (in normal form).
pub async fn settings_round_trip(s: Subject) {
    let index = s.create("settings").await;
    let defaults = s.engine.settings(&index).await.unwrap();
    assert_eq!(defaults.searchable_attributes, None);
    assert!(defaults.filterable_attributes.is_empty());
    assert_eq!(defaults.ranking_rules, None);
    let custom = catalog_settings().ranking_rules([
        "words",
        "sort",
        "typo",
        "proximity",
        "attribute",
        "exactness",
        "rating:desc",
    ]);
    s.engine
        .apply_settings(&index, &custom, WAIT)
        .await
        .unwrap();
    assert_eq!(
        s.engine.settings(&index).await.unwrap(),
        custom.normalized()
    );
    let bad = IndexSettings::new().filterable(["a b"]);
    assert!(matches!(
        s.engine.apply_settings(&index, &bad, WAIT).await,
        Err(SearchError::InvalidField { .. })
    ));
    let bad = IndexSettings::new().ranking_rules(["popularity"]);
    assert!(matches!(
        s.engine.apply_settings(&index, &bad, WAIT).await,
        Err(SearchError::InvalidArgument { .. })
    ));
    s.cleanup().await;
}

/// Every filter form selects the same documents on every engine.
pub async fn filters_select_the_same_documents(s: Subject) {
    let index = s.catalog("filters").await;
    let cases: Vec<(Filter, &[&str])> = vec![
        (Filter::eq("category", "garden"), &["p04", "p05", "p10"]),
        (Filter::eq("category", "GARDEN"), &["p04", "p05", "p10"]),
        (
            Filter::ne("category", "kitchen"),
            &["p04", "p05", "p06", "p07", "p08", "p10", "p12"],
        ),
        (Filter::gt("price", 55), &["p03", "p12"]),
        (Filter::gte("price", 55), &["p03", "p06", "p12"]),
        (Filter::lt("price", 10), &["p05", "p07"]),
        (Filter::lte("price", 11), &["p05", "p07", "p11"]),
        (
            Filter::between("price", 25, 40),
            &["p01", "p02", "p04", "p09"],
        ),
        (Filter::gt("rating", 4.5), &["p03", "p07", "p12"]),
        (Filter::eq("price", 35), &["p02"]),
        (Filter::eq("tags", "tea"), &["p01", "p02", "p09"]),
        (
            Filter::any_of("tags", ["steel", "paper"]),
            &["p01", "p03", "p07"],
        ),
        (Filter::eq("in_stock", false), &["p02", "p06", "p10"]),
        (Filter::eq("maker.name", "acme"), &["p01", "p03", "p08"]),
        (
            Filter::exists("maker"),
            &[
                "p01", "p02", "p03", "p04", "p05", "p07", "p08", "p09", "p10", "p12",
            ],
        ),
        (Filter::is_null("maker"), &["p05"]),
        (Filter::is_empty("tags"), &["p04"]),
        (
            Filter::eq("category", "kitchen").and(Filter::lt("price", 30)),
            &["p01", "p11"],
        ),
        (
            Filter::eq("category", "garden").or(Filter::gt("price", 100)),
            &["p04", "p05", "p10", "p12"],
        ),
        (
            Filter::eq("category", "office")
                .and(Filter::eq("in_stock", true).not())
                .or(Filter::eq("tags", "porcelain")),
            &["p06", "p09"],
        ),
        (
            Filter::all([Filter::eq("category", "kitchen"), Filter::eq("tags", "tea")])
                .and(Filter::any_of("maker.name", ["verde", "brava"])),
            &["p02", "p09"],
        ),
        (
            Filter::all([]),
            &[
                "p01", "p02", "p03", "p04", "p05", "p06", "p07", "p08", "p09", "p10", "p11", "p12",
            ],
        ),
    ];
    for (filter, expected) in cases {
        let got = s.filtered(&index, filter.clone()).await;
        assert_eq!(got, set(expected), "filter {filter}");
    }
    s.cleanup().await;
}

/// Values from users are data: quotes, backslashes and operators inside a
/// value match only documents holding exactly that value.
pub async fn filter_values_cannot_inject(s: Subject) {
    let index = s.catalog("injection").await;
    let attempts = [
        r#"kitchen" OR category = "garden"#,
        r#"x" OR price > 0 OR tags = "y"#,
        r"kitchen\",
        "office) OR (price > 0",
        "' OR 1=1 --",
    ];
    for attempt in attempts {
        let got = s.filtered(&index, Filter::eq("category", attempt)).await;
        assert!(got.is_empty(), "{attempt:?} matched {got:?}");
    }
    assert_eq!(
        s.filtered(&index, Filter::eq("tags", "a\"b")).await,
        set(&["p11"])
    );
    assert_eq!(
        s.filtered(&index, Filter::eq("tags", "c\\d")).await,
        set(&["p11"])
    );
    let not = s
        .filtered(
            &index,
            Filter::ne("category", r#"x" OR category = "office"#),
        )
        .await;
    assert_eq!(not.len(), 12);
    s.cleanup().await;
}

/// Filters, facets and sorts on undeclared attributes are refused with the
/// engine's codes.
pub async fn undeclared_attributes_are_refused(s: Subject) {
    let index = s.catalog("undeclared").await;
    let code = |r: crate::Result<_>| match r {
        Err(SearchError::Rejected { code, .. }) => code,
        other => panic!(
            "expected a rejection, got {:?}",
            other.map(|_: crate::SearchResults<Document>| ())
        ),
    };
    let r = s
        .engine
        .search(
            &index,
            &SearchRequest::new("").filter(Filter::eq("title", "x")),
        )
        .await;
    assert_eq!(code(r), "invalid_search_filter");
    let r = s
        .engine
        .search(&index, &SearchRequest::new("").sort(SortBy::asc("title")))
        .await;
    assert_eq!(code(r), "invalid_search_sort");
    let r = s
        .engine
        .search(&index, &SearchRequest::new("").facets(["description"]))
        .await;
    assert_eq!(code(r), "invalid_search_facets");
    s.cleanup().await;
}

/// Sorts order hits the same way on every engine.
pub async fn sorts_order_hits(s: Subject) {
    let index = s.catalog("sorts").await;
    let all = |sort: Vec<SortBy>| {
        let mut r = SearchRequest::new("").offset(0, 100);
        r.sort = sort;
        r
    };
    assert_eq!(
        s.ids(&index, &all(vec![SortBy::asc("price")])).await,
        [
            "p05", "p07", "p11", "p10", "p08", "p01", "p09", "p02", "p04", "p06", "p03", "p12"
        ]
    );
    assert_eq!(
        s.ids(&index, &all(vec![SortBy::desc("rating")])).await,
        [
            "p03", "p07", "p12", "p01", "p06", "p04", "p09", "p02", "p10", "p05", "p11", "p08"
        ]
    );
    assert_eq!(
        s.ids(
            &index,
            &all(vec![SortBy::asc("category"), SortBy::desc("price")])
        )
        .await,
        [
            "p04", "p10", "p05", "p03", "p02", "p09", "p01", "p11", "p12", "p06", "p08", "p07"
        ]
    );
    let cheap_kitchen = all(vec![SortBy::desc("price")])
        .filter(Filter::eq("category", "kitchen").and(Filter::lt("price", 50)));
    assert_eq!(
        s.ids(&index, &cheap_kitchen).await,
        ["p02", "p09", "p01", "p11"]
    );
    s.cleanup().await;
}

/// Offset and page pagination slice the same ordered result.
pub async fn pagination_slices_results(s: Subject) {
    let index = s.catalog("pages").await;
    let by_price = || SearchRequest::new("").sort(SortBy::asc("price"));
    let r = s
        .engine
        .search(&index, &by_price().offset(3, 4))
        .await
        .unwrap();
    assert_eq!(r.total, TotalHits::Estimated(12));
    assert_eq!(
        r.hits
            .iter()
            .map(|h| id_of(&h.document))
            .collect::<Vec<_>>(),
        ["p10", "p08", "p01", "p09"]
    );
    let r = s
        .engine
        .search(&index, &by_price().page(3, 5))
        .await
        .unwrap();
    assert_eq!(r.total, TotalHits::Exact { hits: 12, pages: 3 });
    assert_eq!(
        r.hits
            .iter()
            .map(|h| id_of(&h.document))
            .collect::<Vec<_>>(),
        ["p03", "p12"]
    );
    let r = s
        .engine
        .search(&index, &by_price().page(4, 5))
        .await
        .unwrap();
    assert!(r.hits.is_empty());
    assert_eq!(r.total, TotalHits::Exact { hits: 12, pages: 3 });
    let r = s
        .engine
        .search(&index, &by_price().offset(20, 5))
        .await
        .unwrap();
    assert!(r.hits.is_empty());
    let r = s
        .engine
        .search(
            &index,
            &by_price()
                .filter(Filter::eq("category", "office"))
                .page(1, 3),
        )
        .await
        .unwrap();
    assert_eq!(r.total, TotalHits::Exact { hits: 4, pages: 2 });
    assert!(
        s.engine
            .search(&index, &by_price().page(0, 5))
            .await
            .is_err()
    );
    s.cleanup().await;
}

/// Facet counts cover every matching document, not just the page.
pub async fn facets_count_matches(s: Subject) {
    let index = s.catalog("facets").await;
    let r = s
        .engine
        .search(
            &index,
            &SearchRequest::new("")
                .filter(Filter::eq("in_stock", true))
                .facets(["category", "tags", "in_stock"])
                .offset(0, 1),
        )
        .await
        .unwrap();
    assert_eq!(r.hits.len(), 1);
    let category = &r.facets["category"];
    assert_eq!(category.get("kitchen"), Some(&4));
    assert_eq!(category.get("garden"), Some(&2));
    assert_eq!(category.get("office"), Some(&3));
    let tags = &r.facets["tags"];
    assert_eq!(tags.get("tea"), Some(&2));
    assert_eq!(tags.get("steel"), Some(&2));
    assert_eq!(tags.get("light"), None);
    assert_eq!(r.facets["in_stock"].get("true"), Some(&9));
    s.cleanup().await;
}

/// Every query word must match (the last one as a prefix); synonyms
/// widen a word.
pub async fn queries_match_words(s: Subject) {
    let index = s.catalog("queries").await;
    let q = |text: &str| SearchRequest::new(text).offset(0, 100);
    assert_eq!(s.id_set(&index, &q("kettle")).await, set(&["p01", "p02"]));
    assert_eq!(s.id_set(&index, &q("KETTLE")).await, set(&["p01", "p02"]));
    assert_eq!(s.id_set(&index, &q("blue kettle")).await, set(&["p01"]));
    assert_eq!(s.id_set(&index, &q("red kett")).await, set(&["p02"]));
    assert_eq!(
        s.id_set(&index, &q("tea")).await,
        set(&["p01", "p02", "p09"])
    );
    assert_eq!(
        s.id_set(&index, &q("teakettle")).await,
        set(&["p01", "p02"])
    );
    assert!(s.id_set(&index, &q("xylophone")).await.is_empty());
    assert_eq!(
        s.id_set(&index, &q("kettle").filter(Filter::eq("in_stock", true)))
            .await,
        set(&["p01"])
    );
    assert_eq!(s.id_set(&index, &q("")).await.len(), 12);
    s.cleanup().await;
}

/// Highlighting wraps matched words in the tags, keeping their case.
pub async fn highlighting_marks_matches(s: Subject) {
    let index = s.catalog("highlight").await;
    let r = s
        .engine
        .search(
            &index,
            &SearchRequest::new("kettle")
                .filter(Filter::eq("price", 25))
                .highlight(Highlight::fields(["title", "description"]).tags("[", "]")),
        )
        .await
        .unwrap();
    let formatted = r.hits[0].formatted.as_ref().expect("formatted hit");
    assert_eq!(formatted["title"], "Blue [kettle]");
    assert_eq!(formatted["description"], "A steel [kettle] for tea");
    // The document itself is untouched.
    assert_eq!(r.hits[0].document["title"], "Blue kettle");
    let plain = s
        .engine
        .search(&index, &SearchRequest::new("kettle"))
        .await
        .unwrap();
    assert!(plain.hits.iter().all(|h| h.formatted.is_none()));
    s.cleanup().await;
}

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
