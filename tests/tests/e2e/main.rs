//! Process tests: Ordering and Shipping run as real processes
//! (`keel_tests::services`) on PostgreSQL, Redis and the Pub/Sub emulator
//! (found or started by keel-testkit), and the tests check what issue #17
//! asks of them from the outside: gRPC calls, the services' own databases,
//! the emulator, and the spans the processes export.
//!
//! | module | checks |
//! |---|---|
//! | [`restart`] | SIGKILL of Shipping and of Ordering mid-run: no order lost, each paid order shipped exactly once in effect |
//! | [`dead_letter`] | a schema-v2 `order.paid` is dead-lettered, replayed after the fix, handled once |
//! | [`trace`] | one gRPC call's trace reaches Shipping through the bus |
//! | [`search`] | `SearchShipments` finds the shipped order |

mod common;
mod dead_letter;
mod otlp;
mod restart;
mod search;
mod trace;
