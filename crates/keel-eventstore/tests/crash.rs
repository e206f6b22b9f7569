//! The gap-safety stress across a crash of PostgreSQL: a private cluster
//! (never the shared one) is killed as a power cut would and started again
//! while writers append and a reader tails the global log, with a foreign
//! transaction holding a transaction id in another database before and
//! after the crash.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::TryStreamExt;
use keel_core::{EventId, ExpectedVersion, Position, StreamId};
use keel_eventstore::{Appender, GlobalLog, NewEvent, PostgresEventStore, ReadAll, StoreConfig};
use keel_testkit::ThrowawayPostgres;
use rand::Rng;
use serde_json::json;
use sqlx::Connection;

fn ev(n: u64) -> NewEvent {
    NewEvent::from_json("test.happened", &json!({ "n": n }))
}

/// A transaction in database `postgres` that holds an xid and stays open.
async fn foreign(pg: &ThrowawayPostgres) -> sqlx::PgConnection {
    let mut conn = sqlx::PgConnection::connect_with(&pg.connect_options().database("postgres"))
        .await
        .unwrap();
    sqlx::query("BEGIN").execute(&mut conn).await.unwrap();
    sqlx::query("SELECT txid_current()")
        .execute(&mut conn)
        .await
        .unwrap();
    conn
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crash_mid_run_loses_no_committed_event_and_repeats_none() {
    const WRITERS: usize = 6;
    const TXS_PER_WRITER: usize = 40;
    let pg = ThrowawayPostgres::new().await.expect("a private cluster");
    let mut admin = sqlx::PgConnection::connect_with(&pg.connect_options().database("postgres"))
        .await
        .unwrap();
    sqlx::query("CREATE DATABASE crash")
        .execute(&mut admin)
        .await
        .unwrap();
    // The kit's private clusters trade durability for speed; a commit that
    // was answered must survive this crash, so make commits wait for their
    // WAL again (a killed server keeps what reached the operating system).
    sqlx::query("ALTER SYSTEM SET synchronous_commit = on")
        .execute(&mut admin)
        .await
        .unwrap();
    sqlx::query("SELECT pg_reload_conf()")
        .execute(&mut admin)
        .await
        .unwrap();
    admin.close().await.unwrap();
    let options = pg.connect_options().database("crash");
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(12)
        .acquire_timeout(Duration::from_secs(30))
        .connect_with(options.clone())
        .await
        .unwrap();
    let units = keel_database::Database::connect_lazy(
        keel_database::DatabaseConfig::builder()
            .connect_options(options)
            .min_connections(0)
            .max_connections(12)
            .build()
            .unwrap(),
    );
    keel_database::migrate(&pool, &[&keel_eventstore::MIGRATIONS])
        .await
        .unwrap();
    let store = PostgresEventStore::with_config(
        pool.clone(),
        StoreConfig::default()
            .read_batch_size(7)
            .settle_timeout(Duration::from_secs(2)),
    );
    let mut before = foreign(&pg).await;
    let _ = sqlx::query("SELECT 1").execute(&mut before).await;

    // Surely committed (the commit returned), surely not (rolled back or
    // failed before the commit), and unknown (the commit itself failed).
    let committed = Arc::new(Mutex::new(HashSet::<EventId>::new()));
    let not_committed = Arc::new(Mutex::new(HashSet::<EventId>::new()));
    let unknown = Arc::new(Mutex::new(HashSet::<EventId>::new()));
    let running = Arc::new(AtomicUsize::new(WRITERS));
    let progress = Arc::new(AtomicUsize::new(0));

    let reader = {
        let store = store.clone();
        let running = running.clone();
        tokio::spawn(async move {
            let mut seen: Vec<(Position, EventId, String, u64)> = Vec::new();
            let mut checkpoint = Position::START;
            let mut quiet_rounds = 0;
            loop {
                let finished = running.load(Ordering::SeqCst) == 0;
                let batch: Result<Vec<_>, _> = store
                    .read_all(ReadAll::after(checkpoint))
                    .try_collect()
                    .await;
                // A read interrupted by the crash keeps what it delivered
                // before the error (its checkpoint moved with it).
                let got = match batch {
                    Ok(b) => b,
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                if got.is_empty() && finished {
                    quiet_rounds += 1;
                    if quiet_rounds > 3 {
                        return seen;
                    }
                }
                for e in got {
                    seen.push((
                        e.position,
                        e.event_id,
                        e.stream_id.to_string(),
                        e.version.get(),
                    ));
                    checkpoint = e.position;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };

    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let (store, units) = (store.clone(), units.clone());
        let (committed, not_committed, unknown) =
            (committed.clone(), not_committed.clone(), unknown.clone());
        let (running, progress) = (running.clone(), progress.clone());
        writers.push(tokio::spawn(async move {
            for t in 0..TXS_PER_WRITER {
                let (pause, rollback, autocommit, stream) = {
                    let mut rng = rand::rng();
                    (
                        rng.random_range(0..15u64),
                        rng.random_bool(0.2),
                        rng.random_bool(0.3),
                        rng.random_range(0..4u32),
                    )
                };
                let stream = StreamId::new(format!("Crash-{stream}")).unwrap();
                let n = (w * 1000 + t) as u64;
                let batch = vec![ev(n * 10), ev(n * 10 + 1)];
                let ids: Vec<EventId> = batch.iter().map(NewEvent::event_id).collect();
                if autocommit {
                    match store.append(&stream, ExpectedVersion::Any, batch).await {
                        Ok(_) => committed.lock().unwrap().extend(ids),
                        Err(_) => unknown.lock().unwrap().extend(ids),
                    }
                } else {
                    let mut tx = match units.begin().await {
                        Ok(tx) => tx,
                        Err(_) => {
                            not_committed.lock().unwrap().extend(ids);
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            progress.fetch_add(1, Ordering::SeqCst);
                            continue;
                        }
                    };
                    // Holds a transaction id before it appends, as a unit of
                    // work that writes elsewhere first does.
                    let appended =
                        match sqlx::query("SELECT txid_current()").execute(&mut *tx).await {
                            Ok(_) => {
                                tokio::time::sleep(Duration::from_millis(pause)).await;
                                store
                                    .within(&mut tx)
                                    .append(&stream, ExpectedVersion::Any, batch)
                                    .await
                                    .is_ok()
                            }
                            Err(_) => false,
                        };
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                    if !appended || rollback {
                        let _ = tx.rollback().await;
                        not_committed.lock().unwrap().extend(ids);
                    } else {
                        match tx.commit().await {
                            Ok(()) => committed.lock().unwrap().extend(ids),
                            Err(_) => unknown.lock().unwrap().extend(ids),
                        }
                    }
                }
                progress.fetch_add(1, Ordering::SeqCst);
            }
            running.fetch_sub(1, Ordering::SeqCst);
        }));
    }

    // Crash once a third of the work is done, then start again.
    while progress.load(Ordering::SeqCst) < WRITERS * TXS_PER_WRITER / 3 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let at_crash = committed.lock().unwrap().len();
    pg.kill().await.unwrap();
    drop(before);
    tokio::time::sleep(Duration::from_millis(300)).await;
    pg.start().await.unwrap();
    let mut after = foreign(&pg).await;

    for w in writers {
        w.await.unwrap();
    }
    let seen = tokio::time::timeout(Duration::from_secs(120), reader)
        .await
        .expect("the reader caught up with the foreign transaction open")
        .unwrap();
    let still_open: bool =
        sqlx::query_scalar("SELECT pg_current_xact_id_if_assigned() IS NOT NULL")
            .fetch_one(&mut after)
            .await
            .unwrap();
    assert!(still_open, "the foreign transaction stayed open");

    let committed = committed.lock().unwrap().clone();
    let not_committed = not_committed.lock().unwrap().clone();
    let unknown = unknown.lock().unwrap().clone();
    assert!(committed.len() > 100, "enough events committed");
    assert!(
        at_crash > 0 && committed.len() > at_crash,
        "events were committed before and after the crash"
    );
    assert!(!not_committed.is_empty());
    let mut counts: HashMap<EventId, usize> = HashMap::new();
    for (_, id, _, _) in &seen {
        *counts.entry(*id).or_default() += 1;
    }
    assert!(counts.values().all(|&c| c == 1), "no event seen twice");
    let seen_ids: HashSet<EventId> = counts.keys().copied().collect();
    assert!(committed.is_subset(&seen_ids), "every committed event seen");
    assert!(
        seen_ids.is_disjoint(&not_committed),
        "nothing rolled back seen"
    );
    assert!(
        seen_ids
            .difference(&committed)
            .all(|id| unknown.contains(id)),
        "anything else seen was an append whose commit went unanswered"
    );
    assert!(
        seen.windows(2).all(|w| w[0].0 < w[1].0),
        "positions increase"
    );
    let mut next: HashMap<&str, u64> = HashMap::new();
    for (_, _, stream, version) in &seen {
        let expected = next.entry(stream.as_str()).or_insert(1);
        assert_eq!(version, expected, "stream {stream} in version order");
        *expected += 1;
    }
    // The reader's view is the log's.
    let full: Vec<_> = store
        .read_all(ReadAll::from_start())
        .try_collect()
        .await
        .unwrap();
    assert_eq!(
        full.iter().map(|e| e.event_id).collect::<Vec<_>>(),
        seen.iter().map(|s| s.1).collect::<Vec<_>>()
    );
    sqlx::query("ROLLBACK").execute(&mut after).await.unwrap();
    pool.close().await;
}
