//! The contract suite against a real Meilisearch, and what only a real
//! server can show: failed tasks with their codes, timeouts, keys from a
//! secret provider, tenant tokens, a dead server.
//!
//! Runs when `MEILISEARCH_URL` (with `MEILISEARCH_KEY`) or
//! `MEILISEARCH_BIN` is set; otherwise every test says it skipped and
//! passes.

mod common;

use std::sync::Arc;
use std::time::Duration;

use keel_core::ErrorKind;
use keel_search::meilisearch::{MeilisearchEngine, TenantRules, TenantTokenSigner};
use keel_search::testing::{Subject, WAIT, catalog};
use keel_search::{
    DocumentReader, DocumentWriter, Filter, IndexAdmin, IndexSettings, SearchError, SearchRequest,
    Wait,
};
use keel_security::{FileSecrets, Secret};
use serde_json::json;

mod contract {
    use super::*;

    keel_search::contract_suite!(|| async {
        let (engine, _) = common::meilisearch("contract suite").await?;
        Some(Subject::new(Arc::new(engine)))
    });
}

async fn engine() -> Option<(
    MeilisearchEngine,
    keel_testkit::services::MeilisearchEndpoint,
)> {
    common::meilisearch("Meilisearch-only tests").await
}

#[tokio::test]
async fn a_failed_task_carries_the_meilisearch_code() {
    let Some((engine, _)) = engine().await else {
        return;
    };
    let s = Subject::new(Arc::new(engine.clone()));
    let index = s.create("failed_task").await;
    engine
        .apply_settings(&index, &IndexSettings::new().filterable(["_geo"]), WAIT)
        .await
        .unwrap();
    let bad_geo = json!({"id": "g1", "_geo": {"lat": "north", "lng": 2}});
    let r = engine
        .upsert_documents(&index, vec![bad_geo.as_object().cloned().unwrap()], WAIT)
        .await;
    match r {
        Err(SearchError::Rejected { code, task, .. }) => {
            assert_eq!(code, "invalid_document_geo_field");
            assert!(task.is_some());
        }
        other => panic!("expected a failed task, got {other:?}"),
    }
    // Enqueued writes report the failure when waited for.
    let receipt = engine
        .upsert_documents(
            &index,
            vec![bad_geo.as_object().cloned().unwrap()],
            Wait::Enqueued,
        )
        .await
        .unwrap();
    let waited = engine.wait_for(receipt, Duration::from_secs(60)).await;
    assert_eq!(
        waited.unwrap_err().code(),
        Some("invalid_document_geo_field")
    );
    assert_eq!(engine.document_count(&index).await.unwrap(), 0);
    s.cleanup().await;
}

#[tokio::test]
async fn waiting_times_out_with_a_typed_error() {
    let Some((engine, _)) = engine().await else {
        return;
    };
    let s = Subject::new(Arc::new(engine.clone()));
    let index = s.create("timeout").await;
    let docs: Vec<_> = (0..5000)
        .map(|i| {
            json!({"id": i, "text": format!("document number {i} with some words to index")})
                .as_object()
                .cloned()
                .unwrap()
        })
        .collect();
    let receipt = engine
        .upsert_documents(&index, docs, Wait::Enqueued)
        .await
        .unwrap();
    let r = engine.wait_for(receipt, Duration::from_millis(1)).await;
    match r {
        Err(e @ SearchError::Timeout { .. }) => {
            assert!(e.is_retryable());
            assert_eq!(keel_core::Error::from(e).kind(), ErrorKind::Timeout);
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    engine
        .wait_for(receipt, Duration::from_secs(120))
        .await
        .unwrap();
    assert_eq!(engine.document_count(&index).await.unwrap(), 5000);
    s.cleanup().await;
}

#[tokio::test]
async fn the_api_key_comes_from_a_secret_provider() {
    let Some((_, endpoint)) = engine().await else {
        return;
    };
    let Some(key) = endpoint.key.clone() else {
        common::notice(
            "keel-search: this server has no API key; skipping the secret-provider test",
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("meilisearch-api-key"), &key).unwrap();
    let secrets = FileSecrets::new(dir.path());
    let engine = MeilisearchEngine::from_secret(&endpoint.url, &secrets, "meilisearch-api-key")
        .await
        .unwrap();
    let s = Subject::new(Arc::new(engine.clone()));
    let index = s.create("secret").await;
    assert!(engine.index_exists(&index).await.unwrap());
    s.cleanup().await;

    let missing = MeilisearchEngine::from_secret(&endpoint.url, &secrets, "no-such-secret").await;
    match missing {
        Err(SearchError::Config(message)) => {
            assert!(message.contains("no-such-secret"));
            assert!(!message.contains(&key));
        }
        other => panic!("expected a configuration error, got {other:?}"),
    }

    let wrong = MeilisearchEngine::new(
        &endpoint.url,
        Some(Secret::from("a-wrong-key-of-some-length")),
    )
    .unwrap();
    let r = wrong.index_exists(&index).await;
    match r {
        Err(e @ SearchError::Rejected { .. }) => {
            assert_eq!(e.code(), Some("invalid_api_key"));
            assert_eq!(keel_core::Error::from(e).kind(), ErrorKind::Unauthorized);
        }
        other => panic!("expected an auth rejection, got {other:?}"),
    }
}

#[tokio::test]
async fn tenant_tokens_restrict_searches() {
    use meilisearch_sdk::key::{Action, KeyBuilder};

    let Some((engine, endpoint)) = engine().await else {
        return;
    };
    if endpoint.key.is_none() {
        common::notice("keel-search: this server has no API key; skipping the tenant-token test");
        return;
    }
    let s = Subject::new(Arc::new(engine.clone()));
    let shop = s.catalog("tenant").await;
    let other = s.catalog("tenant_other").await;
    let mut builder = KeyBuilder::new();
    builder
        .with_action(Action::Search)
        .with_index(shop.as_str());
    let key = engine.client().create_key(&builder).await.unwrap();

    let signer = TenantTokenSigner::new(&key.uid, Secret::from(key.key.clone())).unwrap();
    let rules = TenantRules::new()
        .index(shop.as_str(), Some(Filter::eq("category", "garden")))
        .unwrap();
    let token = signer.sign(&rules, Duration::from_secs(300)).unwrap();
    let tenant = MeilisearchEngine::new(&endpoint.url, Some(token)).unwrap();

    let found = tenant
        .search(&shop, &SearchRequest::new("").offset(0, 100))
        .await
        .unwrap();
    let mut ids: Vec<String> = found
        .hits
        .iter()
        .map(|h| h.document["id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    assert_eq!(ids, ["p04", "p05", "p10"]);
    // Filters the tenant adds narrow further; they cannot widen.
    let widened = tenant
        .search(
            &shop,
            &SearchRequest::new("").filter(Filter::eq("category", "kitchen")),
        )
        .await
        .unwrap();
    assert!(widened.hits.is_empty());
    // Other indexes and writes are out of reach.
    let r = tenant.search(&other, &SearchRequest::new("")).await;
    assert!(
        matches!(&r, Err(SearchError::Rejected { error_type, .. }) if error_type == "auth"),
        "{r:?}"
    );
    let r = tenant.delete_all_documents(&shop, WAIT).await;
    assert!(
        matches!(&r, Err(SearchError::Rejected { error_type, .. }) if error_type == "auth"),
        "{r:?}"
    );
    assert_eq!(
        engine.document_count(&shop).await.unwrap(),
        catalog().len() as u64
    );
    engine.client().delete_key(&key.key).await.unwrap();
    s.cleanup().await;
}

#[tokio::test]
async fn a_dead_server_is_unavailable_and_retryable() {
    // Port 9 (discard) on loopback: nothing listens there.
    let engine = MeilisearchEngine::new("http://127.0.0.1:9", None).unwrap();
    let index = keel_search::IndexName::new("anything").unwrap();
    let r = engine.search(&index, &SearchRequest::new("x")).await;
    match r {
        Err(e @ SearchError::Unavailable { .. }) => {
            assert!(e.is_retryable());
            assert_eq!(keel_core::Error::from(e).kind(), ErrorKind::Unavailable);
        }
        other => panic!("expected unavailable, got {other:?}"),
    }
    assert!(!engine.is_healthy().await);
    let report = engine.health_check(Duration::from_secs(2)).check().await;
    assert_eq!(report.status, keel_core::HealthStatus::Unhealthy);
}

#[tokio::test]
async fn a_server_that_never_answers_times_out() {
    // Accepts connections, reads nothing, answers nothing.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let hold = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            open.push(socket);
        }
    });
    let engine = MeilisearchEngine::new(&format!("http://{address}"), None)
        .unwrap()
        .with_request_timeout(Duration::from_millis(300));
    let index = keel_search::IndexName::new("anything").unwrap();
    let r = engine.search(&index, &SearchRequest::new("x")).await;
    match r {
        Err(e @ SearchError::Timeout { .. }) => {
            assert!(e.is_retryable());
            assert_eq!(keel_core::Error::from(e).kind(), ErrorKind::Timeout);
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    let r = engine
        .upsert_documents(
            &index,
            vec![json!({"id": "a"}).as_object().cloned().unwrap()],
            WAIT,
        )
        .await;
    assert!(matches!(r, Err(SearchError::Timeout { .. })), "{r:?}");
    hold.abort();
}

#[tokio::test]
async fn a_live_server_is_healthy() {
    let Some((engine, _)) = engine().await else {
        return;
    };
    assert!(engine.is_healthy().await);
    let report = engine.health_check(Duration::from_secs(5)).check().await;
    assert_eq!(
        report.status,
        keel_core::HealthStatus::Healthy,
        "{report:?}"
    );
}
