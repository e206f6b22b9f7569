//! Append-only PostgreSQL event store for Keel, with an in-memory twin
//!
//! (Work in progress.)
