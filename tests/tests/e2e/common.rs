//! What the process tests share: orders over gRPC with retries through a
//! restart, waiting for an outcome, and reading both services' databases.

use std::future::Future;
use std::time::{Duration, Instant};

use keel_grpc::proto::examples::ordering::v1 as ordering_api;
use keel_grpc::proto::examples::shipping::v1 as shipping_api;
use keel_tests::services::{Error, OrderingClient, ShippingClient};
use tonic::Code;

/// One service stack at a time: each is two processes on a shared, small
/// machine, and the tests are about correctness, not contention.
pub(crate) static ONE_STACK_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The price of the one line every test order has, in euro cents.
pub(crate) const PRICE: i64 = 450;

/// Polls `check` every 100 ms until it returns `Some`, failing with `what`
/// after `limit`.
pub(crate) async fn wait_for<T, F, Fut>(
    what: &str,
    limit: Duration,
    mut check: F,
) -> Result<T, Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>, Error>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check().await? {
            return Ok(value);
        }
        if Instant::now() > deadline {
            return Err(format!("timed out after {limit:?} waiting for {what}").into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether a call failed because the service was down or went down
/// during it: worth the same call again (same request id) once it is back.
fn transient(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded
    )
}

/// Runs `call` until it succeeds, retrying transient failures for up to a
/// minute: what a client does across a restart.
async fn retrying<T, F, Fut>(what: &str, mut call: F) -> Result<T, Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, tonic::Status>>,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match call().await {
            Ok(value) => return Ok(value),
            Err(status) if transient(&status) && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(status) => return Err(format!("{what}: {status}").into()),
        }
    }
}

/// A shipping address whose name makes the order easy to find.
pub(crate) fn address(name: &str) -> ordering_api::Address {
    ordering_api::Address {
        name: name.to_owned(),
        lines: vec!["1 Harbour Street".to_owned()],
        postal_code: "10115".to_owned(),
        city: "Berlin".to_owned(),
        country_code: "DE".to_owned(),
    }
}

/// Places an order of one tea for `customer`, shipped to `recipient`, and
/// pays it; retried through restarts with the same request ids, so a retry
/// never makes a second order or payment. Returns the order id.
pub(crate) async fn place_and_pay(
    ordering: &OrderingClient,
    customer: &str,
    recipient: &str,
) -> Result<String, Error> {
    let place_id = uuid::Uuid::new_v4().to_string();
    let placed = retrying("PlaceOrder", || {
        let mut client = ordering.clone();
        let request = ordering_api::PlaceOrderRequest {
            request_id: place_id.clone(),
            customer_id: customer.to_owned(),
            lines: vec![ordering_api::OrderLine {
                sku: "SKU-TEA".to_owned(),
                quantity: 1,
                unit_price: Some(euro(PRICE)),
            }],
            shipping_address: Some(address(recipient)),
        };
        async move { client.place_order(request).await }
    })
    .await?
    .into_inner();
    let pay_id = uuid::Uuid::new_v4().to_string();
    retrying("PayOrder", || {
        let mut client = ordering.clone();
        let request = ordering_api::PayOrderRequest {
            request_id: pay_id.clone(),
            order_id: placed.order_id.clone(),
            amount: Some(euro(PRICE)),
            payment_reference: format!("psp-{}", placed.order_id),
            expected_version: None,
        };
        async move { client.pay_order(request).await }
    })
    .await?;
    Ok(placed.order_id)
}

/// `amount` euro cents.
pub(crate) fn euro(amount: i64) -> ordering_api::Money {
    ordering_api::Money {
        currency_code: "EUR".to_owned(),
        amount_minor: amount,
    }
}

/// The order's status as Ordering reports it.
pub(crate) async fn order_status(
    ordering: &OrderingClient,
    order_id: &str,
) -> Result<ordering_api::OrderStatus, Error> {
    let order = retrying("GetOrder", || {
        let mut client = ordering.clone();
        let request = ordering_api::GetOrderRequest {
            order_id: order_id.to_owned(),
        };
        async move { client.get_order(request).await }
    })
    .await?
    .into_inner()
    .order
    .ok_or("GetOrder answered without an order")?;
    Ok(order.status())
}

/// The order's shipment as Shipping reports it, `None` before it exists.
pub(crate) async fn shipment(
    shipping: &ShippingClient,
    order_id: &str,
) -> Result<Option<shipping_api::Shipment>, Error> {
    let mut client = shipping.clone();
    match client
        .get_shipment(shipping_api::GetShipmentRequest {
            order_id: order_id.to_owned(),
        })
        .await
    {
        Ok(response) => Ok(response.into_inner().shipment),
        Err(status) if status.code() == Code::NotFound => Ok(None),
        Err(status) => Err(format!("GetShipment {order_id}: {status}").into()),
    }
}

/// Waits until Ordering shows every order in `orders` shipped.
pub(crate) async fn wait_all_shipped(
    ordering: &OrderingClient,
    orders: &[String],
    limit: Duration,
) -> Result<(), Error> {
    let deadline = Instant::now() + limit;
    let mut waiting: Vec<&String> = orders.iter().collect();
    loop {
        let mut still = Vec::new();
        for id in waiting {
            if order_status(ordering, id).await? != ordering_api::OrderStatus::Shipped {
                still.push(id);
            }
        }
        waiting = still;
        if waiting.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{} of {} orders not shipped after {limit:?}, e.g. {}",
                waiting.len(),
                orders.len(),
                waiting[0]
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until Shipping's database holds a dispatched shipment for every
/// order in `orders`.
///
/// It reads the table, not `GetShipment`: that call reads through
/// Shipping's cache, and a read that loads a shipment while the dispatch
/// commits can put the old state back after the dispatch's eviction, where
/// it stays for the cache's TTL (a minute), so polling the API can wait a
/// minute after the fact. Ask the API once everything is dispatched.
pub(crate) async fn wait_all_dispatched(
    shipping_db: &sqlx::PgPool,
    orders: &[String],
    limit: Duration,
) -> Result<(), Error> {
    let deadline = Instant::now() + limit;
    loop {
        let dispatched: std::collections::HashSet<String> = sqlx::query_scalar(
            "SELECT order_id FROM keel_examples_shipments \
             WHERE shipment->>'status' = 'dispatched'",
        )
        .fetch_all(shipping_db)
        .await?
        .into_iter()
        .collect();
        let waiting: Vec<&String> = orders
            .iter()
            .filter(|id| !dispatched.contains(*id))
            .collect();
        if waiting.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{} of {} orders not dispatched by Shipping after {limit:?}, e.g. {}",
                waiting.len(),
                orders.len(),
                waiting[0]
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A pool on `url` (a test database of the stack).
pub(crate) async fn pool(url: &str) -> Result<sqlx::PgPool, Error> {
    Ok(sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(url)
        .await?)
}
