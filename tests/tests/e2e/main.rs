//! Process tests: Ordering and Shipping run as real processes
//! (`keel_tests::services`) on PostgreSQL, Redis and the Pub/Sub emulator
//! (found or started by keel-testkit), and the tests check what issue #17
//! asks of them from the outside: gRPC calls, the services' own databases,
//! the emulator, and the spans the processes export.
//!
//! | module | checks |
//! |---|---|
//! | [`restart`] | Ordering SIGKILLed twice mid-run (clients retrying, the relay holding unpublished events) while Shipping stays up: no order lost, each paid order shipped exactly once in effect; SIGKILL of Shipping too is a second test, ignored on the emulator (it loses messages of a killed subscriber) |
//! | [`dead_letter`] | a schema-v2 `order.paid` is dead-lettered, replayed after the fix, handled once |
//! | [`trace`] | one gRPC call's trace reaches Shipping through the bus |
//! | [`search`] | `SearchShipments` finds the shipped order |
//!
//! Run them with `cargo test -p keel-tests --test e2e`. The harness builds
//! the two service binaries when they are older than the test executable;
//! after `cargo build -p keel-examples --bins`, `KEEL_SERVICES_BUILD=never`
//! skips that step (the nested build runs with the test's environment and
//! can make the next outer build recompile the workspace). One stack runs
//! at a time ([`common::ONE_STACK_AT_A_TIME`]); each test takes from
//! several seconds to a minute or two on a busy machine.

mod common;
mod dead_letter;
mod otlp;
mod restart;
mod search;
mod trace;
