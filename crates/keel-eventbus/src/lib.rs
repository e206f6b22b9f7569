//! Event bus for Keel on Google Cloud Pub/Sub, with an in-memory twin
//!
//! (Work in progress.)
