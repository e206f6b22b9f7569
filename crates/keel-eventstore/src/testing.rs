//! The contract suite every event store implementation must pass.
//!
//! Each function takes a fresh, empty store and panics when the store breaks
//! the contract. Run them all with `keel_testkit::contract_tests!`:
//!
//! ```ignore
//! keel_testkit::contract_tests! {
//!     factory: || async { (keel_eventstore::InMemoryEventStore::new(), ()) },
//!     suite: keel_eventstore::testing,
//!     tests: [append_and_read_back, expected_version_modes /* , … */],
//! }
//! ```
//!
//! [`ALL`] lists every test name, so a new one cannot be forgotten silently:
//! the store's test file asserts that it runs them all.

#![allow(
    clippy::missing_panics_doc,
    reason = "contract tests panic on failure by design"
)]

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::TryStreamExt;
use keel_core::{
    CorrelationId, EventId, ExpectedVersion, Metadata, Position, StreamId, TenantId, TraceContext,
    Version,
};
use serde_json::json;

use crate::{
    EventSourcedRepository, EventStore, EventStoreError, NewEvent, ReadAll, ReadStream,
    RecordedEvent, Snapshot, SnapshotPolicy, SnapshotStore, StreamAppend, Subscription,
    SubscriptionHandle, SubscriptionHandler, SubscriptionOptions, SubscriptionStatus,
    SubscriptionSupport, Upcasters,
};

/// What the suite needs from a store under test.
pub trait Subject: EventStore + SnapshotStore + SubscriptionSupport + Clone + 'static {}
impl<T: EventStore + SnapshotStore + SubscriptionSupport + Clone + 'static> Subject for T {}

/// The name of every contract test in this module.
pub const ALL: &[&str] = &[
    "append_and_read_back",
    "expected_version_modes",
    "racing_writers_exactly_one_wins",
    "open_appends_race_without_loss",
    "idempotent_retries",
    "reused_event_ids_are_refused",
    "bad_input_writes_nothing",
    "multi_stream_append_is_atomic",
    "read_stream_directions_and_limits",
    "global_log_order_and_filters",
    "typed_decoding",
    "snapshots_keep_the_latest",
    "checkpoints_never_move_backwards",
    "subscription_catches_up_then_tails",
    "subscription_redelivers_after_failure_or_crash",
    "subscription_has_one_leader_and_fails_over",
    "aggregate_repository_round_trip",
];

fn sid(s: &str) -> StreamId {
    StreamId::new(s).expect("valid stream id")
}

fn ev(n: u64) -> NewEvent {
    NewEvent::from_json("test.happened", &json!({ "n": n }))
}

async fn stream_of<S: Subject>(
    store: &S,
    stream: &StreamId,
    opts: ReadStream,
) -> Vec<RecordedEvent> {
    store
        .read_stream(stream, opts)
        .try_collect()
        .await
        .expect("read stream")
}

async fn log_of<S: Subject>(store: &S, opts: ReadAll) -> Vec<RecordedEvent> {
    store.read_all(opts).try_collect().await.expect("read all")
}

fn numbers(events: &[RecordedEvent]) -> Vec<u64> {
    events
        .iter()
        .map(|e| e.payload_value().expect("json")["n"].as_u64().expect("n"))
        .collect()
}

/// Appended events read back with everything they were given, versions from
/// 1, strictly increasing positions and server-side timestamps.
pub async fn append_and_read_back<S: Subject>(store: S) {
    let stream = sid("Order-1");
    let meta = Metadata::new()
        .with_correlation_id(CorrelationId::new())
        .with_actor("alice")
        .with_tenant(TenantId::new("acme").unwrap())
        .with_trace_context(
            TraceContext::new(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                None,
            )
            .unwrap(),
        )
        .with_extra("source", "test");
    let first = ev(1).with_metadata(meta.clone()).with_schema_version(3);
    let first_id = first.event_id();
    let before = chrono::Utc::now() - chrono::Duration::seconds(5);
    let r = store
        .append(&stream, ExpectedVersion::NoStream, vec![first, ev(2)])
        .await
        .expect("append");
    assert_eq!(r.first_version, Version::new(1));
    assert_eq!(r.next_expected_version, Version::new(2));
    assert_eq!(r.positions.len(), 2);
    assert!(r.positions[0] < r.positions[1]);
    assert!(!r.was_retry);
    assert_eq!(
        store.stream_version(&stream).await.unwrap(),
        Version::new(2)
    );

    let r2 = store
        .append(
            &stream,
            ExpectedVersion::Exact(Version::new(2)),
            vec![ev(3)],
        )
        .await
        .expect("second append");
    assert_eq!(r2.first_version, Version::new(3));
    assert!(
        r2.positions[0] > r.positions[1],
        "a later append sorts later"
    );

    let read = stream_of(&store, &stream, ReadStream::forward()).await;
    assert_eq!(numbers(&read), vec![1, 2, 3]);
    assert_eq!(
        read.iter().map(|e| e.version.get()).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    assert_eq!(read[0].event_id, first_id);
    assert_eq!(read[0].metadata, meta);
    assert_eq!(read[0].schema_version, 3);
    assert_eq!(read[1].schema_version, 1);
    assert_eq!(read[0].event_type, "test.happened");
    assert_eq!(read[0].position, r.positions[0]);
    assert_eq!(read[2].position, r2.positions[0]);
    assert!(read[0].recorded_at > before && read[0].recorded_at <= chrono::Utc::now());
    assert_eq!(
        store.stream_version(&sid("Order-none")).await.unwrap(),
        Version::INITIAL
    );
    assert!(
        stream_of(&store, &sid("Order-none"), ReadStream::forward())
            .await
            .is_empty()
    );
}

fn conflict(e: &EventStoreError) -> (ExpectedVersion, Version) {
    let c = e
        .as_conflict()
        .unwrap_or_else(|| panic!("expected a conflict, got {e:?}"));
    (c.expected, c.actual)
}

/// Any, no stream, stream exists and exact behave as documented, and a
/// refused append reports expected and actual versions and writes nothing.
pub async fn expected_version_modes<S: Subject>(store: S) {
    let s = sid("Modes-1");
    let e = store
        .append(&s, ExpectedVersion::StreamExists, vec![ev(0)])
        .await
        .unwrap_err();
    assert_eq!(
        conflict(&e),
        (ExpectedVersion::StreamExists, Version::INITIAL)
    );
    let e = store
        .append(&s, ExpectedVersion::Exact(Version::new(1)), vec![ev(0)])
        .await
        .unwrap_err();
    assert_eq!(
        conflict(&e),
        (ExpectedVersion::Exact(Version::new(1)), Version::INITIAL)
    );
    assert_eq!(store.stream_version(&s).await.unwrap(), Version::INITIAL);

    store
        .append(&s, ExpectedVersion::Exact(Version::INITIAL), vec![ev(1)])
        .await
        .unwrap();
    let e = store
        .append(&s, ExpectedVersion::NoStream, vec![ev(0)])
        .await
        .unwrap_err();
    assert_eq!(conflict(&e), (ExpectedVersion::NoStream, Version::new(1)));
    let e = store
        .append(&s, ExpectedVersion::Exact(Version::INITIAL), vec![ev(0)])
        .await
        .unwrap_err();
    assert_eq!(
        conflict(&e),
        (ExpectedVersion::Exact(Version::INITIAL), Version::new(1))
    );
    store
        .append(&s, ExpectedVersion::StreamExists, vec![ev(2)])
        .await
        .unwrap();
    store
        .append(&s, ExpectedVersion::Any, vec![ev(3)])
        .await
        .unwrap();
    let e = store
        .append(&s, ExpectedVersion::Exact(Version::new(2)), vec![ev(0)])
        .await
        .unwrap_err();
    assert_eq!(
        conflict(&e),
        (ExpectedVersion::Exact(Version::new(2)), Version::new(3))
    );
    let e = store
        .append(&s, ExpectedVersion::Exact(Version::new(9)), vec![ev(0)])
        .await
        .unwrap_err();
    assert_eq!(
        conflict(&e),
        (ExpectedVersion::Exact(Version::new(9)), Version::new(3))
    );
    store
        .append(&s, ExpectedVersion::Exact(Version::new(3)), vec![ev(4)])
        .await
        .unwrap();
    store
        .append(&sid("Modes-2"), ExpectedVersion::Any, vec![ev(1)])
        .await
        .unwrap();

    assert_eq!(
        numbers(&stream_of(&store, &s, ReadStream::forward()).await),
        vec![1, 2, 3, 4]
    );
    let all = log_of(&store, ReadAll::from_start()).await;
    assert_eq!(all.len(), 5, "refused appends wrote nothing");
    let converted: keel_core::Error = e.into();
    assert_eq!(converted.code(), "keel.conflict.version");

    // The same rules hold for batches, which stores may write differently.
    let b = sid("Modes-3");
    let batch = |from: u64| (from..from + 3).map(ev).collect::<Vec<_>>();
    let refused = store
        .append(&b, ExpectedVersion::StreamExists, batch(0))
        .await
        .unwrap_err();
    assert_eq!(
        conflict(&refused),
        (ExpectedVersion::StreamExists, Version::INITIAL)
    );
    let mut version = 0;
    for (expected, from) in [
        (ExpectedVersion::NoStream, 1),
        (ExpectedVersion::Exact(Version::new(3)), 4),
        (ExpectedVersion::StreamExists, 7),
        (ExpectedVersion::Any, 10),
    ] {
        let r = store.append(&b, expected, batch(from)).await.unwrap();
        assert_eq!(r.first_version, Version::new(version + 1), "{expected:?}");
        version += 3;
        assert_eq!(
            r.next_expected_version,
            Version::new(version),
            "{expected:?}"
        );
        assert_eq!(r.positions.len(), 3);
        assert!(r.positions.windows(2).all(|w| w[0] < w[1]));
    }
    for expected in [
        ExpectedVersion::NoStream,
        ExpectedVersion::Exact(Version::new(9)),
    ] {
        let e = store.append(&b, expected, batch(0)).await.unwrap_err();
        assert_eq!(conflict(&e), (expected, Version::new(12)));
    }
    assert_eq!(
        numbers(&stream_of(&store, &b, ReadStream::forward()).await),
        (1..=12).collect::<Vec<_>>()
    );
}

/// Many tasks append with the same expectation at once: exactly one wins
/// each round, the others get structured conflicts, and the stream stays
/// dense.
pub async fn racing_writers_exactly_one_wins<S: Subject>(store: S) {
    const WRITERS: u64 = 12;
    const ROUNDS: u64 = 5;
    let s = sid("Race-1");
    for round in 0..ROUNDS {
        let expected = if round == 0 {
            ExpectedVersion::NoStream
        } else {
            ExpectedVersion::Exact(Version::new(round))
        };
        let mut tasks = Vec::new();
        for w in 0..WRITERS {
            let store = store.clone();
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                store.append(&s, expected, vec![ev(round * 100 + w)]).await
            }));
        }
        let mut wins = 0;
        for t in tasks {
            match t.await.expect("task") {
                Ok(r) => {
                    wins += 1;
                    assert_eq!(r.next_expected_version, Version::new(round + 1));
                }
                Err(e) => assert_eq!(conflict(&e), (expected, Version::new(round + 1))),
            }
        }
        assert_eq!(wins, 1, "round {round}: exactly one writer wins");
    }
    let events = stream_of(&store, &s, ReadStream::forward()).await;
    assert_eq!(
        events.iter().map(|e| e.version.get()).collect::<Vec<_>>(),
        (1..=ROUNDS).collect::<Vec<_>>()
    );
    assert_eq!(
        log_of(&store, ReadAll::from_start()).await.len() as u64,
        ROUNDS
    );
}

/// Many tasks append to one stream at once without a version expectation
/// (`Any`, or `StreamExists` once it exists), one event or a batch at a
/// time. Every append succeeds, the stream stays dense, every event is
/// stored exactly once, each writer's events keep its order, and each
/// result names the versions its events landed at.
pub async fn open_appends_race_without_loss<S: Subject>(store: S) {
    const WRITERS: u64 = 8;
    const APPENDS: u64 = 15;
    let s = sid("OpenRace-1");
    store
        .append(&s, ExpectedVersion::NoStream, vec![ev(0)])
        .await
        .expect("create the stream");
    let mut tasks = Vec::new();
    for w in 1..=WRITERS {
        let store = store.clone();
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let mut landed = Vec::new();
            for a in 0..APPENDS {
                let expected = if a % 2 == 0 {
                    ExpectedVersion::Any
                } else {
                    ExpectedVersion::StreamExists
                };
                // odd writers append batches of three, even ones single events
                let size = if w % 2 == 1 { 3 } else { 1 };
                let events: Vec<NewEvent> =
                    (0..size).map(|i| ev(w * 10_000 + a * 10 + i)).collect();
                let r = store
                    .append(&s, expected, events)
                    .await
                    .expect("open append");
                assert_eq!(
                    r.next_expected_version.get() - r.first_version.get() + 1,
                    size,
                    "the result spans the batch"
                );
                for i in 0..size {
                    landed.push((r.first_version.get() + i, w * 10_000 + a * 10 + i));
                }
            }
            landed
        }));
    }
    let mut landed = vec![(1, 0)];
    for t in tasks {
        landed.extend(t.await.expect("task"));
    }
    landed.sort_unstable();
    let events = stream_of(&store, &s, ReadStream::forward()).await;
    let stored: Vec<(u64, u64)> = events
        .iter()
        .map(|e| e.version.get())
        .zip(numbers(&events))
        .collect();
    assert_eq!(
        stored, landed,
        "every event is where its append said it went"
    );
    let versions: Vec<u64> = stored.iter().map(|(v, _)| *v).collect();
    assert_eq!(
        versions,
        (1..=stored.len() as u64).collect::<Vec<_>>(),
        "dense"
    );
    let mut seen = HashSet::new();
    assert!(
        stored.iter().all(|(_, n)| seen.insert(*n)),
        "no event twice"
    );
    for w in 1..=WRITERS {
        let own: Vec<u64> = stored
            .iter()
            .map(|(_, n)| *n)
            .filter(|n| n / 10_000 == w)
            .collect();
        let size = if w % 2 == 1 { 3 } else { 1 };
        assert_eq!(own.len() as u64, APPENDS * size, "writer {w} lost nothing");
        assert!(
            own.windows(2).all(|p| p[0] < p[1]),
            "writer {w} kept its order"
        );
    }
    assert_eq!(
        store.stream_version(&s).await.expect("version").get(),
        stored.len() as u64
    );
    assert_eq!(
        log_of(&store, ReadAll::from_start()).await.len(),
        stored.len()
    );
}

/// Retrying a stored batch (after a lost reply, say) returns the original
/// result and stores nothing new, whatever the expectation mode.
pub async fn idempotent_retries<S: Subject>(store: S) {
    let s = sid("Retry-1");
    let batch = vec![ev(1), ev(2)];
    let first = store
        .append(&s, ExpectedVersion::NoStream, batch.clone())
        .await
        .unwrap();
    let again = store
        .append(&s, ExpectedVersion::NoStream, batch.clone())
        .await
        .unwrap();
    assert!(again.was_retry);
    assert_eq!(again.positions, first.positions);
    assert_eq!(again.first_version, first.first_version);
    assert_eq!(again.next_expected_version, first.next_expected_version);

    let third = vec![ev(3)];
    let r3 = store
        .append(&s, ExpectedVersion::Exact(Version::new(2)), third.clone())
        .await
        .unwrap();
    // The stream moved on, yet retrying the old batches still succeeds.
    let again = store
        .append(&s, ExpectedVersion::Any, batch.clone())
        .await
        .unwrap();
    assert_eq!(again.positions, first.positions);
    let again3 = store
        .append(&s, ExpectedVersion::Exact(Version::new(2)), third)
        .await
        .unwrap();
    assert_eq!(again3.positions, r3.positions);
    assert_eq!(again3.next_expected_version, Version::new(3));
    // Key order inside a payload does not make it a different event.
    let obj = NewEvent::from_json("test.obj", &json!({"a": 1, "b": 2}));
    let id = obj.event_id();
    store
        .append(&s, ExpectedVersion::Any, vec![obj])
        .await
        .unwrap();
    let reordered = NewEvent::from_json_bytes("test.obj", br#"{"b":2,"a":1}"#)
        .unwrap()
        .with_id(id);
    assert!(
        store
            .append(&s, ExpectedVersion::Any, vec![reordered])
            .await
            .unwrap()
            .was_retry
    );

    assert_eq!(
        numbers(&stream_of(&store, &s, ReadStream::forward().limit(3)).await),
        vec![1, 2, 3]
    );
    assert_eq!(log_of(&store, ReadAll::from_start()).await.len(), 4);
}

fn reused(e: &EventStoreError) -> EventId {
    match e {
        EventStoreError::EventIdReused { event_id, .. } => *event_id,
        other => panic!("expected EventIdReused, got {other:?}"),
    }
}

/// An id already used by a different event (other content, other stream,
/// other version, or only part of the batch) is refused with a typed error
/// naming the id, and nothing is written.
pub async fn reused_event_ids_are_refused<S: Subject>(store: S) {
    let s = sid("Reuse-1");
    let a = ev(1);
    let b = ev(2);
    store
        .append(&s, ExpectedVersion::NoStream, vec![a.clone(), b.clone()])
        .await
        .unwrap();

    let changed = ev(99).with_id(b.event_id());
    let e = store
        .append(&s, ExpectedVersion::Any, vec![a.clone(), changed])
        .await
        .unwrap_err();
    assert_eq!(reused(&e), b.event_id());

    let e = store
        .append(&sid("Reuse-2"), ExpectedVersion::Any, vec![a.clone()])
        .await
        .unwrap_err();
    assert_eq!(reused(&e), a.event_id());
    assert_eq!(
        store.stream_version(&sid("Reuse-2")).await.unwrap(),
        Version::INITIAL
    );

    let partial = vec![a.clone(), b.clone(), ev(3)];
    let e = store
        .append(&s, ExpectedVersion::Any, partial)
        .await
        .unwrap_err();
    assert_eq!(reused(&e), a.event_id());

    let swapped = vec![b.clone(), a.clone()];
    let e = store
        .append(&s, ExpectedVersion::Any, swapped)
        .await
        .unwrap_err();
    assert!([a.event_id(), b.event_id()].contains(&reused(&e)));

    let other_type = NewEvent::from_json("test.other", &json!({"n": 1})).with_id(a.event_id());
    let e = store
        .append(&s, ExpectedVersion::Any, vec![other_type, b.clone()])
        .await
        .unwrap_err();
    assert_eq!(reused(&e), a.event_id());

    let wrong_expectation = store
        .append(
            &s,
            ExpectedVersion::Exact(Version::new(5)),
            vec![a.clone(), b.clone()],
        )
        .await
        .unwrap_err();
    assert_eq!(reused(&wrong_expectation), a.event_id());

    assert_eq!(log_of(&store, ReadAll::from_start()).await.len(), 2);
    assert_eq!(store.stream_version(&s).await.unwrap(), Version::new(2));
    let core: keel_core::Error = e.into();
    assert_eq!(core.kind(), keel_core::ErrorKind::Conflict);
}

fn invalid_field(e: &EventStoreError) -> &str {
    match e {
        EventStoreError::Invalid(inv) => &inv.field,
        other => panic!("expected Invalid, got {other:?}"),
    }
}

/// Bad input gets a typed error and nothing is written.
pub async fn bad_input_writes_nothing<S: Subject>(store: S) {
    let s = sid("Bad-1");
    let e = store
        .append(&s, ExpectedVersion::Any, vec![])
        .await
        .unwrap_err();
    assert_eq!(invalid_field(&e), "events");

    // Metadata has a limit of its own: a batch whose last event carries too
    // much is refused whole.
    let mut heavy = Metadata::new().with_actor("a".repeat(1_000));
    heavy
        .extra
        .insert("blob".into(), "m".repeat(crate::MAX_METADATA_BYTES));
    let e = store
        .append(
            &s,
            ExpectedVersion::Any,
            vec![ev(1), ev(2).with_metadata(heavy)],
        )
        .await
        .unwrap_err();
    assert_eq!(invalid_field(&e), "metadata");
    assert!(e.to_string().contains("test.happened"), "{e}");
    assert_eq!(store.stream_version(&s).await.unwrap(), Version::INITIAL);
    let mut meta_at_limit = Metadata::new();
    meta_at_limit
        .extra
        .insert("blob".into(), "m".repeat(crate::MAX_METADATA_BYTES - 4));

    let big = "x".repeat(crate::DEFAULT_MAX_PAYLOAD_BYTES);
    let e = store
        .append(
            &s,
            ExpectedVersion::Any,
            vec![ev(1), NewEvent::from_json("test.big", &json!(big))],
        )
        .await
        .unwrap_err();
    match e {
        EventStoreError::PayloadTooLarge {
            event_type,
            size,
            limit,
        } => {
            assert_eq!(event_type, "test.big");
            assert_eq!(size, crate::DEFAULT_MAX_PAYLOAD_BYTES + 2);
            assert_eq!(limit, crate::DEFAULT_MAX_PAYLOAD_BYTES);
        }
        other => panic!("expected PayloadTooLarge, got {other:?}"),
    }
    let just_fits = "x".repeat(crate::DEFAULT_MAX_PAYLOAD_BYTES - 2);
    let fits = NewEvent::from_json("test.big", &json!(just_fits));
    assert_eq!(fits.payload_json().len(), crate::DEFAULT_MAX_PAYLOAD_BYTES);

    let dup = ev(1);
    let e = store
        .append(&s, ExpectedVersion::Any, vec![dup.clone(), ev(2), dup])
        .await
        .unwrap_err();
    assert_eq!(invalid_field(&e), "event_id");

    let e = store
        .append(
            &s,
            ExpectedVersion::Any,
            vec![NewEvent::from_json("", &json!({}))],
        )
        .await
        .unwrap_err();
    assert_eq!(invalid_field(&e), "event_type");
    let e = store
        .append(
            &s,
            ExpectedVersion::Any,
            vec![NewEvent::from_json("x".repeat(201), &json!({}))],
        )
        .await
        .unwrap_err();
    assert_eq!(invalid_field(&e), "event_type");
    let e = store
        .append(&s, ExpectedVersion::Any, vec![ev(1).with_schema_version(0)])
        .await
        .unwrap_err();
    assert_eq!(invalid_field(&e), "schema_version");
    let e = store
        .append(
            &s,
            ExpectedVersion::Exact(Version::new(u64::MAX)),
            vec![ev(1)],
        )
        .await
        .unwrap_err();
    assert_eq!(invalid_field(&e), "expected_version");

    for bad in [&b"not json"[..], b"{\"a\":", b"", b"{} {}", &[0xff, 0xfe]] {
        match NewEvent::from_json_bytes("test.raw", bad) {
            Err(EventStoreError::NotJson { event_type, .. }) => assert_eq!(event_type, "test.raw"),
            other => panic!("expected NotJson for {bad:?}, got {other:?}"),
        }
    }
    assert!(NewEvent::from_json_bytes("test.raw", br#"{"ok":true}"#).is_ok());

    let e = store.append_multi(vec![]).await.unwrap_err();
    assert_eq!(invalid_field(&e), "appends");

    assert!(log_of(&store, ReadAll::from_start()).await.is_empty());
    assert_eq!(store.stream_version(&s).await.unwrap(), Version::INITIAL);
    // The limit is the payload's size: a payload at the limit is accepted.
    store
        .append(&s, ExpectedVersion::NoStream, vec![fits])
        .await
        .unwrap();
    assert_eq!(store.stream_version(&s).await.unwrap(), Version::new(1));
    // So is metadata at its limit.
    store
        .append(
            &sid("Bad-Meta"),
            ExpectedVersion::NoStream,
            vec![ev(1).with_metadata(meta_at_limit)],
        )
        .await
        .expect("metadata at the limit is accepted");
}

/// A multi-stream append is all or nothing, and its events share one commit.
pub async fn multi_stream_append_is_atomic<S: Subject>(store: S) {
    let (a, b, c) = (sid("Multi-a"), sid("Multi-b"), sid("Multi-c"));
    store
        .append(&b, ExpectedVersion::NoStream, vec![ev(1)])
        .await
        .unwrap();

    let e = store
        .append_multi(vec![
            StreamAppend::new(a.clone(), ExpectedVersion::NoStream, vec![ev(10), ev(11)]),
            StreamAppend::new(
                b.clone(),
                ExpectedVersion::Exact(Version::new(5)),
                vec![ev(12)],
            ),
        ])
        .await
        .unwrap_err();
    assert_eq!(
        conflict(&e),
        (ExpectedVersion::Exact(Version::new(5)), Version::new(1))
    );
    assert_eq!(store.stream_version(&a).await.unwrap(), Version::INITIAL);
    assert_eq!(log_of(&store, ReadAll::from_start()).await.len(), 1);

    let twice = store
        .append_multi(vec![
            StreamAppend::new(a.clone(), ExpectedVersion::Any, vec![ev(1)]),
            StreamAppend::new(a.clone(), ExpectedVersion::Any, vec![ev(2)]),
        ])
        .await
        .unwrap_err();
    assert_eq!(invalid_field(&twice), "appends");

    let results = store
        .append_multi(vec![
            StreamAppend::new(a.clone(), ExpectedVersion::NoStream, vec![ev(10), ev(11)]),
            StreamAppend::new(
                b.clone(),
                ExpectedVersion::Exact(Version::new(1)),
                vec![ev(12)],
            ),
            StreamAppend::new(c.clone(), ExpectedVersion::Any, vec![ev(13)]),
        ])
        .await
        .unwrap();
    assert_eq!(results.len(), 3);
    assert_eq!(results[1].first_version, Version::new(2));
    let commits: HashSet<u64> = results
        .iter()
        .flat_map(|r| r.positions.iter().map(|p| p.commit))
        .collect();
    assert_eq!(commits.len(), 1, "one transaction, one commit key");
    let log = log_of(&store, ReadAll::from_start()).await;
    assert_eq!(numbers(&log), vec![1, 10, 11, 12, 13]);
}

/// Forward and backward reads from a version with limits, across read
/// batch boundaries.
pub async fn read_stream_directions_and_limits<S: Subject>(store: S) {
    const N: u64 = 2_500;
    let s = sid("Long-1");
    let mut next = 0;
    while next < N {
        let batch: Vec<NewEvent> = (next + 1..=(next + 500).min(N)).map(ev).collect();
        let len = batch.len() as u64;
        store
            .append(&s, ExpectedVersion::Exact(Version::new(next)), batch)
            .await
            .unwrap();
        next += len;
    }
    let all = stream_of(&store, &s, ReadStream::forward()).await;
    assert_eq!(numbers(&all), (1..=N).collect::<Vec<_>>());
    let back = stream_of(&store, &s, ReadStream::backward()).await;
    assert_eq!(numbers(&back), (1..=N).rev().collect::<Vec<_>>());

    let mid = stream_of(
        &store,
        &s,
        ReadStream::forward().from(Version::new(999)).limit(1_203),
    )
    .await;
    assert_eq!(numbers(&mid), (999..=2_201).collect::<Vec<_>>());
    let tail = stream_of(
        &store,
        &s,
        ReadStream::backward()
            .from(Version::new(1_001))
            .limit(1_001),
    )
    .await;
    assert_eq!(numbers(&tail), (1..=1_001).rev().collect::<Vec<_>>());
    let beyond = stream_of(&store, &s, ReadStream::forward().from(Version::new(N + 1))).await;
    assert!(beyond.is_empty());
    let from_far = stream_of(
        &store,
        &s,
        ReadStream::backward().from(Version::new(u64::MAX)).limit(2),
    )
    .await;
    assert_eq!(numbers(&from_far), vec![N, N - 1]);
    let zero = stream_of(&store, &s, ReadStream::forward().limit(0)).await;
    assert!(zero.is_empty());
    let from0 = stream_of(
        &store,
        &s,
        ReadStream::forward().from(Version::INITIAL).limit(2),
    )
    .await;
    assert_eq!(numbers(&from0), vec![1, 2]);
    let back0 = stream_of(&store, &s, ReadStream::backward().from(Version::INITIAL)).await;
    assert!(back0.is_empty());
}

/// The global log lists events in position order, resumes strictly after a
/// position, and filters by category, stream prefix and event type.
pub async fn global_log_order_and_filters<S: Subject>(store: S) {
    let typed = |t: &str, n: u64| NewEvent::from_json(t, &json!({ "n": n }));
    store
        .append(
            &sid("Order-1"),
            ExpectedVersion::Any,
            vec![typed("order.placed", 1)],
        )
        .await
        .unwrap();
    store
        .append(
            &sid("Orderly-1"),
            ExpectedVersion::Any,
            vec![typed("orderly.x", 2)],
        )
        .await
        .unwrap();
    store
        .append(
            &sid("Order-2"),
            ExpectedVersion::Any,
            vec![typed("order.placed", 3), typed("order.paid", 4)],
        )
        .await
        .unwrap();
    store
        .append(
            &sid("Order"),
            ExpectedVersion::Any,
            vec![typed("order.meta", 5)],
        )
        .await
        .unwrap();
    store
        .append(
            &sid("Cart_x-1"),
            ExpectedVersion::Any,
            vec![typed("cart.added", 6)],
        )
        .await
        .unwrap();
    store
        .append(
            &sid("Order-1"),
            ExpectedVersion::Any,
            vec![typed("order.paid", 7)],
        )
        .await
        .unwrap();

    let all = log_of(&store, ReadAll::from_start()).await;
    assert_eq!(numbers(&all), vec![1, 2, 3, 4, 5, 6, 7]);
    assert!(all.windows(2).all(|w| w[0].position < w[1].position));

    let after = log_of(&store, ReadAll::after(all[2].position)).await;
    assert_eq!(numbers(&after), vec![4, 5, 6, 7]);
    let limited = log_of(&store, ReadAll::after(all[0].position).limit(2)).await;
    assert_eq!(numbers(&limited), vec![2, 3]);
    let end = log_of(&store, ReadAll::after(all[6].position)).await;
    assert!(end.is_empty());
    let far = log_of(&store, ReadAll::after(Position::new(u64::MAX, u64::MAX))).await;
    assert!(far.is_empty());

    assert_eq!(
        numbers(&log_of(&store, ReadAll::from_start().category("Order")).await),
        vec![1, 3, 4, 5, 7]
    );
    assert_eq!(
        numbers(&log_of(&store, ReadAll::from_start().stream_prefix("Order-")).await),
        vec![1, 3, 4, 7]
    );
    assert_eq!(
        numbers(&log_of(&store, ReadAll::from_start().stream_prefix("Cart_")).await),
        vec![6]
    );
    assert_eq!(
        numbers(&log_of(&store, ReadAll::from_start().stream_prefix("Cart%")).await),
        Vec::<u64>::new()
    );
    assert_eq!(
        numbers(
            &log_of(
                &store,
                ReadAll::from_start().event_types(["order.paid", "cart.added"])
            )
            .await
        ),
        vec![4, 6, 7]
    );
    assert_eq!(
        numbers(
            &log_of(
                &store,
                ReadAll::from_start()
                    .category("Order")
                    .event_types(["order.paid"])
                    .limit(1)
            )
            .await
        ),
        vec![4]
    );
    assert!(
        log_of(&store, ReadAll::from_start().category("Nothing"))
            .await
            .is_empty()
    );
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq)]
enum Shape {
    Circle { r: u32 },
    Square { side: u32 },
}

impl keel_core::DomainEvent for Shape {
    fn event_type(&self) -> &'static str {
        match self {
            Shape::Circle { .. } => "shape.circle",
            Shape::Square { .. } => "shape.square",
        }
    }
}

/// Domain events round-trip through the store; payloads of another type or
/// shape give typed errors naming the event type.
pub async fn typed_decoding<S: Subject>(store: S) {
    let s = sid("Shape-1");
    let events = vec![
        NewEvent::from_domain(&Shape::Circle { r: 2 }).unwrap(),
        NewEvent::from_domain(&Shape::Square { side: 3 }).unwrap(),
        NewEvent::from_json("shape.triangle", &json!({"Triangle": {"a": 1}})),
        NewEvent::from_json("shape.circle", &json!({"Circle": {"r": "big"}})),
        NewEvent::from_json("shape.square", &json!({"Circle": {"r": 1}})),
    ];
    store
        .append(&s, ExpectedVersion::NoStream, events)
        .await
        .unwrap();
    let read = stream_of(&store, &s, ReadStream::forward()).await;
    let circle = read[0].decode::<Shape>().unwrap();
    assert_eq!(circle.payload, Shape::Circle { r: 2 });
    assert_eq!(circle.version, Version::new(1));
    assert_eq!(
        read[1].decode::<Shape>().unwrap().payload,
        Shape::Square { side: 3 }
    );
    match read[2].decode::<Shape>().unwrap_err() {
        EventStoreError::Decode {
            event_type,
            version,
            ..
        } => {
            assert_eq!(event_type, "shape.triangle");
            assert_eq!(version, Version::new(3));
        }
        other => panic!("expected Decode, got {other:?}"),
    }
    match read[3].decode::<Shape>().unwrap_err() {
        EventStoreError::Decode { event_type, .. } => assert_eq!(event_type, "shape.circle"),
        other => panic!("expected Decode, got {other:?}"),
    }
    match read[4].decode::<Shape>().unwrap_err() {
        EventStoreError::UnknownEventType { event_type, .. } => {
            assert_eq!(event_type, "shape.square");
        }
        other => panic!("expected UnknownEventType, got {other:?}"),
    }
    assert_eq!(read[2].payload_value().unwrap()["Triangle"]["a"], 1);
}

/// The latest snapshot wins; an older one never replaces a newer one.
pub async fn snapshots_keep_the_latest<S: Subject>(store: S) {
    let s = sid("Snap-1");
    assert!(store.load_snapshot(&s).await.unwrap().is_none());
    store
        .save_snapshot(Snapshot::new(
            s.clone(),
            Version::new(5),
            1,
            r#"{"v":5}"#.into(),
        ))
        .await
        .unwrap();
    store
        .save_snapshot(Snapshot::new(
            s.clone(),
            Version::new(3),
            1,
            r#"{"v":3}"#.into(),
        ))
        .await
        .unwrap();
    let got = store.load_snapshot(&s).await.unwrap().unwrap();
    assert_eq!(got.version, Version::new(5));
    assert_eq!(got.state, r#"{"v":5}"#);
    store
        .save_snapshot(Snapshot::new(
            s.clone(),
            Version::new(9),
            2,
            r#"{"v":9}"#.into(),
        ))
        .await
        .unwrap();
    let got = store.load_snapshot(&s).await.unwrap().unwrap();
    assert_eq!((got.version, got.schema_version), (Version::new(9), 2));
    assert!(store.load_snapshot(&sid("Snap-2")).await.unwrap().is_none());
}

/// Checkpoints are durable per name and never move backwards.
pub async fn checkpoints_never_move_backwards<S: Subject>(store: S) {
    assert_eq!(store.load_checkpoint("projector").await.unwrap(), None);
    store
        .save_checkpoint("projector", Position::new(10, 5))
        .await
        .unwrap();
    store
        .save_checkpoint("projector", Position::new(9, 50))
        .await
        .unwrap();
    assert_eq!(
        store.load_checkpoint("projector").await.unwrap(),
        Some(Position::new(10, 5))
    );
    store
        .save_checkpoint("projector", Position::new(10, 6))
        .await
        .unwrap();
    store
        .save_checkpoint("other", Position::new(1, 1))
        .await
        .unwrap();
    assert_eq!(
        store.load_checkpoint("projector").await.unwrap(),
        Some(Position::new(10, 6))
    );
    assert_eq!(
        store.load_checkpoint("other").await.unwrap(),
        Some(Position::new(1, 1))
    );
}

/// Collects what a subscription delivers; optionally fails once on the
/// event whose payload `n` equals `fail_on`.
#[derive(Clone, Debug, Default)]
struct Collect {
    seen: Arc<Mutex<Vec<RecordedEvent>>>,
    fail_on: Option<u64>,
    failed: Arc<AtomicBool>,
}

impl Collect {
    fn failing_once_on(n: u64) -> Self {
        Self {
            fail_on: Some(n),
            ..Self::default()
        }
    }

    fn numbers(&self) -> Vec<u64> {
        numbers(&self.seen.lock().unwrap())
    }

    fn positions(&self) -> Vec<Position> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .map(|e| e.position)
            .collect()
    }
}

#[async_trait::async_trait]
impl SubscriptionHandler for Collect {
    async fn handle(&self, event: &RecordedEvent) -> Result<(), keel_core::BoxError> {
        let n = event.payload_value()?["n"].as_u64().unwrap_or(0);
        if self.fail_on == Some(n) && !self.failed.swap(true, Ordering::SeqCst) {
            return Err("the handler refused this event".into());
        }
        self.seen.lock().unwrap().push(event.clone());
        Ok(())
    }
}

fn quick(name: &str) -> SubscriptionOptions {
    SubscriptionOptions::new(name)
        .batch_size(8)
        .checkpoint(10, Duration::from_millis(100))
        .poll_interval(Duration::from_millis(50))
        .leadership_retry(Duration::from_millis(50))
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

/// A subscription catches up from the start, then tails new events live,
/// stores its checkpoint, and a restart resumes after it; a filtered one
/// sees only its events.
pub async fn subscription_catches_up_then_tails<S: Subject>(store: S) {
    let store = Arc::new(store);
    for i in 0..30u64 {
        let s = sid(&format!("Sub-{}", i % 3));
        store
            .append(&s, ExpectedVersion::Any, vec![ev(i)])
            .await
            .unwrap();
    }
    store
        .append(
            &sid("Other-1"),
            ExpectedVersion::Any,
            vec![ev(100), ev(101)],
        )
        .await
        .unwrap();

    let all = Collect::default();
    let mut handle = Subscription::spawn(store.clone(), quick("projector"), all.clone());
    let only_other = Collect::default();
    let mut filtered = Subscription::spawn(
        store.clone(),
        quick("other-projector").filter(ReadAll::from_start().category("Other")),
        only_other.clone(),
    );
    until(&mut handle, "caught up", |s| s.handled >= 32).await;

    let mut writers = Vec::new();
    for i in 0..15u64 {
        let store = store.clone();
        writers.push(tokio::spawn(async move {
            let s = sid(&format!("Sub-live-{i}"));
            store
                .append(&s, ExpectedVersion::NoStream, vec![ev(200 + i)])
                .await
                .unwrap();
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    store
        .append(&sid("Other-2"), ExpectedVersion::Any, vec![ev(102)])
        .await
        .unwrap();
    until(&mut handle, "live events arrived", |s| s.handled >= 48).await;
    until(&mut filtered, "filtered events arrived", |s| s.handled >= 3).await;
    let last = handle.status().position.unwrap();
    handle.stop().await.unwrap();
    filtered.stop().await.unwrap();

    let mut expected: Vec<u64> = (0..30).chain(100..103).chain(200..215).collect();
    let mut got = all.numbers();
    assert_eq!(got.len(), expected.len(), "each event exactly once");
    assert!(
        all.positions().windows(2).all(|w| w[0] < w[1]),
        "in log order"
    );
    got.sort_unstable();
    expected.sort_unstable();
    assert_eq!(got, expected);
    assert_eq!(only_other.numbers(), vec![100, 101, 102]);
    assert_eq!(
        store.load_checkpoint("projector").await.unwrap(),
        Some(last),
        "stop stores the checkpoint"
    );

    let resumed = Collect::default();
    let mut handle = Subscription::spawn(store.clone(), quick("projector"), resumed.clone());
    until(&mut handle, "leading again", |s| s.leader).await;
    store
        .append(
            &sid("Sub-late"),
            ExpectedVersion::Any,
            vec![ev(300), ev(301)],
        )
        .await
        .unwrap();
    until(&mut handle, "late events arrived", |s| s.handled >= 2).await;
    handle.stop().await.unwrap();
    assert_eq!(
        resumed.numbers(),
        vec![300, 301],
        "a restart resumes after the checkpoint"
    );
}

/// A failing handler stops the subscription with a typed error and the
/// event is delivered again on restart; after a crash (no final
/// checkpoint) unsaved events are delivered again: at least once.
pub async fn subscription_redelivers_after_failure_or_crash<S: Subject>(store: S) {
    let store = Arc::new(store);
    let s = sid("Redeliver-1");
    store
        .append(&s, ExpectedVersion::NoStream, (1..=10).map(ev).collect())
        .await
        .unwrap();
    let positions: Vec<Position> = stream_of(&*store, &s, ReadStream::forward())
        .await
        .iter()
        .map(|e| e.position)
        .collect();

    let failing = Collect::failing_once_on(7);
    let handle = Subscription::spawn(store.clone(), quick("flaky"), failing.clone());
    let err = tokio::time::timeout(Duration::from_secs(20), handle.join())
        .await
        .expect("the subscription stops")
        .unwrap_err();
    match err {
        EventStoreError::Handler {
            subscription,
            position,
            ..
        } => {
            assert_eq!(subscription, "flaky");
            assert_eq!(position, positions[6]);
        }
        other => panic!("expected a handler error, got {other:?}"),
    }
    assert_eq!(failing.numbers(), (1..=6).collect::<Vec<_>>());
    assert_eq!(
        store.load_checkpoint("flaky").await.unwrap(),
        Some(positions[5])
    );

    let lazy = quick("flaky").checkpoint(1_000, Duration::from_secs(3_600));
    let retry = Collect::default();
    let mut handle = Subscription::spawn(store.clone(), lazy.clone(), retry.clone());
    until(&mut handle, "redelivered", |s| s.handled >= 4).await;
    assert_eq!(retry.numbers(), vec![7, 8, 9, 10]);
    handle.abort();

    let after_crash = Collect::default();
    let mut handle = Subscription::spawn(store.clone(), lazy, after_crash.clone());
    until(&mut handle, "redelivered after the crash", |s| {
        s.handled >= 4
    })
    .await;
    handle.stop().await.unwrap();
    assert_eq!(
        after_crash.numbers(),
        vec![7, 8, 9, 10],
        "unsaved progress is delivered again"
    );
    assert_eq!(
        store.load_checkpoint("flaky").await.unwrap(),
        Some(positions[9])
    );
}

/// Of two consumers of one subscription name only one is active; when it
/// dies the other takes over from its checkpoint.
pub async fn subscription_has_one_leader_and_fails_over<S: Subject>(store: S) {
    let store = Arc::new(store);
    store
        .append(
            &sid("Lead-1"),
            ExpectedVersion::NoStream,
            (1..=20).map(ev).collect(),
        )
        .await
        .unwrap();
    let eager = quick("leader-test").checkpoint(1, Duration::from_millis(100));

    let first = Collect::default();
    let mut a = Subscription::spawn(store.clone(), eager.clone(), first.clone());
    until(&mut a, "A handled the backlog", |s| {
        s.leader && s.handled >= 20
    })
    .await;
    let second = Collect::default();
    let mut b = Subscription::spawn(store.clone(), eager, second.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!b.status().leader, "B waits while A leads");
    store
        .append(
            &sid("Lead-1"),
            ExpectedVersion::Exact(Version::new(20)),
            vec![ev(21)],
        )
        .await
        .unwrap();
    until(&mut a, "A handled the new event", |s| s.handled >= 21).await;
    assert!(
        second.numbers().is_empty(),
        "only the leader receives events"
    );
    // A stores a checkpoint after every event; let the last one land.
    let handled_to = a.status().position;
    tokio::time::timeout(Duration::from_secs(20), async {
        while store.load_checkpoint("leader-test").await.unwrap() != handled_to {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("A's checkpoint is stored");

    a.abort();
    until(&mut b, "B took over", |s| s.leader).await;
    store
        .append(
            &sid("Lead-1"),
            ExpectedVersion::Exact(Version::new(21)),
            (22..=25).map(ev).collect(),
        )
        .await
        .unwrap();
    until(&mut b, "B handled the new events", |s| s.handled >= 4).await;
    b.stop().await.unwrap();
    assert_eq!(first.numbers(), (1..=21).collect::<Vec<_>>());
    assert_eq!(
        second.numbers(),
        (22..=25).collect::<Vec<_>>(),
        "B resumes after A's checkpoint"
    );
}

#[derive(Default, Debug, serde::Serialize, serde::Deserialize, PartialEq)]
struct Tally {
    total: i64,
    adds: u32,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
enum TallyEvent {
    Added { n: i64 },
}

impl keel_core::DomainEvent for TallyEvent {
    fn event_type(&self) -> &'static str {
        "tally.added"
    }

    fn schema_version(&self) -> u32 {
        2
    }
}

impl keel_core::Aggregate for Tally {
    const TYPE: &'static str = "Tally";
    type Id = u32;
    type Event = TallyEvent;
    type Command = i64;
    type Error = keel_core::DomainError;

    fn apply(&mut self, TallyEvent::Added { n }: &TallyEvent) {
        self.total += n;
        self.adds += 1;
    }

    fn handle(&self, n: i64) -> Result<Vec<TallyEvent>, keel_core::DomainError> {
        if self.total + n < 0 {
            return Err(keel_core::DomainError::new(
                "tally.negative",
                "would go below zero",
            ));
        }
        Ok(vec![TallyEvent::Added { n }])
    }
}

fn tally_upcasters() -> Upcasters {
    // Version 1 called the field `amount`.
    Upcasters::new().step("tally.added", 1, |mut v| {
        let amount = v["Added"]["amount"].take();
        Ok(json!({ "Added": { "n": amount } }))
    })
}

/// The event-sourced repository loads (snapshot + later events, upcast),
/// saves with the loaded version as the expected version, takes snapshots
/// by policy, ignores outdated or unreadable snapshots, and reports unknown
/// types and missing upcasters clearly.
pub async fn aggregate_repository_round_trip<S: Subject>(store: S) {
    use keel_core::{AggregateRepository, CommandError, ErrorKind};

    let store = Arc::new(store);
    let old =
        |amount: i64| NewEvent::from_json("tally.added", &json!({ "Added": { "amount": amount } }));
    store
        .append(
            &sid("Tally-1"),
            ExpectedVersion::NoStream,
            vec![old(3), old(3)],
        )
        .await
        .unwrap();
    let repo = EventSourcedRepository::<Tally, S>::new(store.clone())
        .with_upcasters(tally_upcasters())
        .with_snapshots(SnapshotPolicy::every(3), 1);
    let meta = Metadata::new().with_actor("tester");

    let loaded = repo.load(&1).await.unwrap().unwrap();
    assert_eq!(loaded.state(), &Tally { total: 6, adds: 2 });
    assert_eq!(loaded.version(), Version::new(2));
    assert!(repo.load(&99).await.unwrap().is_none());

    repo.execute(&1, 4, &meta).await.unwrap();
    let snap = store
        .load_snapshot(&sid("Tally-1"))
        .await
        .unwrap()
        .expect("a snapshot at 3");
    assert_eq!((snap.version, snap.schema_version), (Version::new(3), 1));
    assert_eq!(
        serde_json::from_str::<Tally>(&snap.state).unwrap(),
        Tally { total: 10, adds: 3 }
    );
    let stored = stream_of(&*store, &sid("Tally-1"), ReadStream::forward()).await;
    assert_eq!(stored[2].schema_version, 2);
    assert_eq!(stored[2].metadata.actor.as_deref(), Some("tester"));

    // The snapshot is really used: a doctored one shows through.
    store
        .save_snapshot(Snapshot::new(
            sid("Tally-1"),
            Version::new(3),
            1,
            r#"{"total":1000,"adds":0}"#.into(),
        ))
        .await
        .unwrap();
    repo.execute(&1, 1, &meta).await.unwrap();
    let root = repo.load(&1).await.unwrap().unwrap();
    assert_eq!(
        (root.state().total, root.version()),
        (1001, Version::new(4))
    );

    // Outdated or unreadable snapshots are ignored: rebuilt from events.
    store
        .save_snapshot(Snapshot::new(
            sid("Tally-1"),
            Version::new(4),
            99,
            r#"{"total":5000,"adds":0}"#.into(),
        ))
        .await
        .unwrap();
    assert_eq!(repo.load(&1).await.unwrap().unwrap().state().total, 11);
    store
        .save_snapshot(Snapshot::new(
            sid("Tally-1"),
            Version::new(4),
            1,
            r#"{"bogus":true}"#.into(),
        ))
        .await
        .unwrap();
    assert_eq!(
        repo.load(&1).await.unwrap().unwrap().state(),
        &Tally { total: 11, adds: 4 }
    );

    // Two loads at the same version: the second save is a conflict.
    let mut a = repo.load(&1).await.unwrap().unwrap();
    let mut b = repo.load(&1).await.unwrap().unwrap();
    a.execute(1).unwrap();
    b.execute(2).unwrap();
    assert_eq!(repo.save(&mut a, &meta).await.unwrap(), Version::new(5));
    let err = repo.save(&mut b, &meta).await.unwrap_err();
    let c = err.as_conflict().expect("a version conflict");
    assert_eq!(
        (c.expected, c.actual),
        (ExpectedVersion::Exact(Version::new(4)), Version::new(5))
    );

    match repo.execute(&1, -5_000, &meta).await {
        Err(CommandError::Rejected(e)) => assert_eq!(e.code(), "tally.negative"),
        other => panic!("expected a rejection, got {other:?}"),
    }
    assert_eq!(
        store.stream_version(&sid("Tally-1")).await.unwrap(),
        Version::new(5)
    );

    store
        .append(
            &sid("Tally-2"),
            ExpectedVersion::NoStream,
            vec![NewEvent::from_json("tally.exploded", &json!({}))],
        )
        .await
        .unwrap();
    let err = repo.load(&2).await.unwrap_err();
    assert!(err.to_string().contains("tally.exploded"), "{err}");

    let gap = EventSourcedRepository::<Tally, S>::new(store.clone())
        .with_upcasters(tally_upcasters().current_version("tally.added", 3));
    let err = gap.load(&1).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Internal);
    assert!(
        err.to_string()
            .contains(r#"no upcaster for event type "tally.added" from schema version 2 to 3"#),
        "{err}"
    );
    // A save whose first attempt committed but whose answer was lost (a
    // timeout, a dropped connection) is retried: the pending events keep
    // their ids, so the retry returns the stored result instead of a conflict
    // or a second copy.
    let mut retried = repo.load(&1).await.unwrap().unwrap();
    retried.execute(2).unwrap();
    let ids = retried.pending_event_ids().to_vec();
    assert_eq!(ids.len(), 1);
    store
        .append(
            &sid("Tally-1"),
            ExpectedVersion::Exact(Version::new(5)),
            vec![
                NewEvent::from_domain(&retried.pending()[0])
                    .unwrap()
                    .with_id(ids[0])
                    .with_metadata(meta.clone()),
            ],
        )
        .await
        .unwrap();
    assert_eq!(
        repo.save(&mut retried, &meta).await.unwrap(),
        Version::new(6)
    );
    assert!(retried.pending().is_empty() && retried.pending_event_ids().is_empty());
    let stored = stream_of(&*store, &sid("Tally-1"), ReadStream::forward()).await;
    assert_eq!(stored.len(), 6, "the retry stored nothing twice");
    assert_eq!(stored[5].event_id, ids[0]);
}
