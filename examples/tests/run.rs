//! Runs every example in-process, twice: on in-memory adapters, and on real
//! PostgreSQL, Redis and the Pub/Sub emulator found (or started) by
//! keel-testkit. Each example checks its own invariants and returns `Err`
//! when one breaks, so these tests are only as strong as those checks; they
//! also prove that the README's quick start keeps working.

use keel_database::{Database, DatabaseConfig};
use keel_examples::{EXAMPLES, Services};
use keel_testkit::TestDatabase;

/// Every example this file runs, on each path. `every_example_is_tested`
/// fails when an example is added to the registry but not here.
const TESTED: &[&str] = &[
    "aggregate",
    "event-store",
    "subscription",
    "publishing",
    "repository",
    "cache",
    "outbox",
    "contexts",
];

#[test]
fn every_example_is_tested() {
    let registered: Vec<&str> = EXAMPLES.iter().map(|e| e.name).collect();
    assert_eq!(registered, TESTED, "add new examples to TESTED");
}

async fn run(name: &str, services: &Services) {
    let example = keel_examples::find(name).unwrap_or_else(|| panic!("no example {name}"));
    if let Err(e) = (example.run)(services).await {
        panic!("example {name} failed on {:?}: {e}", services.describe());
    }
}

mod in_memory {
    use super::*;

    async fn in_memory(name: &str) {
        run(name, &Services::in_memory()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn aggregate() {
        in_memory("aggregate").await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn event_store() {
        in_memory("event-store").await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn subscription() {
        in_memory("subscription").await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn publishing() {
        in_memory("publishing").await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn repository() {
        in_memory("repository").await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cache() {
        in_memory("cache").await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn outbox() {
        // Without PostgreSQL it explains itself and succeeds.
        in_memory("outbox").await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn contexts() {
        in_memory("contexts").await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_whole_tour_runs_in_order_on_one_set_of_services() {
        let services = Services::in_memory();
        for example in EXAMPLES {
            run(example.name, &services).await;
        }
    }
}

/// Real services: a fresh migrated database per test (TestDatabase), the
/// Redis and Pub/Sub emulator the test kit finds or starts once per run.
mod real_services {
    use super::*;

    struct Real {
        services: Services,
        database: Database,
        _test_database: TestDatabase,
    }

    async fn real() -> Real {
        let test_database =
            TestDatabase::create(&[&keel_eventstore::MIGRATIONS, &keel_outbox::MIGRATIONS])
                .await
                .expect("a PostgreSQL database from keel-testkit");
        let config = DatabaseConfig::builder()
            .url(test_database.url())
            .min_connections(1)
            .max_connections(20)
            .build()
            .expect("a valid pool configuration");
        let database = Database::connect(config)
            .await
            .expect("a pool on the test database");
        let redis = keel_testkit::services::redis_url()
            .await
            .expect("Redis from keel-testkit");
        let emulator = keel_testkit::services::pubsub_emulator_host()
            .await
            .expect("the Pub/Sub emulator from keel-testkit");
        let services = Services::in_memory()
            .with_database(database.clone())
            .with_redis(redis)
            .with_pubsub_emulator(emulator);
        Real {
            services,
            database,
            _test_database: test_database,
        }
    }

    async fn on_real_services(name: &str) {
        let real = real().await;
        run(name, &real.services).await;
        // Let go of the connections before the test database is dropped.
        real.database.close().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn event_store_on_postgres() {
        on_real_services("event-store").await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn subscription_on_postgres() {
        on_real_services("subscription").await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn publishing_on_postgres_and_pubsub() {
        on_real_services("publishing").await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn repository_on_postgres() {
        on_real_services("repository").await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cache_on_redis_and_postgres() {
        on_real_services("cache").await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn outbox_on_postgres_and_pubsub() {
        on_real_services("outbox").await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn contexts_on_postgres_redis_and_pubsub() {
        on_real_services("contexts").await;
    }

    /// What `cargo run -p keel-examples` does with every variable set: all
    /// examples, in order, on one database, Redis and emulator, so each must
    /// keep to its own streams, topics and keys.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_whole_tour_runs_in_order_on_one_set_of_services() {
        let real = real().await;
        for example in EXAMPLES {
            run(example.name, &real.services).await;
        }
        real.database.close().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_describe_lines_name_the_real_adapters() {
        let real = real().await;
        let lines = real.services.describe().join("\n");
        for adapter in [
            "PostgresEventStore",
            "PgRepository",
            "PubSubBus",
            "RedisCache",
        ] {
            assert!(lines.contains(adapter), "{adapter} missing from:\n{lines}");
        }
        real.database.close().await;
    }
}

/// A service that is configured but unreachable fails the example with an
/// error naming it; the run never falls back to memory or hangs.
mod misconfigured {
    use std::time::{Duration, Instant};

    use super::*;

    async fn fails_quickly(name: &str, services: Services, mentions: &str) {
        let example = keel_examples::find(name).expect("registered");
        let started = Instant::now();
        let outcome = (example.run)(&services).await;
        let error = outcome.expect_err("an unreachable service must fail the example");
        assert!(
            error.to_string().contains(mentions),
            "the error should mention {mentions:?}: {error}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "failing took {:?}",
            started.elapsed()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unreachable_redis_fails_the_cache_example() {
        // Port 1 on loopback: nothing listens there.
        let services = Services::in_memory().with_redis("redis://127.0.0.1:1");
        fails_quickly("cache", services, "REDIS_URL").await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unreachable_emulator_fails_the_publishing_example() {
        let services = Services::in_memory().with_pubsub_emulator("127.0.0.1:1");
        fails_quickly("publishing", services, "PUBSUB_EMULATOR_HOST").await;
    }
}
