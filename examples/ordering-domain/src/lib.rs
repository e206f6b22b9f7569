//! The Ordering bounded context of Keel's example services: customers place
//! orders, pay for them and cancel them, and Shipping reports them shipped.
//!
//! This crate is what a team writes for its own domain. It depends on
//! `keel-core` alone (plus `serde` and `thiserror`): no database, bus,
//! cache or gRPC type appears here, and a test in `keel-tests`
//! (`domain_dependencies`) fails if one ever does. The application layer
//! stores [`Order`] in Keel's event store, which takes snapshots of the
//! state (it is `serde`), and publishes its [`OrderEvent`]s as integration
//! events under the names of `proto/examples/ordering/v1/ordering.proto`
//! (`order.placed`, `order.paid`, `order.cancelled`, plus `order.shipped`).
//!
//! Rules, each broken one a typed [`OrderError`]:
//! - an order is placed once, by a customer, with at least one line, every
//!   line a SKU, a quantity of 1 or more and a non-negative price, all in
//!   one currency, and a complete shipping address;
//! - a placed order is paid once, with exactly its total;
//! - an order that has not shipped may be cancelled, once, with a reason;
//! - only a paid order ships, once.
//!
//! ```
//! use keel_core::AggregateRoot;
//! use ordering_domain::{Address, Money, Order, OrderCommand, OrderLine, OrderStatus};
//!
//! let mut order = AggregateRoot::<Order>::new("o-1".to_owned());
//! order.execute(OrderCommand::Place {
//!     customer_id: "c-7".to_owned(),
//!     lines: vec![OrderLine::new("SKU-1", 2, Money::new("EUR", 1_250))],
//!     address: Address::example(),
//! })?;
//! order.execute(OrderCommand::Pay {
//!     amount: Money::new("EUR", 2_500),
//!     payment_reference: "psp-42".to_owned(),
//! })?;
//! assert_eq!(order.state().status(), OrderStatus::Paid);
//! assert_eq!(order.pending().len(), 2);
//! # Ok::<(), ordering_domain::OrderError>(())
//! ```

use keel_core::{Aggregate, DomainError, DomainEvent};
use serde::{Deserialize, Serialize};

/// The aggregate type name: the prefix of every order's stream id.
pub const AGGREGATE_TYPE: &str = "Order";

/// An amount of money in minor units (cents) of an ISO 4217 currency.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Money {
    /// Three-letter ISO 4217 code, e.g. `EUR`.
    pub currency_code: String,
    /// The amount in the currency's minor unit.
    pub amount_minor: i64,
}

impl Money {
    /// `amount_minor` minor units of `currency_code`.
    #[must_use]
    pub fn new(currency_code: impl Into<String>, amount_minor: i64) -> Self {
        Self {
            currency_code: currency_code.into(),
            amount_minor,
        }
    }
}

impl std::fmt::Display for Money {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.amount_minor, self.currency_code)
    }
}

/// One product line of an order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderLine {
    /// The product's stock-keeping unit.
    pub sku: String,
    /// How many items, 1 or more.
    pub quantity: u32,
    /// The price of one item.
    pub unit_price: Money,
}

impl OrderLine {
    /// `quantity` items of `sku` at `unit_price` each.
    #[must_use]
    pub fn new(sku: impl Into<String>, quantity: u32, unit_price: Money) -> Self {
        Self {
            sku: sku.into(),
            quantity,
            unit_price,
        }
    }
}

/// Where an order is shipped to.
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

    fn is_complete(&self) -> bool {
        !self.name.trim().is_empty()
            && self.lines.iter().any(|l| !l.trim().is_empty())
            && !self.city.trim().is_empty()
            && self.country_code.len() == 2
            && self.country_code.chars().all(|c| c.is_ascii_uppercase())
    }
}

/// Where an order is in its life cycle.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OrderStatus {
    /// Not placed yet: the state of a stream with no events.
    #[default]
    New,
    /// Placed, waiting for payment.
    Placed,
    /// Paid, waiting for shipping.
    Paid,
    /// Shipped by the Shipping context.
    Shipped,
    /// Cancelled before it shipped.
    Cancelled,
}

/// The state of one order, rebuilt from its events.
///
/// It is also the snapshot format (`serde`); its shape is versioned by the
/// snapshot schema version the repository is configured with.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    status: OrderStatus,
    customer_id: String,
    lines: Vec<OrderLine>,
    address: Address,
    total: Option<Money>,
    payment_reference: Option<String>,
}

impl Order {
    /// Where the order is in its life cycle.
    #[must_use]
    pub fn status(&self) -> OrderStatus {
        self.status
    }

    /// Who placed it; empty before it is placed.
    #[must_use]
    pub fn customer_id(&self) -> &str {
        &self.customer_id
    }

    /// What was ordered.
    #[must_use]
    pub fn lines(&self) -> &[OrderLine] {
        &self.lines
    }

    /// Where it goes.
    #[must_use]
    pub fn address(&self) -> &Address {
        &self.address
    }

    /// The sum of the lines; `None` before the order is placed.
    #[must_use]
    pub fn total(&self) -> Option<&Money> {
        self.total.as_ref()
    }

    /// The payment provider's reference, once paid.
    #[must_use]
    pub fn payment_reference(&self) -> Option<&str> {
        self.payment_reference.as_deref()
    }
}

/// What happened to an order. Stored as JSON, tagged by `type`; these are
/// also the integration events Ordering publishes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum OrderEvent {
    /// The order was placed (`order.placed`).
    Placed {
        /// Who placed it.
        customer_id: String,
        /// What was ordered.
        lines: Vec<OrderLine>,
        /// Where it goes.
        address: Address,
        /// The sum of the lines.
        total: Money,
    },
    /// The order was paid (`order.paid`).
    Paid {
        /// The amount paid: the order's total.
        amount: Money,
        /// The payment provider's reference.
        payment_reference: String,
    },
    /// The order was cancelled before it shipped (`order.cancelled`).
    Cancelled {
        /// Why.
        reason: String,
    },
    /// Shipping dispatched the order (`order.shipped`).
    Shipped {
        /// The carrier's tracking number.
        tracking_number: String,
    },
}

impl DomainEvent for OrderEvent {
    fn event_type(&self) -> &'static str {
        match self {
            OrderEvent::Placed { .. } => "order.placed",
            OrderEvent::Paid { .. } => "order.paid",
            OrderEvent::Cancelled { .. } => "order.cancelled",
            OrderEvent::Shipped { .. } => "order.shipped",
        }
    }
}

/// What may be asked of an order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OrderCommand {
    /// Place the order.
    Place {
        /// Who places it.
        customer_id: String,
        /// What is ordered; at least one line.
        lines: Vec<OrderLine>,
        /// Where to ship it.
        address: Address,
    },
    /// Record its payment.
    Pay {
        /// The amount paid; must equal the total.
        amount: Money,
        /// The payment provider's reference.
        payment_reference: String,
    },
    /// Cancel it before it ships.
    Cancel {
        /// Why, for the audit trail.
        reason: String,
    },
    /// Record that Shipping dispatched it.
    MarkShipped {
        /// The carrier's tracking number.
        tracking_number: String,
    },
}

/// A rule of the Ordering context was broken. Each variant has a stable
/// [`code`](OrderError::code), and converts into a [`DomainError`] for the
/// layers that speak `keel-core`'s error kinds.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OrderError {
    /// The order was placed already.
    #[error("the order was placed already")]
    AlreadyPlaced,
    /// The order does not exist yet.
    #[error("the order has not been placed")]
    NotPlaced,
    /// The order names no customer.
    #[error("an order needs a customer")]
    CustomerRequired,
    /// The order has no lines.
    #[error("an order needs at least one line")]
    NoLines,
    /// A line is malformed (empty SKU, zero quantity, negative price).
    #[error("line {index} is invalid: {reason}")]
    InvalidLine {
        /// The line's index, from 0.
        index: usize,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Lines are priced in more than one currency.
    #[error("all lines must be in {expected}, line {index} is in {actual}")]
    MixedCurrencies {
        /// The first line's currency.
        expected: String,
        /// The offending currency.
        actual: String,
        /// The offending line's index.
        index: usize,
    },
    /// The total does not fit in 64 bits.
    #[error("the order's total is too large")]
    TotalOverflow,
    /// The shipping address misses a name, street, city or country code.
    #[error("the shipping address is incomplete")]
    IncompleteAddress,
    /// The order was paid already.
    #[error("the order was paid already")]
    AlreadyPaid,
    /// The payment does not match the total.
    #[error("the payment of {actual} does not match the total of {expected}")]
    AmountMismatch {
        /// The order's total.
        expected: Money,
        /// What was paid.
        actual: Money,
    },
    /// The payment carries no reference.
    #[error("a payment needs the provider's reference")]
    PaymentReferenceRequired,
    /// The order was cancelled.
    #[error("the order was cancelled")]
    Cancelled,
    /// The order has shipped.
    #[error("the order has shipped")]
    AlreadyShipped,
    /// A cancellation without a reason.
    #[error("a cancellation needs a reason")]
    ReasonRequired,
    /// Shipping an order that is not paid.
    #[error("only a paid order ships")]
    NotPaid,
}

impl OrderError {
    /// A stable, machine-readable code, e.g. `order.amount_mismatch`.
    #[must_use]
    pub fn code(&self) -> &'static str {
        match self {
            OrderError::AlreadyPlaced => "order.already_placed",
            OrderError::NotPlaced => "order.not_placed",
            OrderError::CustomerRequired => "order.customer_required",
            OrderError::NoLines => "order.no_lines",
            OrderError::InvalidLine { .. } => "order.invalid_line",
            OrderError::MixedCurrencies { .. } => "order.mixed_currencies",
            OrderError::TotalOverflow => "order.total_overflow",
            OrderError::IncompleteAddress => "order.incomplete_address",
            OrderError::AlreadyPaid => "order.already_paid",
            OrderError::AmountMismatch { .. } => "order.amount_mismatch",
            OrderError::PaymentReferenceRequired => "order.payment_reference_required",
            OrderError::Cancelled => "order.cancelled",
            OrderError::AlreadyShipped => "order.already_shipped",
            OrderError::ReasonRequired => "order.reason_required",
            OrderError::NotPaid => "order.not_paid",
        }
    }
}

impl From<OrderError> for DomainError {
    fn from(e: OrderError) -> Self {
        DomainError::new(e.code(), e.to_string())
    }
}

impl Aggregate for Order {
    const TYPE: &'static str = AGGREGATE_TYPE;
    type Id = String;
    type Event = OrderEvent;
    type Command = OrderCommand;
    type Error = OrderError;

    fn apply(&mut self, event: &OrderEvent) {
        match event {
            OrderEvent::Placed {
                customer_id,
                lines,
                address,
                total,
            } => {
                self.status = OrderStatus::Placed;
                self.customer_id.clone_from(customer_id);
                self.lines.clone_from(lines);
                self.address.clone_from(address);
                self.total = Some(total.clone());
            }
            OrderEvent::Paid {
                payment_reference, ..
            } => {
                self.status = OrderStatus::Paid;
                self.payment_reference = Some(payment_reference.clone());
            }
            OrderEvent::Cancelled { .. } => self.status = OrderStatus::Cancelled,
            OrderEvent::Shipped { .. } => self.status = OrderStatus::Shipped,
        }
    }

    fn handle(&self, command: OrderCommand) -> Result<Vec<OrderEvent>, OrderError> {
        match command {
            OrderCommand::Place {
                customer_id,
                lines,
                address,
            } => {
                if self.status != OrderStatus::New {
                    return Err(OrderError::AlreadyPlaced);
                }
                if customer_id.trim().is_empty() {
                    return Err(OrderError::CustomerRequired);
                }
                let total = total_of(&lines)?;
                if !address.is_complete() {
                    return Err(OrderError::IncompleteAddress);
                }
                Ok(vec![OrderEvent::Placed {
                    customer_id,
                    lines,
                    address,
                    total,
                }])
            }
            OrderCommand::Pay {
                amount,
                payment_reference,
            } => {
                match self.status {
                    OrderStatus::New => return Err(OrderError::NotPlaced),
                    OrderStatus::Placed => {}
                    OrderStatus::Paid | OrderStatus::Shipped => {
                        return Err(OrderError::AlreadyPaid);
                    }
                    OrderStatus::Cancelled => return Err(OrderError::Cancelled),
                }
                let expected = self.total.clone().ok_or(OrderError::NotPlaced)?;
                if amount != expected {
                    return Err(OrderError::AmountMismatch {
                        expected,
                        actual: amount,
                    });
                }
                if payment_reference.trim().is_empty() {
                    return Err(OrderError::PaymentReferenceRequired);
                }
                Ok(vec![OrderEvent::Paid {
                    amount,
                    payment_reference,
                }])
            }
            OrderCommand::Cancel { reason } => {
                match self.status {
                    OrderStatus::New => return Err(OrderError::NotPlaced),
                    OrderStatus::Placed | OrderStatus::Paid => {}
                    OrderStatus::Shipped => return Err(OrderError::AlreadyShipped),
                    OrderStatus::Cancelled => return Err(OrderError::Cancelled),
                }
                if reason.trim().is_empty() {
                    return Err(OrderError::ReasonRequired);
                }
                Ok(vec![OrderEvent::Cancelled { reason }])
            }
            OrderCommand::MarkShipped { tracking_number } => match self.status {
                OrderStatus::New => Err(OrderError::NotPlaced),
                OrderStatus::Placed => Err(OrderError::NotPaid),
                OrderStatus::Paid => Ok(vec![OrderEvent::Shipped { tracking_number }]),
                OrderStatus::Shipped => Err(OrderError::AlreadyShipped),
                OrderStatus::Cancelled => Err(OrderError::Cancelled),
            },
        }
    }
}

/// Checks every line and sums them, in one currency.
fn total_of(lines: &[OrderLine]) -> Result<Money, OrderError> {
    let first = lines.first().ok_or(OrderError::NoLines)?;
    let currency = &first.unit_price.currency_code;
    let mut total: i64 = 0;
    for (index, line) in lines.iter().enumerate() {
        let invalid = |reason| OrderError::InvalidLine { index, reason };
        if line.sku.trim().is_empty() {
            return Err(invalid("the SKU is empty"));
        }
        if line.quantity == 0 {
            return Err(invalid("the quantity is zero"));
        }
        if line.unit_price.amount_minor < 0 {
            return Err(invalid("the price is negative"));
        }
        if &line.unit_price.currency_code != currency {
            return Err(OrderError::MixedCurrencies {
                expected: currency.clone(),
                actual: line.unit_price.currency_code.clone(),
                index,
            });
        }
        total = line
            .unit_price
            .amount_minor
            .checked_mul(i64::from(line.quantity))
            .and_then(|l| total.checked_add(l))
            .ok_or(OrderError::TotalOverflow)?;
    }
    Ok(Money::new(currency.clone(), total))
}

#[cfg(test)]
mod tests;
