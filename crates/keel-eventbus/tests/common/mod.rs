//! Shared test scaffolding.

/// Like `keel_testkit::contract_tests!`, whose nested `$($suite)::+`
/// repetition does not expand with more than one test: one
/// `#[tokio::test]` per suite function, each with a fresh subject.
#[macro_export]
macro_rules! bus_contract_tests {
    (factory: $factory:expr, tests: [$($test:ident),* $(,)?] $(,)?) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $test() {
                let (subject, _guard) = ($factory)().await;
                ::keel_eventbus::testing::$test(subject).await;
            }
        )*
    };
}
