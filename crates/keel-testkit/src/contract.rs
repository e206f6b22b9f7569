//! Scaffolding for contract suites: one set of test functions, run against
//! every implementation of a port.
//!
//! # How a crate structures its contract suite
//!
//! Every Keel port has a real adapter and an in-memory one that must behave
//! alike. The crate that owns the adapters writes the rules down once:
//!
//! 1. **The suite** is a module of `pub async fn rule_name(subject: S)`
//!    functions, generic over the port (`impl EventStore`, `Arc<dyn
//!    Cache>`, …). Each function states one rule (conflicting writers,
//!    idempotent retry, ordering, pagination edges) and panics when the
//!    subject breaks it. It lives in the adapter crate (for example
//!    `keel_eventstore::contract`, behind a feature such as `testing`) so
//!    that services implementing the port themselves can run it too.
//! 2. **One test file per implementation** (`tests/contract_memory.rs`,
//!    `tests/contract_postgres.rs`) calls [`contract_tests!`] with a factory
//!    that builds a fresh subject and a guard that keeps its resources alive:
//!    `()` for an in-memory subject, a [`TestDatabase`](crate::TestDatabase)
//!    for PostgreSQL, a topic prefix for Pub/Sub.
//! 3. The list of `tests:` names every rule of the suite; a rule missing
//!    from one implementation's list is a rule that implementation never
//!    proves, so keep the lists identical (a suite may export a macro that
//!    expands to the list).
//!
//! Each rule becomes its own `#[tokio::test]` (multi-threaded runtime, four
//! workers, so races between concurrent writers are real) named after the
//! rule, so test output reads as a list of rules per implementation.

/// Generates one `#[tokio::test]` per suite function, each calling it with a
/// fresh subject from `factory`.
///
/// `factory` is a closure returning a future of `(subject, guard)`; the guard
/// (a [`TestDatabase`](crate::TestDatabase), say, or `()`) is kept alive for
/// the test's duration. `suite` is the path of the module holding the rule
/// functions; `tests` lists the rules to run. The calling crate needs
/// `tokio` (with the `macros` and `rt-multi-thread` features) as a
/// dev-dependency.
///
/// ```ignore
/// mod postgres {
///     keel_testkit::contract_tests! {
///         factory: || async {
///             let db = keel_testkit::TestDatabase::create(&keel_eventstore::MIGRATIONS)
///                 .await
///                 .unwrap();
///             (keel_eventstore::PostgresEventStore::new(db.pool().clone()), db)
///         },
///         suite: keel_eventstore::contract,
///         tests: [conflicting_writers, idempotent_retry],
///     }
/// }
/// ```
#[macro_export]
macro_rules! contract_tests {
    (factory: $factory:expr, suite: $($suite:ident)::+, tests: [$($test:ident),* $(,)?] $(,)?) => {
        $crate::contract_tests!(@each $factory, [$($suite)::+], [$($test),*]);
    };
    (@each $factory:expr, $suite:tt, [$($test:ident),*]) => {
        $( $crate::contract_tests!(@one $factory, $suite, $test); )*
    };
    (@one $factory:expr, [$($suite:ident)::+], $test:ident) => {
        #[::tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn $test() {
            let (subject, _guard) = ($factory)().await;
            $($suite)::+::$test(subject).await;
        }
    };
}
