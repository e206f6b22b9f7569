//! The contract suite against PostgreSQL, plus what only a database can
//! show: transactions, server time, constraints, the table surviving
//! injection attempts.

use keel_repository::testing::{Gadget, Harness, clock};
use keel_repository::{Mapped, PgRepository};
use keel_testkit::TestDatabase;

async fn database() -> TestDatabase {
    let db = TestDatabase::create(&keel_database::MIGRATOR)
        .await
        .expect("test database");
    sqlx::query(&Gadget::mapping().create_table_sql())
        .execute(db.pool())
        .await
        .expect("create gadgets");
    db
}

keel_repository::contract_suite!(|| async {
    let db = database().await;
    let clock = clock();
    let repo = PgRepository::<Gadget>::new(db.pool().clone())
        .expect("valid mapping")
        .with_clock(clock.clone());
    (Harness::new(repo, clock), db)
});
