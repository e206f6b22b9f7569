//! Documents follow repository writes through the outbox: outbox → relay →
//! bus → `SearchSyncHandler` → index. Rolled-back writes never show up;
//! redelivered and stale messages never roll a document back.

use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_core::uow::{MemoryTransactions, TransactionSource};
use keel_core::{Delivery, EventHandler, HandlerError, Message};
use keel_eventbus::{EventBus, InMemoryBus, SubscriptionConfig};
use keel_outbox::{InMemoryOutbox, Outbox, OutboxMessage, Relay, RelayConfig};
use keel_search::sync::{Change, SearchSyncHandler, VERSION_FIELD};
use keel_search::{
    DocumentId, DocumentReader, InMemoryEngine, IndexAdmin, IndexName, SearchEngine, Wait,
};
use serde_json::json;

async fn write(
    transactions: &MemoryTransactions,
    outbox: &InMemoryOutbox,
    order: &str,
    message: Message,
    commit: bool,
) {
    let mut tx = transactions.begin().await.unwrap();
    outbox
        .within(&mut *tx)
        .write(&OutboxMessage::new("orders", "Order", order, message))
        .await
        .unwrap();
    if commit {
        tx.commit().await.unwrap();
    } else {
        tx.rollback().await.unwrap();
    }
}

fn saved(order: &str, status: &str, version: u64) -> Message {
    Message::new(
        "order.saved",
        json!({"order": {"id": order, "status": status}, "version": version}),
    )
}

async fn eventually(what: &str, check: impl AsyncFn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn documents_follow_committed_writes_through_the_outbox() {
    let engine = Arc::new(InMemoryEngine::new());
    let index = IndexName::new("orders_sync").unwrap();
    engine
        .create_index(&index, "id", Wait::applied_default())
        .await
        .unwrap();
    let handler = Arc::new(
        SearchSyncHandler::new(engine.clone(), index.clone())
            .upsert_on("order.saved", "/order")
            .delete_on("order.deleted", "/order_id")
            .versioned("/version"),
    );
    let bus = InMemoryBus::new();
    let subscription = bus
        .subscribe(
            "orders",
            &SubscriptionConfig::new("orders-search").with_ordered(true),
            handler.clone(),
        )
        .await
        .unwrap();
    let outbox = InMemoryOutbox::new();
    let transactions = MemoryTransactions::new();
    let relay = Relay::in_memory(&outbox, Arc::new(bus.clone()), RelayConfig::default())
        .unwrap()
        .spawn();

    write(
        &transactions,
        &outbox,
        "o-1",
        saved("o-1", "placed", 1),
        true,
    )
    .await;
    write(&transactions, &outbox, "o-1", saved("o-1", "paid", 2), true).await;
    write(
        &transactions,
        &outbox,
        "o-1",
        saved("o-1", "refunded", 3),
        false,
    )
    .await;
    write(
        &transactions,
        &outbox,
        "o-2",
        saved("o-2", "placed", 1),
        true,
    )
    .await;
    write(
        &transactions,
        &outbox,
        "o-2",
        Message::new("order.deleted", json!({"order_id": "o-2"})),
        true,
    )
    .await;
    write(
        &transactions,
        &outbox,
        "o-3",
        saved("o-3", "placed", 1),
        true,
    )
    .await;

    let id = |s: &str| DocumentId::new(s).unwrap();
    eventually("o-3 to be indexed", async || {
        engine
            .get_document(&index, &id("o-3"))
            .await
            .unwrap()
            .is_some()
    })
    .await;
    eventually("o-2 to be deleted", async || {
        engine
            .get_document(&index, &id("o-2"))
            .await
            .unwrap()
            .is_none()
    })
    .await;
    let o1 = engine
        .get_document(&index, &id("o-1"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(o1["status"], "paid", "the rolled-back write must not show");
    assert_eq!(o1[VERSION_FIELD], 2);

    // A redelivered old message changes nothing.
    handler
        .handle(&Delivery::new(
            saved("o-1", "placed", 1),
            2,
            "orders-search",
        ))
        .await
        .unwrap();
    let o1 = engine
        .get_document(&index, &id("o-1"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(o1["status"], "paid");
    assert_eq!(engine.document_count(&index).await.unwrap(), 2);

    relay.shutdown().await;
    subscription.shutdown().await;
}

#[tokio::test]
async fn malformed_messages_are_rejected_and_write_nothing() {
    let engine: Arc<dyn SearchEngine> = Arc::new(InMemoryEngine::new());
    let index = IndexName::new("orders_reject").unwrap();
    engine
        .create_index(&index, "id", Wait::applied_default())
        .await
        .unwrap();
    let handler = SearchSyncHandler::new(Arc::clone(&engine), index.clone())
        .upsert_on("order.saved", "/order")
        .delete_on("order.deleted", "/order_id")
        .versioned("/version")
        .on("order.merged", |m| {
            let from = m.payload["from"].as_str().ok_or("no from")?;
            Ok(vec![Change::Delete(
                DocumentId::new(from).map_err(|e| e.to_string())?,
            )])
        });
    let cases = [
        Message::new("order.saved", json!({"version": 1})),
        Message::new(
            "order.saved",
            json!({"order": "not an object", "version": 1}),
        ),
        Message::new("order.saved", json!({"order": {"id": "a b"}, "version": 1})),
        Message::new("order.saved", json!({"order": {"id": "ok"}})),
        Message::new("order.deleted", json!({"order_id": "../etc"})),
        Message::new("order.merged", json!({})),
    ];
    for message in cases {
        let r = handler
            .handle(&Delivery::new(message.clone(), 1, "orders-search"))
            .await;
        assert!(
            matches!(r, Err(HandlerError::Reject(_))),
            "{}: {r:?}",
            message.payload
        );
    }
    // Unknown event types are acknowledged and ignored.
    handler
        .handle(&Delivery::new(
            Message::new("order.viewed", json!({})),
            1,
            "orders-search",
        ))
        .await
        .unwrap();
    assert_eq!(engine.document_count(&index).await.unwrap(), 0);

    // A missing index is not the message's fault: retry later.
    let lost = SearchSyncHandler::new(engine, IndexName::new("gone").unwrap())
        .upsert_on("order.saved", "/order");
    let r = lost
        .handle(&Delivery::new(
            saved("o-9", "placed", 1),
            1,
            "orders-search",
        ))
        .await;
    assert!(matches!(r, Err(HandlerError::Retry(_))), "{r:?}");
}
