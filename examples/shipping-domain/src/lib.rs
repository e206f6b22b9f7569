//! The Shipping bounded context of Keel's example services: it ships the
//! orders Ordering reports paid, once each.
//!
//! This crate is what a team writes for its own domain. It depends on
//! `keel-core` alone (plus `serde`, `chrono` and `thiserror`): no database,
//! bus, cache or gRPC type appears here, and a test in `keel-tests`
//! (`domain_dependencies`) fails if one ever does. Shipping does not share
//! Ordering's types either: it keeps its own copy of what it needs
//! ([`ShipmentLine`], [`Address`]), filled from Ordering's integration
//! events by the application layer.
//!
//! A [`Shipment`] is a state-based entity (a [`keel_core::Entity`]) stored
//! through Keel's entity repository port. One order has at most one
//! shipment: its id is derived from the order id ([`ShipmentId::for_order`]),
//! so a redelivered event finds the shipment it already made.
//!
//! Life cycle, each broken rule a typed [`ShipmentError`]:
//! - an order's placement opens a shipment [`AwaitingPayment`](ShipmentStatus::AwaitingPayment);
//! - its payment moves it to [`Preparing`](ShipmentStatus::Preparing);
//! - a preparing shipment is dispatched once, with a tracking number;
//! - an order's cancellation cancels a shipment that has not been dispatched.
//!
//! ```
//! use chrono::Utc;
//! use shipping_domain::{Address, Shipment, ShipmentLine, ShipmentStatus, ShippingEvent};
//!
//! let mut shipment = Shipment::open("o-1", vec![ShipmentLine::new("SKU-1", 2)], Address::example())?;
//! shipment.mark_paid()?;
//! let dispatched = shipment.dispatch("TRK-1", Utc::now())?;
//! assert_eq!(shipment.status(), ShipmentStatus::Dispatched);
//! assert!(matches!(dispatched, ShippingEvent::Dispatched { order_id, .. } if order_id == "o-1"));
//! # Ok::<(), shipping_domain::ShipmentError>(())
//! ```

use chrono::{DateTime, Utc};
use keel_core::{DomainError, DomainEvent, Entity};
use serde::{Deserialize, Serialize};

/// The id of a shipment: `shp-<order id>`, one per order.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ShipmentId(String);

impl ShipmentId {
    /// The id of the shipment of `order_id`.
    #[must_use]
    pub fn for_order(order_id: &str) -> Self {
        Self(format!("shp-{order_id}"))
    }

    /// The id as text.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for ShipmentId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// One product line to ship.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShipmentLine {
    /// The product's stock-keeping unit.
    pub sku: String,
    /// How many items, 1 or more.
    pub quantity: u32,
}

impl ShipmentLine {
    /// `quantity` items of `sku`.
    #[must_use]
    pub fn new(sku: impl Into<String>, quantity: u32) -> Self {
        Self {
            sku: sku.into(),
            quantity,
        }
    }
}

/// Where a shipment goes (Shipping's own copy of the order's address).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Address {
    /// Recipient name.
    pub name: String,
    /// Street and number, one or more lines.
    pub lines: Vec<String>,
    /// Postal code.
    pub postal_code: String,
    /// City.
    pub city: String,
    /// Two-letter ISO 3166-1 country code.
    pub country_code: String,
}

impl Address {
    /// A complete address, for examples and tests.
    #[must_use]
    pub fn example() -> Self {
        Self {
            name: "Ada Lovelace".to_owned(),
            lines: vec!["12 St James's Square".to_owned()],
            postal_code: "SW1Y 4JH".to_owned(),
            city: "London".to_owned(),
            country_code: "GB".to_owned(),
        }
    }
}

/// Where a shipment is in its life cycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShipmentStatus {
    /// The order was placed but not paid: nothing to ship yet.
    AwaitingPayment,
    /// Paid: being prepared for the carrier.
    Preparing,
    /// Handed to the carrier.
    Dispatched,
    /// Stopped because the order was cancelled.
    Cancelled,
}

/// The shipment of one order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shipment {
    id: ShipmentId,
    order_id: String,
    lines: Vec<ShipmentLine>,
    address: Address,
    status: ShipmentStatus,
    tracking_number: Option<String>,
    dispatched_at: Option<DateTime<Utc>>,
    cancel_reason: Option<String>,
}

impl Entity for Shipment {
    type Id = ShipmentId;
    const NAME: &'static str = "shipment";

    fn id(&self) -> &ShipmentId {
        &self.id
    }
}

impl Shipment {
    /// Opens the shipment of a placed order, awaiting its payment.
    ///
    /// # Errors
    ///
    /// [`ShipmentError::OrderIdRequired`], [`ShipmentError::NothingToShip`] or
    /// [`ShipmentError::InvalidLine`] when the order cannot be shipped as given.
    pub fn open(
        order_id: impl Into<String>,
        lines: Vec<ShipmentLine>,
        address: Address,
    ) -> Result<Self, ShipmentError> {
        let order_id = order_id.into();
        if order_id.trim().is_empty() {
            return Err(ShipmentError::OrderIdRequired);
        }
        if lines.is_empty() {
            return Err(ShipmentError::NothingToShip);
        }
        if let Some(index) = lines
            .iter()
            .position(|l| l.sku.trim().is_empty() || l.quantity == 0)
        {
            return Err(ShipmentError::InvalidLine { index });
        }
        Ok(Self {
            id: ShipmentId::for_order(&order_id),
            order_id,
            lines,
            address,
            status: ShipmentStatus::AwaitingPayment,
            tracking_number: None,
            dispatched_at: None,
            cancel_reason: None,
        })
    }

    /// The order it ships.
    #[must_use]
    pub fn order_id(&self) -> &str {
        &self.order_id
    }

    /// What it holds.
    #[must_use]
    pub fn lines(&self) -> &[ShipmentLine] {
        &self.lines
    }

    /// Where it goes.
    #[must_use]
    pub fn address(&self) -> &Address {
        &self.address
    }

    /// Where it is in its life cycle.
    #[must_use]
    pub fn status(&self) -> ShipmentStatus {
        self.status
    }

    /// The carrier's tracking number, once dispatched.
    #[must_use]
    pub fn tracking_number(&self) -> Option<&str> {
        self.tracking_number.as_deref()
    }

    /// When it was dispatched, once it was.
    #[must_use]
    pub fn dispatched_at(&self) -> Option<DateTime<Utc>> {
        self.dispatched_at
    }

    /// Why it was cancelled, if it was.
    #[must_use]
    pub fn cancel_reason(&self) -> Option<&str> {
        self.cancel_reason.as_deref()
    }

    /// The order was paid: prepare the shipment. Returns `false` when it was
    /// already past payment (a redelivered payment changes nothing).
    ///
    /// # Errors
    ///
    /// [`ShipmentError::Cancelled`] when the order was cancelled first.
    pub fn mark_paid(&mut self) -> Result<bool, ShipmentError> {
        match self.status {
            ShipmentStatus::AwaitingPayment => {
                self.status = ShipmentStatus::Preparing;
                Ok(true)
            }
            ShipmentStatus::Preparing | ShipmentStatus::Dispatched => Ok(false),
            ShipmentStatus::Cancelled => Err(ShipmentError::Cancelled),
        }
    }

    /// Hands the shipment to the carrier.
    ///
    /// # Errors
    ///
    /// [`ShipmentError::NotPaid`], [`ShipmentError::AlreadyDispatched`],
    /// [`ShipmentError::Cancelled`] or [`ShipmentError::TrackingNumberRequired`].
    pub fn dispatch(
        &mut self,
        tracking_number: impl Into<String>,
        at: DateTime<Utc>,
    ) -> Result<ShippingEvent, ShipmentError> {
        match self.status {
            ShipmentStatus::AwaitingPayment => return Err(ShipmentError::NotPaid),
            ShipmentStatus::Preparing => {}
            ShipmentStatus::Dispatched => return Err(ShipmentError::AlreadyDispatched),
            ShipmentStatus::Cancelled => return Err(ShipmentError::Cancelled),
        }
        let tracking_number = tracking_number.into();
        if tracking_number.trim().is_empty() {
            return Err(ShipmentError::TrackingNumberRequired);
        }
        self.status = ShipmentStatus::Dispatched;
        self.tracking_number = Some(tracking_number.clone());
        self.dispatched_at = Some(at);
        Ok(ShippingEvent::Dispatched {
            shipment_id: self.id.clone(),
            order_id: self.order_id.clone(),
            tracking_number,
        })
    }

    /// The order was cancelled: stop the shipment. Returns `None` when it was
    /// cancelled already (a redelivered cancellation changes nothing).
    ///
    /// # Errors
    ///
    /// [`ShipmentError::AlreadyDispatched`]: a dispatched shipment cannot be
    /// called back.
    pub fn cancel(
        &mut self,
        reason: impl Into<String>,
    ) -> Result<Option<ShippingEvent>, ShipmentError> {
        match self.status {
            ShipmentStatus::AwaitingPayment | ShipmentStatus::Preparing => {
                let reason = reason.into();
                self.status = ShipmentStatus::Cancelled;
                self.cancel_reason = Some(reason.clone());
                Ok(Some(ShippingEvent::Cancelled {
                    shipment_id: self.id.clone(),
                    order_id: self.order_id.clone(),
                    reason,
                }))
            }
            ShipmentStatus::Dispatched => Err(ShipmentError::AlreadyDispatched),
            ShipmentStatus::Cancelled => Ok(None),
        }
    }
}

/// What Shipping tells the world (through its outbox).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ShippingEvent {
    /// A shipment left the warehouse (`shipment.dispatched`).
    Dispatched {
        /// The shipment's id.
        shipment_id: ShipmentId,
        /// The order it ships.
        order_id: String,
        /// The carrier's tracking number.
        tracking_number: String,
    },
    /// A shipment was stopped because its order was cancelled
    /// (`shipment.cancelled`).
    Cancelled {
        /// The shipment's id.
        shipment_id: ShipmentId,
        /// The order.
        order_id: String,
        /// The order's cancellation reason.
        reason: String,
    },
}

impl DomainEvent for ShippingEvent {
    fn event_type(&self) -> &'static str {
        match self {
            ShippingEvent::Dispatched { .. } => "shipment.dispatched",
            ShippingEvent::Cancelled { .. } => "shipment.cancelled",
        }
    }
}

/// A rule of the Shipping context was broken. Each variant has a stable
/// [`code`](ShipmentError::code) and converts into a [`DomainError`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ShipmentError {
    /// The shipment names no order.
    #[error("a shipment needs an order id")]
    OrderIdRequired,
    /// The order has no lines.
    #[error("there is nothing to ship")]
    NothingToShip,
    /// A line has no SKU or a zero quantity.
    #[error("line {index} has no SKU or a zero quantity")]
    InvalidLine {
        /// The line's index, from 0.
        index: usize,
    },
    /// The order has not been paid.
    #[error("the order has not been paid")]
    NotPaid,
    /// The shipment was dispatched already.
    #[error("the shipment was dispatched already")]
    AlreadyDispatched,
    /// The shipment was cancelled.
    #[error("the shipment was cancelled")]
    Cancelled,
    /// A dispatch without a tracking number.
    #[error("a dispatch needs a tracking number")]
    TrackingNumberRequired,
}

impl ShipmentError {
    /// A stable, machine-readable code, e.g. `shipment.not_paid`.
    #[must_use]
    pub fn code(&self) -> &'static str {
        match self {
            ShipmentError::OrderIdRequired => "shipment.order_id_required",
            ShipmentError::NothingToShip => "shipment.nothing_to_ship",
            ShipmentError::InvalidLine { .. } => "shipment.invalid_line",
            ShipmentError::NotPaid => "shipment.not_paid",
            ShipmentError::AlreadyDispatched => "shipment.already_dispatched",
            ShipmentError::Cancelled => "shipment.cancelled",
            ShipmentError::TrackingNumberRequired => "shipment.tracking_number_required",
        }
    }
}

impl From<ShipmentError> for DomainError {
    fn from(e: ShipmentError) -> Self {
        DomainError::new(e.code(), e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open() -> Shipment {
        Shipment::open(
            "o-1",
            vec![ShipmentLine::new("SKU-1", 2)],
            Address::example(),
        )
        .expect("a valid shipment")
    }

    fn preparing() -> Shipment {
        let mut s = open();
        assert!(s.mark_paid().expect("paid"));
        s
    }

    #[test]
    fn one_shipment_per_order_and_malformed_orders_are_refused() {
        let s = open();
        assert_eq!(s.id(), &ShipmentId::for_order("o-1"));
        assert_eq!(s.id().as_str(), "shp-o-1");
        assert_eq!(s.status(), ShipmentStatus::AwaitingPayment);
        let a = Address::example;
        assert_eq!(
            Shipment::open(" ", vec![ShipmentLine::new("S", 1)], a()),
            Err(ShipmentError::OrderIdRequired)
        );
        assert_eq!(
            Shipment::open("o", vec![], a()),
            Err(ShipmentError::NothingToShip)
        );
        assert_eq!(
            Shipment::open(
                "o",
                vec![ShipmentLine::new("S", 1), ShipmentLine::new("T", 0)],
                a()
            ),
            Err(ShipmentError::InvalidLine { index: 1 })
        );
    }

    #[test]
    fn only_a_paid_shipment_dispatches_and_only_once() {
        let now = Utc::now();
        let mut s = open();
        assert_eq!(s.dispatch("T", now), Err(ShipmentError::NotPaid));
        let mut s2 = preparing();
        assert_eq!(
            s2.dispatch(" ", now),
            Err(ShipmentError::TrackingNumberRequired)
        );
        assert_eq!(s2.status(), ShipmentStatus::Preparing, "nothing half-done");
        let event = s2.dispatch("TRK-1", now).expect("dispatched");
        assert_eq!(event.event_type(), "shipment.dispatched");
        assert_eq!(s2.tracking_number(), Some("TRK-1"));
        assert_eq!(s2.dispatched_at(), Some(now));
        assert_eq!(
            s2.dispatch("TRK-2", now),
            Err(ShipmentError::AlreadyDispatched)
        );
        assert_eq!(s2.tracking_number(), Some("TRK-1"));
        // A redelivered payment after dispatch changes nothing.
        assert_eq!(s2.mark_paid(), Ok(false));
        assert_eq!(s2.status(), ShipmentStatus::Dispatched);
    }

    #[test]
    fn cancelling_stops_an_undispatched_shipment_once() {
        let mut s = preparing();
        let event = s.cancel("customer").expect("cancelled").expect("an event");
        assert_eq!(event.event_type(), "shipment.cancelled");
        assert_eq!(s.cancel_reason(), Some("customer"));
        assert_eq!(s.cancel("again"), Ok(None));
        assert_eq!(s.mark_paid(), Err(ShipmentError::Cancelled));
        assert_eq!(s.dispatch("T", Utc::now()), Err(ShipmentError::Cancelled));
        let mut d = preparing();
        d.dispatch("T", Utc::now()).expect("dispatched");
        assert_eq!(d.cancel("late"), Err(ShipmentError::AlreadyDispatched));
        assert_eq!(d.status(), ShipmentStatus::Dispatched);
    }

    #[test]
    fn a_shipment_round_trips_through_json_and_errors_map_to_domain_errors() {
        let mut s = preparing();
        s.dispatch("TRK", Utc::now()).expect("dispatched");
        let json = serde_json::to_string(&s).expect("serialize");
        let back: Shipment = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(back, s);
        let domain: DomainError = ShipmentError::NotPaid.into();
        assert_eq!(domain.code(), "shipment.not_paid");
    }
}
