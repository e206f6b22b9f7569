//! PostgreSQL plumbing for Keel: the connection pool, units of work,
//! health checks, error classification and migrations.
//!
//! Every Keel adapter that stores data in PostgreSQL (the event store, the
//! outbox, repositories, the audit log) shares one [`Database`] and writes
//! through one [`UnitOfWork`], so an aggregate's events, its outbox
//! messages and its read-model rows commit or roll back together. Services
//! build the [`Database`] once, in their composition root.
//!
//! * [`DatabaseConfig`]: builder and environment variables (`DATABASE_URL`,
//!   `KEEL_DB_MAX_CONNECTIONS`, …), validated up front; defaults min 10 /
//!   max 100 connections, 5 s acquire timeout, 30 s statement timeout; TLS
//!   through rustls.
//! * [`Database`]: the pool. [`Database::connect`] fails fast on a wrong
//!   host, password or database; broken connections are replaced by
//!   themselves after a server restart; a connection given back inside a
//!   transaction (a `BEGIN` cancelled in flight) is closed, never reused
//!   ([`close_unclean_connections`] adds the same check to a pool you
//!   build yourself).
//! * [`UnitOfWork`]: a transaction with savepoints, rollback on drop and
//!   after-commit hooks; [`Database::transaction`] runs a closure in one and
//!   retries serialization failures and deadlocks with jittered backoff.
//! * [`UnitOfWork`] is also Keel's [`Transaction`](keel_core::Transaction)
//!   port and [`Database`] its [`TransactionSource`](keel_core::TransactionSource):
//!   every PostgreSQL adapter (event store, aggregate repository, entity
//!   repository, outbox, inbox, audit log) joins one with `within(tx)`, and
//!   the command pipeline's
//!   [`TransactionalService`](keel_core::command::TransactionalService)
//!   runs each command in one (`docs/command-pipeline.md`).
//! * [`DatabaseError`] and the predicates [`is_unique_violation`],
//!   [`is_serialization_failure`], [`is_connection_error`], … classify
//!   failures by SQLSTATE and constraint name; [`to_keel`] maps them onto
//!   [`keel_core::Error`] (connection failures and transaction conflicts
//!   are retryable).
//! * [`DatabaseReadiness`] and [`DatabaseLiveness`] implement the
//!   [`keel_core::HealthCheck`] port.
//! * [`migrate()`] and [`Database::migrate`] apply Keel's migrations (the
//!   base set [`MIGRATIONS`] and each linked crate's `MIGRATIONS`), with a
//!   history of their own (`keel.schema_history`), beside the service's own
//!   sqlx migrations (see [`migrate`](mod@migrate)).
//!
//! # Example
//!
//! ```no_run
//! use keel_database::{Database, DatabaseConfig, DatabaseError, TransactionOptions};
//!
//! # async fn run() -> Result<(), DatabaseError> {
//! // DATABASE_URL=postgres://app:secret@localhost:5432/orders
//! let db = Database::connect(DatabaseConfig::from_env()?).await?;
//! // Keel's base schema; add each linked crate's set, e.g.
//! // db.migrate(&[&keel_eventstore::MIGRATIONS, &keel_outbox::MIGRATIONS])
//! db.migrate(&[]).await?;
//!
//! // Runs the closure in a serializable transaction, again if PostgreSQL
//! // aborts it with a serialization failure, and commits.
//! let total: i64 = db
//!     .transaction_with(&TransactionOptions::serializable(), |uow| {
//!         Box::pin(async move {
//!             sqlx::query("UPDATE accounts SET balance = balance - 10 WHERE id = 1")
//!                 .execute(uow.conn())
//!                 .await?;
//!             sqlx::query("UPDATE accounts SET balance = balance + 10 WHERE id = 2")
//!                 .execute(uow.conn())
//!                 .await?;
//!             let total = sqlx::query_scalar("SELECT sum(balance)::bigint FROM accounts")
//!                 .fetch_one(uow.conn())
//!                 .await?;
//!             Ok::<_, DatabaseError>(total)
//!         })
//!     })
//!     .await?;
//! # let _ = total;
//! # Ok(()) }
//! ```
//!
//! The guide in `docs/database.md` lists every setting and describes retries,
//! health and reconnect behaviour.
//!
//! # Feature flags
//!
//! `keel-database` always uses PostgreSQL through `sqlx` with rustls for TLS
//! (never OpenSSL).
//!
//! | feature | default | effect |
//! |---|---|---|
//! | `testkit` | off | Implements `keel_testkit::Schema` for [`Migrations`], so tests write `TestDatabase::create(&keel_eventstore::MIGRATIONS)` (or an array of sets); meant for `[dev-dependencies]`. |

mod command;
pub mod config;
mod error;
mod health;
pub mod migrate;
mod pool;
mod release;
mod retry;
mod uow;

pub use config::{DatabaseConfig, DatabaseConfigBuilder, TlsMode};
pub use error::{
    ConstraintKind, DatabaseError, Result, SERVICE, chain_has_transaction_conflict, constraint_of,
    is_connection_error, is_deadlock, is_lock_timeout, is_pool_timeout, is_retryable,
    is_serialization_failure, is_statement_timeout, is_transaction_conflict, is_unique_violation,
    sqlstate, sqlstate_of, to_keel,
};
pub use health::{
    DEFAULT_DEGRADED_AFTER, DEFAULT_HEALTH_TIMEOUT, DatabaseLiveness, DatabaseReadiness,
};
pub use migrate::{MIGRATIONS, MigrateError, MigrationId, Migrations, migrate, migrate_connection};
pub use pool::{DEFAULT_POOL_METRICS_INTERVAL, Database, PoolStats, TransactionFuture};
pub use release::close_unclean_connections;
pub use retry::{RetryPolicy, TransactionError};
pub use uow::{IsolationLevel, TransactionOptions, UnitOfWork, sql_literal};
