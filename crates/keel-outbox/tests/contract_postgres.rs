//! The contract suite against the PostgreSQL outbox, relay and inbox.

mod common;

use keel_outbox::testing::Subject;

keel_testkit::contract_tests! {
    factory: || async {
        let db = common::database().await;
        let subject = Subject::postgres(&common::connect(&db));
        (subject, db)
    },
    suite: keel_outbox::testing,
    tests: [
        rolled_back_writes_are_never_published,
        committed_writes_are_published_once_in_order,
        concurrent_writers_publish_exactly_what_committed,
        bad_messages_are_refused_before_anything_is_written,
        failed_publishes_are_retried_and_nothing_is_lost,
        redelivered_message_is_acked_without_running_the_work_again,
        handler_failure_rolls_back_work_and_mark,
        concurrent_duplicate_deliveries_do_the_work_once,
    ],
}
