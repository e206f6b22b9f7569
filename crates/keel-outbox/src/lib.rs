//! Transactional outbox and relay from PostgreSQL to Keel's event bus
//!
//! (Work in progress.)
