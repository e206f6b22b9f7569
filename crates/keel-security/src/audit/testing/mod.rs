//! The contract suite every implementation of [`keel_core::AuditLog`] (with
//! [`AuditHead`]) must pass (feature `testing`).
//!
//! Each function takes a fresh, empty log and panics when the
//! implementation breaks the rule it is named after. Run the whole suite
//! with [`audit_contract_suite!`](crate::audit_contract_suite) and a
//! factory returning `(Arc<dyn AuditHead>, guard)`:
//!
//! ```ignore
//! keel_security::audit_contract_suite!(|| async {
//!     let log: Arc<dyn AuditHead> = Arc::new(InMemoryAuditLog::new());
//!     (log, ())
//! });
//! ```
//!
//! Tampering is not part of the suite: how to alter a stored record
//! behind the store's back depends on the store (see the crate's
//! `tests/audit_postgres.rs` and the in-memory store's unit tests).

mod chaining;
mod commands;
mod keyed;
mod queries;
mod refusals;
mod transactions;

pub use chaining::{
    appends_chain_from_genesis, concurrent_appends_never_fork, details_survive_storage_and_rehash,
    empty_log_verifies, every_field_round_trips, head_anchors_the_chain,
    incremental_verification_resumes,
};
pub use commands::{
    command_attempt, command_entry, concurrent_attempts_are_each_stored_once,
    concurrent_retries_store_each_command_once, other_attempts_of_a_command_are_recorded,
    retried_appends_return_the_original,
};
pub use keyed::{keyed_logs_rotate, test_key};
pub use queries::{
    combined_filters_all_apply, page_size_is_clamped, pagination_walks_every_record,
    queries_filter_by_aggregate, queries_filter_by_principal, queries_filter_by_time_range,
};
pub use refusals::{
    bad_entries_are_refused, bad_queries_are_refused, injection_strings_are_stored_verbatim,
    oversized_details_are_refused,
};
pub use transactions::{
    concurrent_transactions_chain_every_commit_once, within_commits_with_the_transaction,
};

use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use keel_core::{AuditEntry, AuditLog, AuditOutcome, AuditQuery, AuditRecord, Error};

use super::AuditHead;

/// The log under test.
pub type Subject = Arc<dyn AuditHead>;

/// When the suite's commands occurred; nanoseconds on purpose, to show
/// they are truncated to microseconds.
pub const EPOCH: &str = "2026-03-01T12:00:00.123456789Z";

fn epoch() -> DateTime<Utc> {
    EPOCH.parse().expect("EPOCH parses")
}

/// An accepted entry by `principal`, `minutes` after [`EPOCH`].
#[must_use]
pub fn entry(principal: &str, minutes: i64) -> AuditEntry {
    AuditEntry::new("order.place", AuditOutcome::Accepted)
        .with_principal(principal)
        .with_occurred_at(epoch() + Duration::minutes(minutes))
}

async fn all(log: &dyn AuditLog) -> Vec<AuditRecord> {
    let mut out = Vec::new();
    let mut query = AuditQuery::new().limit(AuditQuery::MAX_LIMIT);
    loop {
        let page = log.query(&query).await.expect("query");
        out.extend(page.records);
        match page.next_after {
            Some(after) => query = query.after(after),
            None => return out,
        }
    }
}

fn invalid_field(result: Result<AuditRecord, Error>) -> String {
    match result {
        Err(Error::Invalid(invalid)) => invalid.field.into_owned(),
        other => panic!("expected invalid input, got {other:?}"),
    }
}

fn sequences(records: &[AuditRecord]) -> Vec<u64> {
    records.iter().map(|r| r.sequence).collect()
}

/// `entry` as a store keeps it: `occurred_at` cut to microseconds.
fn as_stored(mut entry: AuditEntry) -> AuditEntry {
    entry.occurred_at = DateTime::from_timestamp_micros(entry.occurred_at.timestamp_micros())
        .expect("a representable time");
    entry
}

/// Runs every rule of the audit-log contract suite against the logs built
/// by `factory` (a closure returning a future of
/// `(Arc<dyn AuditHead>, guard)`), one `#[tokio::test]` per rule.
#[macro_export]
macro_rules! audit_contract_suite {
    ($factory:expr) => {
        ::keel_testkit::contract_tests! {
            factory: $factory,
            suite: keel_security::audit::testing,
            tests: [
                appends_chain_from_genesis,
                every_field_round_trips,
                details_survive_storage_and_rehash,
                empty_log_verifies,
                queries_filter_by_principal,
                queries_filter_by_aggregate,
                queries_filter_by_time_range,
                combined_filters_all_apply,
                pagination_walks_every_record,
                page_size_is_clamped,
                concurrent_appends_never_fork,
                oversized_details_are_refused,
                bad_entries_are_refused,
                injection_strings_are_stored_verbatim,
                bad_queries_are_refused,
                head_anchors_the_chain,
                retried_appends_return_the_original,
                other_attempts_of_a_command_are_recorded,
                concurrent_retries_store_each_command_once,
                concurrent_attempts_are_each_stored_once,
                incremental_verification_resumes,
            ],
        }
    };
}
