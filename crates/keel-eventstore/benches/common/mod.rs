//! What the event store's bench binaries share: the workload scale and the
//! event they all write.

use keel_core::{CorrelationId, Metadata};
use keel_eventstore::NewEvent;
use serde_json::json;

/// `KEEL_BENCH_SCALE` (default 1.0): shrinks or grows every workload.
pub(crate) fn scale() -> f64 {
    std::env::var("KEEL_BENCH_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0)
}

/// `base` scaled, at least 1.
pub(crate) fn n(base: usize) -> usize {
    ((base as f64) * scale()).max(1.0) as usize
}

/// The payload of the `i`th event: an order line of about 150 bytes.
pub(crate) fn payload(i: usize) -> serde_json::Value {
    json!({
        "order_id": format!("0190a6f2-7c1e-7d3a-9b1f-{i:012}"),
        "sku": "SKU-12345",
        "quantity": 3,
        "price_cents": 1999,
        "note": "leave at the door, ring twice",
    })
}

/// The metadata every event carries: a fresh correlation id and an actor.
pub(crate) fn metadata() -> Metadata {
    Metadata::new()
        .with_correlation_id(CorrelationId::new())
        .with_actor("bench")
}

/// The `i`th event as Keel appends it.
pub(crate) fn event(i: usize) -> NewEvent {
    NewEvent::from_json("order.line_added", &payload(i)).with_metadata(metadata())
}
