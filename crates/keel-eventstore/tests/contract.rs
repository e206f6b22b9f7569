//! The contract suite, run against both stores.

macro_rules! all_contract_tests {
    (@each $factory:expr; $($test:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $test() {
                let (subject, _guard) = ($factory)().await;
                keel_eventstore::testing::$test(subject).await;
            }
        )*
    };
    ($factory:expr) => {
        // The same shape as keel_testkit::contract_tests!, which cannot yet
        // expand a multi-segment suite path for several tests (its nested
        // repetition does not compile).
        all_contract_tests!(@each $factory; append_and_read_back, expected_version_modes,
            racing_writers_exactly_one_wins, idempotent_retries, reused_event_ids_are_refused,
            bad_input_writes_nothing, multi_stream_append_is_atomic,
            read_stream_directions_and_limits, global_log_order_and_filters, typed_decoding,
            snapshots_keep_the_latest, checkpoints_never_move_backwards);

        /// Fails when a suite function was added to `testing::ALL` but not
        /// to the list above.
        #[test]
        fn runs_every_contract_test() {
            let listed = stringify!(
                append_and_read_back,
                expected_version_modes,
                racing_writers_exactly_one_wins,
                idempotent_retries,
                reused_event_ids_are_refused,
                bad_input_writes_nothing,
                multi_stream_append_is_atomic,
                read_stream_directions_and_limits,
                global_log_order_and_filters,
                typed_decoding,
                snapshots_keep_the_latest,
                checkpoints_never_move_backwards,
            );
            for name in keel_eventstore::testing::ALL {
                assert!(listed.split(',').any(|l| l.trim() == *name), "{name} is not run");
            }
        }
    };
}

mod in_memory {
    all_contract_tests!(|| async { (keel_eventstore::InMemoryEventStore::new(), ()) });
}

mod postgres {
    all_contract_tests!(|| async {
        let db = keel_testkit::TestDatabase::create(&keel_database::MIGRATOR)
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
