//! Keel's ports and shared kernel.
//!
//! `keel-core` is the one Keel crate that domain code depends on. It holds
//! the vocabulary of a domain-driven service, with no database, broker or
//! runtime in sight:
//!
//! * [`Aggregate`], [`AggregateRoot`] and the [`AggregateRepository`] port;
//! * [`DomainEvent`], [`EventEnvelope`] and [`Metadata`] (correlation,
//!   causation, W3C trace context, actor, tenant);
//! * typed ids ([`EventId`] is a UUID v7, [`StreamId`] is validated),
//!   [`Version`], [`ExpectedVersion`] and [`Position`];
//! * the other ports: [`EntityRepository`] with pagination types,
//!   [`EventPublisher`] and [`EventHandler`], [`Cache`] and [`Clock`], and
//!   the [`AuditLog`] port;
//! * the command pipeline's types: [`Command`], [`CommandEnvelope`] (with the
//!   caller's [`Principal`]), [`CommandHandler`] and [`HandlerService`], the
//!   innermost `tower::Service` that tracing, authentication, authorization,
//!   audit and unit-of-work layers wrap;
//! * the error taxonomy: infrastructure [`Error`] (kind, stable code,
//!   retryable flag) apart from domain errors ([`DomainError`],
//!   [`CommandError`]).
//!
//! Adapter crates (`keel-eventstore`, `keel-eventbus`, `keel-repository`,
//! `keel-cache`, …) implement these ports; every port also has an in-memory
//! implementation for tests.
//!
//! # Example
//!
//! ```
//! use keel_core::{Aggregate, AggregateRoot, DomainError, DomainEvent};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Default, Debug)]
//! struct Account { balance: i64, open: bool }
//!
//! #[derive(Clone, Debug, Serialize, Deserialize)]
//! enum AccountEvent { Opened, Deposited { amount: i64 } }
//!
//! impl DomainEvent for AccountEvent {
//!     fn event_type(&self) -> &'static str {
//!         match self {
//!             AccountEvent::Opened => "account.opened",
//!             AccountEvent::Deposited { .. } => "account.deposited",
//!         }
//!     }
//! }
//!
//! enum AccountCommand { Open, Deposit(i64) }
//!
//! impl Aggregate for Account {
//!     const TYPE: &'static str = "Account";
//!     type Id = String;
//!     type Event = AccountEvent;
//!     type Command = AccountCommand;
//!     type Error = DomainError;
//!
//!     fn apply(&mut self, event: &AccountEvent) {
//!         match event {
//!             AccountEvent::Opened => self.open = true,
//!             AccountEvent::Deposited { amount } => self.balance += amount,
//!         }
//!     }
//!
//!     fn handle(&self, command: AccountCommand) -> Result<Vec<AccountEvent>, DomainError> {
//!         match command {
//!             AccountCommand::Open if self.open => {
//!                 Err(DomainError::new("account.already_open", "account is already open"))
//!             }
//!             AccountCommand::Open => Ok(vec![AccountEvent::Opened]),
//!             AccountCommand::Deposit(_) if !self.open => {
//!                 Err(DomainError::new("account.closed", "account is not open"))
//!             }
//!             AccountCommand::Deposit(amount) => Ok(vec![AccountEvent::Deposited { amount }]),
//!         }
//!     }
//! }
//!
//! let mut account = AccountRoot::new("acc-1".to_owned());
//! # type AccountRoot = AggregateRoot<Account>;
//! account.execute(AccountCommand::Open).unwrap();
//! account.execute(AccountCommand::Deposit(40)).unwrap();
//! assert_eq!(account.state().balance, 40);
//! assert_eq!(Account::stream_id(account.id()).unwrap().as_str(), "Account-acc-1");
//! ```
//!
//! # Feature flags
//!
//! `keel-core` has no optional features.

pub mod aggregate;
pub mod command;
pub mod error;
pub mod event;
pub mod id;
pub mod ports;
pub mod principal;
pub mod uow;
pub mod version;

pub use aggregate::{Aggregate, AggregateRepository, AggregateRoot};
pub use command::{
    AggregateRef, BearerToken, Command, CommandEnvelope, CommandHandler, Handled, HandlerService,
    PipelineError, TransactionalHandler, TransactionalService,
};
pub use error::{
    BoxError, CommandError, DomainError, Error, ErrorDescription, ErrorKind, InvalidInput, Result,
    VersionConflict,
};
pub use event::{DomainEvent, EventEnvelope, Metadata, TraceContext};
pub use id::{
    CausationId, CommandId, CorrelationId, EventId, MAX_STREAM_ID_LEN, StreamId, TenantId,
};
pub use ports::audit::{
    AuditAppender, AuditEntry, AuditLog, AuditOutcome, AuditPage, AuditQuery, AuditRecord,
    ChainVerification,
};
pub use ports::bus::{Delivery, EventHandler, EventPublisher, HandlerError, Message};
pub use ports::cache::{Cache, CacheExt};
pub use ports::clock::{Clock, ManualClock, SystemClock};
pub use ports::entity::{
    Cursor, Deleted, Direction, Entity, EntityReader, EntityRepository, EntityWriter, Filter,
    FilterValue, ListQuery, Page, PageRequest, SortKey, Stored,
};
pub use ports::health::{HealthCheck, HealthReport, HealthStatus, Probe, ProbeLimits};
pub use principal::Principal;
pub use uow::{Transaction, TransactionSource};
pub use version::{ExpectedVersion, Position, Version};

#[doc(hidden)]
pub mod __private {
    //! Re-exports used by Keel's macros; not a public API.
    pub use uuid::Uuid;
}
