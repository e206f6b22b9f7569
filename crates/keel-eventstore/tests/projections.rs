//! Projections on PostgreSQL with read models in real tables: crashes and
//! dropped connections mid-batch apply nothing twice, two runners and
//! concurrent writers keep effects exact, readers never see a half-built
//! version, and an ambiguous commit is classified `Unavailable`.

use std::sync::Arc;
use std::time::Duration;

use keel_core::uow::{Transaction, TransactionSource};
use keel_core::{ExpectedVersion, Position, StreamId};
use keel_database::{Database, DatabaseConfig, UnitOfWork};
use keel_eventstore::{
    Appender, NewEvent, PostgresEventStore, Projection, ProjectionHandle, ProjectionId,
    ProjectionOptions, ProjectionRunner, ProjectionStatus, ProjectionSupport, ReadAll,
    RecordedEvent, StoreConfig,
};
use keel_testkit::TestDatabase;
use rand::Rng;
use serde_json::json;

async fn setup() -> (Arc<PostgresEventStore>, Database, TestDatabase) {
    let db = TestDatabase::create(&keel_eventstore::MIGRATIONS)
        .await
        .expect("test database");
    let store = PostgresEventStore::with_config(
        db.pool().clone(),
        StoreConfig::default().settle_timeout(Duration::from_secs(30)),
    );
    let config = DatabaseConfig::builder()
        .connect_options(db.connect_options())
        .min_connections(0)
        .max_connections(20)
        .build()
        .expect("database config");
    (Arc::new(store), Database::connect_lazy(config), db)
}

fn ev(n: u64) -> NewEvent {
    NewEvent::from_json("item.added", &json!({ "n": n }))
}

async fn append(store: &PostgresEventStore, range: std::ops::Range<u64>) -> Position {
    let mut last = Position::START;
    for n in range {
        let r = store
            .append(
                &StreamId::new(format!("Item-{}", n % 5)).unwrap(),
                ExpectedVersion::Any,
                vec![ev(n)],
            )
            .await
            .unwrap();
        last = *r.positions.last().unwrap();
    }
    last
}

/// Inserts one row per event into `table` (no unique key: a second
/// application would show up as a second row), pausing a little so that
/// crashes land in the middle of batches.
#[derive(Clone)]
struct Rows {
    table: String,
    pause: Duration,
}

#[async_trait::async_trait]
impl Projection for Rows {
    async fn apply(
        &self,
        event: &RecordedEvent,
        tx: &mut dyn Transaction,
    ) -> Result<(), keel_core::BoxError> {
        let n = event.payload_value()?["n"].as_i64().unwrap_or(-1);
        let uow = UnitOfWork::join(tx)?;
        sqlx::query(&format!("INSERT INTO {} (n) VALUES ($1)", self.table))
            .bind(n)
            .execute(uow.conn())
            .await?;
        if !self.pause.is_zero() {
            tokio::time::sleep(self.pause).await;
        }
        Ok(())
    }
}

async fn table(db: &TestDatabase, name: &str) {
    sqlx::query(&format!("CREATE TABLE {name} (n bigint NOT NULL)"))
        .execute(db.pool())
        .await
        .unwrap();
}

/// (rows, distinct values) in `table`.
async fn counts(db: &TestDatabase, table: &str) -> (i64, i64) {
    sqlx::query_as(&format!("SELECT count(*), count(DISTINCT n) FROM {table}"))
        .fetch_one(db.pool())
        .await
        .unwrap()
}

fn options(name: &str, version: u32) -> ProjectionOptions {
    ProjectionOptions::new(ProjectionId::new(name, version).unwrap())
        .batch_size(25)
        .poll_interval(Duration::from_millis(50))
        .leadership_retry(Duration::from_millis(100))
}

async fn until(handle: &mut ProjectionHandle, what: &str, f: impl Fn(&ProjectionStatus) -> bool) {
    tokio::time::timeout(Duration::from_secs(60), handle.wait_for(f))
        .await
        .unwrap_or_else(|_| panic!("timed out waiting until {what}: {:?}", handle.status()));
}

/// Ends every other session on the test database: the runner's unit of
/// work, its leadership and its listener all lose their connections.
async fn drop_connections(db: &TestDatabase) -> i64 {
    sqlx::query_scalar(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )
    .fetch_one(db.pool())
    .await
    .unwrap()
}

/// Events at or before `position`: what a projection whose checkpoint is
/// there must have applied, exactly once each.
async fn events_up_to(db: &TestDatabase, position: Position) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM keel.events WHERE (commit, position) <= ($1, $2)")
        .bind(i64::try_from(position.commit).unwrap())
        .bind(i64::try_from(position.sequence).unwrap())
        .fetch_one(db.pool())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crashes_and_dropped_connections_mid_batch_apply_nothing_twice() {
    let (store, units, db) = setup().await;
    table(&db, "effects").await;
    append(&store, 0..600).await;
    let id = ProjectionId::new("effects", 1).unwrap();
    store.register_projection(&id).await.unwrap();
    let units: Arc<dyn TransactionSource> = Arc::new(units);
    let mut previous = 0;
    let mut crashes = 0;
    for round in 0..40 {
        // No pause most rounds, so that a crash often lands between the
        // last insert and the commit, not only inside a handler.
        let rows = Rows {
            table: "effects".into(),
            pause: Duration::from_millis(if round % 3 == 0 { 1 } else { 0 }),
        };
        let mut handle =
            ProjectionRunner::spawn(store.clone(), units.clone(), options("effects", 1), rows);
        until(&mut handle, "leading", |s| s.leader || s.caught_up).await;
        tokio::time::sleep(Duration::from_millis(rand::rng().random_range(0..25))).await;
        if handle.status().caught_up {
            handle.abort().await;
            break;
        }
        if round % 5 == 4 {
            // The database drops every connection, the open transaction's
            // included; the runner resumes by itself from its checkpoint.
            assert!(drop_connections(&db).await > 0);
            let applied = handle.status().applied;
            until(&mut handle, "resumed after the drop", |s| {
                s.applied > applied + 10 || s.caught_up
            })
            .await;
        }
        // A crash: the task is aborted wherever it is.
        handle.abort().await;
        crashes += 1;
        // Rows and checkpoint from one snapshot: an aborted runner's COMMIT
        // may still be on its way to the server and land between two reads.
        let (n, distinct, commit, sequence): (i64, i64, i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM effects), (SELECT count(DISTINCT n) FROM effects), \
                    commit, sequence FROM keel.projections WHERE name = 'effects'",
        )
        .fetch_one(db.pool())
        .await
        .unwrap();
        assert_eq!(n, distinct, "round {round}: an event was applied twice");
        let checkpoint = Position::new(commit as u64, sequence as u64);
        assert_eq!(
            n,
            events_up_to(&db, checkpoint).await,
            "round {round}: effects and checkpoint disagree"
        );
        assert!(n >= previous, "committed effects never vanish");
        previous = n;
    }
    assert!(
        crashes >= 5,
        "only {crashes} crashes landed before the end of the log"
    );
    let last = append(&store, 600..640).await;
    let rows = Rows {
        table: "effects".into(),
        pause: Duration::ZERO,
    };
    let mut handle =
        ProjectionRunner::spawn(store.clone(), units.clone(), options("effects", 1), rows);
    until(&mut handle, "caught up", |s| {
        s.caught_up && s.position == Some(last)
    })
    .await;
    handle.shutdown().await.unwrap();
    assert_eq!(counts(&db, "effects").await, (640, 640));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_runners_and_concurrent_writers_keep_effects_exact() {
    let (store, units, db) = setup().await;
    table(&db, "effects").await;
    let units: Arc<dyn TransactionSource> = Arc::new(units);
    let rows = Rows {
        table: "effects".into(),
        pause: Duration::ZERO,
    };
    let a = ProjectionRunner::spawn(
        store.clone(),
        units.clone(),
        options("pair", 1),
        rows.clone(),
    );
    let b = ProjectionRunner::spawn(
        store.clone(),
        units.clone(),
        options("pair", 1),
        rows.clone(),
    );
    let mut writers = Vec::new();
    for w in 0..8u64 {
        let store = store.clone();
        writers.push(tokio::spawn(async move {
            for i in 0..50u64 {
                let n = w * 1_000 + i;
                store
                    .append(
                        &StreamId::new(format!("Writer-{w}")).unwrap(),
                        ExpectedVersion::Any,
                        vec![ev(n)],
                    )
                    .await
                    .unwrap();
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    // The leader may be either; stop it partway and let the other take over.
    tokio::time::timeout(Duration::from_secs(60), async {
        while a.status().applied + b.status().applied < 100 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("some progress");
    let (leader, mut follower) = if a.status().leader { (a, b) } else { (b, a) };
    assert!(!follower.status().leader, "one leader at a time");
    leader.abort().await;
    until(&mut follower, "took over and caught up", |s| {
        s.leader && s.caught_up
    })
    .await;
    let last = append(&store, 90_000..90_001).await;
    until(&mut follower, "caught up", |s| s.position == Some(last)).await;
    follower.shutdown().await.unwrap();
    assert_eq!(counts(&db, "effects").await, (401, 401));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_checkpoint_moved_by_someone_else_rolls_the_batch_back() {
    let (store, units, db) = setup().await;
    table(&db, "effects").await;
    let id = ProjectionId::new("cas", 1).unwrap();
    store.register_projection(&id).await.unwrap();
    let to = append(&store, 0..1).await;
    let mut first = TransactionSource::begin(&units).await.unwrap();
    let mut second = TransactionSource::begin(&units).await.unwrap();
    store
        .advance_projection(&mut *first, &id, Position::START, to)
        .await
        .unwrap();
    let racing = {
        let store = store.clone();
        let id = id.clone();
        tokio::spawn(async move {
            sqlx::query("INSERT INTO effects (n) VALUES (1)")
                .execute(UnitOfWork::join(&mut *second).unwrap().conn())
                .await
                .unwrap();
            // Waits on the first transaction's row lock, then finds the
            // checkpoint moved.
            let r = store
                .advance_projection(&mut *second, &id, Position::START, to)
                .await;
            let _ = second.rollback().await;
            r
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    first.commit().await.unwrap();
    let err = racing.await.unwrap().unwrap_err();
    assert!(err.is_retryable(), "{err:?}");
    assert_eq!(
        keel_core::Error::from(err).kind(),
        keel_core::ErrorKind::Conflict
    );
    assert_eq!(counts(&db, "effects").await, (0, 0));
    assert_eq!(
        store
            .projection_state(&id)
            .await
            .unwrap()
            .unwrap()
            .checkpoint,
        to
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readers_never_see_a_half_built_version() {
    let (store, units, db) = setup().await;
    table(&db, "model_v1").await;
    table(&db, "model_v2").await;
    let units: Arc<dyn TransactionSource> = Arc::new(units);
    append(&store, 0..120).await;
    let mut v1 = ProjectionRunner::spawn(
        store.clone(),
        units.clone(),
        options("model", 1).batch_size(10),
        Rows {
            table: "model_v1".into(),
            pause: Duration::from_millis(1),
        },
    );
    until(&mut v1, "v1 caught up", |s| s.caught_up).await;
    assert_eq!(
        store.active_projection_version("model").await.unwrap(),
        Some(1)
    );

    // A reader asks for the active version, then reads that version's table.
    let reading = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let reader = {
        let (store, pool, reading) = (store.clone(), db.pool().clone(), reading.clone());
        tokio::spawn(async move {
            let mut reads = Vec::new();
            while reading.load(std::sync::atomic::Ordering::SeqCst) {
                let v = store
                    .active_projection_version("model")
                    .await
                    .unwrap()
                    .expect("a version is active");
                let n: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM model_v{v}"))
                    .fetch_one(&pool)
                    .await
                    .unwrap();
                reads.push((v, n));
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            reads
        })
    };
    let mut v2 = ProjectionRunner::spawn(
        store.clone(),
        units.clone(),
        options("model", 2).batch_size(10),
        Rows {
            table: "model_v2".into(),
            pause: Duration::from_millis(3),
        },
    );
    until(&mut v2, "v2 caught up", |s| s.caught_up).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    reading.store(false, std::sync::atomic::Ordering::SeqCst);
    let reads = reader.await.unwrap();
    assert!(
        reads.iter().any(|r| r.0 == 1) && reads.iter().any(|r| r.0 == 2),
        "{reads:?}"
    );
    assert!(
        reads.iter().all(|&(_, n)| n == 120),
        "a reader saw an incomplete model: {:?}",
        reads.iter().find(|r| r.1 != 120)
    );
    // Then v1 goes: its runner stops, its records and its table are dropped.
    v1.shutdown().await.unwrap();
    store
        .retire_projection(&ProjectionId::new("model", 1).unwrap())
        .await
        .unwrap();
    sqlx::query("DROP TABLE model_v1")
        .execute(db.pool())
        .await
        .unwrap();
    v2.shutdown().await.unwrap();
    assert_eq!(
        store.active_projection_version("model").await.unwrap(),
        Some(2)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_commit_whose_connection_dies_is_unavailable() {
    let (_store, units, db) = setup().await;
    // A deferred trigger makes COMMIT itself slow, so the session can be
    // ended while the server is committing.
    for sql in [
        "CREATE TABLE slow_commit (n int)",
        "CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN PERFORM pg_sleep(30); RETURN NULL; END $$",
        "CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON slow_commit \
         DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit()",
    ] {
        sqlx::query(sql).execute(db.pool()).await.unwrap();
    }
    let mut tx = TransactionSource::begin(&units).await.unwrap();
    let pid: i32 = {
        let uow = UnitOfWork::join(&mut *tx).unwrap();
        sqlx::query("INSERT INTO slow_commit VALUES (1)")
            .execute(uow.conn())
            .await
            .unwrap();
        sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(uow.conn())
            .await
            .unwrap()
    };
    let killer = {
        let pool = db.pool().clone();
        tokio::spawn(async move {
            // Wait until the session is inside the deferred trigger.
            loop {
                let sleeping: bool = sqlx::query_scalar(
                    "SELECT EXISTS (SELECT 1 FROM pg_stat_activity \
                     WHERE pid = $1 AND wait_event = 'PgSleep')",
                )
                .bind(pid)
                .fetch_one(&pool)
                .await
                .unwrap();
                if sleeping {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            sqlx::query("SELECT pg_terminate_backend($1)")
                .bind(pid)
                .execute(&pool)
                .await
                .unwrap();
        })
    };
    let err = tx.commit().await.unwrap_err();
    killer.await.unwrap();
    assert_eq!(err.kind(), keel_core::ErrorKind::Unavailable, "{err:?}");
    assert!(err.is_retryable());
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM slow_commit")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(stored, 0, "the commit did not happen");
}

#[tokio::test]
async fn a_filtered_projection_reports_lag_of_its_own_events() {
    let (store, _units, _db) = setup().await;
    append(&store, 0..10).await;
    store
        .append(
            &StreamId::new("Other-1").unwrap(),
            ExpectedVersion::Any,
            vec![ev(1), ev(2)],
        )
        .await
        .unwrap();
    use keel_eventstore::LogLag;
    let all = store
        .lag_after(Position::START, &ReadAll::from_start())
        .await
        .unwrap();
    assert_eq!(all.events, 12);
    assert!(all.oldest.is_some());
    let other = store
        .lag_after(Position::START, &ReadAll::from_start().category("Other"))
        .await
        .unwrap();
    assert_eq!(other.events, 2);
    let none = store
        .lag_after(Position::new(u64::MAX >> 1, 0), &ReadAll::from_start())
        .await
        .unwrap();
    assert_eq!((none.events, none.oldest), (0, None));
}

#[tokio::test]
async fn a_store_can_be_reset_between_tests_but_truncate_stays_refused() {
    let (store, _units, db) = setup().await;
    append(&store, 0..5).await;
    let id = ProjectionId::new("reset", 1).unwrap();
    store.register_projection(&id).await.unwrap();
    let truncate = sqlx::query("TRUNCATE keel.events").execute(db.pool()).await;
    assert!(truncate.is_err(), "TRUNCATE is still refused");

    keel_eventstore::testing::reset_postgres(db.pool(), &[&keel_eventstore::MIGRATIONS])
        .await
        .unwrap();
    use futures::TryStreamExt;
    use keel_eventstore::GlobalLog;
    let left: Vec<RecordedEvent> = store
        .read_all(ReadAll::from_start())
        .try_collect()
        .await
        .unwrap();
    assert!(left.is_empty());
    assert_eq!(store.projection_state(&id).await.unwrap(), None);
    let r = store
        .append(
            &StreamId::new("Item-0").unwrap(),
            ExpectedVersion::NoStream,
            vec![ev(1)],
        )
        .await
        .unwrap();
    assert_eq!(r.first_version.get(), 1, "streams start over");

    // Never on the cluster's own database.
    let admin = sqlx::PgPool::connect_with(db.connect_options().database("postgres"))
        .await
        .unwrap();
    let refused =
        keel_eventstore::testing::reset_postgres(&admin, &[&keel_eventstore::MIGRATIONS]).await;
    assert!(
        matches!(refused, Err(keel_eventstore::EventStoreError::Invalid(_))),
        "{refused:?}"
    );
}

/// Counts applications; writes nothing.
struct Nothing;

#[async_trait::async_trait]
impl Projection for Nothing {
    async fn apply(
        &self,
        _event: &RecordedEvent,
        _tx: &mut dyn Transaction,
    ) -> Result<(), keel_core::BoxError> {
        Ok(())
    }
}

#[tokio::test]
async fn a_runner_handed_the_wrong_kind_of_transaction_stops_with_a_clear_error() {
    let (store, _units, _db) = setup().await;
    append(&store, 0..3).await;
    let handle = ProjectionRunner::spawn(
        store.clone(),
        Arc::new(keel_core::uow::MemoryTransactions::new()),
        options("miswired", 1),
        Nothing,
    );
    let err = tokio::time::timeout(Duration::from_secs(30), handle.join())
        .await
        .expect("the runner stops")
        .unwrap_err();
    let err = keel_core::Error::from(err);
    assert_eq!(err.kind(), keel_core::ErrorKind::Internal, "{err:?}");
    assert!(err.to_string().contains("cannot join"), "{err}");
}

/// Never finishes handling: a subscription stuck on its first event.
struct Stuck;

#[async_trait::async_trait]
impl keel_eventstore::SubscriptionHandler for Stuck {
    async fn handle(&self, _event: &RecordedEvent) -> Result<(), keel_core::BoxError> {
        std::future::pending::<()>().await;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_subscription_shows_up_in_the_readiness_report() {
    use keel_core::{HealthStatus, Probe};
    use keel_telemetry::health::HealthRegistry;
    let (store, _units, _db) = setup().await;
    append(&store, 0..3).await;
    let mut handle = keel_eventstore::Subscription::spawn(
        store.clone(),
        keel_eventstore::SubscriptionOptions::new("stuck"),
        Stuck,
    );
    tokio::time::timeout(Duration::from_secs(30), handle.wait_for(|s| s.leader))
        .await
        .unwrap();
    let health = HealthRegistry::builder()
        .cache_ttl(Duration::ZERO)
        .show_details(true)
        .build();
    // Stuck past a threshold of zero: any waiting event counts.
    health.register(
        handle
            .progress_check(store.clone())
            .stuck_after(Duration::ZERO),
    );
    let report = health.report(Probe::Readiness).await;
    assert_eq!(report.status, HealthStatus::Unhealthy, "{report:?}");
    let check = &report.checks[0];
    assert_eq!(check.name, "subscription:stuck");
    let detail = check.detail.as_deref().unwrap_or_default();
    assert!(detail.starts_with("stuck: 3 events behind"), "{detail}");
    handle.abort().await;
}

/// Runners and subscriptions stop (or crash) in the middle of a global
/// read. A read cancelled while its read-only transaction was being opened
/// (or inside it) must not hand the connection back to the pool inside that
/// transaction, or the next append on it fails ("cannot execute ... in a
/// read-only transaction"). The store relies on the pool for this: a
/// `keel_database::Database` pool closes such connections on release.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_global_read_leaves_no_transaction_on_the_pool() {
    use futures::TryStreamExt;
    use keel_eventstore::GlobalLog;
    let (_store, _units, db) = setup().await;
    // One connection, so every read and append shares it.
    let config = DatabaseConfig::builder()
        .connect_options(db.connect_options())
        .min_connections(0)
        .max_connections(1)
        .build()
        .expect("database config");
    let database = Database::connect_lazy(config);
    let store = PostgresEventStore::with_config(
        database.pool().clone(),
        StoreConfig::default().settle_timeout(Duration::from_secs(30)),
    );
    append(&store, 0..20).await;
    let mut rng = rand::rng();
    for i in 0..400u64 {
        let cut = Duration::from_micros(rng.random_range(0..1_500));
        let _ = tokio::time::timeout(
            cut,
            store
                .read_all(ReadAll::from_start().page_size(5))
                .try_collect::<Vec<_>>(),
        )
        .await;
        store
            .append(
                &StreamId::new("After-1").unwrap(),
                ExpectedVersion::Any,
                vec![ev(1_000 + i)],
            )
            .await
            .unwrap_or_else(|e| panic!("append after cancelled read {i}: {e:?}"));
    }
    // Some cuts fell inside a read's transaction: the pool closed those
    // connections (so the run above did exercise the release check).
    assert!(
        database.stats().closed_on_release > 0,
        "{:?}",
        database.stats()
    );
}
