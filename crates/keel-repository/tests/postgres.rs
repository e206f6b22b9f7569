//! The contract suite against PostgreSQL, plus what only a database can
//! show: transactions, server time, constraints, the table surviving
//! injection attempts.

use keel_repository::testing::{Gadget, Harness, clock};
use keel_repository::{Mapped, PgRepository};
use keel_testkit::TestDatabase;

async fn database() -> TestDatabase {
    let db = TestDatabase::create(&keel_database::MIGRATIONS)
        .await
        .expect("test database");
    sqlx::query(&Gadget::mapping().create_table_sql())
        .execute(db.pool())
        .await
        .expect("create gadgets");
    db
}

/// A `keel_database::Database` on the test database: the transaction
/// source units of work come from.
async fn connect(db: &TestDatabase) -> Database {
    Database::connect(
        DatabaseConfig::builder()
            .url(db.url())
            .min_connections(0)
            .max_connections(16)
            .build()
            .expect("config"),
    )
    .await
    .expect("connect")
}

keel_repository::contract_suite!(|| async {
    let db = database().await;
    let database = connect(&db).await;
    let clock = clock();
    let repo = PgRepository::<Gadget>::new(database.pool().clone())
        .expect("valid mapping")
        .with_clock(clock.clone());
    (Harness::new(repo, clock, database), db)
});

use std::sync::Arc;

use keel_core::uow::{MemoryTransaction, TransactionSource};
use keel_core::{
    Clock, Deleted, EntityReader, EntityRepository, EntityWriter, Error, Filter, ListQuery,
    PageRequest, Version,
};
use keel_database::{Database, DatabaseConfig};
use keel_repository::Result;
use keel_repository::testing::gadget;
use sqlx::Row as _;

async fn repo(db: &TestDatabase) -> PgRepository<Gadget> {
    PgRepository::new(db.pool().clone()).expect("valid mapping")
}

async fn outbox(db: &TestDatabase) {
    sqlx::query("CREATE TABLE outbox (id BIGSERIAL PRIMARY KEY, topic TEXT NOT NULL)")
        .execute(db.pool())
        .await
        .unwrap();
}

async fn outbox_rows(db: &TestDatabase) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(db.pool())
        .await
        .unwrap()
}

#[tokio::test]
async fn server_time_is_the_default() {
    let db = database().await;
    let repo = repo(&db).await;
    repo.verify_schema()
        .await
        .expect("create_table_sql matches the mapping");
    let before: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT now()")
        .fetch_one(db.pool())
        .await
        .unwrap();
    let created = repo.insert(gadget("a", "x", 1)).await.unwrap();
    assert!(created.created_at >= before);
    assert_eq!(created.created_at, created.updated_at);
    let updated = repo
        .update(created.entity.clone(), created.version)
        .await
        .unwrap();
    assert!(
        updated.updated_at > created.updated_at,
        "a later transaction, a later now()"
    );
    assert_eq!(updated.created_at, created.created_at);
    let deleted = repo
        .soft_delete(&"a".to_owned(), updated.version)
        .await
        .unwrap();
    assert!(deleted.deleted_at.unwrap() >= updated.updated_at);
}

#[tokio::test]
async fn a_unit_of_work_spans_the_repository_and_other_writes() {
    let db = database().await;
    outbox(&db).await;
    let repo = repo(&db).await;
    let database = connect(&db).await;

    // A batch larger than one INSERT runs under a savepoint of the unit.
    let mut tx = database.begin().await.unwrap();
    let saved = repo
        .within(&mut tx)
        .insert(gadget("a", "x", 1))
        .await
        .unwrap();
    repo.within(&mut tx)
        .insert_many(
            (0..1_200)
                .map(|i| gadget(&format!("b{i}"), "y", i))
                .collect(),
        )
        .await
        .unwrap();
    sqlx::query("INSERT INTO outbox (topic) VALUES ('gadget.created')")
        .execute(tx.conn())
        .await
        .unwrap();
    assert!(repo.within(&mut tx).exists(&"a".to_owned()).await.unwrap());
    assert!(!repo.exists(&"a".to_owned()).await.unwrap());
    assert_eq!(saved.version, Version::new(1));
    tx.rollback().await.unwrap();
    assert_eq!(repo.count(&[], Deleted::Include).await.unwrap(), 0);
    assert_eq!(outbox_rows(&db).await, 0);

    // Through the port-level transaction, as a command handler sees it.
    let mut tx = TransactionSource::begin(&database).await.unwrap();
    repo.within(&mut *tx)
        .insert(gadget("a", "x", 1))
        .await
        .unwrap();
    let uow = keel_database::UnitOfWork::join(&mut *tx).unwrap();
    sqlx::query("INSERT INTO outbox (topic) VALUES ('gadget.created')")
        .execute(uow.conn())
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert!(repo.exists(&"a".to_owned()).await.unwrap());
    assert_eq!(outbox_rows(&db).await, 1);
}

#[tokio::test]
async fn a_transaction_of_another_backend_is_refused() {
    let db = database().await;
    let repo = repo(&db).await;
    let mut tx = MemoryTransaction::new();
    let err = repo
        .within(&mut tx)
        .insert(gadget("a", "x", 1))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Internal { .. }), "{err:?}");
    assert!(err.to_string().contains("memory"), "{err}");
    assert_eq!(repo.count(&[], Deleted::Include).await.unwrap(), 0);
}

#[tokio::test]
async fn unique_constraints_and_checks_are_typed() {
    let db = database().await;
    sqlx::query("CREATE UNIQUE INDEX gadgets_name_key ON gadgets (name)")
        .execute(db.pool())
        .await
        .unwrap();
    sqlx::query("ALTER TABLE gadgets ADD CONSTRAINT price_positive CHECK (price >= 0)")
        .execute(db.pool())
        .await
        .unwrap();
    let repo = repo(&db).await;
    repo.insert(gadget("a", "same", 1)).await.unwrap();

    let err = repo.insert(gadget("b", "same", 1)).await.unwrap_err();
    match &err {
        Error::AlreadyExists { subject } => {
            assert_eq!(subject, "gadget b (unique constraint `gadgets_name_key`)");
        }
        other => panic!("{other:?}"),
    }
    let err = repo.insert(gadget("a", "other", 1)).await.unwrap_err();
    match &err {
        Error::AlreadyExists { subject } => {
            assert_eq!(subject, "gadget a (unique constraint `gadgets_pkey`)");
        }
        other => panic!("{other:?}"),
    }
    let err = repo.insert(gadget("c", "neg", -5)).await.unwrap_err();
    assert!(
        matches!(&err, Error::Invalid(i) if i.reason.contains("23514")),
        "{err:?}"
    );
    let err = repo.upsert(gadget("a", "same", -1)).await.unwrap_err();
    assert!(matches!(&err, Error::Invalid(_)), "{err:?}");
    assert_eq!(repo.count(&[], Deleted::Include).await.unwrap(), 1);
}

#[tokio::test]
async fn injection_attempts_leave_the_schema_alone() {
    let db = database().await;
    let repo = repo(&db).await;
    sqlx::query("CREATE TABLE canary (n INT)")
        .execute(db.pool())
        .await
        .unwrap();
    // Field names are looked up in the mapping and refused when unknown;
    // values are bound parameters. None of these statements may run.
    for field in [
        "name; DROP TABLE canary; --",
        "name\" = '' OR 1=1; DROP TABLE canary; --",
        "id) OR (SELECT count(*) FROM canary) >= (0",
    ] {
        let q = ListQuery::new(PageRequest::first(10));
        assert!(matches!(
            repo.list(&q.clone().filter(Filter::eq(field, "x"))).await,
            Err(Error::Invalid(_))
        ));
        assert!(matches!(
            repo.list(&q.sort_by(field, keel_core::Direction::Asc))
                .await,
            Err(Error::Invalid(_))
        ));
        repo.count(
            &[Filter::eq(
                "name",
                format!("x'; DROP TABLE canary; --{field}"),
            )],
            Deleted::Include,
        )
        .await
        .unwrap();
    }
    let canary: Option<String> = sqlx::query_scalar("SELECT to_regclass('canary')::text")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(
        canary.as_deref(),
        Some("canary"),
        "the canary table survives"
    );
    let evil = "'; DROP TABLE gadgets; --";
    repo.insert(gadget(evil, evil, 1)).await.unwrap();
    repo.list(
        &ListQuery::new(PageRequest::first(10))
            .filter(Filter::prefix("name", evil))
            .filter(Filter::one_of("id", [evil, "x'); DELETE FROM gadgets; --"])),
    )
    .await
    .unwrap();
    let err = repo
        .list(
            &ListQuery::new(PageRequest::first(10))
                .sort_by("name; DROP TABLE gadgets", keel_core::Direction::Asc),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Invalid(_)));
    let tables: Vec<String> =
        sqlx::query_scalar("SELECT tablename::text FROM pg_tables WHERE tablename = 'gadgets'")
            .fetch_all(db.pool())
            .await
            .unwrap();
    assert_eq!(tables, ["gadgets"]);
    let stored: String = sqlx::query("SELECT id FROM gadgets")
        .fetch_one(db.pool())
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, evil);
}

#[tokio::test]
async fn a_column_of_the_wrong_type_is_a_decode_error() {
    let db = TestDatabase::create(&keel_database::MIGRATIONS)
        .await
        .unwrap();
    let ddl = Gadget::mapping()
        .create_table_sql()
        .replace("\"stock\" INTEGER", "\"stock\" BIGINT");
    sqlx::query(&ddl).execute(db.pool()).await.unwrap();
    let repo = repo(&db).await;
    let report = repo.verify_schema().await.unwrap_err().to_string();
    assert!(
        report.contains("column `stock` is int8, the mapping needs INTEGER"),
        "{report}"
    );
    let err = repo.insert(gadget("a", "x", 1)).await;
    // Either the insert refuses the parameter type or reading back fails;
    // both say which column, and neither is a panic.
    let message = err.unwrap_err().to_string();
    assert!(
        message.contains("stock") || message.contains("type"),
        "{message}"
    );
    sqlx::query("ALTER TABLE gadgets DROP COLUMN deleted_at, DROP CONSTRAINT gadgets_pkey")
        .execute(db.pool())
        .await
        .unwrap();
    let report = repo.verify_schema().await.unwrap_err().to_string();
    assert!(
        report.contains("column `deleted_at` is missing"),
        "{report}"
    );
    assert!(report.contains("no unique index on `id`"), "{report}");
    assert!(
        report.contains("`stock`"),
        "every problem at once: {report}"
    );
}

#[tokio::test]
async fn schema_qualified_tables_work() {
    #[derive(Clone, Debug, PartialEq)]
    struct Note {
        id: i64,
        body: String,
    }
    impl keel_core::Entity for Note {
        type Id = i64;
        const NAME: &'static str = "note";
        fn id(&self) -> &i64 {
            &self.id
        }
    }
    impl Mapped for Note {
        fn mapping() -> keel_repository::Mapping {
            keel_repository::Mapping::new("app.notes")
                .id("id", keel_repository::ColumnType::I64)
                .column(
                    keel_repository::Column::new("body", keel_repository::ColumnType::Text)
                        .filterable()
                        .sortable(),
                )
        }
        fn id_value(id: &i64) -> keel_repository::Value {
            (*id).into()
        }
        fn write(&self, row: &mut keel_repository::RowWriter<'_>) {
            row.set("id", self.id).set("body", &self.body);
        }
        fn read(row: &mut keel_repository::Row<'_>) -> Result<Self> {
            Ok(Note {
                id: row.get("id")?,
                body: row.get("body")?,
            })
        }
    }
    let db = TestDatabase::create(&keel_database::MIGRATIONS)
        .await
        .unwrap();
    sqlx::query("CREATE SCHEMA app")
        .execute(db.pool())
        .await
        .unwrap();
    sqlx::query(&Note::mapping().create_table_sql())
        .execute(db.pool())
        .await
        .unwrap();
    let repo = PgRepository::<Note>::new(db.pool().clone()).unwrap();
    repo.verify_schema().await.unwrap();
    let gadgets = TestDatabase::create(&keel_database::MIGRATIONS)
        .await
        .unwrap();
    let missing = PgRepository::<Note>::new(gadgets.pool().clone()).unwrap();
    let report = missing.verify_schema().await.unwrap_err().to_string();
    assert!(
        report.contains("table `app.notes` does not exist"),
        "{report}"
    );
    repo.insert_many(
        (1..=5)
            .map(|id| Note {
                id,
                body: format!("n{id}"),
            })
            .collect(),
    )
    .await
    .unwrap();
    let page = repo
        .list(&ListQuery::new(PageRequest::first(2)).sort_by("body", keel_core::Direction::Desc))
        .await
        .unwrap();
    assert_eq!(
        page.items.iter().map(|s| s.entity.id).collect::<Vec<_>>(),
        [5, 4]
    );
    assert_eq!(repo.get_many(&[3, 1, 9]).await.unwrap().len(), 2);
    let clock: Arc<dyn Clock> = Arc::new(keel_core::SystemClock);
    let with_clock = PgRepository::<Note>::new(db.pool().clone())
        .unwrap()
        .with_clock(clock);
    let s = with_clock
        .upsert(Note {
            id: 1,
            body: "again".into(),
        })
        .await
        .unwrap();
    assert_eq!(s.version, Version::new(2));
}

#[tokio::test]
async fn the_if_not_exists_statement_runs_again_and_keeps_the_rows() {
    let db = TestDatabase::create(&keel_database::MIGRATIONS)
        .await
        .unwrap();
    let create = Gadget::mapping().create_table_if_not_exists_sql();
    sqlx::query(&create).execute(db.pool()).await.unwrap();
    let repo = repo(&db).await;
    repo.verify_schema()
        .await
        .expect("the if-not-exists statement creates the mapped table");
    repo.insert(gadget("a", "x", 1)).await.unwrap();

    // Again, as a restarted service or a second test would: nothing happens.
    sqlx::query(&create).execute(db.pool()).await.unwrap();
    repo.verify_schema().await.unwrap();
    assert_eq!(
        repo.get(&"a".to_owned()).await.unwrap().unwrap().version,
        Version::new(1)
    );

    // The plain statement is the one that refuses an existing table.
    let err = sqlx::query(&Gadget::mapping().create_table_sql())
        .execute(db.pool())
        .await
        .unwrap_err();
    assert_eq!(
        err.as_database_error().and_then(|e| e.code()).as_deref(),
        Some("42P07"),
        "{err:?}"
    );

    // A table of that name with other columns is left alone; verify_schema
    // is what reports it.
    let other = TestDatabase::create(&keel_database::MIGRATIONS)
        .await
        .unwrap();
    sqlx::query("CREATE TABLE gadgets (id TEXT PRIMARY KEY)")
        .execute(other.pool())
        .await
        .unwrap();
    sqlx::query(&create).execute(other.pool()).await.unwrap();
    let report = PgRepository::<Gadget>::new(other.pool().clone())
        .unwrap()
        .verify_schema()
        .await
        .unwrap_err()
        .to_string();
    assert!(report.contains("column `name` is missing"), "{report}");
}
