//! An aggregate on `keel-core` alone: a library loan that may be extended
//! twice and must be returned before it can be extended again.
//!
//! Shows `handle` deciding (events or a domain error), `apply` folding
//! events into state, `AggregateRoot` collecting pending events, and the
//! state being rebuilt from the events alone, as a repository would.

use keel_core::{Aggregate, AggregateRoot, DomainError, DomainEvent, Version};
use serde::{Deserialize, Serialize};

use crate::Result;

/// The state of one loan, rebuilt from its events.
#[derive(Default, Debug)]
pub(crate) struct Loan {
    status: Status,
    book: String,
    extensions: u8,
}

#[derive(Default, Debug, PartialEq, Eq)]
enum Status {
    #[default]
    None,
    Lent,
    Returned,
}

/// What happened to a loan.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum LoanEvent {
    Lent { book: String, member: String },
    Extended { weeks: u8 },
    Returned,
}

impl DomainEvent for LoanEvent {
    fn event_type(&self) -> &'static str {
        match self {
            LoanEvent::Lent { .. } => "loan.lent",
            LoanEvent::Extended { .. } => "loan.extended",
            LoanEvent::Returned => "loan.returned",
        }
    }
}

/// What may be asked of a loan.
#[derive(Debug)]
pub(crate) enum LoanCommand {
    Lend { book: String, member: String },
    Extend,
    Return,
}

/// How many times a loan may be extended.
const MAX_EXTENSIONS: u8 = 2;

impl Aggregate for Loan {
    const TYPE: &'static str = "Loan";
    type Id = String;
    type Event = LoanEvent;
    type Command = LoanCommand;
    type Error = DomainError;

    fn apply(&mut self, event: &LoanEvent) {
        match event {
            LoanEvent::Lent { book, .. } => {
                self.status = Status::Lent;
                self.book.clone_from(book);
            }
            LoanEvent::Extended { .. } => self.extensions += 1,
            LoanEvent::Returned => self.status = Status::Returned,
        }
    }

    fn handle(&self, command: LoanCommand) -> std::result::Result<Vec<LoanEvent>, DomainError> {
        match (command, &self.status) {
            (LoanCommand::Lend { book, member }, Status::None) => {
                Ok(vec![LoanEvent::Lent { book, member }])
            }
            (LoanCommand::Lend { .. }, _) => Err(DomainError::new(
                "loan.exists",
                "this loan was already made",
            )),
            (LoanCommand::Extend, Status::Lent) if self.extensions >= MAX_EXTENSIONS => Err(
                DomainError::new("loan.extension_limit", "a loan may be extended twice"),
            ),
            (LoanCommand::Extend, Status::Lent) => Ok(vec![LoanEvent::Extended { weeks: 2 }]),
            (LoanCommand::Extend | LoanCommand::Return, Status::None | Status::Returned) => Err(
                DomainError::new("loan.not_lent", "the book is not lent out"),
            ),
            (LoanCommand::Return, Status::Lent) => Ok(vec![LoanEvent::Returned]),
        }
    }
}

/// Runs the example.
///
/// # Errors
///
/// When replaying the events does not give the state the commands produced.
pub async fn run() -> Result {
    let id = "loan-42".to_owned();
    tracing::info!(stream = %Loan::stream_id(&id)?, "a new loan");

    let mut loan = AggregateRoot::<Loan>::new(id.clone());
    let commands = [
        LoanCommand::Lend {
            book: "Domain-Driven Design".to_owned(),
            member: "m-7".to_owned(),
        },
        LoanCommand::Extend,
        LoanCommand::Extend,
        LoanCommand::Extend,
        LoanCommand::Return,
        LoanCommand::Return,
    ];
    for command in commands {
        let shown = format!("{command:?}");
        match loan.execute(command) {
            Ok(events) => {
                for event in &events {
                    let payload = serde_json::to_string(event)?;
                    tracing::info!(command = %shown, event_type = event.event_type(), %payload, "accepted");
                }
            }
            Err(rejected) => tracing::info!(
                command = %shown,
                code = rejected.code(),
                reason = rejected.message(),
                "rejected"
            ),
        }
    }
    tracing::info!(state = ?loan.state(), "after the commands");

    // A repository stores the pending events; loading replays them into a
    // fresh aggregate. Nothing but the events is needed to get the state back.
    let history = loan.take_pending();
    let mut reloaded = AggregateRoot::<Loan>::new(id);
    let mut version = Version::INITIAL;
    for event in &history {
        version = version.next();
        reloaded.replay(event, version);
    }
    tracing::info!(
        events = history.len(),
        version = %reloaded.version(),
        state = ?reloaded.state(),
        "rebuilt from the events alone"
    );
    if reloaded.state().extensions != loan.state().extensions
        || reloaded.state().status != loan.state().status
    {
        return Err("replaying the events gave another state".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use keel_testkit::AggregateTest;

    use super::*;

    fn lent() -> AggregateTest<Loan> {
        AggregateTest::new().given([LoanEvent::Lent {
            book: "SICP".to_owned(),
            member: "m-1".to_owned(),
        }])
    }

    #[test]
    fn a_loan_is_extended_at_most_twice() {
        lent()
            .when(LoanCommand::Extend)
            .then([LoanEvent::Extended { weeks: 2 }]);
        lent()
            .given([
                LoanEvent::Extended { weeks: 2 },
                LoanEvent::Extended { weeks: 2 },
            ])
            .when(LoanCommand::Extend)
            .then_rejected(|e| e.code() == "loan.extension_limit");
    }

    #[test]
    fn a_returned_book_cannot_be_returned_again() {
        lent()
            .given([LoanEvent::Returned])
            .when(LoanCommand::Return)
            .then_rejected(|e| e.code() == "loan.not_lent");
    }

    #[tokio::test]
    async fn the_example_runs_and_replay_gives_the_same_state() {
        run().await.unwrap();
    }
}
