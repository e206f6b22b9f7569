//! Repository base for state-based entities on PostgreSQL, with an in-memory twin
//!
//! (Work in progress.)
