//! Test kit for Keel and for services built on it.
//!
//! (Work in progress.)

mod contract;
mod database;
pub mod services;

pub use database::TestDatabase;

/// Errors from the test kit carry a clear explanation: tests fail loudly and
/// early.
pub type Error = Box<dyn std::error::Error + Send + Sync>;
