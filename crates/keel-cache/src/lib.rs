//! Cache-aside caching for Keel on Redis, with an in-memory twin
//!
//! (Work in progress.)
