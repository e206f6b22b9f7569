//! The contract suite against both backends: the in-memory one and a real
//! Redis (each test under its own key prefix).

use keel_cache::testing::Subject;
use keel_cache::{RedisCache, RedisConfig};

async fn redis_subject() -> Subject {
    let url = keel_testkit::services::redis_url()
        .await
        .expect("these tests need Redis");
    let prefix = format!("keel-cache-test:{}:", uuid::Uuid::new_v4().simple());
    let connect = |prefix: String| {
        let url = url.clone();
        async move {
            RedisCache::connect(RedisConfig::new(url).key_prefix(prefix))
                .await
                .expect("cannot connect to Redis")
        }
    };
    let cache = connect(prefix.clone()).await;
    let peer = connect(prefix.clone()).await;
    let neighbour = cache.with_prefix(format!("{prefix}neighbour:"));
    Subject::new(cache, peer, neighbour)
}

macro_rules! suite {
    ($factory:expr) => {
        keel_testkit::contract_tests! {
            factory: $factory,
            suite: keel_cache::testing,
            tests: [
                get_set_delete,
                missing_keys,
                ttl_expiry,
                overwrite_replaces_value_and_expiry,
                binary_values,
                large_values,
                key_namespacing,
                bad_input,
                write_if_absent_has_one_winner,
                remove_if_equals,
                read_or_insert,
                write_guarded_checks_every_guard,
                write_batch_is_atomic_for_guarded_writes,
                delete_many,
                publish_reaches_other_processes,
                get_or_load_caches,
                single_flight_loads_once,
                joined_callers_are_counted_apart,
                cross_process_stampede_loads_once,
                negative_caching,
                namespaces_are_isolated,
                version_bump_invalidates_everywhere,
                two_tier_invalidation_across_processes,
                undecodable_values_are_misses,
                load_errors_are_shared_and_not_cached,
                cache_aside_bad_input,
                invalidation_handler_evicts_on_events,
                eviction_during_a_load_wins,
                eviction_by_another_process_during_a_load_wins,
                concurrent_reads_and_invalidations_converge,
            ],
        }
    };
}

mod memory {
    use super::*;
    suite!(|| async { (Subject::memory(), ()) });
}

mod redis {
    use super::*;
    suite!(|| async { (redis_subject().await, ()) });
}
