//! The end-of-run check: every paid order dispatched exactly once, no
//! cancelled order shipped, and both services agree.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use keel_proto::examples::ordering::v1 as ordering;
use keel_proto::examples::shipping::v1 as shipping;
use keel_tests::load::{DispatchObserver, LoadConfig};

use crate::BoxError;
use crate::driver::Driven;
use crate::services::Running;

/// What the check found (all of it must be empty or zero for a pass).
#[derive(Debug, Default)]
pub(crate) struct Verified {
    /// Paid orders checked.
    pub(crate) paid: usize,
    /// Cancelled orders checked.
    pub(crate) cancelled: usize,
    /// Paid orders the observer never saw dispatched.
    pub(crate) missing: Vec<String>,
    /// Orders with more than one distinct dispatch event.
    pub(crate) duplicates: Vec<(String, usize)>,
    /// Cancelled orders that were dispatched anyway.
    pub(crate) cancelled_dispatched: Vec<String>,
    /// Orders whose state in Shipping or Ordering is not what it should
    /// be, with what was found.
    pub(crate) wrong_state: Vec<String>,
    /// Failed commands during the run.
    pub(crate) failed_commands: u64,
}

impl Verified {
    fn passed(&self) -> bool {
        self.missing.is_empty()
            && self.duplicates.is_empty()
            && self.cancelled_dispatched.is_empty()
            && self.wrong_state.is_empty()
            && self.failed_commands == 0
    }
}

/// Checks the outcome through the observer and both services' read APIs;
/// an error lists what went wrong.
pub(crate) async fn check(
    config: &LoadConfig,
    running: &Running,
    driven: &Driven,
    observer: &DispatchObserver,
) -> Result<Verified, BoxError> {
    let paid: Vec<String> = lock(&driven.pay_started).keys().cloned().collect();
    let cancelled: Vec<String> = lock(&driven.cancelled_ids).clone();
    let mut found = Verified {
        paid: paid.len(),
        cancelled: cancelled.len(),
        failed_commands: driven.failed.load(Ordering::Relaxed),
        ..Verified::default()
    };
    found.missing = paid
        .iter()
        .filter(|id| observer.dispatch(id).is_none())
        .cloned()
        .collect();
    found.duplicates = observer.duplicates();
    found.cancelled_dispatched = cancelled
        .iter()
        .filter(|id| observer.dispatch(id).is_some())
        .cloned()
        .collect();

    // Both services' own view, every order. Ordering learns of the
    // shipment from the same event a moment later, so it gets a while.
    let cancelled_set: HashSet<&String> = cancelled.iter().collect();
    let all: Vec<&String> = paid.iter().chain(cancelled.iter()).collect();
    let deadline = Instant::now() + config.settle;
    let wrong: Vec<String> = futures::stream::iter(all)
        .map(|id| {
            let is_cancelled = cancelled_set.contains(id);
            async move { state_of(running, id, is_cancelled, deadline).await.err() }
        })
        .buffer_unordered(config.concurrency)
        .filter_map(|w| async move { w })
        .collect()
        .await;
    found.wrong_state = wrong;
    found.wrong_state.sort();

    if found.passed() {
        Ok(found)
    } else {
        Err(format!(
            "the run lost or duplicated work: {} failed commands (first: {:?}); {} paid orders never dispatched {:?}; \
             {} dispatched twice {:?}; {} cancelled but dispatched {:?}; {} in the wrong state {:?}",
            found.failed_commands,
            lock(&driven.errors).first(),
            found.missing.len(),
            first(&found.missing),
            found.duplicates.len(),
            first(&found.duplicates),
            found.cancelled_dispatched.len(),
            first(&found.cancelled_dispatched),
            found.wrong_state.len(),
            first(&found.wrong_state),
        )
        .into())
    }
}

/// Checks one order in both services; `Err` says what is wrong.
async fn state_of(
    running: &Running,
    order_id: &str,
    cancelled: bool,
    deadline: Instant,
) -> Result<(), String> {
    let mut shipping_client = running.shipping_client();
    let shipment = shipping_client
        .get_shipment(shipping::GetShipmentRequest {
            order_id: order_id.to_owned(),
        })
        .await
        .map(|r| r.into_inner().shipment);
    let dispatched = matches!(
        &shipment,
        Ok(Some(s)) if s.status == shipping::ShipmentStatus::Dispatched as i32 && !s.tracking_number.is_empty()
    );
    if dispatched == cancelled {
        return Err(format!("{order_id}: Shipping has {shipment:?}"));
    }
    let want = if cancelled {
        ordering::OrderStatus::Cancelled
    } else {
        ordering::OrderStatus::Shipped
    };
    let mut ordering_client = running.ordering_client();
    loop {
        let order = ordering_client
            .get_order(ordering::GetOrderRequest {
                order_id: order_id.to_owned(),
            })
            .await
            .map(|r| r.into_inner().order.map(|o| o.status));
        match order {
            Ok(Some(status)) if status == want as i32 => return Ok(()),
            other if Instant::now() > deadline => {
                return Err(format!("{order_id}: Ordering has {other:?}, not {want:?}"));
            }
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

fn first<T>(items: &[T]) -> &[T] {
    &items[..items.len().min(5)]
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
