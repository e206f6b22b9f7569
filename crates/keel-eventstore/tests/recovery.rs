//! Backup and recovery of the event store's database with PostgreSQL's own
//! tools, on private clusters (never the shared server):
//!
//! * point-in-time recovery: WAL archiving, `pg_basebackup`, events written
//!   after the backup, recovery into a new cluster up to a target time and
//!   up to a named restore point;
//! * a logical dump (`pg_dump` / `pg_restore`) into a new cluster, followed
//!   by `keel.rebase_commit_order()`.
//!
//! After each restore the tests check what `docs/operations.md` promises:
//! everything committed before the target is there and nothing after it,
//! stream versions are contiguous, the global log reads back in order, and
//! appends and catch-up subscriptions carry on from their checkpoints.
//!
//! The tests skip (saying so) when PostgreSQL's server binaries are not
//! installed.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::TryStreamExt;
use keel_core::{EventId, ExpectedVersion, Position, StreamId, Version};
use keel_eventstore::{
    Appender, GlobalLog, NewEvent, PostgresEventStore, ReadAll, ReadStream, RecordedEvent,
    StoreConfig, StreamReader, Subscription, SubscriptionHandler, SubscriptionOptions,
    SubscriptionSupport,
};
use keel_testkit::{Error as KitError, RecoveryTarget, ThrowawayPostgres};
use serde_json::json;
use sqlx::postgres::PgPoolOptions;

const STREAMS: usize = 4;
const PROJECTOR: &str = "recovery-projector";

/// A cluster, or `None` (with a message) when PostgreSQL's server binaries
/// are missing on this machine.
async fn cluster(archive: bool) -> Option<ThrowawayPostgres> {
    let made = if archive {
        ThrowawayPostgres::with_wal_archive().await
    } else {
        ThrowawayPostgres::new().await
    };
    match made {
        Ok(pg) => Some(pg),
        Err(KitError::ServiceUnavailable { tried, .. }) => {
            eprintln!(
                "SKIPPED: backup and recovery tests need PostgreSQL's server binaries \
                 (initdb, pg_ctl, pg_basebackup, pg_dump; e.g. /usr/lib/postgresql/15/bin):\n{tried}"
            );
            None
        }
        Err(e) => panic!("cannot start a private PostgreSQL cluster: {e}"),
    }
}

/// The event store on `database` of `pg`, migrated.
async fn store_on(pg: &ThrowawayPostgres, database: &str) -> PostgresEventStore {
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .connect_with(pg.connect_options().database(database))
        .await
        .expect("connect to the private cluster");
    keel_database::migrate(&pool, &[&keel_eventstore::MIGRATIONS])
        .await
        .expect("migrate (a no-op on a restored database)");
    PostgresEventStore::with_config(
        pool,
        StoreConfig::default().settle_timeout(Duration::from_secs(30)),
    )
}

fn stream(i: usize) -> StreamId {
    StreamId::new(format!("Ledger-{i}")).unwrap()
}

/// Appends `per_stream` events to each of the streams, from concurrent
/// tasks (one per stream, one event per append), and returns their ids.
async fn write(store: &PostgresEventStore, phase: &str, per_stream: usize) -> HashSet<EventId> {
    let tasks: Vec<_> = (0..STREAMS)
        .map(|i| {
            let store = store.clone();
            let phase = phase.to_owned();
            tokio::spawn(async move {
                let mut ids = Vec::new();
                for n in 0..per_stream {
                    let event = NewEvent::from_json(
                        "ledger.posted",
                        &json!({ "phase": phase, "stream": i, "n": n }),
                    );
                    ids.push(event.event_id());
                    store
                        .append(&stream(i), ExpectedVersion::Any, vec![event])
                        .await
                        .expect("append");
                }
                ids
            })
        })
        .collect();
    let mut all = HashSet::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    all
}

async fn read_log(store: &PostgresEventStore) -> Vec<RecordedEvent> {
    store
        .read_all(ReadAll::from_start())
        .try_collect()
        .await
        .expect("read the global log")
}

/// Records what a subscription delivers.
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<RecordedEvent>>>);

#[async_trait::async_trait]
impl SubscriptionHandler for Recorder {
    async fn handle(&self, event: &RecordedEvent) -> Result<(), keel_core::BoxError> {
        self.0.lock().unwrap().push(event.clone());
        Ok(())
    }
}

impl Recorder {
    fn events(&self) -> Vec<RecordedEvent> {
        self.0.lock().unwrap().clone()
    }
}

/// Runs subscription [`PROJECTOR`] until it has handled `count` events,
/// then stops it gracefully (storing its checkpoint) and returns them.
async fn project(store: &PostgresEventStore, count: usize) -> Vec<RecordedEvent> {
    let recorder = Recorder::default();
    let mut handle = Subscription::spawn(
        Arc::new(store.clone()),
        SubscriptionOptions::new(PROJECTOR)
            .poll_interval(Duration::from_millis(50))
            .leadership_retry(Duration::from_millis(100)),
        recorder.clone(),
    );
    let waited = tokio::time::timeout(
        Duration::from_secs(60),
        handle.wait_for(|s| s.handled >= count as u64),
    )
    .await;
    handle.shutdown().await.expect("subscription stops cleanly");
    waited.expect("the subscription delivers every event in time");
    let events = recorder.events();
    assert_eq!(events.len(), count, "delivered more than was written");
    events
}

/// The checks every restored database must pass.
///
/// `present` must be there and nothing else (in particular nothing of
/// `absent`); the projector's checkpoint must be `checkpoint`; the
/// projector must then deliver exactly the present events after its
/// checkpoint, followed by events appended after the restore.
async fn check_restored(
    store: &PostgresEventStore,
    present: &HashSet<EventId>,
    absent: &HashSet<EventId>,
    checkpoint: Position,
) {
    // Everything committed before the target, nothing after it.
    let log = read_log(store).await;
    let ids: HashSet<EventId> = log.iter().map(|e| e.event_id).collect();
    assert_eq!(ids.len(), log.len(), "the global log repeats an event");
    let missing = present.difference(&ids).count();
    let extra = ids.difference(present).count();
    assert_eq!(
        (missing, extra),
        (0, 0),
        "restored log differs from what committed before the target"
    );
    assert!(
        ids.is_disjoint(absent),
        "an event from after the target survived"
    );

    // The global log reads back in order.
    assert!(
        log.windows(2).all(|w| w[0].position < w[1].position),
        "global log out of order"
    );

    // Per-stream versions are contiguous, and agree with the global log.
    let mut per_stream: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for e in &log {
        per_stream
            .entry(e.stream_id.as_str().to_owned())
            .or_default()
            .push(e.version.get());
    }
    assert_eq!(per_stream.len(), STREAMS);
    for i in 0..STREAMS {
        let s = stream(i);
        let versions: Vec<u64> = store
            .read_stream(&s, ReadStream::forward())
            .map_ok(|e| e.version.get())
            .try_collect()
            .await
            .unwrap();
        let n = versions.len() as u64;
        assert_eq!(versions, (1..=n).collect::<Vec<_>>(), "{s} has a gap");
        assert_eq!(per_stream[s.as_str()], versions, "{s} in log order");
        assert_eq!(store.stream_version(&s).await.unwrap(), Version::new(n));
    }

    // Appends work: an exact expectation at the restored head succeeds, a
    // stale one is a conflict.
    let s = stream(0);
    let head = store.stream_version(&s).await.unwrap();
    let after: Vec<NewEvent> = (0..3)
        .map(|n| NewEvent::from_json("ledger.posted", &json!({ "phase": "after", "n": n })))
        .collect();
    let after_ids: Vec<EventId> = after.iter().map(NewEvent::event_id).collect();
    store
        .append(&s, ExpectedVersion::Exact(head), after)
        .await
        .expect("append at the restored head");
    let stale = store
        .append(
            &s,
            ExpectedVersion::Exact(head),
            vec![NewEvent::from_json("ledger.posted", &json!({}))],
        )
        .await
        .unwrap_err();
    assert_eq!(
        stale.as_conflict().expect("a conflict").actual.get(),
        head.get() + 3
    );

    // The projector resumes from its checkpoint: every event after it once,
    // in log order, and the new events after the restored ones.
    assert_eq!(
        store.load_checkpoint(PROJECTOR).await.unwrap(),
        Some(checkpoint),
        "the checkpoint committed before the target"
    );
    let expected: Vec<EventId> = log
        .iter()
        .filter(|e| e.position > checkpoint)
        .map(|e| e.event_id)
        .chain(after_ids.iter().copied())
        .collect();
    let delivered = project(store, expected.len()).await;
    assert_eq!(
        delivered.iter().map(|e| e.event_id).collect::<Vec<_>>(),
        expected,
        "the subscription skipped, repeated or reordered events"
    );
    let newest_restored = log.last().expect("a restored event").position;
    assert!(
        delivered
            .iter()
            .filter(|e| after_ids.contains(&e.event_id))
            .all(|e| e.position > newest_restored),
        "an append after the restore sorts before restored events"
    );
    assert_eq!(
        store.load_checkpoint(PROJECTOR).await.unwrap(),
        delivered.last().map(|e| e.position)
    );
}

#[tokio::test]
async fn point_in_time_recovery_restores_exactly_what_committed_before_the_target() {
    let Some(pg) = cluster(true).await else {
        return;
    };
    let store = store_on(&pg, "postgres").await;

    // Before the base backup: events, and a projector that handled them.
    let before_backup = write(&store, "before-backup", 10).await;
    let projected = project(&store, before_backup.len()).await;
    let checkpoint = projected.last().unwrap().position;
    assert_eq!(
        store.load_checkpoint(PROJECTOR).await.unwrap(),
        Some(checkpoint)
    );

    let backup = pg.base_backup().await.expect("pg_basebackup");

    // After the backup, before the target: only the WAL archive has these.
    let before_target = write(&store, "before-target", 10).await;
    // A unit of work that appends before the target but commits after it:
    // its events must not survive (they were never committed at the
    // target), although they were written, and recorded, before it.
    let units = keel_database::Database::connect_lazy(
        keel_database::DatabaseConfig::builder()
            .connect_options((*store.pool().connect_options()).clone())
            .min_connections(0)
            .max_connections(2)
            .build()
            .expect("database config"),
    );
    let mut late = units.begin().await.unwrap();
    let late_event = NewEvent::from_json("ledger.posted", &json!({ "phase": "late" }));
    let late_id = late_event.event_id();
    store
        .within(&mut late)
        .append(
            &StreamId::new("Late-1").unwrap(),
            ExpectedVersion::NoStream,
            vec![late_event],
        )
        .await
        .unwrap();
    let mut db = store.pool().acquire().await.unwrap();
    let target_time: String = sqlx::query_scalar("SELECT clock_timestamp()::text")
        .fetch_one(&mut *db)
        .await
        .unwrap();
    sqlx::query("SELECT pg_create_restore_point('keel-recovery-test')")
        .execute(&mut *db)
        .await
        .unwrap();
    drop(db);
    late.commit().await.unwrap();

    // After the target: events, and the projector moving its checkpoint on.
    let mut after_target = write(&store, "after-target", 10).await;
    after_target.insert(late_id);
    project(&store, before_target.len() + after_target.len()).await;
    pg.archive_current_wal().await.expect("archive the WAL");

    let present: HashSet<EventId> = before_backup.union(&before_target).copied().collect();
    for target in [
        RecoveryTarget::Time(target_time),
        RecoveryTarget::Name("keel-recovery-test".to_owned()),
    ] {
        let restored = pg
            .recover(&backup, target.clone())
            .await
            .unwrap_or_else(|e| panic!("recovery to {target:?}: {e}"));
        let restored_store = store_on(&restored, "postgres").await;
        check_restored(&restored_store, &present, &after_target, checkpoint).await;
        restored_store.pool().close().await;
    }

    // The source is untouched by all this: it still has every event.
    assert_eq!(
        read_log(&store).await.len(),
        present.len() + after_target.len()
    );
}

#[tokio::test]
async fn recovery_to_the_backup_alone_has_none_of_the_later_events() {
    let Some(pg) = cluster(true).await else {
        return;
    };
    let store = store_on(&pg, "postgres").await;
    let before_backup = write(&store, "before-backup", 5).await;
    let checkpoint = project(&store, before_backup.len())
        .await
        .last()
        .unwrap()
        .position;
    let backup = pg.base_backup().await.expect("pg_basebackup");
    let later = write(&store, "later", 5).await;
    pg.archive_current_wal().await.expect("archive the WAL");

    let restored = pg
        .recover(&backup, RecoveryTarget::Immediate)
        .await
        .expect("recovery to the end of the backup");
    let restored_store = store_on(&restored, "postgres").await;
    check_restored(&restored_store, &before_backup, &later, checkpoint).await;
}

#[tokio::test]
async fn a_logical_dump_restored_into_a_new_cluster_keeps_order_and_checkpoints() {
    let Some(source) = cluster(false).await else {
        return;
    };
    let Some(target) = cluster(false).await else {
        return;
    };
    let admin = sqlx::PgPool::connect_with(source.connect_options())
        .await
        .unwrap();
    sqlx::query("CREATE DATABASE keel_dump_source")
        .execute(&admin)
        .await
        .unwrap();
    admin.close().await;
    let store = store_on(&source, "keel_dump_source").await;

    // Burn transaction ids on the source, as a long-lived production
    // cluster would have: the new cluster's ids start far below them.
    let mut conn = store.pool().acquire().await.unwrap();
    for _ in 0..300 {
        sqlx::query("SELECT pg_current_xact_id()")
            .execute(&mut *conn)
            .await
            .unwrap();
    }
    drop(conn);

    let handled = write(&store, "handled", 10).await;
    let checkpoint = project(&store, handled.len())
        .await
        .last()
        .unwrap()
        .position;
    let unhandled = write(&store, "unhandled", 10).await;

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keel.dump");
    source
        .dump("keel_dump_source", &file)
        .await
        .expect("pg_dump");
    target
        .restore_dump(&file, "keel_restored")
        .await
        .expect("pg_restore");

    let restored = store_on(&target, "keel_restored").await;
    // The documented step after restoring a dump, before any writer starts.
    sqlx::query("SELECT keel.rebase_commit_order()")
        .execute(restored.pool())
        .await
        .expect("rebase the commit order");
    // Running it again is harmless.
    sqlx::query("SELECT keel.rebase_commit_order()")
        .execute(restored.pool())
        .await
        .unwrap();

    let present: HashSet<EventId> = handled.union(&unhandled).copied().collect();
    check_restored(&restored, &present, &HashSet::new(), checkpoint).await;
}
