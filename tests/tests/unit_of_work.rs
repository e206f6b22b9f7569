//! One unit of work across the event-sourced repository, an entity
//! repository, the outbox and the inbox: the same rules on PostgreSQL and
//! in memory.

use std::sync::Arc;

use keel_core::Error;
use keel_core::uow::MemoryTransactions;
use keel_database::{Database, DatabaseConfig, UnitOfWork, to_keel};
use keel_eventstore::{EventSourcedRepository, InMemoryEventStore, PostgresEventStore};
use keel_outbox::{InMemoryInbox, InMemoryOutbox, OutboxStats, PgInbox, PgOutbox};
use keel_repository::{InMemoryRepository, Mapped, PgRepository};
use keel_testkit::TestDatabase;
use keel_tests::{Order, OrderSummary, Ports};

fn memory() -> Arc<Ports> {
    let outbox = InMemoryOutbox::new();
    let pending = outbox.clone();
    Arc::new(Ports {
        transactions: Arc::new(MemoryTransactions::new()),
        orders: Arc::new(EventSourcedRepository::<Order, _>::new(Arc::new(
            InMemoryEventStore::new(),
        ))),
        summaries: Arc::new(InMemoryRepository::<OrderSummary>::new().unwrap()),
        outbox: Arc::new(outbox),
        inbox: Arc::new(InMemoryInbox::new()),
        pending_outbox: Box::new(move || {
            let outbox = pending.clone();
            Box::pin(async move { outbox.stats().pending })
        }),
        // In memory nothing races by itself: the backend's answer to a lost
        // race is this error.
        conflict: Box::new(|_tx| {
            Box::pin(async {
                Err(Error::TransactionConflict {
                    message: "lost a race".to_owned(),
                    source: None,
                })
            })
        }),
    })
}

async fn postgres() -> (TestDatabase, Arc<Ports>) {
    let test_db = TestDatabase::create(&[&keel_eventstore::MIGRATIONS, &keel_outbox::MIGRATIONS])
        .await
        .unwrap();
    let config = DatabaseConfig::builder()
        .connect_options(test_db.connect_options())
        .min_connections(0)
        .max_connections(16)
        .build()
        .unwrap();
    let db = Database::connect(config).await.unwrap();
    sqlx::query(&OrderSummary::mapping().create_table_if_not_exists_sql())
        .execute(db.pool())
        .await
        .unwrap();
    let pool = db.pool().clone();
    let pending = pool.clone();
    let ports = Ports {
        transactions: Arc::new(db),
        orders: Arc::new(EventSourcedRepository::<Order, _>::new(Arc::new(
            PostgresEventStore::new(pool.clone()),
        ))),
        summaries: Arc::new(PgRepository::<OrderSummary>::new(pool.clone()).unwrap()),
        outbox: Arc::new(PgOutbox::new()),
        inbox: Arc::new(PgInbox::new(pool)),
        pending_outbox: Box::new(move || {
            let pool = pending.clone();
            Box::pin(async move { OutboxStats::load(&pool).await.unwrap().pending })
        }),
        // A real serialization failure, raised by the server and classified
        // like any other.
        conflict: Box::new(|tx| {
            Box::pin(async move {
                let uow = UnitOfWork::join(tx)?;
                sqlx::query(
                    "DO $$ BEGIN RAISE EXCEPTION 'lost a race' USING ERRCODE = '40001'; END $$",
                )
                .execute(uow.conn())
                .await
                .map_err(to_keel)?;
                Ok(())
            })
        }),
    };
    (test_db, Arc::new(ports))
}

#[tokio::test]
async fn memory_commits_everything_or_nothing() {
    keel_tests::a_command_commits_everything_or_nothing(memory()).await;
}

#[tokio::test]
async fn memory_retries_a_transaction_conflict_as_a_whole() {
    keel_tests::a_transaction_conflict_is_retried_as_a_whole(memory()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_concurrent_commands_commit_exactly_what_was_accepted() {
    keel_tests::concurrent_commands_commit_exactly_what_was_accepted(memory()).await;
}

#[tokio::test]
async fn postgres_commits_everything_or_nothing() {
    let (_db, ports) = postgres().await;
    keel_tests::a_command_commits_everything_or_nothing(ports).await;
}

#[tokio::test]
async fn postgres_retries_a_transaction_conflict_as_a_whole() {
    let (_db, ports) = postgres().await;
    keel_tests::a_transaction_conflict_is_retried_as_a_whole(ports).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_concurrent_commands_commit_exactly_what_was_accepted() {
    let (_db, ports) = postgres().await;
    keel_tests::concurrent_commands_commit_exactly_what_was_accepted(ports).await;
}
