//! Ports: the traits adapters implement and domain or application code calls.
//!
//! Every port is object-safe, so a composition root can hold
//! `Arc<dyn Port>` and swap the PostgreSQL, Redis or Pub/Sub adapter for the
//! in-memory one in tests.

pub mod audit;
pub mod bus;
pub mod cache;
pub mod clock;
pub mod entity;
pub mod health;
