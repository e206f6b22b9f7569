//! Watching the other context's effect: a consumer of Shipping's
//! `shipment.dispatched` events that notes when each order's first
//! dispatch arrived and how many distinct dispatch events it had.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use async_trait::async_trait;
use keel_core::{Delivery, EventHandler, EventId, HandlerError};

/// The event type the observer records.
pub const DISPATCHED: &str = "shipment.dispatched";

/// What the observer saw of one order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dispatch {
    /// When the first dispatch of the order arrived here.
    pub first_seen: Instant,
    /// The distinct event ids of its dispatch events (more than one means
    /// Shipping dispatched the order twice).
    pub event_ids: Vec<EventId>,
}

/// An [`EventHandler`] for Shipping's shipments topic, on its own
/// subscription (its own consumer name), so that it sees every event
/// without taking any from Ordering's consumer.
///
/// A redelivery of an event it already has (same event id) only counts as
/// a redelivery; a second event id for the same order is a duplicate
/// dispatch. A `shipment.dispatched` without an `order_id` is rejected
/// (dead-lettered) and counted, so that a change of payload cannot pass
/// silently as "nothing dispatched".
#[derive(Debug, Default)]
pub struct DispatchObserver {
    orders: Mutex<HashMap<String, Dispatch>>,
    deliveries: AtomicU64,
    redeliveries: AtomicU64,
    other_events: AtomicU64,
    unreadable: AtomicU64,
}

impl DispatchObserver {
    /// An observer that has seen nothing.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Records one `shipment.dispatched` event for `order_id` arriving at
    /// `at`. Returns whether it was the order's first.
    pub fn record(&self, order_id: &str, event_id: EventId, at: Instant) -> bool {
        let mut orders = self.lock();
        match orders.get_mut(order_id) {
            None => {
                orders.insert(
                    order_id.to_owned(),
                    Dispatch {
                        first_seen: at,
                        event_ids: vec![event_id],
                    },
                );
                true
            }
            Some(seen) => {
                if seen.event_ids.contains(&event_id) {
                    self.redeliveries.fetch_add(1, Ordering::Relaxed);
                } else {
                    seen.event_ids.push(event_id);
                }
                false
            }
        }
    }

    /// What was seen of `order_id`, if anything.
    #[must_use]
    pub fn dispatch(&self, order_id: &str) -> Option<Dispatch> {
        self.lock().get(order_id).cloned()
    }

    /// How many distinct orders were dispatched.
    #[must_use]
    pub fn orders(&self) -> usize {
        self.lock().len()
    }

    /// Orders with more than one distinct dispatch event, with their
    /// count, sorted by order id.
    #[must_use]
    pub fn duplicates(&self) -> Vec<(String, usize)> {
        let mut found: Vec<_> = self
            .lock()
            .iter()
            .filter(|(_, d)| d.event_ids.len() > 1)
            .map(|(id, d)| (id.clone(), d.event_ids.len()))
            .collect();
        found.sort();
        found
    }

    /// Every delivery handled, redeliveries and other event types included.
    #[must_use]
    pub fn deliveries(&self) -> u64 {
        self.deliveries.load(Ordering::Relaxed)
    }

    /// Deliveries of an event id already recorded (at-least-once at work).
    #[must_use]
    pub fn redeliveries(&self) -> u64 {
        self.redeliveries.load(Ordering::Relaxed)
    }

    /// Deliveries of other event types on the topic (ignored).
    #[must_use]
    pub fn other_events(&self) -> u64 {
        self.other_events.load(Ordering::Relaxed)
    }

    /// `shipment.dispatched` events without a readable `order_id`.
    #[must_use]
    pub fn unreadable(&self) -> u64 {
        self.unreadable.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Dispatch>> {
        self.orders
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[async_trait]
impl EventHandler for DispatchObserver {
    async fn handle(&self, delivery: &Delivery) -> Result<(), HandlerError> {
        let at = Instant::now();
        self.deliveries.fetch_add(1, Ordering::Relaxed);
        let message = &delivery.message;
        if message.event_type != DISPATCHED {
            self.other_events.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        let Some(order_id) = message.payload.get("order_id").and_then(|v| v.as_str()) else {
            self.unreadable.fetch_add(1, Ordering::Relaxed);
            return Err(HandlerError::reject(format!(
                "{DISPATCHED} {} has no order_id",
                message.event_id
            )));
        };
        self.record(order_id, message.event_id, at);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use keel_core::{EventPublisher, Message};
    use keel_eventbus::{EventBus, InMemoryBus, SubscriptionConfig};
    use serde_json::json;

    use super::*;

    fn dispatched(order: &str) -> Message {
        Message::new(
            DISPATCHED,
            json!({ "order_id": order, "tracking_number": "T" }),
        )
    }

    #[tokio::test]
    async fn counts_orders_duplicates_and_redeliveries_through_a_bus() {
        let bus = InMemoryBus::new();
        let observer = Arc::new(DispatchObserver::new());
        let sub = bus
            .subscribe(
                "shipments",
                &SubscriptionConfig::new("load-observer"),
                observer.clone(),
            )
            .await
            .unwrap();
        let first = dispatched("o-1");
        let again = first.clone(); // the same event, published twice
        let twice = dispatched("o-2");
        let twice_more = dispatched("o-2"); // a second dispatch of o-2
        let other = Message::new("stock.insufficient", json!({ "order_id": "o-3" }));
        let broken = Message::new(DISPATCHED, json!({ "shipment_id": "s" }));
        bus.publish(
            "shipments",
            &[first, again, twice, twice_more, other, broken],
        )
        .await
        .unwrap();

        let deadline = Instant::now() + Duration::from_secs(5);
        while observer.deliveries() < 6 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        sub.shutdown().await;

        assert_eq!(observer.orders(), 2);
        assert_eq!(observer.duplicates(), vec![("o-2".to_owned(), 2)]);
        assert_eq!(observer.redeliveries(), 1);
        assert_eq!(observer.other_events(), 1);
        assert_eq!(observer.unreadable(), 1);
        assert!(observer.dispatch("o-3").is_none());
        assert_eq!(observer.dispatch("o-1").unwrap().event_ids.len(), 1);
    }

    #[test]
    fn the_first_arrival_is_kept() {
        let observer = DispatchObserver::new();
        let id = EventId::new();
        let early = Instant::now();
        assert!(observer.record("o", id, early));
        assert!(!observer.record("o", id, early + Duration::from_secs(1)));
        assert_eq!(observer.dispatch("o").unwrap().first_seen, early);
        assert!(observer.duplicates().is_empty());
    }
}
