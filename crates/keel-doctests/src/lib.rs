//! Compiles and runs the Rust blocks of Keel's guides (`docs/*.md`) as
//! doc-tests: each guide is the documentation of one module here, so
//! `cargo test -p keel-doctests --doc` checks every block that is not
//! marked `ignore` or `text`. Blocks that need a running server are
//! `no_run` (compiled, not run).
//!
//! Nothing here is for use: the crate has no items of its own and is never
//! published.

#[doc = include_str!("../../../docs/README.md")]
pub mod readme {}

#[doc = include_str!("../../../docs/benchmarks-cache.md")]
pub mod benchmarks_cache {}

#[doc = include_str!("../../../docs/benchmarks-eventbus.md")]
pub mod benchmarks_eventbus {}

#[doc = include_str!("../../../docs/benchmarks-eventstore.md")]
pub mod benchmarks_eventstore {}

#[doc = include_str!("../../../docs/benchmarks-outbox.md")]
pub mod benchmarks_outbox {}

#[doc = include_str!("../../../docs/benchmarks-repository.md")]
pub mod benchmarks_repository {}

#[doc = include_str!("../../../docs/benchmarks-search.md")]
pub mod benchmarks_search {}

#[doc = include_str!("../../../docs/benchmarks-security.md")]
pub mod benchmarks_security {}

#[doc = include_str!("../../../docs/benchmarks.md")]
pub mod benchmarks {}

#[doc = include_str!("../../../docs/cache.md")]
pub mod cache {}

#[doc = include_str!("../../../docs/command-pipeline.md")]
pub mod command_pipeline {}

#[doc = include_str!("../../../docs/configuration.md")]
pub mod configuration {}

#[doc = include_str!("../../../docs/database.md")]
pub mod database {}

#[doc = include_str!("../../../docs/errors.md")]
pub mod errors {}

#[doc = include_str!("../../../docs/event-bus.md")]
pub mod event_bus {}

#[doc = include_str!("../../../docs/event-store.md")]
pub mod event_store {}

#[doc = include_str!("../../../docs/grpc.md")]
pub mod grpc {}

#[doc = include_str!("../../../docs/health.md")]
pub mod health {}

#[doc = include_str!("../../../docs/infrastructure.md")]
pub mod infrastructure {}

#[doc = include_str!("../../../docs/operations.md")]
pub mod operations {}

#[doc = include_str!("../../../docs/outbox.md")]
pub mod outbox {}

#[doc = include_str!("../../../docs/projections.md")]
pub mod projections {}

#[doc = include_str!("../../../docs/repository.md")]
pub mod repository {}

#[doc = include_str!("../../../docs/search.md")]
pub mod search {}

#[doc = include_str!("../../../docs/security.md")]
pub mod security {}

#[doc = include_str!("../../../docs/telemetry.md")]
pub mod telemetry {}

#[doc = include_str!("../../../docs/testing.md")]
pub mod testing {}
