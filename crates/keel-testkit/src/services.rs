//! Finding (or starting) the services tests need.
//!
//! Each function looks, in order: at its environment variable; at the
//! default local service; (more sources to come: testcontainers, local
//! binaries). It fails with a message saying what is missing and how to
//! provide it.

use std::net::TcpStream;
use std::time::Duration;

use crate::Error;

fn answers(addr: &str) -> bool {
    addr.parse()
        .ok()
        .and_then(|a| TcpStream::connect_timeout(&a, Duration::from_millis(300)).ok())
        .is_some()
}

/// A PostgreSQL server URL (any database; tests create their own).
pub async fn postgres_url() -> Result<String, Error> {
    if let Ok(url) = std::env::var("DATABASE_URL") {
        return Ok(url);
    }
    if answers("127.0.0.1:5432") {
        return Ok("postgres://postgres@127.0.0.1:5432/postgres".to_owned());
    }
    Err("no PostgreSQL: set DATABASE_URL or start PostgreSQL on 127.0.0.1:5432".into())
}

/// A Redis URL.
pub async fn redis_url() -> Result<String, Error> {
    if let Ok(url) = std::env::var("REDIS_URL") {
        return Ok(url);
    }
    if answers("127.0.0.1:6379") {
        return Ok("redis://127.0.0.1:6379".to_owned());
    }
    Err("no Redis: set REDIS_URL or start Redis on 127.0.0.1:6379".into())
}

/// The Pub/Sub emulator's `host:port`.
pub async fn pubsub_emulator_host() -> Result<String, Error> {
    if let Ok(host) = std::env::var("PUBSUB_EMULATOR_HOST") {
        return Ok(host);
    }
    if answers("127.0.0.1:8085") {
        return Ok("127.0.0.1:8085".to_owned());
    }
    Err("no Pub/Sub emulator: set PUBSUB_EMULATOR_HOST or start it on 127.0.0.1:8085".into())
}
