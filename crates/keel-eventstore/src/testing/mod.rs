//! The contract suite every event store implementation must pass.
//!
//! Each function takes a fresh, empty store and panics when the store breaks
//! the contract. Run them all with `keel_testkit::contract_tests!`:
//!
//! ```ignore
//! keel_testkit::contract_tests! {
//!     factory: || async { (keel_eventstore::InMemoryEventStore::new(), ()) },
//!     suite: keel_eventstore::testing,
//!     tests: [append_and_read_back, expected_version_modes /* , … */],
//! }
//! ```
//!
//! [`ALL`] lists every test name, so a new one cannot be forgotten silently:
//! the store's test file asserts that it runs them all.

#![allow(
    clippy::missing_panics_doc,
    reason = "contract tests panic on failure by design"
)]

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::TryStreamExt;
use keel_core::{
    CorrelationId, EventId, ExpectedVersion, Metadata, Position, StreamId, TenantId, TraceContext,
    Version,
};
use serde_json::json;

mod aggregate;
mod append;
mod archive;
mod input;
mod projections;
mod read;
mod subscriptions;
mod transactions;

pub use aggregate::{aggregate_repository_round_trip, snapshots_keep_the_latest};
pub use append::{
    append_and_read_back, expected_version_modes, multi_stream_append_is_atomic,
    open_appends_race_without_loss, racing_writers_exactly_one_wins,
};
pub use archive::{snapshot_archive_round_trip, snapshot_retention_policy};
pub use input::{bad_input_writes_nothing, idempotent_retries, reused_event_ids_are_refused};
pub use projections::{
    progress_checks_report_lag_and_stalls, projection_applies_each_event_once,
    projection_parks_poison_events, projection_versions_switch_when_caught_up,
    subscription_flags_redeliveries,
};
pub use read::{
    global_log_order_and_filters, page_sizes_per_read_change_nothing_but_the_pages,
    read_stream_directions_and_limits, typed_decoding,
};
pub use subscriptions::{
    batched_handlers_stop_at_the_failed_event, checkpoints_never_move_backwards,
    subscription_catches_up_then_tails, subscription_has_one_leader_and_fails_over,
    subscription_redelivers_after_failure_or_crash,
};
pub use transactions::{
    aggregate_repository_within_transaction, concurrent_transactions_keep_the_log_exact,
    racing_transactions_exactly_one_commits, transaction_appends_are_invisible_until_commit,
    transaction_rollback_leaves_nothing,
};

use keel_core::uow::Transaction;

#[allow(unused_imports, reason = "the suite shares one set of imports")]
use crate::{BatchFailure, Delivery};
use crate::{
    EventSourcedRepository, EventStoreBackend, EventStoreError, NewEvent, ReadAll, ReadStream,
    RecordedEvent, Snapshot, SnapshotPolicy, StreamAppend, Subscription, SubscriptionHandle,
    SubscriptionHandler, SubscriptionOptions, SubscriptionStatus, Upcasters,
};

/// What the suite needs from a store under test: the whole backend, and a
/// way to begin the kind of transaction it joins.
#[async_trait::async_trait]
pub trait Subject: EventStoreBackend + crate::SnapshotArchive + Clone + 'static {
    /// Begins a transaction this store can join with `within`.
    async fn begin(&self) -> Box<dyn Transaction>;

    /// Begins a transaction of another backend, which this store must refuse.
    fn foreign_transaction(&self) -> Box<dyn Transaction>;

    /// Begins the transactions a projection runner on this store uses.
    fn transactions(&self) -> Arc<dyn keel_core::uow::TransactionSource>;
}

#[async_trait::async_trait]
impl Subject for crate::InMemoryEventStore {
    async fn begin(&self) -> Box<dyn Transaction> {
        Box::new(keel_core::uow::MemoryTransaction::new())
    }

    fn foreign_transaction(&self) -> Box<dyn Transaction> {
        Box::new(Foreign)
    }

    fn transactions(&self) -> Arc<dyn keel_core::uow::TransactionSource> {
        Arc::new(keel_core::uow::MemoryTransactions::new())
    }
}

#[cfg(feature = "postgres")]
#[async_trait::async_trait]
impl Subject for crate::PostgresEventStore {
    async fn begin(&self) -> Box<dyn Transaction> {
        // A unit of work as a service's composition root begins it, on the
        // store's database.
        Box::new(
            units_on(self, 1)
                .begin()
                .await
                .expect("begin a unit of work"),
        )
    }

    fn foreign_transaction(&self) -> Box<dyn Transaction> {
        Box::new(keel_core::uow::MemoryTransaction::new())
    }

    fn transactions(&self) -> Arc<dyn keel_core::uow::TransactionSource> {
        Arc::new(units_on(self, 10))
    }
}

/// A `keel_database::Database` on the store's database, as a service's
/// composition root would have it.
#[cfg(feature = "postgres")]
fn units_on(store: &crate::PostgresEventStore, max: u32) -> keel_database::Database {
    let config = keel_database::DatabaseConfig::builder()
        .connect_options((*store.pool().connect_options()).clone())
        .min_connections(0)
        .max_connections(max)
        .build()
        .expect("database config");
    keel_database::Database::connect_lazy(config)
}

/// A transaction of a backend no store joins.
#[derive(Debug)]
struct Foreign;

#[async_trait::async_trait]
impl Transaction for Foreign {
    fn backend(&self) -> &'static str {
        "foreign"
    }

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }

    fn after_commit(&mut self, _hook: Box<dyn FnOnce() + Send>) {}

    async fn commit(self: Box<Self>) -> keel_core::Result<()> {
        Ok(())
    }

    async fn rollback(self: Box<Self>) -> keel_core::Result<()> {
        Ok(())
    }
}

/// The name of every contract test in this module.
pub const ALL: &[&str] = &[
    "append_and_read_back",
    "expected_version_modes",
    "racing_writers_exactly_one_wins",
    "open_appends_race_without_loss",
    "idempotent_retries",
    "reused_event_ids_are_refused",
    "bad_input_writes_nothing",
    "multi_stream_append_is_atomic",
    "read_stream_directions_and_limits",
    "global_log_order_and_filters",
    "typed_decoding",
    "snapshots_keep_the_latest",
    "snapshot_archive_round_trip",
    "snapshot_retention_policy",
    "checkpoints_never_move_backwards",
    "subscription_catches_up_then_tails",
    "subscription_redelivers_after_failure_or_crash",
    "subscription_has_one_leader_and_fails_over",
    "batched_handlers_stop_at_the_failed_event",
    "aggregate_repository_round_trip",
    "transaction_appends_are_invisible_until_commit",
    "transaction_rollback_leaves_nothing",
    "racing_transactions_exactly_one_commits",
    "aggregate_repository_within_transaction",
    "concurrent_transactions_keep_the_log_exact",
    "projection_applies_each_event_once",
    "projection_parks_poison_events",
    "projection_versions_switch_when_caught_up",
    "progress_checks_report_lag_and_stalls",
    "subscription_flags_redeliveries",
    "page_sizes_per_read_change_nothing_but_the_pages",
];

fn sid(s: &str) -> StreamId {
    StreamId::new(s).expect("valid stream id")
}

fn ev(n: u64) -> NewEvent {
    NewEvent::from_json("test.happened", &json!({ "n": n }))
}

async fn stream_of<S: Subject>(
    store: &S,
    stream: &StreamId,
    opts: ReadStream,
) -> Vec<RecordedEvent> {
    store
        .read_stream(stream, opts)
        .try_collect()
        .await
        .expect("read stream")
}

async fn log_of<S: Subject>(store: &S, opts: ReadAll) -> Vec<RecordedEvent> {
    store.read_all(opts).try_collect().await.expect("read all")
}

fn numbers(events: &[RecordedEvent]) -> Vec<u64> {
    events
        .iter()
        .map(|e| e.payload_value().expect("json")["n"].as_u64().expect("n"))
        .collect()
}

fn conflict(e: &EventStoreError) -> (ExpectedVersion, Version) {
    let c = e
        .as_conflict()
        .unwrap_or_else(|| panic!("expected a conflict, got {e:?}"));
    (c.expected, c.actual)
}

fn reused(e: &EventStoreError) -> EventId {
    match e {
        EventStoreError::EventIdReused { event_id, .. } => *event_id,
        other => panic!("expected EventIdReused, got {other:?}"),
    }
}

fn invalid_field(e: &EventStoreError) -> &str {
    match e {
        EventStoreError::Invalid(inv) => &inv.field,
        other => panic!("expected Invalid, got {other:?}"),
    }
}

/// Starts a PostgreSQL test over with an empty event store: drops schema
/// `keel` (the event log, checkpoints, projections, and every other Keel
/// table and migration record in it) and applies `sets` again.
///
/// The supported replacement for `TRUNCATE`, which the log refuses: use it
/// on a database the test owns (a `keel_testkit::TestDatabase`, say) when
/// one test needs several fresh stores in turn. Read models of your own
/// outside schema `keel` are left alone. A fresh
/// [`InMemoryEventStore`](crate::InMemoryEventStore) needs nothing of the
/// kind: `InMemoryEventStore::new()` is empty.
///
/// # Errors
///
/// [`EventStoreError::Invalid`] on the cluster's `postgres` database or a
/// template (never a test's own); database and migration failures.
#[cfg(feature = "postgres")]
pub async fn reset_postgres(
    pool: &sqlx::PgPool,
    sets: &[&keel_database::Migrations],
) -> Result<(), EventStoreError> {
    let database: String = sqlx::query_scalar("SELECT current_database()::text")
        .fetch_one(pool)
        .await?;
    let template: bool = sqlx::query_scalar(
        "SELECT datistemplate FROM pg_database WHERE datname = current_database()",
    )
    .fetch_one(pool)
    .await?;
    if database == "postgres" || template {
        return Err(EventStoreError::Invalid(keel_core::InvalidInput::new(
            "database",
            format!("refusing to reset {database:?}: reset only a test's own database"),
        )));
    }
    sqlx::query("DROP SCHEMA IF EXISTS keel CASCADE")
        .execute(pool)
        .await?;
    keel_database::migrate(pool, sets)
        .await
        .map_err(|e| EventStoreError::Core(e.into()))?;
    Ok(())
}
