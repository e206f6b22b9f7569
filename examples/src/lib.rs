//! A runnable tour of Keel, as a library so that tests can run it too.
//!
//! `cargo run -p keel-examples` runs every example in [`EXAMPLES`] in
//! order; `KEEL_EXAMPLE=<name>` (or `cargo run -p keel-examples -- <name>`)
//! runs one and `list` lists them. Each example is an
//! `async fn run(&Services) -> Result` that narrates through `tracing`
//! and ends by checking its own invariants: a broken promise is an `Err`,
//! and the binary exits non-zero.
//!
//! The examples share one small bounded context, bank accounts
//! ([`domain`]), and follow its events through Keel:
//!
//! | example | shows |
//! |---|---|
//! | `aggregate` | an aggregate on `keel-core` alone (a library loan) |
//! | `event-store` | the event-sourced repository: snapshots, an optimistic-concurrency conflict and its retry, reading a stream back |
//! | `subscription` | a catch-up subscription over the global log building a read model, stopped and resumed from its checkpoint |
//! | `publishing` | the event store as outbox: the relay publishes to the bus, an idempotent projection consumes, a poison message is dead-lettered |
//! | `repository` | a state-based entity: CRUD, optimistic locking, soft delete, keyset and offset pagination |
//! | `cache` | cache-aside in front of a repository read: hits, invalidation, one load for a stampede |
//! | `outbox` | the transactional outbox and inbox on PostgreSQL: entity and event commit together, a rollback publishes nothing, a redelivery does nothing |
//! | `contexts` | two bounded contexts ([`contexts`]): event-sourced Ordering and state-based Shipping, talking through the bus, with a dead letter replayed |
//!
//! [`Services`] decides what runs underneath: in memory by default,
//! PostgreSQL, Redis and the Pub/Sub emulator when their environment
//! variables are set ([`services::ENVIRONMENT`]).

pub mod contexts;
pub mod domain;
pub mod examples;
pub mod service;
pub mod services;

use std::future::Future;
use std::pin::Pin;

pub use services::Services;

/// What an example returns: `Err` when it failed or one of its invariants
/// did not hold.
pub type Result<T = (), E = Box<dyn std::error::Error + Send + Sync>> = std::result::Result<T, E>;

/// The future an example's `run` returns.
pub type RunFuture<'a> = Pin<Box<dyn Future<Output = Result> + Send + 'a>>;

/// A registered example.
#[derive(Clone, Copy)]
pub struct Example {
    /// Its name, as `KEEL_EXAMPLE` takes it.
    pub name: &'static str,
    /// One line about what it shows.
    pub about: &'static str,
    /// Runs it.
    pub run: for<'a> fn(&'a Services) -> RunFuture<'a>,
}

impl std::fmt::Debug for Example {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Example")
            .field("name", &self.name)
            .field("about", &self.about)
            .finish_non_exhaustive()
    }
}

/// Every example, in the order `cargo run -p keel-examples` runs them.
pub const EXAMPLES: &[Example] = &[
    Example {
        name: "aggregate",
        about: "an aggregate on keel-core alone: commands, events, replay",
        run: |_| Box::pin(examples::aggregate::run()),
    },
    Example {
        name: "event-store",
        about: "event-sourced accounts: snapshots, a version conflict and its retry, the stream read back",
        run: |s| Box::pin(examples::event_store::run(s)),
    },
    Example {
        name: "subscription",
        about: "a catch-up subscription over the global log builds a read model and resumes from its checkpoint",
        run: |s| Box::pin(examples::subscription::run(s)),
    },
    Example {
        name: "publishing",
        about: "the store as outbox: relay -> event bus -> idempotent projection, with a retry and a dead letter",
        run: |s| Box::pin(examples::publishing::run(s)),
    },
    Example {
        name: "repository",
        about: "a state-based entity: CRUD, optimistic locking, soft delete, keyset and offset pages",
        run: |s| Box::pin(examples::repository::run(s)),
    },
    Example {
        name: "cache",
        about: "cache-aside in front of a repository read: hits, invalidation, a stampede loads once",
        run: |s| Box::pin(examples::cache::run(s)),
    },
    Example {
        name: "outbox",
        about: "a command through a transactional service: entity row and outbox event in one unit of work, relay, inbox",
        run: |s| Box::pin(examples::outbox::run(s)),
    },
    Example {
        name: "contexts",
        about: "two bounded contexts end to end: orders placed, paid and shipped, a poison message dead-lettered and replayed",
        run: |s| Box::pin(async move { contexts::run(s).await.map(drop) }),
    },
];

/// The example called `name`.
#[must_use]
pub fn find(name: &str) -> Option<&'static Example> {
    EXAMPLES.iter().find(|e| e.name == name)
}

/// Fails with `what` unless `holds`: how examples check their invariants.
pub(crate) fn ensure(holds: bool, what: impl Into<String>) -> Result {
    if holds {
        Ok(())
    } else {
        Err(format!("invariant broken: {}", what.into()).into())
    }
}
