//! The contract suite and mapping checks against the in-memory repository.

use keel_core::uow::MemoryTransactions;
use keel_repository::InMemoryRepository;
use keel_repository::testing::{Gadget, Harness, clock};

keel_repository::contract_suite!(|| async {
    let clock = clock();
    let repo = InMemoryRepository::<Gadget>::new()
        .expect("valid mapping")
        .with_clock(clock.clone());
    (Harness::new(repo, clock, MemoryTransactions::new()), ())
});

use keel_core::{EntityReader, EntityWriter, Error, ListQuery, PageRequest};
use keel_repository::testing::gadget;

async fn seeded(repo: &InMemoryRepository<Gadget>) {
    repo.insert_many(
        (0..30)
            .map(|i| gadget(&format!("g{i:02}"), "n", i))
            .collect(),
    )
    .await
    .unwrap();
}

fn invalid_field(e: &Error) -> &str {
    match e {
        Error::Invalid(i) => &i.field,
        other => panic!("expected invalid input, got {other:?}"),
    }
}

#[tokio::test]
async fn the_page_size_limit_is_configurable() {
    let repo = InMemoryRepository::<Gadget>::new()
        .unwrap()
        .with_max_page_size(10);
    seeded(&repo).await;
    let ok = repo
        .list(&ListQuery::new(PageRequest::first(10)))
        .await
        .unwrap();
    assert_eq!(ok.items.len(), 10);
    let err = repo
        .list(&ListQuery::new(PageRequest::offset(1, 11)))
        .await
        .unwrap_err();
    assert_eq!(invalid_field(&err), "page");
}

#[tokio::test]
async fn cursors_signed_with_another_secret_are_refused() {
    let a = InMemoryRepository::<Gadget>::new()
        .unwrap()
        .with_cursor_secret("secret-a");
    seeded(&a).await;
    // Same data, other secret (a clone shares the rows).
    let b = a.clone().with_cursor_secret("secret-b");
    let q = ListQuery::new(PageRequest::first(5));
    let cursor = a.list(&q).await.unwrap().next.unwrap();
    let next = q.clone().with_page(PageRequest::after(cursor, 5));
    assert_eq!(a.list(&next).await.unwrap().items.len(), 5);
    let err = b.list(&next).await.unwrap_err();
    assert_eq!(invalid_field(&err), "cursor");
    assert!(err.to_string().contains("signature"), "{err}");
}
