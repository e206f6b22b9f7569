//! The bounded context the tour is about: bank accounts.
//!
//! This module is what a team writes for its own domain. It depends on
//! `keel-core` alone: no database, bus or cache type appears here. The
//! examples store accounts in an event store, publish their events, project
//! them into read models and cache those, all through Keel's ports.
//!
//! Rules: an account is opened once, by an owner; deposits and withdrawals
//! are positive amounts in cents; a withdrawal may not take the balance
//! below zero; a closed account takes no more money, and only an empty
//! account may be closed.

use keel_core::{Aggregate, DomainError, DomainEvent};
use serde::{Deserialize, Serialize};

/// The state of one account, rebuilt from its events.
///
/// It is also the snapshot format (serde), so its shape is versioned by the
/// snapshot schema version the repository is configured with.
#[derive(Clone, Default, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    /// Who owns it; empty until the account is opened.
    pub owner: String,
    /// The balance in cents.
    pub balance: i64,
    /// Whether the account was closed.
    pub closed: bool,
}

impl Account {
    /// Whether the account has been opened.
    #[must_use]
    pub fn is_open(&self) -> bool {
        !self.owner.is_empty() && !self.closed
    }
}

/// What happened to an account. Stored as JSON, tagged by `type`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AccountEvent {
    /// The account was opened for `owner`.
    Opened {
        /// The owner's name.
        owner: String,
    },
    /// Money was paid in.
    Deposited {
        /// Cents, always positive.
        amount: i64,
    },
    /// Money was taken out.
    Withdrawn {
        /// Cents, always positive.
        amount: i64,
    },
    /// The account was closed; it was empty.
    Closed,
}

impl DomainEvent for AccountEvent {
    fn event_type(&self) -> &'static str {
        match self {
            AccountEvent::Opened { .. } => "account.opened",
            AccountEvent::Deposited { .. } => "account.deposited",
            AccountEvent::Withdrawn { .. } => "account.withdrawn",
            AccountEvent::Closed => "account.closed",
        }
    }
}

/// What may be asked of an account.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AccountCommand {
    /// Open the account for `owner`.
    Open {
        /// The owner's name.
        owner: String,
    },
    /// Pay `amount` cents in.
    Deposit {
        /// Cents.
        amount: i64,
    },
    /// Take `amount` cents out.
    Withdraw {
        /// Cents.
        amount: i64,
    },
    /// Close the (empty) account.
    Close,
}

impl Aggregate for Account {
    const TYPE: &'static str = "Account";
    type Id = String;
    type Event = AccountEvent;
    type Command = AccountCommand;
    type Error = DomainError;

    fn apply(&mut self, event: &AccountEvent) {
        match event {
            AccountEvent::Opened { owner } => self.owner.clone_from(owner),
            AccountEvent::Deposited { amount } => self.balance += amount,
            AccountEvent::Withdrawn { amount } => self.balance -= amount,
            AccountEvent::Closed => self.closed = true,
        }
    }

    fn handle(&self, command: AccountCommand) -> Result<Vec<AccountEvent>, DomainError> {
        match command {
            AccountCommand::Open { owner } => {
                if !self.owner.is_empty() {
                    return Err(DomainError::new(
                        "account.exists",
                        "the account is already open",
                    ));
                }
                if owner.trim().is_empty() {
                    return Err(DomainError::new(
                        "account.owner_required",
                        "an account needs an owner",
                    ));
                }
                Ok(vec![AccountEvent::Opened { owner }])
            }
            AccountCommand::Deposit { amount } => {
                self.require_open()?;
                require_positive(amount)?;
                Ok(vec![AccountEvent::Deposited { amount }])
            }
            AccountCommand::Withdraw { amount } => {
                self.require_open()?;
                require_positive(amount)?;
                if amount > self.balance {
                    return Err(DomainError::new(
                        "account.insufficient_funds",
                        format!(
                            "cannot withdraw {amount} from a balance of {}",
                            self.balance
                        ),
                    ));
                }
                Ok(vec![AccountEvent::Withdrawn { amount }])
            }
            AccountCommand::Close => {
                self.require_open()?;
                if self.balance != 0 {
                    return Err(DomainError::new(
                        "account.not_empty",
                        "only an empty account can be closed",
                    ));
                }
                Ok(vec![AccountEvent::Closed])
            }
        }
    }
}

impl Account {
    fn require_open(&self) -> Result<(), DomainError> {
        if self.is_open() {
            Ok(())
        } else {
            Err(DomainError::new(
                "account.not_open",
                "the account is not open",
            ))
        }
    }
}

fn require_positive(amount: i64) -> Result<(), DomainError> {
    if amount > 0 {
        Ok(())
    } else {
        Err(DomainError::new(
            "account.bad_amount",
            "amounts are positive cents",
        ))
    }
}

#[cfg(test)]
mod tests {
    use keel_testkit::AggregateTest;

    use super::*;

    fn opened() -> AggregateTest<Account> {
        AggregateTest::new().given([AccountEvent::Opened {
            owner: "ada".to_owned(),
        }])
    }

    #[test]
    fn a_withdrawal_may_not_overdraw() {
        opened()
            .given([AccountEvent::Deposited { amount: 100 }])
            .when(AccountCommand::Withdraw { amount: 101 })
            .then_rejected(|e| e.code() == "account.insufficient_funds");
        opened()
            .given([AccountEvent::Deposited { amount: 100 }])
            .when(AccountCommand::Withdraw { amount: 100 })
            .then([AccountEvent::Withdrawn { amount: 100 }]);
    }

    #[test]
    fn only_an_empty_account_closes_and_then_takes_no_money() {
        opened()
            .given([AccountEvent::Deposited { amount: 5 }])
            .when(AccountCommand::Close)
            .then_rejected(|e| e.code() == "account.not_empty");
        opened()
            .given([AccountEvent::Closed])
            .when(AccountCommand::Deposit { amount: 5 })
            .then_rejected(|e| e.code() == "account.not_open");
    }

    #[test]
    fn amounts_are_positive_and_accounts_open_once() {
        opened()
            .when(AccountCommand::Deposit { amount: 0 })
            .then_rejected(|e| e.code() == "account.bad_amount");
        opened()
            .when(AccountCommand::Open {
                owner: "bob".to_owned(),
            })
            .then_rejected(|e| e.code() == "account.exists");
    }
}
