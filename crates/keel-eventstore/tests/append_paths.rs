//! The autocommit append paths against the real PostgreSQL: batches on the
//! one-statement fast path (a plain `INSERT … RETURNING`, one row per
//! event), their conflicts, retries and refusals, many writers on one
//! stream, and the upgrade to the migration that made the statements
//! lighter (`20261207091000`).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures::TryStreamExt;
use keel_core::{ExpectedVersion, StreamId, Version};
use keel_eventstore::{
    Appender, EventStoreError, GlobalLog, NewEvent, PostgresEventStore, ReadAll, ReadStream,
    RecordedEvent, StoreConfig, StreamReader,
};
use keel_testkit::TestDatabase;
use serde_json::json;

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

fn sid(s: &str) -> StreamId {
    StreamId::new(s).unwrap()
}

/// Event `k` of batch `batch` written by `writer`.
fn ev(writer: usize, batch: usize, k: usize) -> NewEvent {
    NewEvent::from_json(
        "test.batched",
        &json!({ "writer": writer, "batch": batch, "k": k }),
    )
}

fn batch(writer: usize, batch_no: usize, len: usize) -> Vec<NewEvent> {
    (0..len).map(|k| ev(writer, batch_no, k)).collect()
}

async fn read(store: &PostgresEventStore, s: &StreamId) -> Vec<RecordedEvent> {
    store
        .read_stream(s, ReadStream::forward())
        .try_collect()
        .await
        .unwrap()
}

async fn log(store: &PostgresEventStore) -> Vec<RecordedEvent> {
    store
        .read_all(ReadAll::from_start())
        .try_collect()
        .await
        .unwrap()
}

/// Every expectation mode through a 50-event batch: the result's versions
/// and positions are exactly what is read back, in version order.
#[tokio::test]
async fn batch_results_match_what_is_stored_for_every_expectation() {
    let (store, _db) = store().await;
    let s = sid("Paths-1");
    let steps = [
        ExpectedVersion::NoStream,
        ExpectedVersion::Exact(Version::new(50)),
        ExpectedVersion::StreamExists,
        ExpectedVersion::Any,
    ];
    let mut results = Vec::new();
    for (i, expected) in steps.into_iter().enumerate() {
        let r = store.append(&s, expected, batch(0, i, 50)).await.unwrap();
        assert!(!r.was_retry);
        assert_eq!(r.first_version, Version::new(i as u64 * 50 + 1));
        assert_eq!(r.next_expected_version, Version::new(i as u64 * 50 + 50));
        assert_eq!(r.positions.len(), 50);
        results.push(r);
    }
    let stored = read(&store, &s).await;
    assert_eq!(stored.len(), 200);
    let returned: Vec<_> = results.iter().flat_map(|r| r.positions.clone()).collect();
    let read_back: Vec<_> = stored.iter().map(|e| e.position).collect();
    assert_eq!(returned, read_back);
    for (i, e) in stored.iter().enumerate() {
        assert_eq!(e.version, Version::new(i as u64 + 1));
        let p = e.payload_value().unwrap();
        assert_eq!(p["batch"], json!(i / 50));
        assert_eq!(p["k"], json!(i % 50));
    }
    // One commit key per batch, positions rising inside it.
    for r in &results {
        assert!(
            r.positions
                .iter()
                .all(|p| p.commit == r.positions[0].commit)
        );
        assert!(r.positions.windows(2).all(|w| w[0] < w[1]));
    }
    assert!(
        results
            .windows(2)
            .all(|w| w[0].positions[49] < w[1].positions[0])
    );

    // A failed expectation on the fast path stores nothing and names the
    // actual version.
    for expected in [
        ExpectedVersion::NoStream,
        ExpectedVersion::Exact(Version::new(150)),
        ExpectedVersion::Exact(Version::new(201)),
    ] {
        let e = store
            .append(&s, expected, batch(0, 99, 50))
            .await
            .unwrap_err();
        match e {
            EventStoreError::Conflict(c) => assert_eq!(c.actual, Version::new(200)),
            other => panic!("expected a conflict, got {other:?}"),
        }
    }
    let e = store
        .append(
            &sid("Paths-none"),
            ExpectedVersion::StreamExists,
            batch(0, 0, 50),
        )
        .await
        .unwrap_err();
    assert!(matches!(e, EventStoreError::Conflict(_)), "{e:?}");
    assert_eq!(log(&store).await.len(), 200);
}

/// A 50-event batch retried as it was returns the stored result; the same
/// batch with one event changed (same id, other content) is refused,
/// naming that id, and writes nothing.
#[tokio::test]
async fn a_retried_batch_is_idempotent_and_a_changed_one_is_refused() {
    let (store, _db) = store().await;
    let s = sid("Paths-2");
    let events = batch(1, 0, 50);
    let first = store
        .append(&s, ExpectedVersion::NoStream, events.clone())
        .await
        .unwrap();
    for expected in [ExpectedVersion::NoStream, ExpectedVersion::Any] {
        let again = store.append(&s, expected, events.clone()).await.unwrap();
        assert!(again.was_retry);
        assert_eq!(again.positions, first.positions);
        assert_eq!(again.next_expected_version, Version::new(50));
    }

    let mut changed = events.clone();
    let reused = changed[17].event_id();
    changed[17] = ev(1, 0, 1_000).with_id(reused);
    let e = store
        .append(&s, ExpectedVersion::NoStream, changed)
        .await
        .unwrap_err();
    assert!(
        matches!(e, EventStoreError::EventIdReused { event_id, .. } if event_id == reused),
        "{e:?}"
    );
    // One used id inside an otherwise new batch, on another stream.
    let mut mixed = batch(2, 0, 50);
    mixed[30] = mixed[30].clone().with_id(events[3].event_id());
    let e = store
        .append(&sid("Paths-3"), ExpectedVersion::NoStream, mixed)
        .await
        .unwrap_err();
    assert!(
        matches!(e, EventStoreError::EventIdReused { event_id, .. } if event_id == events[3].event_id()),
        "{e:?}"
    );
    assert_eq!(
        store.stream_version(&sid("Paths-3")).await.unwrap(),
        Version::INITIAL
    );
    assert_eq!(log(&store).await.len(), 50);
}

/// A batch holding one oversize payload, or built from bytes that are not
/// JSON, is refused before anything is sent: typed errors, nothing stored.
#[tokio::test]
async fn oversize_and_malformed_payloads_in_a_batch_write_nothing() {
    let db = TestDatabase::create(&keel_eventstore::MIGRATIONS)
        .await
        .unwrap();
    let store =
        PostgresEventStore::with_config(db.pool().clone(), patient().max_payload_bytes(1_000));
    let s = sid("Paths-4");
    let mut events = batch(3, 0, 49);
    events.push(NewEvent::from_json(
        "test.big",
        &json!({ "blob": "x".repeat(2_000) }),
    ));
    let e = store
        .append(&s, ExpectedVersion::NoStream, events)
        .await
        .unwrap_err();
    assert!(
        matches!(e, EventStoreError::PayloadTooLarge { limit: 1_000, .. }),
        "{e:?}"
    );
    let e = NewEvent::from_json_bytes("test.bad", b"{\"a\": 1,").unwrap_err();
    assert!(matches!(e, EventStoreError::NotJson { .. }), "{e:?}");
    // Bad event types are refused in the client now that the table has no
    // CHECK constraints: the typed error, and no row.
    let mut events = batch(3, 1, 10);
    events[5] = NewEvent::from_json("", &json!({}));
    let e = store
        .append(&s, ExpectedVersion::NoStream, events)
        .await
        .unwrap_err();
    assert!(matches!(e, EventStoreError::Invalid(_)), "{e:?}");
    assert_eq!(store.stream_version(&s).await.unwrap(), Version::INITIAL);
    assert!(log(&store).await.is_empty());
}

/// Many writers race 1- to 50-event batches onto one stream with exact
/// expectations, re-reading the version after each conflict. Afterwards
/// the stream holds every acknowledged batch exactly once, each batch's
/// events consecutive and in order under one commit key, versions
/// contiguous, and the global log in the stream's version order.
#[tokio::test]
async fn concurrent_batch_writers_on_one_stream_keep_it_exact() {
    let (store, _db) = store().await;
    let store = Arc::new(store);
    let s = sid("Paths-5");
    let writers = 12;
    let batches_per_writer = 15;
    let mut tasks = Vec::new();
    for w in 0..writers {
        let (store, s) = (store.clone(), s.clone());
        tasks.push(tokio::spawn(async move {
            let mut acknowledged = Vec::new();
            let mut conflicts = 0;
            for b in 0..batches_per_writer {
                let len = 1 + (w * 7 + b * 13) % 50;
                let events = batch(w, b, len);
                loop {
                    let at = store.stream_version(&s).await.unwrap();
                    match store
                        .append(&s, ExpectedVersion::Exact(at), events.clone())
                        .await
                    {
                        Ok(r) => {
                            assert_eq!(r.positions.len(), len);
                            acknowledged.push((b, len, r));
                            break;
                        }
                        Err(EventStoreError::Conflict(_)) => conflicts += 1,
                        Err(e) => panic!("writer {w}: {e:?}"),
                    }
                }
            }
            (w, acknowledged, conflicts)
        }));
    }
    let mut expected_total = 0;
    let mut all_conflicts = 0;
    let mut acks = Vec::new();
    for t in tasks {
        let (w, acknowledged, conflicts) = t.await.unwrap();
        all_conflicts += conflicts;
        for (b, len, r) in acknowledged {
            expected_total += len;
            acks.push((w, b, len, r));
        }
    }
    // The race was real: writers did collide.
    assert!(all_conflicts > 0, "no writer ever conflicted");

    let stored = read(&store, &s).await;
    assert_eq!(stored.len(), expected_total);
    for (i, e) in stored.iter().enumerate() {
        assert_eq!(e.version, Version::new(i as u64 + 1));
    }
    let ids: HashSet<_> = stored.iter().map(|e| e.event_id).collect();
    assert_eq!(ids.len(), expected_total);
    for (w, b, len, r) in &acks {
        let first = usize::try_from(r.first_version.get()).unwrap() - 1;
        let run = &stored[first..first + len];
        for (k, e) in run.iter().enumerate() {
            let p = e.payload_value().unwrap();
            assert_eq!(
                (p["writer"].clone(), p["batch"].clone(), p["k"].clone()),
                (json!(w), json!(b), json!(k))
            );
            assert_eq!(e.position, r.positions[k]);
            assert_eq!(e.position.commit, r.positions[0].commit);
        }
    }
    // Per-stream order holds in the global log.
    let global: Vec<_> = log(&store)
        .await
        .into_iter()
        .filter(|e| e.stream_id == s)
        .map(|e| e.version)
        .collect();
    assert_eq!(global, stored.iter().map(|e| e.version).collect::<Vec<_>>());
}

/// A store created before migration `20261207091000`, with events in it,
/// upgrades in place: the stored events stay as they were, appends after
/// the upgrade continue the streams and the commit order, and the new
/// functions publish their keys (the horizon passes every committed
/// append, and stops at an open one).
#[tokio::test]
async fn upgrading_to_the_lighter_append_keeps_the_log() {
    const UPGRADE: i64 = 20261207091000;
    // The migrations as they stood before, in a directory of their own
    // (the keel schema first, which keel_database's runner creates).
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("00000000000000_keel_schema.sql"),
        "CREATE SCHEMA IF NOT EXISTS keel;",
    )
    .unwrap();
    let source = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
    let mut upgrade_sql = None;
    for entry in std::fs::read_dir(&source).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
        let version: i64 = name[..14].parse().unwrap();
        if version < UPGRADE {
            std::fs::copy(&path, dir.path().join(&name)).unwrap();
        } else if version == UPGRADE {
            upgrade_sql = Some(std::fs::read_to_string(&path).unwrap());
        }
    }
    let before = sqlx::migrate::Migrator::new(dir.path()).await.unwrap();
    let db = TestDatabase::create(&before).await.unwrap();
    let pool = db.pool().clone();
    let store = PostgresEventStore::with_config(pool.clone(), patient());
    let checks = |pool: sqlx::PgPool| async move {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_constraint WHERE conrelid = 'keel.events'::regclass \
             AND contype = 'c'",
        )
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    assert_eq!(checks(pool.clone()).await, 3);

    let a = sid("Upgrade-A");
    let b = sid("Upgrade-B");
    store
        .append(&a, ExpectedVersion::NoStream, batch(0, 0, 1))
        .await
        .unwrap();
    store
        .append(&b, ExpectedVersion::NoStream, batch(1, 0, 20))
        .await
        .unwrap();
    let old_log = log(&store).await;
    assert_eq!(old_log.len(), 21);

    sqlx::raw_sql(upgrade_sql.as_deref().expect("the upgrade migration"))
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(checks(pool.clone()).await, 0);

    let after_a = store
        .append(&a, ExpectedVersion::Exact(Version::new(1)), batch(0, 1, 1))
        .await
        .unwrap();
    let after_b = store
        .append(
            &b,
            ExpectedVersion::Exact(Version::new(20)),
            batch(1, 1, 30),
        )
        .await
        .unwrap();
    // Inside a caller's transaction (keel.next_commit(), also replaced).
    let units = keel_database::Database::connect_lazy(
        keel_database::DatabaseConfig::builder()
            .connect_options(db.connect_options())
            .min_connections(0)
            .max_connections(4)
            .build()
            .unwrap(),
    );
    let mut tx = units.begin().await.unwrap();
    store
        .within(&mut tx)
        .append(&a, ExpectedVersion::Exact(Version::new(2)), batch(0, 2, 2))
        .await
        .unwrap();
    store
        .within(&mut tx)
        .append(&b, ExpectedVersion::Exact(Version::new(50)), batch(1, 2, 1))
        .await
        .unwrap();
    // An open appender holds the horizon at its first key, no further.
    let held: Option<i64> = sqlx::query_scalar("SELECT keel.commit_horizon()")
        .fetch_one(&pool)
        .await
        .unwrap();
    let open_first: i64 = sqlx::query_scalar(
        "SELECT min(first_commit) FROM keel.commit_holders() WHERE first_commit IS NOT NULL",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(held, Some(open_first));
    tx.commit().await.unwrap();

    let new_log = log(&store).await;
    assert_eq!(new_log.len(), 21 + 1 + 30 + 3);
    // What was stored before the upgrade is unchanged and still first.
    for (old, new) in old_log.iter().zip(&new_log) {
        assert_eq!(old.event_id, new.event_id);
        assert_eq!(old.position, new.position);
        assert_eq!(old.payload, new.payload);
    }
    let last_old = old_log.last().unwrap().position;
    assert!(after_a.positions[0] > last_old);
    assert!(after_b.positions[0] > after_a.positions[0]);
    assert!(new_log.windows(2).all(|w| w[0].position < w[1].position));
    assert_eq!(read(&store, &a).await.len(), 4);
    assert_eq!(read(&store, &b).await.len(), 51);
    let horizon: Option<i64> = sqlx::query_scalar("SELECT keel.commit_horizon()")
        .fetch_one(&pool)
        .await
        .unwrap();
    let last_commit = i64::try_from(new_log.last().unwrap().position.commit).unwrap();
    units.close().await;
    assert!(horizon.unwrap() > last_commit);
}
