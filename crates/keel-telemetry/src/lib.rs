//! Structured logs, traces and metrics for Keel services via OpenTelemetry
//!
//! (Work in progress.)
