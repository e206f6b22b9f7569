//! Test kit for Keel and for services built on it.

mod aggregate;
mod contract;
mod database;
mod error;
mod pg;
pub mod services;
mod sys;
mod throwaway;

pub use aggregate::{AggregateTest, Outcome, RejectionCheck, Verified};
pub use database::TestDatabase;
pub use error::{Error, Result};
pub use throwaway::ThrowawayPostgres;
