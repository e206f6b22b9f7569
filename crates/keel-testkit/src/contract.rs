//! Scaffolding for contract suites: one set of test functions, run against
//! every implementation of a port.

/// Generates one `#[tokio::test]` per suite function, each calling it with a
/// fresh subject from `factory`.
///
/// `factory` is an async closure returning `(subject, guard)`; the guard
/// (a [`TestDatabase`](crate::TestDatabase), say, or `()`) is kept alive for
/// the test's duration.
///
/// ```ignore
/// keel_testkit::contract_tests! {
///     factory: || async { (InMemoryEventStore::new(), ()) },
///     suite: keel_eventstore::contract,
///     tests: [conflicting_writers, idempotent_retry],
/// }
/// ```
#[macro_export]
macro_rules! contract_tests {
    (factory: $factory:expr, suite: $($suite:ident)::+, tests: [$($test:ident),* $(,)?] $(,)?) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $test() {
                let (subject, _guard) = ($factory)().await;
                $($suite)::+::$test(subject).await;
            }
        )*
    };
}
