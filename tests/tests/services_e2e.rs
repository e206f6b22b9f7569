//! Both example services as real processes on PostgreSQL, Redis and the
//! Pub/Sub emulator: orders placed, paid and cancelled over gRPC with
//! concurrency; every paid order ends shipped in Ordering and dispatched
//! in Shipping exactly once in effect (checked in Shipping's own tables);
//! refused calls get the right codes and the audit log holds the
//! commands; SIGTERM stops both with exit status 0.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use keel_core::AuditOutcome;
use keel_grpc::proto::examples::ordering::v1 as ordering;
use keel_grpc::proto::examples::shipping::v1 as shipping;
use keel_tests::services::{OrderingClient, ServiceStack, StackOptions};
use tonic::Code;

const ORDERS: usize = 20;

fn place_request(n: usize) -> ordering::PlaceOrderRequest {
    ordering::PlaceOrderRequest {
        request_id: uuid::Uuid::now_v7().to_string(),
        customer_id: format!("customer-{n}"),
        lines: vec![ordering::OrderLine {
            sku: format!("SKU-{}", n % 3),
            quantity: u32::try_from(n % 4 + 1).unwrap(),
            unit_price: Some(ordering::Money {
                currency_code: "EUR".into(),
                amount_minor: 250,
            }),
        }],
        shipping_address: Some(ordering::Address {
            name: format!("Recipient {n}"),
            lines: vec!["1 Main Street".into()],
            postal_code: "1000".into(),
            city: if n % 2 == 0 { "Lisbon" } else { "Porto" }.into(),
            country_code: "PT".into(),
        }),
    }
}

/// Places order `n`, then pays it (or, for `cancel`, cancels it). Returns
/// the order id.
async fn run_order(mut client: OrderingClient, n: usize, cancel: bool) -> String {
    let request = place_request(n);
    let placed = client
        .place_order(request.clone())
        .await
        .unwrap()
        .into_inner();
    // A retried placement (same request id) is answered from the first.
    let again = client.place_order(request).await.unwrap().into_inner();
    assert_eq!(again.order_id, placed.order_id);
    assert_eq!(again.version, placed.version);
    let order_id = placed.order_id;
    if cancel {
        client
            .cancel_order(ordering::CancelOrderRequest {
                request_id: uuid::Uuid::now_v7().to_string(),
                order_id: order_id.clone(),
                reason: "changed my mind".into(),
                expected_version: Some(placed.version),
            })
            .await
            .unwrap();
    } else {
        let pay = ordering::PayOrderRequest {
            request_id: uuid::Uuid::now_v7().to_string(),
            order_id: order_id.clone(),
            amount: placed.total.clone(),
            payment_reference: format!("psp-{n}"),
            expected_version: Some(placed.version),
        };
        let paid = client.pay_order(pay.clone()).await.unwrap().into_inner();
        // Paying again with the same request id records nothing new.
        let repaid = client.pay_order(pay).await.unwrap().into_inner();
        assert_eq!(repaid.version, paid.version);
    }
    order_id
}

async fn eventually<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paid_orders_ship_exactly_once_across_two_service_processes() {
    let mut stack = ServiceStack::start(StackOptions::default()).await.unwrap();
    let client = stack.ordering_client().unwrap();

    // Twenty orders at once; the last is cancelled instead of paid.
    let tasks: Vec<_> = (0..ORDERS)
        .map(|n| tokio::spawn(run_order(client.clone(), n, n == ORDERS - 1)))
        .collect();
    let mut ids = Vec::new();
    for task in tasks {
        ids.push(task.await.unwrap());
    }
    let (cancelled, paid) = ids.split_last().unwrap();
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), ORDERS);

    // Every paid order ends SHIPPED in Ordering...
    let mut reader = client.clone();
    eventually(
        "every paid order shipped in Ordering",
        Duration::from_secs(90),
        || {
            let mut reader = reader.clone();
            let paid = paid.to_vec();
            async move {
                for id in &paid {
                    let order = reader
                        .get_order(ordering::GetOrderRequest {
                            order_id: id.clone(),
                        })
                        .await
                        .unwrap()
                        .into_inner()
                        .order
                        .unwrap();
                    if order.status != ordering::OrderStatus::Shipped as i32 {
                        return false;
                    }
                }
                true
            }
        },
    )
    .await;
    let order = reader
        .get_order(ordering::GetOrderRequest {
            order_id: cancelled.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .order
        .unwrap();
    assert_eq!(order.status, ordering::OrderStatus::Cancelled as i32);

    // ...and dispatched in Shipping, as its API shows it.
    let mut shipping_client = stack.shipping_client().unwrap();
    for id in paid {
        let shipment = shipping_client
            .get_shipment(shipping::GetShipmentRequest {
                order_id: id.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .shipment
            .unwrap();
        assert_eq!(shipment.status, shipping::ShipmentStatus::Dispatched as i32);
        assert_eq!(shipment.tracking_number, format!("TRK-{id}"));
    }
    let stopped = shipping_client
        .get_shipment(shipping::GetShipmentRequest {
            order_id: cancelled.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .shipment
        .unwrap();
    assert_eq!(stopped.status, shipping::ShipmentStatus::Cancelled as i32);

    // Exactly once in effect, in Shipping's own tables: one shipment per
    // order, one `shipment.dispatched` outbox row per paid order and none
    // for the cancelled one.
    let pool = stack.shipping_db.pool();
    let shipments: Vec<(String, serde_json::Value)> =
        sqlx::query_as("SELECT order_id, shipment FROM keel_examples_shipments")
            .fetch_all(pool)
            .await
            .unwrap();
    let mut per_order: BTreeMap<String, usize> = BTreeMap::new();
    for (order_id, _) in &shipments {
        *per_order.entry(order_id.clone()).or_default() += 1;
    }
    assert_eq!(per_order.len(), ORDERS, "one shipment per order");
    assert!(per_order.values().all(|&n| n == 1), "{per_order:?}");
    let dispatched: Vec<(String,)> = sqlx::query_as(
        "SELECT payload->>'order_id' FROM keel.outbox WHERE event_type = 'shipment.dispatched'",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let dispatched_orders: Vec<String> = dispatched.into_iter().map(|(o,)| o).collect();
    assert_eq!(
        dispatched_orders.len(),
        paid.len(),
        "one dispatch per paid order: {dispatched_orders:?}"
    );
    assert_eq!(
        dispatched_orders.iter().collect::<HashSet<_>>(),
        paid.iter().collect::<HashSet<_>>()
    );
    let unpublished: (i64,) =
        sqlx::query_as("SELECT count(*) FROM keel.outbox WHERE published_at IS NULL")
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(unpublished.0, 0, "the relay published every outbox row");

    // The search read model found them too.
    let found = shipping_client
        .search_shipments(shipping::SearchShipmentsRequest {
            query: "Lisbon".into(),
            status: shipping::ShipmentStatus::Dispatched as i32,
            limit: 100,
        })
        .await
        .unwrap()
        .into_inner()
        .hits;
    let lisbon_paid = paid.iter().enumerate().filter(|(n, _)| n % 2 == 0).count();
    assert_eq!(found.len(), lisbon_paid, "{found:?}");

    // No token: UNAUTHENTICATED. A token without the scope: PERMISSION_DENIED.
    let anonymous = ServiceStack::channel(&stack.ordering, None).unwrap();
    let err = OrderingClient::new(anonymous)
        .get_order(ordering::GetOrderRequest {
            order_id: paid[0].clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    let read_only = stack.token("user:reader", &["orders:read"]).unwrap();
    let mut reader_only =
        OrderingClient::new(ServiceStack::channel(&stack.ordering, Some(read_only)).unwrap());
    let refused_request = place_request(99);
    let err = reader_only
        .place_order(refused_request.clone())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let no_scope = stack.token("user:nobody", &[]).unwrap();
    let err = OrderingClient::new(ServiceStack::channel(&stack.ordering, Some(no_scope)).unwrap())
        .get_order(ordering::GetOrderRequest {
            order_id: paid[0].clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let err = reader
        .get_order(ordering::GetOrderRequest {
            order_id: refused_request.request_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::NotFound,
        "the refused order was not placed"
    );

    // The audit log holds every accepted command, once (retries are
    // answered from the stored events but audited as further attempts),
    // and the refused one.
    let records = stack.audit_records(&stack.ordering_db).await.unwrap();
    let accepted = |command_type: &str| {
        records
            .iter()
            .filter(|r| r.entry.command_type == command_type)
            .filter(|r| matches!(r.entry.outcome, AuditOutcome::Accepted))
            .filter_map(|r| r.entry.aggregate.as_ref().map(|a| a.id.clone()))
            .collect::<HashSet<_>>()
    };
    assert_eq!(accepted("order.place").len(), ORDERS);
    assert_eq!(accepted("order.pay").len(), paid.len());
    assert_eq!(accepted("order.cancel").len(), 1);
    assert!(
        records
            .iter()
            .all(|r| r.entry.principal.is_some() && r.entry.command_id.is_some()),
        "every record names its caller and command"
    );
    let refused: Vec<_> = records
        .iter()
        .filter(|r| matches!(&r.entry.outcome, AuditOutcome::Rejected { code, .. } if code == "keel.forbidden"))
        .collect();
    assert_eq!(refused.len(), 1, "the forbidden placement is audited");
    assert_eq!(refused[0].entry.principal.as_deref(), Some("user:reader"));

    // SIGTERM: both drain and exit 0.
    stack.terminate().await.unwrap();
}
