//! Rules on indexes and writes: creating and deleting indexes, refused
//! writes, upserts, deletes and settings.

use serde_json::json;

use super::{Subject, WAIT, catalog_settings, doc, set};
use crate::error::SearchError;
use crate::filter::Filter;
use crate::names::DocumentId;
use crate::query::{Document, SearchRequest};
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
