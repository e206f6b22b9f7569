//! Shared test helpers; each test binary uses some of them.

#![allow(dead_code, reason = "each test binary uses a part of the helpers")]

pub(crate) mod secret_manager;

/// A pool of at most `max` connections on the database at `url`, opened
/// lazily (no connection is kept idle).
pub(crate) async fn connect(url: &str, max: u32) -> keel_database::Database {
    keel_database::Database::connect(
        keel_database::DatabaseConfig::builder()
            .connect_options(url.parse().expect("url"))
            .min_connections(0)
            .max_connections(max)
            .build()
            .expect("config"),
    )
    .await
    .expect("connect")
}
