//! The contract suite and mapping checks against the in-memory repository.

use keel_repository::InMemoryRepository;
use keel_repository::testing::{Gadget, Harness, clock};

keel_repository::contract_suite!(|| async {
    let clock = clock();
    let repo = InMemoryRepository::<Gadget>::new()
        .expect("valid mapping")
        .with_clock(clock.clone());
    (Harness::new(repo, clock), ())
});
