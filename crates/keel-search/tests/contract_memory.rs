//! The contract suite against the in-memory engine.

use std::sync::Arc;

use keel_search::InMemoryEngine;
use keel_search::testing::Subject;

keel_search::contract_suite!(|| async { Some(Subject::new(Arc::new(InMemoryEngine::new()))) });
