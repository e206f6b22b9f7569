//! `#[derive(Mapped)]` produces the same mapping as the hand-written one and
//! works with both repositories.

use chrono::{DateTime, Utc};
use keel_core::{Direction, Entity, Filter, ListQuery, PageRequest};
use keel_repository::testing::Gadget;
use keel_repository::{InMemoryRepository, Mapped, PgRepository};
use keel_testkit::TestDatabase;
use uuid::Uuid;

/// The contract suite's `Gadget`, declared with attributes.
#[derive(Clone, Debug, PartialEq, Mapped)]
#[keel(table = "gadgets", name = "gadget")]
struct Derived {
    #[keel(id)]
    id: String,
    #[keel(filterable, sortable)]
    name: String,
    #[keel(filterable)]
    category: Option<String>,
    #[keel(filterable, sortable)]
    price: i64,
    #[keel(filterable, sortable)]
    rating: f64,
    #[keel(filterable, sortable)]
    stock: i32,
    #[keel(filterable)]
    active: bool,
    #[keel(filterable, sortable)]
    sku: Uuid,
    #[keel(filterable, sortable)]
    released: DateTime<Utc>,
    specs: serde_json::Value,
}

#[derive(Clone, Debug, Mapped)]
#[keel(table = "app.line_items")]
struct LineItem {
    #[keel(id, column = "line_id")]
    id: i64,
    #[keel(column = "qty", filterable, sortable)]
    quantity: i32,
}

fn derived(id: &str, name: &str, price: i64) -> Derived {
    let g = keel_repository::testing::gadget(id, name, price);
    Derived {
        id: g.id,
        name: g.name,
        category: g.category,
        price: g.price,
        rating: g.rating,
        stock: g.stock,
        active: g.active,
        sku: g.sku,
        released: g.released,
        specs: g.specs,
    }
}

#[test]
fn the_derived_mapping_matches_the_hand_written_one() {
    assert_eq!(
        Derived::mapping().create_table_sql(),
        Gadget::mapping().create_table_sql()
    );
    assert_eq!(Derived::NAME, Gadget::NAME);
    assert_eq!(LineItem::NAME, "line_item");
    let sql = LineItem::mapping().create_table_sql();
    assert!(
        sql.contains(r#""line_id" BIGINT NOT NULL PRIMARY KEY"#),
        "{sql}"
    );
    assert!(sql.contains(r#""qty" INTEGER NOT NULL"#), "{sql}");
}

#[tokio::test]
async fn derived_entities_round_trip_in_both_repositories() {
    let db = TestDatabase::create(&keel_database::MIGRATIONS)
        .await
        .unwrap();
    sqlx::query(&Derived::mapping().create_table_sql())
        .execute(db.pool())
        .await
        .unwrap();
    let pg = PgRepository::<Derived>::new(db.pool().clone()).unwrap();
    pg.verify_schema().await.unwrap();
    let memory = InMemoryRepository::<Derived>::new().unwrap();
    let repos: [&dyn keel_core::EntityRepository<Derived>; 2] = [&pg, &memory];
    for repo in repos {
        let mut a = derived("a", "alpha", 3);
        a.category = Some("x".into());
        repo.insert_many(vec![a.clone(), derived("b", "beta", 1)])
            .await
            .unwrap();
        let got = repo.get(&"a".to_owned()).await.unwrap().unwrap();
        assert_eq!(got.entity, a);
        let page = repo
            .list(
                &ListQuery::new(PageRequest::first(10))
                    .filter(Filter::at_least("price", 1))
                    .sort_by("price", Direction::Asc),
            )
            .await
            .unwrap();
        let ids: Vec<&str> = page.items.iter().map(|s| s.entity.id.as_str()).collect();
        assert_eq!(ids, ["b", "a"]);
    }
}
