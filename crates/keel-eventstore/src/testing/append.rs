//! Appends: read back, expectation modes, races, multi-stream atomicity.

#[allow(unused_imports, reason = "the suite shares one set of imports")]
use super::*;

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
    // Each stream's batch is stored under one commit key; the streams of
    // one multi-stream append may get one key each (a key per append
    // statement), in the order they were appended.
    for r in &results {
        let commits: HashSet<u64> = r.positions.iter().map(|p| p.commit).collect();
        assert_eq!(commits.len(), 1, "one batch, one commit key");
    }
    assert!(
        results
            .windows(2)
            .all(|w| w[0].positions[0].commit <= w[1].positions[0].commit),
        "the streams' keys follow the order they were appended in"
    );
    let log = log_of(&store, ReadAll::from_start()).await;
    assert_eq!(numbers(&log), vec![1, 10, 11, 12, 13]);
}
