//! A search over gRPC (Shipping's `SearchShipments`) finds the shipped
//! order: on the in-memory engine, and on Meilisearch when
//! `MEILISEARCH_URL` is set (skipped, and said so, when it is not).

use std::time::Duration;

use keel_grpc::proto::examples::shipping::v1 as shipping_api;
use keel_tests::services::{Error, ServiceStack, StackOptions};

use crate::common::{ONE_STACK_AT_A_TIME, place_and_pay, wait_all_shipped, wait_for};

async fn search_finds_the_shipped_order(options: StackOptions) -> Result<(), Error> {
    let _one = ONE_STACK_AT_A_TIME.lock().await;
    let mut stack = ServiceStack::start(options).await?;
    let ordering = stack.ordering_client()?;
    let shipping = stack.shipping_client()?;
    // A recipient no other order has, so the hit can only be this order.
    let recipient = format!(
        "Hedy Lamarr {}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let order_id = place_and_pay(&ordering, "customer-search", &recipient).await?;
    let other = place_and_pay(&ordering, "customer-other", "Alan Turing").await?;
    wait_all_shipped(
        &ordering,
        &[order_id.clone(), other.clone()],
        Duration::from_secs(90),
    )
    .await?;

    let search = |query: String, status: shipping_api::ShipmentStatus| {
        let mut client = shipping.clone();
        async move {
            client
                .search_shipments(shipping_api::SearchShipmentsRequest {
                    query,
                    status: status as i32,
                    limit: 10,
                })
                .await
                .map(|r| r.into_inner().hits)
                .map_err(|e| Error::from(format!("SearchShipments: {e}")))
        }
    };
    // The read model follows the shipments shortly after each change.
    let hit = wait_for(
        "the shipped order in the search index",
        Duration::from_secs(30),
        || {
            let found = search(recipient.clone(), shipping_api::ShipmentStatus::Dispatched);
            async move {
                Ok(found
                    .await?
                    .into_iter()
                    .find(|h| h.status() == shipping_api::ShipmentStatus::Dispatched))
            }
        },
    )
    .await?;
    assert_eq!(hit.order_id, order_id);
    assert_eq!(hit.recipient, recipient);
    assert_eq!(hit.tracking_number, format!("TRK-{order_id}"));
    // Only that order matches its recipient; the other one is found by its own.
    let hits = search(recipient.clone(), shipping_api::ShipmentStatus::Unspecified).await?;
    assert_eq!(hits.len(), 1, "{hits:?}");
    let by_other = search(
        "Turing".to_owned(),
        shipping_api::ShipmentStatus::Unspecified,
    )
    .await?;
    assert!(by_other.iter().any(|h| h.order_id == other), "{by_other:?}");
    assert!(
        by_other.iter().all(|h| h.order_id != order_id),
        "{by_other:?}"
    );
    // Nothing is cancelled, so a status filter on it finds nothing.
    let cancelled = search(String::new(), shipping_api::ShipmentStatus::Cancelled).await?;
    assert!(cancelled.is_empty(), "{cancelled:?}");

    stack.terminate().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn search_finds_the_shipped_order_in_memory() -> Result<(), Error> {
    search_finds_the_shipped_order(StackOptions::default()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn search_finds_the_shipped_order_on_meilisearch() -> Result<(), Error> {
    let Some(url) = std::env::var("MEILISEARCH_URL")
        .ok()
        .filter(|u| !u.is_empty())
    else {
        eprintln!("skipped: MEILISEARCH_URL is not set (the in-memory engine ran above)");
        return Ok(());
    };
    let mut options = StackOptions::default().shipping_env("MEILISEARCH_URL", &url);
    if let Ok(key) = std::env::var("MEILISEARCH_KEY") {
        options = options.shipping_env("MEILISEARCH_KEY", &key);
    }
    search_finds_the_shipped_order(options).await
}
