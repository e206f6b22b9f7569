//! The contract suite, run against both stores.

/// Expands to the contract tests for one store factory. Keep the list equal
/// to `keel_eventstore::testing::ALL` (checked by `runs_every_contract_test`).
macro_rules! all_contract_tests {
    ($factory:expr) => {
        keel_testkit::contract_tests! {
            factory: $factory,
            suite: keel_eventstore::testing,
            tests: [
                append_and_read_back,
                expected_version_modes,
                racing_writers_exactly_one_wins,
                open_appends_race_without_loss,
                idempotent_retries,
                reused_event_ids_are_refused,
                bad_input_writes_nothing,
                multi_stream_append_is_atomic,
                read_stream_directions_and_limits,
                global_log_order_and_filters,
                typed_decoding,
                snapshots_keep_the_latest,
                snapshot_archive_round_trip,
                snapshot_retention_policy,
                checkpoints_never_move_backwards,
                subscription_catches_up_then_tails,
                subscription_redelivers_after_failure_or_crash,
                subscription_has_one_leader_and_fails_over,
                batched_handlers_stop_at_the_failed_event,
                aggregate_repository_round_trip,
                transaction_appends_are_invisible_until_commit,
                transaction_rollback_leaves_nothing,
                racing_transactions_exactly_one_commits,
                aggregate_repository_within_transaction,
                concurrent_transactions_keep_the_log_exact,
                projection_applies_each_event_once,
                projection_parks_poison_events,
                projection_versions_switch_when_caught_up,
                progress_checks_report_lag_and_stalls,
                subscription_flags_redeliveries,
                page_sizes_per_read_change_nothing_but_the_pages,
            ],
        }
    };
}

const RUN: &str = stringify!(
    append_and_read_back,
    expected_version_modes,
    racing_writers_exactly_one_wins,
    open_appends_race_without_loss,
    idempotent_retries,
    reused_event_ids_are_refused,
    bad_input_writes_nothing,
    multi_stream_append_is_atomic,
    read_stream_directions_and_limits,
    global_log_order_and_filters,
    typed_decoding,
    snapshots_keep_the_latest,
    snapshot_archive_round_trip,
    snapshot_retention_policy,
    checkpoints_never_move_backwards,
    subscription_catches_up_then_tails,
    subscription_redelivers_after_failure_or_crash,
    subscription_has_one_leader_and_fails_over,
    batched_handlers_stop_at_the_failed_event,
    aggregate_repository_round_trip,
    transaction_appends_are_invisible_until_commit,
    transaction_rollback_leaves_nothing,
    racing_transactions_exactly_one_commits,
    aggregate_repository_within_transaction,
    concurrent_transactions_keep_the_log_exact,
    projection_applies_each_event_once,
    projection_parks_poison_events,
    projection_versions_switch_when_caught_up,
    progress_checks_report_lag_and_stalls,
    subscription_flags_redeliveries,
    page_sizes_per_read_change_nothing_but_the_pages,
);

/// Fails when a rule was added to `testing::ALL` but is not run here.
#[test]
fn runs_every_contract_test() {
    let listed: Vec<&str> = RUN
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    for name in keel_eventstore::testing::ALL {
        assert!(listed.contains(name), "{name} is not run");
    }
    assert_eq!(listed.len(), keel_eventstore::testing::ALL.len());
}

mod in_memory {
    all_contract_tests!(|| async { (keel_eventstore::InMemoryEventStore::new(), ()) });
}

mod postgres {
    all_contract_tests!(|| async {
        let db = keel_testkit::TestDatabase::create(&keel_eventstore::MIGRATIONS)
            .await
            .expect("test database");
        // The read horizon is cluster-wide and other tests' CREATE/DROP
        // DATABASE hold it back at times: let reads wait for it.
        let config = keel_eventstore::StoreConfig::default()
            .settle_timeout(std::time::Duration::from_secs(30));
        (
            keel_eventstore::PostgresEventStore::with_config(db.pool().clone(), config),
            db,
        )
    });
}
