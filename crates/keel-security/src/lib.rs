//! Authentication, authorization, secrets and a tamper-evident audit log for Keel
//!
//! (Work in progress.)
