//! Driving orders through Ordering's gRPC API with bounded concurrency.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use futures::StreamExt as _;
use keel_proto::examples::ordering::v1 as api;
use keel_tests::load::{LatencyRecorder, LoadConfig};

use crate::services::OrderingClient;

/// How many distinct products the orders use.
const SKUS: usize = 20;

/// The product of order `n`.
fn sku(n: usize) -> String {
    format!("LOAD-SKU-{:02}", n % SKUS)
}

/// The quantity of order `n`'s single line (1 to 3).
fn quantity(n: usize) -> u32 {
    u32::try_from(n % 3 + 1).unwrap_or(1)
}

/// What the driver did, counted as it went.
#[derive(Debug, Default)]
pub(crate) struct Driven {
    pub(crate) placed: AtomicU64,
    pub(crate) paid: AtomicU64,
    pub(crate) cancelled: AtomicU64,
    pub(crate) failed: AtomicU64,
    /// PlaceOrder call latency.
    pub(crate) place: LatencyRecorder,
    /// PayOrder call latency.
    pub(crate) pay: LatencyRecorder,
    /// CancelOrder call latency.
    pub(crate) cancel: LatencyRecorder,
    /// When each paid order's PayOrder call started, by order id (orders
    /// whose payment was accepted only).
    pub(crate) pay_started: Mutex<HashMap<String, Instant>>,
    /// The ids of cancelled orders.
    pub(crate) cancelled_ids: Mutex<Vec<String>>,
    /// The first few failures, for the report.
    pub(crate) errors: Mutex<Vec<String>>,
}

impl Driven {
    pub(crate) fn commands(&self) -> u64 {
        self.placed.load(Ordering::Relaxed)
            + self.paid.load(Ordering::Relaxed)
            + self.cancelled.load(Ordering::Relaxed)
    }

    fn fail(&self, what: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let mut errors = self
            .errors
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if errors.len() < 10 {
            errors.push(what);
        }
    }
}

/// Places `config.orders` orders, `config.concurrency` at a time (and no
/// faster than `config.rate` per second, when set); pays each (or cancels
/// every `cancel_every`-th) right after placing it.
pub(crate) async fn drive(config: &LoadConfig, client: &OrderingClient, driven: &Driven) {
    let start = tokio::time::Instant::now();
    futures::stream::iter(0..config.orders)
        .for_each_concurrent(config.concurrency, |n| {
            let mut client = client.clone();
            async move {
                tokio::time::sleep_until(start + config.start_offset(n)).await;
                if let Err(e) = one_order(config, &mut client, driven, n).await {
                    driven.fail(format!("order #{n}: {e}"));
                }
            }
        })
        .await;
}

async fn one_order(
    config: &LoadConfig,
    client: &mut OrderingClient,
    driven: &Driven,
    n: usize,
) -> Result<(), tonic::Status> {
    let unit_price = api::Money {
        currency_code: "EUR".to_owned(),
        amount_minor: 450,
    };
    let place = api::PlaceOrderRequest {
        request_id: uuid::Uuid::now_v7().to_string(),
        customer_id: format!("load-customer-{}", n % 500),
        lines: vec![api::OrderLine {
            sku: sku(n),
            quantity: quantity(n),
            unit_price: Some(unit_price),
        }],
        shipping_address: Some(api::Address {
            name: format!("Load Tester {n}"),
            lines: vec![format!("{} Bench Street", n % 200 + 1)],
            postal_code: "10115".to_owned(),
            city: "Berlin".to_owned(),
            country_code: "DE".to_owned(),
        }),
    };
    let start = Instant::now();
    let placed = client.place_order(place).await?.into_inner();
    driven.place.record(start.elapsed());
    driven.placed.fetch_add(1, Ordering::Relaxed);

    if config.cancels(n) {
        let cancel = api::CancelOrderRequest {
            request_id: uuid::Uuid::now_v7().to_string(),
            order_id: placed.order_id.clone(),
            reason: "load run: every n-th order is cancelled".to_owned(),
            expected_version: Some(placed.version),
        };
        let start = Instant::now();
        client.cancel_order(cancel).await?;
        driven.cancel.record(start.elapsed());
        driven.cancelled.fetch_add(1, Ordering::Relaxed);
        lock(&driven.cancelled_ids).push(placed.order_id);
    } else {
        let pay = api::PayOrderRequest {
            request_id: uuid::Uuid::now_v7().to_string(),
            order_id: placed.order_id.clone(),
            amount: placed.total,
            payment_reference: format!("load-payment-{n}"),
            expected_version: Some(placed.version),
        };
        // The end-to-end latency runs from the moment the client asks for
        // the payment; only orders whose payment was accepted count.
        let start = Instant::now();
        client.pay_order(pay).await?;
        driven.pay.record(start.elapsed());
        driven.paid.fetch_add(1, Ordering::Relaxed);
        lock(&driven.pay_started).insert(placed.order_id, start);
    }
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
