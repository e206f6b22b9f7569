//! PostgreSQL-only behaviour: immutability in the database, gap-safe global
//! order under concurrent out-of-order commits, appends inside a caller's
//! transaction.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::TryStreamExt;
use keel_core::{EventId, ExpectedVersion, Position, StreamId, Version};
use keel_eventstore::{
    Appender, EventStoreError, GlobalLog, NewEvent, PostgresEventStore, ReadAll, RecordedEvent,
    StoreConfig, StreamReader, Subscription, SubscriptionHandle, SubscriptionHandler,
    SubscriptionOptions, SubscriptionStatus, SubscriptionSupport,
};
use keel_testkit::TestDatabase;
use rand::Rng;
use serde_json::json;

/// Reads wait for the horizon for up to 30 s: it is cluster-wide, and other
/// tests' CREATE/DROP DATABASE hold it back for seconds at times.
fn patient() -> StoreConfig {
    StoreConfig::default().settle_timeout(Duration::from_secs(30))
}

async fn store() -> (PostgresEventStore, TestDatabase) {
    let db = TestDatabase::create(&keel_eventstore::MIGRATIONS)
        .await
        .expect("test database");
    (
        PostgresEventStore::with_config(db.pool().clone(), patient()),
        db,
    )
}

/// Units of work on the test database, as a service's composition root
/// would make them (`keel_database::Database`).
fn units(db: &TestDatabase) -> keel_database::Database {
    let config = keel_database::DatabaseConfig::builder()
        .connect_options(db.connect_options())
        .min_connections(0)
        .max_connections(20)
        .build()
        .expect("database config");
    keel_database::Database::connect_lazy(config)
}

fn sid(s: &str) -> StreamId {
    StreamId::new(s).unwrap()
}

fn ev(n: u64) -> NewEvent {
    NewEvent::from_json("test.happened", &json!({ "n": n }))
}

fn sqlstate(e: &sqlx::Error) -> Option<String> {
    match e {
        sqlx::Error::Database(db) => db.code().map(|c| c.into_owned()),
        _ => None,
    }
}

#[tokio::test]
async fn the_database_refuses_update_delete_and_truncate() {
    let (store, db) = store().await;
    store
        .append(
            &sid("Fact-1"),
            ExpectedVersion::NoStream,
            vec![ev(1), ev(2)],
        )
        .await
        .unwrap();
    for sql in [
        "UPDATE keel.events SET payload = '{}'",
        "UPDATE keel.events SET version = version + 10 WHERE version = 1",
        "DELETE FROM keel.events",
        "DELETE FROM keel.events WHERE version = 2",
        "TRUNCATE keel.events",
        "TRUNCATE keel.events CASCADE",
    ] {
        let err = sqlx::query(sql).execute(db.pool()).await.unwrap_err();
        assert_eq!(sqlstate(&err).as_deref(), Some("KL002"), "{sql}: {err}");
    }
    let rows: Vec<(i64, String)> =
        sqlx::query_as("SELECT version, payload::text FROM keel.events ORDER BY version")
            .fetch_all(db.pool())
            .await
            .unwrap();
    assert_eq!(
        rows,
        vec![(1, r#"{"n":1}"#.to_owned()), (2, r#"{"n":2}"#.to_owned())]
    );
}

#[tokio::test]
async fn appends_join_the_callers_transaction() {
    let (store, db) = store().await;
    let s = sid("Uow-1");

    let mut tx = units(&db).begin().await.unwrap();
    let r = store
        .within(&mut tx)
        .append(&s, ExpectedVersion::NoStream, vec![ev(1)])
        .await
        .unwrap();
    assert_eq!(r.next_expected_version, Version::new(1));
    tx.rollback().await.unwrap();
    assert_eq!(store.stream_version(&s).await.unwrap(), Version::INITIAL);
    let log: Vec<_> = store
        .read_all(ReadAll::from_start())
        .try_collect()
        .await
        .unwrap();
    assert!(log.is_empty(), "a rolled-back unit of work leaves no event");

    let mut tx = units(&db).begin().await.unwrap();
    store
        .within(&mut tx)
        .append(&s, ExpectedVersion::NoStream, vec![ev(1)])
        .await
        .unwrap();
    sqlx::query("CREATE TEMP TABLE side_effect (x int)")
        .execute(&mut *tx)
        .await
        .unwrap();
    let conflict = store
        .within(&mut tx)
        .append(&s, ExpectedVersion::NoStream, vec![ev(2)])
        .await
        .unwrap_err();
    assert_eq!(conflict.as_conflict().unwrap().actual, Version::new(1));
    tx.commit().await.unwrap();
    assert_eq!(store.stream_version(&s).await.unwrap(), Version::new(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_event_id_raced_into_two_streams_is_stored_once() {
    let (store, _db) = store().await;
    for round in 0..20 {
        let id = EventId::new();
        let mut tasks = Vec::new();
        for w in 0..4 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let s = sid(&format!("IdRace-{round}-{w}"));
                store
                    .append(&s, ExpectedVersion::Any, vec![ev(round).with_id(id)])
                    .await
            }));
        }
        let mut ok = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(_) => ok += 1,
                Err(EventStoreError::EventIdReused { event_id, .. }) => assert_eq!(event_id, id),
                Err(other) => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(ok, 1, "round {round}");
    }
    let log: Vec<_> = store
        .read_all(ReadAll::from_start())
        .try_collect()
        .await
        .unwrap();
    assert_eq!(log.len(), 20);
    let streams: i64 = sqlx::query_scalar("SELECT count(DISTINCT stream_id) FROM keel.events")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(streams, 20, "losing writers leave no event behind");
    for round in 0..20 {
        let mut versions = Vec::new();
        for w in 0..4 {
            let s = sid(&format!("IdRace-{round}-{w}"));
            versions.push(store.stream_version(&s).await.unwrap().get());
        }
        versions.sort_unstable();
        assert_eq!(
            versions,
            [0, 0, 0, 1],
            "round {round}: one stream holds the event"
        );
    }
}

/// A transaction outside the store that holds a transaction id and stays
/// open until dropped: the kind of transaction (a batch job, a report, a
/// migration) that used to hold every reader of the cluster back.
struct Foreign {
    conn: sqlx::PgConnection,
}

impl Foreign {
    /// Opens it on `url`; with `write` it also writes a row (into a table of
    /// its own), as a unit of work does before it appends.
    async fn open(url: &str, write: bool) -> Self {
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
        sqlx::query("CREATE TABLE IF NOT EXISTS foreign_work (x int)")
            .execute(&mut conn)
            .await
            .unwrap();
        sqlx::query("BEGIN").execute(&mut conn).await.unwrap();
        sqlx::query("SELECT txid_current()")
            .execute(&mut conn)
            .await
            .unwrap();
        if write {
            sqlx::query("INSERT INTO foreign_work VALUES (1)")
                .execute(&mut conn)
                .await
                .unwrap();
        }
        Self { conn }
    }

    /// Whether it is still open (the server still counts its transaction).
    async fn still_open(&mut self) -> bool {
        let state: Option<String> =
            sqlx::query_scalar("SELECT state FROM pg_stat_activity WHERE pid = pg_backend_pid()")
                .fetch_one(&mut self.conn)
                .await
                .unwrap();
        // Asking runs a statement, so the session reports itself active;
        // the transaction is what matters.
        let in_tx: bool = sqlx::query_scalar("SELECT pg_current_xact_id_if_assigned() IS NOT NULL")
            .fetch_one(&mut self.conn)
            .await
            .unwrap();
        state.is_some() && in_tx
    }

    async fn end(mut self) {
        sqlx::query("ROLLBACK")
            .execute(&mut self.conn)
            .await
            .unwrap();
    }
}

/// What one writer's transaction does in the stress test.
#[derive(Clone, Copy, Debug)]
enum Shape {
    /// A unit of work that appends once.
    Plain,
    /// A unit of work that writes a row elsewhere first (so it holds a
    /// transaction id long before it appends), then appends.
    WritesFirst,
    /// A unit of work that appends in a savepoint, rolls the savepoint back,
    /// then appends again.
    Savepoint,
    /// A unit of work that appends to two streams in two statements.
    TwoAppends,
    /// A one-statement append outside any unit of work.
    Autocommit,
}

/// Many writers (units of work with random pauses before and after their
/// appends, so their commits land out of key order; rollbacks; savepoint
/// rollbacks; writes elsewhere before the first append; one-statement
/// appends) while a reader tails the global log in small batches from its
/// last checkpoint, and while three foreign transactions stay open for the
/// whole run: one in another database that appended events there, one in
/// another database that only holds a transaction id, and one in this
/// database that holds a transaction id and wrote a row but never appends.
///
/// The reader sees every committed event exactly once, no rolled-back
/// event, positions strictly increasing, each stream's versions in order
/// and without a hole; and it sees them all while the foreign transactions
/// are still open (they held the reader back until the read horizon
/// stopped being cluster-wide).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tailing_reader_sees_every_committed_event_exactly_once() {
    const WRITERS: usize = 12;
    const TXS_PER_WRITER: usize = 25;
    const READERS: usize = 4;
    let db = TestDatabase::create(&keel_eventstore::MIGRATIONS)
        .await
        .unwrap();
    let other = TestDatabase::create(&keel_eventstore::MIGRATIONS)
        .await
        .unwrap();
    sqlx::query("CREATE TABLE stress_side (x bigint)")
        .execute(db.pool())
        .await
        .unwrap();

    // The foreign transactions, open before the first append.
    let other_store = PostgresEventStore::new(other.pool().clone());
    let mut other_appender = units(&other).begin().await.unwrap();
    other_store
        .within(&mut other_appender)
        .append(&sid("Elsewhere-1"), ExpectedVersion::Any, vec![ev(1)])
        .await
        .unwrap();
    let mut foreign = vec![
        Foreign::open(&other.url(), false).await,
        Foreign::open(&db.url(), true).await,
    ];

    let store = PostgresEventStore::with_config(
        db.pool().clone(),
        StoreConfig::default()
            .read_batch_size(7)
            .settle_timeout(Duration::from_secs(5)),
    );
    let committed = Arc::new(Mutex::new(HashSet::<EventId>::new()));
    let rolled_back = Arc::new(Mutex::new(HashSet::<EventId>::new()));
    let running = Arc::new(std::sync::atomic::AtomicUsize::new(WRITERS));

    // Several tailing readers on clones of one store: they share its read
    // horizon (a value one of them computed up to `horizon_max_age` ago),
    // and each must still see every committed event once, in one order.
    let readers: Vec<_> = (0..READERS)
        .map(|_| {
            let store = store.clone();
            let running = running.clone();
            let committed = committed.clone();
            tokio::spawn(async move {
                let mut seen: Vec<(Position, EventId, String, u64)> = Vec::new();
                let mut checkpoint = Position::START;
                loop {
                    let finished = running.load(std::sync::atomic::Ordering::SeqCst) == 0;
                    let batch: Vec<_> = store
                        .read_all(ReadAll::after(checkpoint))
                        .try_collect()
                        .await
                        .unwrap();
                    for e in batch {
                        seen.push((
                            e.position,
                            e.event_id,
                            e.stream_id.to_string(),
                            e.version.get(),
                        ));
                        checkpoint = e.position;
                    }
                    // Done once every committed event is in (or, should one
                    // never come, the test's timeout says so).
                    if finished && seen.len() >= committed.lock().unwrap().len() {
                        return seen;
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            })
        })
        .collect();

    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let store = store.clone();
        let pool = units(&db);
        let committed = committed.clone();
        let rolled_back = rolled_back.clone();
        let running = running.clone();
        writers.push(tokio::spawn(async move {
            for t in 0..TXS_PER_WRITER {
                let (pause_before, pause_after, events, stream, rollback, shape) = {
                    let mut rng = rand::rng();
                    let shape = match rng.random_range(0..6u32) {
                        0 | 1 => Shape::Plain,
                        2 => Shape::WritesFirst,
                        3 => Shape::Savepoint,
                        4 => Shape::TwoAppends,
                        _ => Shape::Autocommit,
                    };
                    (
                        rng.random_range(0..4u64),
                        rng.random_range(0..12u64),
                        rng.random_range(1..4u64),
                        rng.random_range(0..6u32),
                        rng.random_bool(0.2),
                        shape,
                    )
                };
                let n = |i: u64| (w * 1000 + t) as u64 * 10 + i;
                let batch = |from: u64| -> Vec<NewEvent> {
                    (from..from + events).map(|i| ev(n(i))).collect()
                };
                let ids_of =
                    |b: &[NewEvent]| -> Vec<EventId> { b.iter().map(NewEvent::event_id).collect() };
                let stream = sid(&format!("Stress-{stream}"));
                if let Shape::Autocommit = shape {
                    let b = batch(0);
                    let ids = ids_of(&b);
                    store
                        .append(&stream, ExpectedVersion::Any, b)
                        .await
                        .unwrap();
                    committed.lock().unwrap().extend(ids);
                    continue;
                }
                let mut tx = pool.begin().await.unwrap();
                let mut ids = Vec::new();
                if let Shape::WritesFirst = shape {
                    sqlx::query("INSERT INTO stress_side VALUES ($1)")
                        .bind(n(0) as i64)
                        .execute(&mut *tx)
                        .await
                        .unwrap();
                }
                tokio::time::sleep(Duration::from_millis(pause_before)).await;
                if let Shape::Savepoint = shape {
                    sqlx::query("SAVEPOINT undone")
                        .execute(&mut *tx)
                        .await
                        .unwrap();
                    let b = batch(5);
                    let undone = ids_of(&b);
                    store
                        .within(&mut tx)
                        .append(&stream, ExpectedVersion::Any, b)
                        .await
                        .unwrap();
                    tokio::time::sleep(Duration::from_millis(pause_before)).await;
                    sqlx::query("ROLLBACK TO SAVEPOINT undone")
                        .execute(&mut *tx)
                        .await
                        .unwrap();
                    rolled_back.lock().unwrap().extend(undone);
                }
                let b = batch(0);
                ids.extend(ids_of(&b));
                store
                    .within(&mut tx)
                    .append(&stream, ExpectedVersion::Any, b)
                    .await
                    .unwrap();
                if let Shape::TwoAppends = shape {
                    tokio::time::sleep(Duration::from_millis(pause_before)).await;
                    let b = batch(5);
                    ids.extend(ids_of(&b));
                    store
                        .within(&mut tx)
                        .append(&sid(&format!("Stress-x{w}")), ExpectedVersion::Any, b)
                        .await
                        .unwrap();
                }
                // The keys are taken; now commit late (or never).
                tokio::time::sleep(Duration::from_millis(pause_after)).await;
                if rollback {
                    tx.rollback().await.unwrap();
                    rolled_back.lock().unwrap().extend(ids);
                } else {
                    tx.commit().await.unwrap();
                    committed.lock().unwrap().extend(ids);
                }
            }
            running.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    let mut seens = Vec::new();
    for reader in readers {
        seens.push(
            tokio::time::timeout(Duration::from_secs(60), reader)
                .await
                .expect("the reader caught up while the foreign transactions were open")
                .unwrap(),
        );
    }
    for other in &seens[1..] {
        assert_eq!(other, &seens[0], "every reader saw the same log");
    }
    let seen = seens.swap_remove(0);
    // They were open all along.
    for f in &mut foreign {
        assert!(
            f.still_open().await,
            "the foreign transaction is still open"
        );
    }

    let committed = committed.lock().unwrap().clone();
    let rolled_back = rolled_back.lock().unwrap().clone();
    assert!(committed.len() > 200, "the test wrote enough events");
    assert!(!rolled_back.is_empty(), "some transactions rolled back");
    let mut counts: HashMap<EventId, usize> = HashMap::new();
    for (_, id, _, _) in &seen {
        *counts.entry(*id).or_default() += 1;
    }
    assert!(counts.values().all(|&c| c == 1), "no event was seen twice");
    let seen_ids: HashSet<EventId> = counts.keys().copied().collect();
    assert!(
        seen_ids.is_disjoint(&rolled_back),
        "no rolled-back event was seen"
    );
    assert_eq!(
        seen_ids.len(),
        committed.len(),
        "every committed event was seen"
    );
    assert_eq!(seen_ids, committed);
    assert!(
        seen.windows(2).all(|w| w[0].0 < w[1].0),
        "positions strictly increase"
    );
    // Per-stream order: in the global order, each stream's versions run
    // 1, 2, 3, ... (a later version never gets a smaller key, even when its
    // transaction took a transaction id long before the earlier version's).
    let mut next: HashMap<&str, u64> = HashMap::new();
    for (_, _, stream, version) in &seen {
        let expected = next.entry(stream.as_str()).or_insert(1);
        assert_eq!(version, expected, "stream {stream} read in version order");
        *expected += 1;
    }
    // The hazard was real: sequence order disagreed with key order, so a
    // reader checkpointing by sequence alone would have skipped events.
    let inversions = seen
        .windows(2)
        .filter(|w| w[0].0.sequence > w[1].0.sequence)
        .count();
    assert!(inversions > 0, "writers committed out of sequence order");
    // The reader's order is the order a full read gives afterwards.
    let full: Vec<_> = store
        .read_all(ReadAll::from_start())
        .try_collect()
        .await
        .unwrap();
    assert_eq!(
        full.iter()
            .map(|e| (e.position, e.event_id))
            .collect::<Vec<_>>(),
        seen.iter()
            .map(|(p, id, _, _)| (*p, *id))
            .collect::<Vec<_>>()
    );

    // The other database's open appender held back only its own database.
    let quick = PostgresEventStore::with_config(
        other.pool().clone(),
        StoreConfig::default().settle_timeout(Duration::from_millis(50)),
    );
    let there: Vec<_> = quick
        .read_all(ReadAll::from_start())
        .try_collect()
        .await
        .unwrap();
    assert!(there.is_empty(), "its own append is not final yet");
    other_appender.commit().await.unwrap();
    let there: Vec<_> = quick
        .read_all(ReadAll::from_start())
        .try_collect()
        .await
        .unwrap();
    assert_eq!(there.len(), 1);
    for f in foreign {
        f.end().await;
    }
}

#[tokio::test]
async fn a_long_transaction_holds_back_the_horizon_but_loses_nothing() {
    let (store, db) = store().await;
    let quick = PostgresEventStore::with_config(
        db.pool().clone(),
        StoreConfig::default().settle_timeout(Duration::from_millis(50)),
    );
    let mut long = units(&db).begin().await.unwrap();
    store
        .within(&mut long)
        .append(&sid("Slow-1"), ExpectedVersion::Any, vec![ev(1)])
        .await
        .unwrap();
    store
        .append(&sid("Fast-1"), ExpectedVersion::Any, vec![ev(2)])
        .await
        .unwrap();
    let visible: Vec<_> = quick
        .read_all(ReadAll::from_start())
        .try_collect()
        .await
        .unwrap();
    assert!(
        visible.is_empty(),
        "a later commit waits behind the open transaction"
    );
    // The stream read does not depend on the horizon.
    let fast: Vec<_> = store
        .read_stream(&sid("Fast-1"), keel_eventstore::ReadStream::forward())
        .try_collect()
        .await
        .unwrap();
    assert_eq!(fast.len(), 1);
    long.commit().await.unwrap();
    let visible: Vec<_> = store
        .read_all(ReadAll::from_start())
        .try_collect()
        .await
        .unwrap();
    let streams: Vec<&str> = visible.iter().map(|e| e.stream_id.as_str()).collect();
    assert_eq!(
        streams,
        vec!["Slow-1", "Fast-1"],
        "commit order, not sequence order"
    );
}

#[tokio::test]
async fn rebasing_commit_order_moves_new_commits_above_stored_ones() {
    let (store, db) = store().await;
    store
        .append(&sid("Rebase-1"), ExpectedVersion::Any, vec![ev(1)])
        .await
        .unwrap();
    // Simulate a restored dump whose commit keys are far above this
    // cluster's transaction ids (the migration refuses UPDATE, so the row is
    // written with an explicit commit key).
    sqlx::query(
        "INSERT INTO keel.events (commit, event_id, stream_id, version, event_type, schema_version, payload, metadata) \
         VALUES (1000000000, gen_random_uuid(), 'Restored-1', 1, 'test.happened', 1, '{\"n\":0}', '{}')",
    )
    .execute(db.pool())
    .await
    .unwrap();
    let offset: i64 = sqlx::query_scalar("SELECT keel.rebase_commit_order()")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert!(offset > 0);
    // A fresh pool: plans cached before the rebase keep the old offset.
    let pool = sqlx::PgPool::connect(&db.url()).await.unwrap();
    let store = PostgresEventStore::with_config(pool.clone(), patient());
    let r = store
        .append(&sid("Rebase-2"), ExpectedVersion::Any, vec![ev(2)])
        .await
        .unwrap();
    assert!(r.positions[0].commit > 1_000_000_000);
    let log: Vec<_> = store
        .read_all(ReadAll::from_start())
        .try_collect()
        .await
        .unwrap();
    let streams: Vec<&str> = log.iter().map(|e| e.stream_id.as_str()).collect();
    assert_eq!(streams, vec!["Rebase-1", "Restored-1", "Rebase-2"]);
    pool.close().await;
}

#[derive(Clone, Default)]
struct Numbers(Arc<Mutex<Vec<u64>>>);

#[async_trait::async_trait]
impl SubscriptionHandler for Numbers {
    async fn handle(&self, event: &RecordedEvent) -> Result<(), keel_core::BoxError> {
        let n = event.payload_value()?["n"].as_u64().unwrap_or(0);
        self.0.lock().unwrap().push(n);
        Ok(())
    }
}

async fn until(
    handle: &mut SubscriptionHandle,
    what: &str,
    f: impl Fn(&SubscriptionStatus) -> bool,
) {
    tokio::time::timeout(Duration::from_secs(20), handle.wait_for(f))
        .await
        .unwrap_or_else(|_| panic!("timed out waiting until {what}: {:?}", handle.status()));
}

/// The leader's session dies (its backend is terminated, as when its host
/// vanishes): the advisory lock goes with it, a follower takes over from the
/// checkpoint, and the old leader notices and stops delivering.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_terminated_leader_session_hands_over() {
    let (store, db) = store().await;
    let store = Arc::new(store);
    store
        .append(
            &sid("Takeover-1"),
            ExpectedVersion::NoStream,
            (1..=5).map(ev).collect(),
        )
        .await
        .unwrap();
    let options = SubscriptionOptions::new("takeover")
        .checkpoint(1, Duration::from_millis(50))
        .poll_interval(Duration::from_millis(50))
        .leadership_retry(Duration::from_millis(50));
    let first = Numbers::default();
    // A, once it lost leadership, waits 10 s before contending again: B, the
    // follower retrying every 50 ms, takes over in the meantime.
    let mut a = Subscription::spawn(
        store.clone(),
        options.clone().leadership_retry(Duration::from_secs(10)),
        first.clone(),
    );
    until(&mut a, "A leads and caught up", |s| {
        s.leader && s.handled >= 5
    })
    .await;
    let second = Numbers::default();
    let mut b = Subscription::spawn(store.clone(), options, second.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!b.status().leader);
    tokio::time::timeout(Duration::from_secs(20), async {
        while store.load_checkpoint("takeover").await.unwrap() != a.status().position {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap();

    let holders: Vec<i32> = sqlx::query_scalar(
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted \
           AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
    .fetch_all(db.pool())
    .await
    .unwrap();
    assert_eq!(
        holders.len(),
        1,
        "exactly one session holds the leadership lock"
    );
    let killed: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(holders[0])
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert!(killed);

    until(&mut b, "B took over", |s| s.leader).await;
    until(&mut a, "A noticed", |s| !s.leader).await;
    store
        .append(
            &sid("Takeover-1"),
            ExpectedVersion::Exact(Version::new(5)),
            (6..=8).map(ev).collect(),
        )
        .await
        .unwrap();
    until(&mut b, "B handled the new events", |s| s.handled >= 3).await;
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
    assert_eq!(*first.0.lock().unwrap(), vec![1, 2, 3, 4, 5]);
    assert_eq!(*second.0.lock().unwrap(), vec![6, 7, 8]);
}

/// With a polling interval far beyond the test's patience, only the append
/// notifications can wake the subscription: after autocommit appends (sent
/// by the store's notifier) and after a unit of work commits (sent in its
/// transaction).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn notifications_wake_a_caught_up_subscription() {
    let (store, db) = store().await;
    let store = Arc::new(store);
    let seen = Numbers::default();
    // Checkpoints after every event, so no pending checkpoint shortens the wait.
    let options = SubscriptionOptions::new("woken")
        .poll_interval(Duration::from_secs(3_600))
        .checkpoint(1, Duration::from_secs(3_600));
    let mut handle = Subscription::spawn(store.clone(), options, seen.clone());
    until(&mut handle, "leading", |s| s.leader).await;
    // Let it reach its (empty) end and start waiting.
    tokio::time::sleep(Duration::from_millis(300)).await;

    store
        .append(&sid("Wake-1"), ExpectedVersion::Any, vec![ev(1)])
        .await
        .unwrap();
    until(&mut handle, "woken by an append", |s| s.handled >= 1).await;

    let mut tx = units(&db).begin().await.unwrap();
    store
        .within(&mut tx)
        .append(&sid("Wake-2"), ExpectedVersion::Any, vec![ev(2)])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    until(&mut handle, "woken by a unit of work", |s| s.handled >= 2).await;
    handle.shutdown().await.unwrap();
    assert_eq!(*seen.0.lock().unwrap(), vec![1, 2]);
}

/// Multi-stream appends naming the same streams in opposite orders neither
/// deadlock nor fail: streams are locked in one global order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crossing_multi_stream_appends_do_not_deadlock() {
    use keel_eventstore::StreamAppend;
    let (store, _db) = store().await;
    let (a, b) = (sid("Cross-a"), sid("Cross-b"));
    let mut tasks = Vec::new();
    for t in 0..8u64 {
        let store = store.clone();
        let (first, second) = if t % 2 == 0 {
            (a.clone(), b.clone())
        } else {
            (b.clone(), a.clone())
        };
        tasks.push(tokio::spawn(async move {
            for i in 0..15u64 {
                let results = store
                    .append_multi(vec![
                        StreamAppend::new(
                            first.clone(),
                            ExpectedVersion::Any,
                            vec![ev(t * 100 + i)],
                        ),
                        StreamAppend::new(
                            second.clone(),
                            ExpectedVersion::Any,
                            vec![ev(t * 100 + i)],
                        ),
                    ])
                    .await
                    .expect("no deadlock");
                assert_eq!(
                    results[0].stream_id, first,
                    "results keep the request order"
                );
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(store.stream_version(&a).await.unwrap(), Version::new(120));
    assert_eq!(store.stream_version(&b).await.unwrap(), Version::new(120));
}

/// Autocommit appends (the one-statement path) and appends inside callers'
/// transactions (the procedure, held open for a random while) race on one
/// stream, open and exact expectations mixed; exact writers re-read the
/// version and try again on a conflict. Afterwards the stream is dense and
/// holds every committed event exactly once, and no rolled-back one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_statement_and_transactional_appends_interleave_safely() {
    let (store, db) = store().await;
    let s = sid("Mixed-1");
    let mut tasks = Vec::new();
    for w in 0..8u64 {
        let (store, pool, s) = (store.clone(), units(&db), s.clone());
        tasks.push(tokio::spawn(async move {
            let mut committed = Vec::new();
            for a in 0..12u64 {
                let n = w * 1_000 + a;
                let (pause, roll_back) = {
                    let mut rng = rand::rng();
                    (rng.random_range(0..6u64), rng.random_range(0..10u32) == 0)
                };
                match w % 4 {
                    // open appends, one statement each
                    0 => {
                        store
                            .append(&s, ExpectedVersion::Any, vec![ev(n)])
                            .await
                            .unwrap();
                        committed.push(n);
                    }
                    // exact appends, retried on conflict
                    1 => loop {
                        let at = store.stream_version(&s).await.unwrap();
                        match store
                            .append(&s, ExpectedVersion::Exact(at), vec![ev(n)])
                            .await
                        {
                            Ok(_) => break committed.push(n),
                            Err(e) if e.as_conflict().is_some() => continue,
                            Err(e) => panic!("unexpected {e:?}"),
                        }
                    },
                    // open appends in a unit of work that stays open a while
                    2 => {
                        let mut tx = pool.begin().await.unwrap();
                        store
                            .within(&mut tx)
                            .append(&s, ExpectedVersion::Any, vec![ev(n)])
                            .await
                            .unwrap();
                        tokio::time::sleep(Duration::from_millis(pause)).await;
                        if roll_back {
                            tx.rollback().await.unwrap();
                        } else {
                            tx.commit().await.unwrap();
                            committed.push(n);
                        }
                    }
                    // exact appends in a unit of work, retried on conflict
                    _ => loop {
                        let at = store.stream_version(&s).await.unwrap();
                        let mut tx = pool.begin().await.unwrap();
                        let appended = store
                            .within(&mut tx)
                            .append(&s, ExpectedVersion::Exact(at), vec![ev(n)])
                            .await;
                        match appended {
                            Ok(_) => {
                                tokio::time::sleep(Duration::from_millis(pause)).await;
                                tx.commit().await.unwrap();
                                break committed.push(n);
                            }
                            Err(e) if e.as_conflict().is_some() => {
                                tx.rollback().await.unwrap();
                            }
                            Err(e) => panic!("unexpected {e:?}"),
                        }
                    },
                }
            }
            committed
        }));
    }
    let mut committed = Vec::new();
    for t in tasks {
        committed.extend(t.await.unwrap());
    }
    let events: Vec<RecordedEvent> = store
        .read_stream(&s, keel_eventstore::ReadStream::forward())
        .try_collect()
        .await
        .unwrap();
    let versions: Vec<u64> = events.iter().map(|e| e.version.get()).collect();
    assert_eq!(
        versions,
        (1..=events.len() as u64).collect::<Vec<_>>(),
        "dense"
    );
    let mut stored: Vec<u64> = events
        .iter()
        .map(|e| e.payload_value().unwrap()["n"].as_u64().unwrap())
        .collect();
    stored.sort_unstable();
    committed.sort_unstable();
    assert_eq!(
        stored, committed,
        "every committed event once, no rolled-back one"
    );
    assert_eq!(
        store.stream_version(&s).await.unwrap().get(),
        committed.len() as u64
    );
}

/// A caller's REPEATABLE READ transaction cannot see a version committed
/// after its snapshot, so it cannot place an open append after it: the
/// append fails with a retryable error and leaves the stream as it was; a
/// fresh transaction then succeeds.
#[tokio::test]
async fn a_snapshot_that_missed_an_append_gets_a_retryable_error() {
    let (store, db) = store().await;
    let s = sid("Snapshot-1");
    store
        .append(&s, ExpectedVersion::NoStream, vec![ev(1)])
        .await
        .unwrap();

    let mut tx = units(&db).begin().await.unwrap();
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        .execute(&mut *tx)
        .await
        .unwrap();
    let seen: i64 = sqlx::query_scalar("SELECT count(*) FROM keel.events")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(seen, 1, "the snapshot is taken");
    store
        .append(&s, ExpectedVersion::Any, vec![ev(2)])
        .await
        .unwrap();

    let err = store
        .within(&mut tx)
        .append(&s, ExpectedVersion::Any, vec![ev(3)])
        .await
        .unwrap_err();
    assert!(err.is_retryable(), "{err:?}");
    tx.rollback().await.unwrap();
    assert_eq!(store.stream_version(&s).await.unwrap(), Version::new(2));

    let mut tx = units(&db).begin().await.unwrap();
    let r = store
        .within(&mut tx)
        .append(&s, ExpectedVersion::Any, vec![ev(3)])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(r.first_version, Version::new(3));
}

/// A subscription keeps delivering, event by event, while transactions that
/// never append stay open: one in another database, one in this database
/// that holds a transaction id and has written a row. Both used to hold
/// every reader of the cluster back until they ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_subscription_keeps_delivering_while_foreign_transactions_stay_open() {
    let (store, db) = store().await;
    let other = TestDatabase::create(&keel_eventstore::MIGRATIONS)
        .await
        .unwrap();
    let mut foreign = vec![
        Foreign::open(&other.url(), false).await,
        Foreign::open(&db.url(), true).await,
    ];
    let store = Arc::new(store);
    let seen = Numbers::default();
    let options = SubscriptionOptions::new("undisturbed").poll_interval(Duration::from_millis(50));
    let mut handle = Subscription::spawn(store.clone(), options, seen.clone());
    for n in 1..=20u64 {
        if n % 2 == 0 {
            store
                .append(&sid("Live-1"), ExpectedVersion::Any, vec![ev(n)])
                .await
                .unwrap();
        } else {
            let mut tx = units(&db).begin().await.unwrap();
            store
                .within(&mut tx)
                .append(&sid("Live-1"), ExpectedVersion::Any, vec![ev(n)])
                .await
                .unwrap();
            tx.commit().await.unwrap();
        }
        until(&mut handle, "the event is delivered", |s| s.handled >= n).await;
    }
    for f in &mut foreign {
        assert!(
            f.still_open().await,
            "the foreign transaction is still open"
        );
    }
    handle.shutdown().await.unwrap();
    assert_eq!(*seen.0.lock().unwrap(), (1..=20).collect::<Vec<_>>());
    // Nothing holds the horizon: it is one past the last key handed out.
    let horizon = store.read_horizon().await.unwrap();
    assert_eq!(horizon.held_by, None);
    assert_eq!(horizon.held_keys(), Some(0));
    for f in foreign {
        f.end().await;
    }
}

/// An open unit of work holds readers back only from its first append on:
/// events stored before that are delivered (even those stored after it took
/// a transaction id), later ones wait, and once it commits its events and
/// the later ones arrive, each exactly once, in key order. The store names
/// the holder.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_open_appender_holds_back_only_what_follows_its_first_append() {
    let (store, db) = store().await;
    sqlx::query("CREATE TABLE side (x int)")
        .execute(db.pool())
        .await
        .unwrap();
    let store = Arc::new(store);
    store
        .append(&sid("Before-1"), ExpectedVersion::Any, vec![ev(1)])
        .await
        .unwrap();
    let mut long = units(&db).begin().await.unwrap();
    sqlx::query("INSERT INTO side VALUES (1)")
        .execute(&mut *long)
        .await
        .unwrap();
    let long_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut *long)
        .await
        .unwrap();
    store
        .append(&sid("Before-2"), ExpectedVersion::Any, vec![ev(2)])
        .await
        .unwrap();
    let seen = Numbers::default();
    let options = SubscriptionOptions::new("held").poll_interval(Duration::from_millis(50));
    let mut handle = Subscription::spawn(store.clone(), options, seen.clone());
    until(&mut handle, "the events before the append", |s| {
        s.handled >= 2
    })
    .await;

    let held = store
        .within(&mut long)
        .append(&sid("Slow-1"), ExpectedVersion::Any, vec![ev(3)])
        .await
        .unwrap();
    let first_key = held.positions[0].commit;
    let horizon = store.read_horizon().await.unwrap();
    assert_eq!(horizon.horizon, Some(first_key), "held at its first key");
    let holder = horizon.held_by.expect("a holder");
    assert_eq!((holder.pid, holder.first_commit), (long_pid, first_key));
    assert!(holder.open_for.is_some());
    for n in 4..=5 {
        store
            .append(&sid("After-1"), ExpectedVersion::Any, vec![ev(n)])
            .await
            .unwrap();
    }
    // A second append in the open transaction takes a later key.
    let again = store
        .within(&mut long)
        .append(&sid("Slow-1"), ExpectedVersion::Any, vec![ev(6)])
        .await
        .unwrap();
    assert!(again.positions[0].commit > first_key);
    let quick = PostgresEventStore::with_config(
        db.pool().clone(),
        StoreConfig::default().settle_timeout(Duration::from_millis(50)),
    );
    let visible: Vec<_> = quick
        .read_all(ReadAll::from_start())
        .try_collect()
        .await
        .unwrap();
    let numbers = |log: &[RecordedEvent]| -> Vec<u64> {
        log.iter()
            .map(|e| e.payload_value().unwrap()["n"].as_u64().unwrap())
            .collect()
    };
    assert_eq!(
        numbers(&visible),
        vec![1, 2],
        "only what precedes its append"
    );
    assert_eq!(*seen.0.lock().unwrap(), vec![1, 2]);

    long.commit().await.unwrap();
    until(&mut handle, "everything after the commit", |s| {
        s.handled >= 6
    })
    .await;
    handle.shutdown().await.unwrap();
    assert_eq!(*seen.0.lock().unwrap(), vec![1, 2, 3, 4, 5, 6]);
    let log: Vec<_> = store
        .read_all(ReadAll::from_start())
        .try_collect()
        .await
        .unwrap();
    assert_eq!(numbers(&log), vec![1, 2, 3, 4, 5, 6]);
    assert_eq!(store.read_horizon().await.unwrap().held_by, None);
}

/// The commit key's bookkeeping follows savepoints: an append rolled back
/// with its savepoint publishes nothing that outlives it, and the next
/// append publishes again; a transaction that only reads or writes other
/// tables takes no key and holds nobody back.
#[tokio::test]
async fn savepoints_and_non_appending_transactions_leave_the_horizon_alone() {
    let (store, db) = store().await;
    let mut tx = units(&db).begin().await.unwrap();
    sqlx::query("CREATE TABLE elsewhere (x int)")
        .execute(&mut *tx)
        .await
        .unwrap();
    assert_eq!(store.read_horizon().await.unwrap().held_by, None);
    sqlx::query("SAVEPOINT a").execute(&mut *tx).await.unwrap();
    let undone = store
        .within(&mut tx)
        .append(&sid("Sp-1"), ExpectedVersion::Any, vec![ev(1)])
        .await
        .unwrap();
    let held = store.read_horizon().await.unwrap().held_by.unwrap();
    assert_eq!(held.first_commit, undone.positions[0].commit);
    sqlx::query("ROLLBACK TO SAVEPOINT a")
        .execute(&mut *tx)
        .await
        .unwrap();
    assert_eq!(store.read_horizon().await.unwrap().held_by, None);
    let kept = store
        .within(&mut tx)
        .append(&sid("Sp-1"), ExpectedVersion::Any, vec![ev(2)])
        .await
        .unwrap();
    let held = store.read_horizon().await.unwrap().held_by.unwrap();
    assert_eq!(held.first_commit, kept.positions[0].commit);
    assert!(kept.positions[0].commit > undone.positions[0].commit);
    tx.commit().await.unwrap();
    let horizon = store.read_horizon().await.unwrap();
    assert_eq!(horizon.held_by, None);
    assert_eq!(horizon.horizon, Some(horizon.last_commit + 1));
    let log: Vec<_> = store
        .read_all(ReadAll::from_start())
        .try_collect()
        .await
        .unwrap();
    assert_eq!(log.len(), 1);
    assert_eq!(log[0].version, Version::new(1));
}

/// Keel's pool hands connections out without a ping, so an append can meet
/// a connection the server killed while it sat idle. The append is sent
/// again on a fresh connection and succeeds; nothing is stored twice.
#[tokio::test]
async fn an_append_on_a_connection_killed_while_idle_is_sent_again() {
    let db = TestDatabase::create(&keel_eventstore::MIGRATIONS)
        .await
        .expect("test database");
    let config = keel_database::DatabaseConfig::builder()
        .connect_options(db.connect_options())
        .min_connections(0)
        .max_connections(1)
        .build()
        .expect("database config");
    let units = keel_database::Database::connect(config).await.unwrap();
    let store = PostgresEventStore::with_config(units.pool().clone(), patient());
    let stream = sid("Revived-1");
    store
        .append(&stream, ExpectedVersion::NoStream, vec![ev(1)])
        .await
        .unwrap();
    // The pool's only connection, idle again once released.
    let pid: i32 = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let mut conn = units.acquire().await.unwrap();
            let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
                .fetch_one(&mut *conn)
                .await
                .unwrap();
            if units.stats().size == 1 {
                break pid;
            }
        }
    })
    .await
    .unwrap();
    tokio::time::timeout(Duration::from_secs(10), async {
        while units.stats().idle < 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap();
    let killed: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(pid)
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert!(killed);

    for (n, expected) in [(2, 1), (3, 2)] {
        let appended = store
            .append(
                &stream,
                ExpectedVersion::Exact(Version::new(expected)),
                vec![ev(n)],
            )
            .await
            .expect("the append survives the dead connection");
        assert_eq!(appended.first_version, Version::new(n));
        assert!(!appended.was_retry);
    }
    let stored: Vec<RecordedEvent> = store
        .read_stream(&stream, keel_eventstore::ReadStream::forward())
        .try_collect()
        .await
        .unwrap();
    let versions: Vec<u64> = stored.iter().map(|e| e.version.get()).collect();
    assert_eq!(versions, vec![1, 2, 3]);
}

/// A writer caught between taking its first key and publishing it (here a
/// transaction that holds only the gate lock) makes the horizon unknown:
/// readers get nothing new rather than a horizon that might pass it. A
/// service's own advisory locks (the `bigint` form, or the two-`int4` form
/// outside Keel's range) do not count.
#[tokio::test]
async fn a_half_published_key_makes_the_horizon_unknown_not_wrong() {
    let (store, db) = store().await;
    store
        .append(&sid("Gate-1"), ExpectedVersion::Any, vec![ev(1)])
        .await
        .unwrap();
    let mut others = units(&db).begin().await.unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock(1262878720), pg_advisory_xact_lock(7, 7)")
        .execute(&mut *others)
        .await
        .unwrap();
    let horizon = store.read_horizon().await.unwrap();
    assert_eq!(horizon.horizon, Some(horizon.last_commit + 1));
    assert_eq!(horizon.held_by, None);

    let mut half = units(&db).begin().await.unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock_shared(1262878720, pg_backend_pid())")
        .execute(&mut *half)
        .await
        .unwrap();
    assert_eq!(store.read_horizon().await.unwrap().horizon, None);
    let quick = PostgresEventStore::with_config(
        db.pool().clone(),
        StoreConfig::default().settle_timeout(Duration::from_millis(50)),
    );
    let log: Vec<_> = quick
        .read_all(ReadAll::from_start())
        .try_collect()
        .await
        .unwrap();
    assert!(
        log.is_empty(),
        "nothing is read while the horizon is unknown"
    );
    half.rollback().await.unwrap();
    let log: Vec<_> = quick
        .read_all(ReadAll::from_start())
        .try_collect()
        .await
        .unwrap();
    assert_eq!(log.len(), 1);
    others.rollback().await.unwrap();
}

/// Readers of one store share its read horizon. Eight reads at once, each
/// of ten one-row batches, on a store that may reuse a horizon for an hour:
/// a read's first batch takes a horizon computed since that read began (at
/// most one computation per read, fewer when reads start together), its
/// other batches reuse the shared one. With sharing off, every batch
/// computes its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readers_of_one_store_share_one_horizon_scan() {
    const READS: u64 = 8;
    let db = TestDatabase::create(&keel_eventstore::MIGRATIONS)
        .await
        .unwrap();
    PostgresEventStore::new(db.pool().clone())
        .append(
            &sid("Shared-1"),
            ExpectedVersion::Any,
            (0..10).map(ev).collect(),
        )
        .await
        .unwrap();
    for max_age in [Duration::from_secs(3600), Duration::ZERO] {
        let store =
            PostgresEventStore::with_config(db.pool().clone(), patient().horizon_max_age(max_age));
        let reads: Vec<_> = (0..READS)
            .map(|_| {
                let store = store.clone();
                tokio::spawn(async move {
                    store
                        .read_all(ReadAll::from_start().page_size(1))
                        .try_collect::<Vec<_>>()
                        .await
                        .unwrap()
                        .len()
                })
            })
            .collect();
        for read in reads {
            assert_eq!(read.await.unwrap(), 10, "max_age {max_age:?}");
        }
        // Ten full batches and an empty one per read; every read ended at
        // the end of the log, so none waited for the horizon to settle.
        let scans = store.horizon_scans();
        if max_age.is_zero() {
            assert_eq!(scans, READS * 11);
        } else {
            assert!((1..=READS).contains(&scans), "{scans} scans");
        }
    }
}

/// A horizon reused from before an append never hides that append from the
/// appender's next read: the read finds committed events above the shared
/// horizon at its end and computes a fresh one (the read-your-writes wait).
#[tokio::test]
async fn a_reused_horizon_delays_nothing_a_reader_wrote() {
    let (_, db) = store().await;
    let store = PostgresEventStore::with_config(
        db.pool().clone(),
        patient().horizon_max_age(Duration::from_secs(3600)),
    );
    let mut checkpoint = Position::START;
    for round in 0..20u64 {
        store
            .append(&sid("Mine-1"), ExpectedVersion::Any, vec![ev(round)])
            .await
            .unwrap();
        let read: Vec<_> = store
            .read_all(ReadAll::after(checkpoint))
            .try_collect()
            .await
            .unwrap();
        assert_eq!(read.len(), 1, "round {round}");
        assert_eq!(read[0].payload_value().unwrap()["n"], round);
        checkpoint = read[0].position;
    }
}
