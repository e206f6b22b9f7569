//! The two-context run (Ordering and Shipping) on in-memory adapters,
//! checked from the outside through the summary it returns. The run checks
//! its own invariants too (it reads both contexts' state); this test pins
//! the numbers a reader of the summary relies on.

use keel_examples::Services;
use keel_examples::contexts::{self, ORDERS};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_paid_order_ships_once_and_the_poison_message_is_dead_lettered_then_replayed() {
    let summary = contexts::run(&Services::in_memory())
        .await
        .unwrap_or_else(|e| panic!("the contexts run failed: {e}"));
    let paid = ORDERS - 1;
    assert_eq!(summary.placed, ORDERS);
    assert_eq!(summary.paid, paid);
    assert_eq!(summary.cancelled, 1);
    // Shipped in both contexts, and dispatched exactly once each although
    // the replayed dead letter paid the first order a second time.
    assert_eq!(summary.shipped, paid);
    assert_eq!(summary.dispatches, paid as u64);
    assert_eq!(summary.dead_letters, 1);
    assert_eq!(summary.replayed, 1);
    // placed, paid and shipped events, plus one cancellation.
    assert_eq!(summary.events, ORDERS + 2 * paid + 1);
    // Every stored order event reached Shipping, and the poison message at
    // least twice (rejected, then replayed).
    assert!(
        summary.deliveries >= summary.events as u64 + 2,
        "{summary:?}"
    );
}
