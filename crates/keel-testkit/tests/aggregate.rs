//! Given/when/then: passing tests, and the messages of failing ones.

use keel_core::{Aggregate, DomainError, DomainEvent};
use keel_testkit::AggregateTest;
use serde::{Deserialize, Serialize};

#[derive(Default, Debug)]
struct Ticket {
    open: bool,
    seats: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
enum TicketEvent {
    Opened { seats: u32 },
    Booked { seat: u32 },
    Closed,
}

impl DomainEvent for TicketEvent {
    fn event_type(&self) -> &'static str {
        match self {
            TicketEvent::Opened { .. } => "ticket.opened",
            TicketEvent::Booked { .. } => "ticket.booked",
            TicketEvent::Closed => "ticket.closed",
        }
    }
}

enum TicketCommand {
    Open(u32),
    Book,
    Close,
}

impl Aggregate for Ticket {
    const TYPE: &'static str = "Ticket";
    type Id = u32;
    type Event = TicketEvent;
    type Command = TicketCommand;
    type Error = DomainError;

    fn apply(&mut self, event: &TicketEvent) {
        match event {
            TicketEvent::Opened { seats } => {
                self.open = true;
                self.seats = *seats;
            }
            TicketEvent::Booked { .. } => self.seats -= 1,
            TicketEvent::Closed => self.open = false,
        }
    }

    fn handle(&self, command: TicketCommand) -> Result<Vec<TicketEvent>, DomainError> {
        match command {
            TicketCommand::Open(seats) => Ok(vec![TicketEvent::Opened { seats }]),
            TicketCommand::Book if !self.open => {
                Err(DomainError::new("ticket.closed", "booking is closed"))
            }
            TicketCommand::Book if self.seats == 0 => {
                Err(DomainError::new("ticket.sold_out", "no seat left"))
            }
            TicketCommand::Book => Ok(vec![TicketEvent::Booked { seat: self.seats }]),
            TicketCommand::Close if !self.open => Ok(vec![]),
            TicketCommand::Close => Ok(vec![TicketEvent::Closed]),
        }
    }
}

fn opened(seats: u32) -> AggregateTest<Ticket> {
    AggregateTest::new().given([TicketEvent::Opened { seats }])
}

#[test]
fn then_checks_the_events_and_returns_the_new_state() {
    let verified = opened(2)
        .when(TicketCommand::Book)
        .then([TicketEvent::Booked { seat: 2 }]);
    assert_eq!(verified.state().seats, 1);
    assert_eq!(verified.events().len(), 1);
    verified.and_state(|t| assert!(t.open));
}

#[test]
fn given_commands_build_history_through_the_rules() {
    AggregateTest::<Ticket>::new()
        .given_commands([TicketCommand::Open(1), TicketCommand::Book])
        .when(TicketCommand::Book)
        .then_rejected(|e| e.code() == "ticket.sold_out");
}

#[test]
fn then_nothing_accepts_an_idempotent_command() {
    AggregateTest::<Ticket>::new()
        .when(TicketCommand::Close)
        .then_nothing();
}

#[test]
fn then_rejected_takes_asserting_closures_and_messages() {
    AggregateTest::<Ticket>::new()
        .when(TicketCommand::Book)
        .then_rejected(|e| assert_eq!(e.code(), "ticket.closed"));
    AggregateTest::<Ticket>::new()
        .when(TicketCommand::Book)
        .then_rejected_with("booking is closed");
}

#[test]
fn result_gives_raw_access() {
    let outcome = opened(0).when(TicketCommand::Book);
    assert_eq!(outcome.result().unwrap_err().code(), "ticket.sold_out");
}

#[test]
#[should_panic(
    expected = "first difference at event #1: expected ticket.booked {\"Booked\":{\"seat\":1}}, got ticket.booked {\"Booked\":{\"seat\":2}}"
)]
fn other_events_fail_with_the_first_difference() {
    let _ = opened(2)
        .when(TicketCommand::Book)
        .then([TicketEvent::Booked { seat: 1 }]);
}

#[test]
#[should_panic(expected = "expected 2 event(s), got 1")]
fn missing_events_fail() {
    let _ = opened(2)
        .when(TicketCommand::Book)
        .then([TicketEvent::Booked { seat: 2 }, TicketEvent::Closed]);
}

#[test]
#[should_panic(
    expected = "expected the command to record 1 event(s), but it was rejected: no seat left"
)]
fn an_unexpected_rejection_fails_with_the_error() {
    let _ = opened(0)
        .when(TicketCommand::Book)
        .then([TicketEvent::Booked { seat: 1 }]);
}

#[test]
#[should_panic(expected = "expected the command to be rejected, but it recorded 1 event(s)")]
fn an_unexpected_success_fails() {
    opened(1).when(TicketCommand::Book).then_rejected(|_| true);
}

#[test]
#[should_panic(expected = "the command was rejected, but not as expected")]
fn the_wrong_rejection_fails() {
    opened(0)
        .when(TicketCommand::Book)
        .then_rejected(|e| e.code() == "ticket.closed");
}

#[test]
#[should_panic(expected = "given command #2 was rejected")]
fn a_rejected_given_command_fails_early() {
    let _ = AggregateTest::<Ticket>::new()
        .given_commands([TicketCommand::Open(0), TicketCommand::Book]);
}
