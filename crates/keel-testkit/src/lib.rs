//! Test kit for Keel and for the services built on it.
//!
//! `keel-testkit` is a dev-dependency: Keel's own crates and the bounded-context
//! services that use Keel take it into their `[dev-dependencies]` to test
//! against real PostgreSQL, Redis and Pub/Sub without hand-made setup. It
//! provides:
//!
//! * [`AggregateTest`]: given/when/then tests for a
//!   [`keel_core::Aggregate`], with failure messages that show the expected
//!   and actual events;
//! * [`TestDatabase`]: a fresh PostgreSQL database per test, cloned in
//!   milliseconds from a template that already has the migrations applied,
//!   dropped afterwards;
//! * [`services`]: finds the PostgreSQL, Redis and Pub/Sub emulator a test
//!   should use (environment variable, default local port, testcontainers,
//!   or local binaries it starts once per test run and stops afterwards), or
//!   fails with a message saying exactly what is missing;
//! * [`ThrowawayPostgres`]: a private PostgreSQL cluster a fault-injection
//!   test may stop, start, restart or crash, and, made with
//!   [`ThrowawayPostgres::with_wal_archive`], back up with `pg_basebackup`,
//!   recover to a point in time ([`RecoveryTarget`]) into a new cluster, or
//!   dump and restore with `pg_dump` / `pg_restore`;
//! * [`contract_tests!`]: runs one contract suite against every
//!   implementation of a port (see [its docs](contract_tests!) for how a
//!   crate lays out its suite).
//!
//! # Example
//!
//! ```
//! use keel_core::{Aggregate, DomainError, DomainEvent};
//! use keel_testkit::AggregateTest;
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Default, Debug)]
//! struct Door { locked: bool }
//!
//! #[derive(Clone, Debug, Serialize, Deserialize)]
//! enum DoorEvent { Locked, Unlocked }
//! impl DomainEvent for DoorEvent {
//!     fn event_type(&self) -> &'static str {
//!         match self { DoorEvent::Locked => "door.locked", DoorEvent::Unlocked => "door.unlocked" }
//!     }
//! }
//!
//! enum DoorCommand { Lock, Unlock }
//!
//! impl Aggregate for Door {
//!     const TYPE: &'static str = "Door";
//!     type Id = u32;
//!     type Event = DoorEvent;
//!     type Command = DoorCommand;
//!     type Error = DomainError;
//!     fn apply(&mut self, event: &DoorEvent) { self.locked = matches!(event, DoorEvent::Locked); }
//!     fn handle(&self, command: DoorCommand) -> Result<Vec<DoorEvent>, DomainError> {
//!         match command {
//!             DoorCommand::Lock if self.locked => Err(DomainError::new("door.locked", "already locked")),
//!             DoorCommand::Lock => Ok(vec![DoorEvent::Locked]),
//!             DoorCommand::Unlock if !self.locked => Ok(vec![]),
//!             DoorCommand::Unlock => Ok(vec![DoorEvent::Unlocked]),
//!         }
//!     }
//! }
//!
//! AggregateTest::<Door>::new()
//!     .given([DoorEvent::Locked])
//!     .when(DoorCommand::Unlock)
//!     .then([DoorEvent::Unlocked]);
//!
//! AggregateTest::<Door>::new()
//!     .given([DoorEvent::Locked])
//!     .when(DoorCommand::Lock)
//!     .then_rejected(|e| e.code() == "door.locked");
//! ```
//!
//! A test against PostgreSQL (the test kit finds or starts the server):
//!
//! ```no_run
//! # static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate::Migrator::DEFAULT;
//! #[tokio::test]
//! async fn stores_orders() {
//!     let db = keel_testkit::TestDatabase::create(&MIGRATOR).await.unwrap();
//!     sqlx::query("SELECT 1").execute(db.pool()).await.unwrap();
//! } // the database is dropped here
//! ```
//!
//! # Services in tests
//!
//! Nothing needs to run before `cargo test`: for each service the test kit
//! takes, in order, the environment variable (`DATABASE_URL`, `REDIS_URL`,
//! `PUBSUB_EMULATOR_HOST`), the default local port, a container (with the
//! `testcontainers` feature and a Docker engine), or the locally installed
//! binaries, which it starts once for the whole test run, shared by all test
//! processes, and stops when the run is over. The [`services`] module
//! documents the order, the sharing scheme and the `KEEL_TESTKIT_*`
//! settings. Tests share servers, never data: each test takes its own
//! database ([`TestDatabase`]), key prefix (Redis) or topic names (Pub/Sub).
//!
//! # Feature flags
//!
//! | feature | default | effect |
//! |---|---|---|
//! | `testcontainers` | off | Start PostgreSQL, Redis and the Pub/Sub emulator in Docker containers (testcontainers) when no environment variable or default local service provides them and a Docker engine is reachable. |

mod aggregate;
mod backup;
mod contract;
mod database;
mod error;
mod pg;
mod schema;
pub mod services;
mod sys;
mod throwaway;

pub use aggregate::{AggregateTest, Outcome, RejectionCheck, Verified};
pub use backup::{BaseBackup, RecoveryTarget};
pub use database::{TEMPLATE_PREFIX, TestDatabase};
pub use error::{Error, Result};
pub use schema::{ApplyFuture, BoxError, Schema};
pub use throwaway::ThrowawayPostgres;
