use keel_core::{Aggregate, AggregateRoot, DomainError, DomainEvent, Version};
use keel_testkit::AggregateTest;

use super::*;

fn eur(amount: i64) -> Money {
    Money::new("EUR", amount)
}

fn place() -> OrderCommand {
    OrderCommand::Place {
        customer_id: "c-1".to_owned(),
        lines: vec![
            OrderLine::new("SKU-1", 2, eur(1_250)),
            OrderLine::new("SKU-2", 1, eur(99)),
        ],
        address: Address::example(),
    }
}

fn placed() -> AggregateTest<Order> {
    AggregateTest::new().given_commands([place()])
}

fn paid() -> AggregateTest<Order> {
    placed().given([OrderEvent::Paid {
        amount: eur(2_599),
        payment_reference: "psp-1".to_owned(),
    }])
}

fn pay(amount: i64) -> OrderCommand {
    OrderCommand::Pay {
        amount: eur(amount),
        payment_reference: "psp-1".to_owned(),
    }
}

#[test]
fn placing_sums_the_lines_and_records_everything_shipping_needs() {
    AggregateTest::<Order>::new()
        .when(place())
        .then([OrderEvent::Placed {
            customer_id: "c-1".to_owned(),
            lines: vec![
                OrderLine::new("SKU-1", 2, eur(1_250)),
                OrderLine::new("SKU-2", 1, eur(99)),
            ],
            address: Address::example(),
            total: eur(2_599),
        }])
        .and_state(|o| {
            assert_eq!(o.status(), OrderStatus::Placed);
            assert_eq!(o.total(), Some(&eur(2_599)));
        });
    placed()
        .when(place())
        .then_rejected(|e| *e == OrderError::AlreadyPlaced);
}

#[test]
fn a_malformed_order_is_refused_with_the_rule_it_breaks() {
    let with = |customer: &str, lines: Vec<OrderLine>, address: Address| OrderCommand::Place {
        customer_id: customer.to_owned(),
        lines,
        address,
    };
    let one = || vec![OrderLine::new("SKU-1", 1, eur(1))];
    let new = AggregateTest::<Order>::new;
    new()
        .when(with(" ", one(), Address::example()))
        .then_rejected(|e| *e == OrderError::CustomerRequired);
    new()
        .when(with("c", vec![], Address::example()))
        .then_rejected(|e| *e == OrderError::NoLines);
    new()
        .when(with(
            "c",
            vec![
                OrderLine::new("SKU-1", 1, eur(1)),
                OrderLine::new("SKU-2", 0, eur(1)),
            ],
            Address::example(),
        ))
        .then_rejected(|e| matches!(e, OrderError::InvalidLine { index: 1, .. }));
    new()
        .when(with(
            "c",
            vec![OrderLine::new("", 1, eur(1))],
            Address::example(),
        ))
        .then_rejected(|e| e.code() == "order.invalid_line");
    new()
        .when(with(
            "c",
            vec![OrderLine::new("S", 1, eur(-1))],
            Address::example(),
        ))
        .then_rejected(|e| e.code() == "order.invalid_line");
    new()
        .when(with(
            "c",
            vec![
                OrderLine::new("S", 1, eur(1)),
                OrderLine::new("T", 1, Money::new("USD", 1)),
            ],
            Address::example(),
        ))
        .then_rejected(|e| matches!(e, OrderError::MixedCurrencies { index: 1, .. }));
    new()
        .when(with(
            "c",
            vec![OrderLine::new("S", u32::MAX, eur(i64::MAX / 2))],
            Address::example(),
        ))
        .then_rejected(|e| *e == OrderError::TotalOverflow);
    new()
        .when(with("c", one(), Address::default()))
        .then_rejected(|e| *e == OrderError::IncompleteAddress);
    let lowercase_country = Address {
        country_code: "gb".to_owned(),
        ..Address::example()
    };
    new()
        .when(with("c", one(), lowercase_country))
        .then_rejected(|e| *e == OrderError::IncompleteAddress);
}

#[test]
fn an_order_is_paid_once_with_exactly_its_total() {
    AggregateTest::<Order>::new()
        .when(pay(1))
        .then_rejected(|e| *e == OrderError::NotPlaced);
    placed().when(pay(2_598)).then_rejected(|e| {
        *e == OrderError::AmountMismatch {
            expected: eur(2_599),
            actual: eur(2_598),
        }
    });
    placed()
        .when(OrderCommand::Pay {
            amount: Money::new("USD", 2_599),
            payment_reference: "psp-1".to_owned(),
        })
        .then_rejected(|e| e.code() == "order.amount_mismatch");
    placed()
        .when(OrderCommand::Pay {
            amount: eur(2_599),
            payment_reference: String::new(),
        })
        .then_rejected(|e| *e == OrderError::PaymentReferenceRequired);
    placed()
        .when(pay(2_599))
        .then([OrderEvent::Paid {
            amount: eur(2_599),
            payment_reference: "psp-1".to_owned(),
        }])
        .and_state(|o| {
            assert_eq!(o.status(), OrderStatus::Paid);
            assert_eq!(o.payment_reference(), Some("psp-1"));
        });
    paid()
        .when(pay(2_599))
        .then_rejected(|e| *e == OrderError::AlreadyPaid);
}

#[test]
fn cancelling_needs_a_reason_and_an_unshipped_order() {
    let cancel = |reason: &str| OrderCommand::Cancel {
        reason: reason.to_owned(),
    };
    placed()
        .when(cancel(""))
        .then_rejected(|e| *e == OrderError::ReasonRequired);
    paid()
        .when(cancel("changed my mind"))
        .then([OrderEvent::Cancelled {
            reason: "changed my mind".to_owned(),
        }]);
    placed()
        .given([OrderEvent::Cancelled {
            reason: "x".to_owned(),
        }])
        .when(pay(2_599))
        .then_rejected(|e| *e == OrderError::Cancelled);
    placed()
        .given([OrderEvent::Cancelled {
            reason: "x".to_owned(),
        }])
        .when(cancel("again"))
        .then_rejected(|e| *e == OrderError::Cancelled);
    paid()
        .given([OrderEvent::Shipped {
            tracking_number: "T1".to_owned(),
        }])
        .when(cancel("too late"))
        .then_rejected(|e| *e == OrderError::AlreadyShipped);
}

#[test]
fn only_a_paid_order_ships_and_only_once() {
    let ship = || OrderCommand::MarkShipped {
        tracking_number: "T1".to_owned(),
    };
    placed()
        .when(ship())
        .then_rejected(|e| *e == OrderError::NotPaid);
    paid()
        .when(ship())
        .then([OrderEvent::Shipped {
            tracking_number: "T1".to_owned(),
        }])
        .and_state(|o| assert_eq!(o.status(), OrderStatus::Shipped));
    paid()
        .given_commands([ship()])
        .when(ship())
        .then_rejected(|e| *e == OrderError::AlreadyShipped);
}

#[test]
fn event_names_match_the_published_contract_and_errors_map_to_domain_errors() {
    let names: Vec<&str> = [
        OrderEvent::Placed {
            customer_id: String::new(),
            lines: vec![],
            address: Address::default(),
            total: eur(0),
        },
        OrderEvent::Paid {
            amount: eur(0),
            payment_reference: String::new(),
        },
        OrderEvent::Cancelled {
            reason: String::new(),
        },
        OrderEvent::Shipped {
            tracking_number: String::new(),
        },
    ]
    .iter()
    .map(DomainEvent::event_type)
    .collect();
    assert_eq!(
        names,
        [
            "order.placed",
            "order.paid",
            "order.cancelled",
            "order.shipped"
        ]
    );
    let domain: DomainError = OrderError::AlreadyPaid.into();
    assert_eq!(domain.code(), "order.already_paid");
    assert_eq!(domain.message(), "the order was paid already");
}

#[test]
fn the_state_round_trips_as_a_snapshot() {
    let mut root = AggregateRoot::<Order>::new("o-1".to_owned());
    root.execute(place()).expect("placed");
    root.execute(pay(2_599)).expect("paid");
    let json = serde_json::to_string(root.state()).expect("serialize");
    let restored: Order = serde_json::from_str(&json).expect("deserialize");
    assert_eq!(&restored, root.state());
    // A snapshot taken at version 2 continues exactly like the replayed root.
    let mut from_snapshot = AggregateRoot::from_parts("o-1".to_owned(), Version::new(2), restored);
    from_snapshot
        .execute(OrderCommand::Cancel {
            reason: "r".to_owned(),
        })
        .expect("cancelled");
    assert_eq!(from_snapshot.state().status(), OrderStatus::Cancelled);
    assert_eq!(
        Order::stream_id(&"o-1".to_owned())
            .expect("stream id")
            .as_str(),
        "Order-o-1"
    );
}
