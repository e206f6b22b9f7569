//! Units of work: `store.within(tx)` and `repository.within(tx)`.

use super::aggregate::Tally;
#[allow(unused_imports, reason = "the suite shares one set of imports")]
use super::*;

fn is_conflict(e: &keel_core::Error) -> bool {
    matches!(e, keel_core::Error::Conflict(_))
}

/// Appends inside a transaction are seen inside it (stream reads, stream
/// version, multi-stream appends, idempotent retries) and by nobody else
/// until it commits; then everyone sees them, in the global log too.
pub async fn transaction_appends_are_invisible_until_commit<S: Subject>(store: S) {
    let (one, two) = (sid("TxSeen-1"), sid("TxSeen-2"));
    let mut tx = store.begin().await;
    let batch = vec![ev(1), ev(2)];
    let first = {
        let view = store.within(&mut *tx);
        let first = view
            .append(&one, ExpectedVersion::NoStream, batch.clone())
            .await
            .unwrap();
        assert_eq!(first.next_expected_version, Version::new(2));
        let retry = view
            .append(&one, ExpectedVersion::NoStream, batch.clone())
            .await
            .unwrap();
        assert!(
            retry.was_retry,
            "a retry inside the transaction is idempotent"
        );
        let multi = view
            .append_multi(vec![
                StreamAppend::new(
                    one.clone(),
                    ExpectedVersion::Exact(Version::new(2)),
                    vec![ev(3)],
                ),
                StreamAppend::new(two.clone(), ExpectedVersion::NoStream, vec![ev(4)]),
            ])
            .await
            .unwrap();
        assert_eq!(multi[0].next_expected_version, Version::new(3));
        let own: Vec<_> = view
            .read_stream(&one, ReadStream::forward())
            .try_collect()
            .await
            .unwrap();
        assert_eq!(
            numbers(&own),
            vec![1, 2, 3],
            "own appends are visible inside"
        );
        assert_eq!(view.stream_version(&two).await.unwrap(), Version::new(1));
        first
    };
    assert_eq!(store.stream_version(&one).await.unwrap(), Version::INITIAL);
    assert!(
        stream_of(&store, &two, ReadStream::forward())
            .await
            .is_empty()
    );
    assert!(log_of(&store, ReadAll::from_start()).await.is_empty());

    tx.commit().await.unwrap();
    assert_eq!(
        numbers(&stream_of(&store, &one, ReadStream::forward()).await),
        vec![1, 2, 3]
    );
    let log = log_of(&store, ReadAll::from_start()).await;
    assert_eq!(log.len(), 4);
    assert!(log.windows(2).all(|w| w[0].position < w[1].position));
    // A retry after the commit returns the stored result.
    let again = store
        .append(&one, ExpectedVersion::NoStream, batch)
        .await
        .unwrap();
    assert!(again.was_retry);
    assert_eq!(again.first_version, first.first_version);
}

/// A rollback leaves nothing: no stream, no global-log entry, no
/// idempotency record (the ids can be used afresh). A refused append keeps
/// the transaction usable; a transaction of another backend is refused
/// with an internal error naming both, and nothing is written.
pub async fn transaction_rollback_leaves_nothing<S: Subject>(store: S) {
    let s = sid("TxGone-1");
    let batch = vec![ev(1), ev(2)];
    let mut tx = store.begin().await;
    store
        .within(&mut *tx)
        .append(&s, ExpectedVersion::NoStream, batch.clone())
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(store.stream_version(&s).await.unwrap(), Version::INITIAL);
    assert!(log_of(&store, ReadAll::from_start()).await.is_empty());
    let fresh = store
        .append(&sid("TxGone-2"), ExpectedVersion::NoStream, batch)
        .await
        .unwrap();
    assert!(
        !fresh.was_retry,
        "a rolled-back append leaves no idempotency record"
    );

    let mut tx = store.begin().await;
    {
        let view = store.within(&mut *tx);
        view.append(&s, ExpectedVersion::NoStream, vec![ev(3)])
            .await
            .unwrap();
        let refused = view
            .append(&s, ExpectedVersion::NoStream, vec![ev(4)])
            .await
            .unwrap_err();
        assert_eq!(conflict(&refused).1, Version::new(1));
    }
    tx.commit().await.unwrap();
    assert_eq!(
        numbers(&stream_of(&store, &s, ReadStream::forward()).await),
        vec![3]
    );

    let mut foreign = store.foreign_transaction();
    let backend = foreign.backend();
    let err = store
        .within(&mut *foreign)
        .append(&sid("TxForeign-1"), ExpectedVersion::Any, vec![ev(5)])
        .await
        .unwrap_err();
    let err = keel_core::Error::from(err);
    assert!(matches!(err, keel_core::Error::Internal { .. }), "{err:?}");
    assert!(err.to_string().contains(backend), "{err}");
    assert_eq!(
        store.stream_version(&sid("TxForeign-1")).await.unwrap(),
        Version::INITIAL
    );
}

/// Two transactions append to one stream with the same expected version:
/// exactly one commits, the other gets a typed conflict, at its append or
/// at its commit.
pub async fn racing_transactions_exactly_one_commits<S: Subject>(store: S) {
    let s = sid("TxRace-1");
    store
        .append(&s, ExpectedVersion::NoStream, vec![ev(0)])
        .await
        .unwrap();
    let mut first = store.begin().await;
    store
        .within(&mut *first)
        .append(&s, ExpectedVersion::Exact(Version::new(1)), vec![ev(1)])
        .await
        .unwrap();
    // The second writer runs on its own task: on PostgreSQL its append
    // waits for the first transaction to end. In memory it may also get to
    // commit first (the tasks race on a multi-threaded runtime): then the
    // first transaction's commit is the one refused.
    let second = tokio::spawn({
        let (store, s) = (store.clone(), s.clone());
        async move {
            let mut tx = store.begin().await;
            let appended = store
                .within(&mut *tx)
                .append(&s, ExpectedVersion::Exact(Version::new(1)), vec![ev(2)])
                .await;
            match appended {
                Err(e) => {
                    assert_eq!(conflict(&e).1, Version::new(2), "{e:?}");
                    tx.rollback().await.unwrap();
                    "append"
                }
                Ok(_) => match tx.commit().await {
                    Err(e) => {
                        assert!(is_conflict(&e), "{e:?}");
                        "commit"
                    }
                    Ok(()) => "won",
                },
            }
        }
    });
    tokio::task::yield_now().await;
    let first_outcome = first.commit().await;
    let second_outcome = second.await.unwrap();
    if second_outcome == "won" {
        let e = first_outcome.expect_err("only one of the two commits");
        assert!(is_conflict(&e), "{e:?}");
        assert_eq!(
            numbers(&stream_of(&store, &s, ReadStream::forward()).await),
            vec![0, 2]
        );
    } else {
        first_outcome.unwrap();
        assert!(["append", "commit"].contains(&second_outcome));
        assert_eq!(
            numbers(&stream_of(&store, &s, ReadStream::forward()).await),
            vec![0, 1]
        );
    }
}

/// The aggregate repository bound to a transaction loads what was saved
/// earlier in it, saves with the loaded version as the expected version,
/// and a rollback takes the events and the snapshot they caused away.
pub async fn aggregate_repository_within_transaction<S: Subject>(store: S) {
    use keel_core::AggregateRepository;

    let store = Arc::new(store);
    let repo = EventSourcedRepository::<Tally, S>::new(store.clone())
        .with_snapshots(SnapshotPolicy::every(2), 1);
    let meta = Metadata::new();

    let mut tx = store.begin().await;
    {
        let orders = repo.within(&mut *tx);
        orders.execute(&5, 2, &meta).await.unwrap();
        orders.execute(&5, 3, &meta).await.unwrap();
        let seen = orders
            .load(&5)
            .await
            .unwrap()
            .expect("saved in the transaction");
        assert_eq!((seen.state().total, seen.version()), (5, Version::new(2)));
    }
    assert!(
        repo.load(&5).await.unwrap().is_none(),
        "nothing before commit"
    );
    tx.rollback().await.unwrap();
    assert!(
        repo.load(&5).await.unwrap().is_none(),
        "nothing after rollback"
    );
    assert!(
        store
            .load_snapshot(&sid("Tally-5"))
            .await
            .unwrap()
            .is_none(),
        "a snapshot of rolled-back events never survives"
    );

    let mut tx = store.begin().await;
    {
        let orders = repo.within(&mut *tx);
        orders.execute(&5, 4, &meta).await.unwrap();
        orders.execute(&5, 1, &meta).await.unwrap();
    }
    tx.commit().await.unwrap();
    let root = repo.load(&5).await.unwrap().unwrap();
    assert_eq!((root.state().total, root.version()), (5, Version::new(2)));
    let snapshot = store.load_snapshot(&sid("Tally-5")).await.unwrap();
    assert_eq!(snapshot.map(|s| s.version), Some(Version::new(2)));

    // A stale root saved in a transaction conflicts, typed as outside one.
    let mut stale = repo.load(&5).await.unwrap().unwrap();
    repo.execute(&5, 1, &meta).await.unwrap();
    stale.execute(1).unwrap();
    let mut tx = store.begin().await;
    let err = repo
        .within(&mut *tx)
        .save(&mut stale, &meta)
        .await
        .unwrap_err();
    assert!(is_conflict(&err), "{err:?}");
    tx.rollback().await.unwrap();
}

/// A fixed pseudo-random mix (splitmix64), so a failing run can be
/// repeated; the interleaving still varies from run to run.
fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Many tasks run many short transactions against a few streams, some
/// rolled back and some losing races; afterwards the store holds exactly
/// the committed events, once each, with dense per-stream versions.
pub async fn concurrent_transactions_keep_the_log_exact<S: Subject>(store: S) {
    const TASKS: u64 = 8;
    const ROUNDS: u64 = 20;
    let streams: Vec<StreamId> = (0..4).map(|i| sid(&format!("TxMany-{i}"))).collect();
    let mut tasks = Vec::new();
    for w in 0..TASKS {
        let (store, streams) = (store.clone(), streams.clone());
        tasks.push(tokio::spawn(async move {
            let mut committed = Vec::new();
            for r in 0..ROUNDS {
                let n = w * 1_000 + r;
                let dice = mix(n);
                let len = streams.len() as u64;
                let (pick, other, roll_back, multi) = (
                    (dice % len) as usize,
                    ((dice >> 8) % len) as usize,
                    (dice >> 16).is_multiple_of(10),
                    (dice >> 24).is_multiple_of(4),
                );
                let mut tx = store.begin().await;
                let appended = {
                    let view = store.within(&mut *tx);
                    let s = &streams[pick];
                    let at = view.stream_version(s).await.unwrap();
                    if multi && other != pick {
                        let o = &streams[other];
                        let at_o = view.stream_version(o).await.unwrap();
                        view.append_multi(vec![
                            StreamAppend::new(s.clone(), ExpectedVersion::Exact(at), vec![ev(n)]),
                            StreamAppend::new(
                                o.clone(),
                                ExpectedVersion::Exact(at_o),
                                vec![ev(n + 500)],
                            ),
                        ])
                        .await
                        .map(|_| vec![n, n + 500])
                    } else {
                        view.append(s, ExpectedVersion::Exact(at), vec![ev(n)])
                            .await
                            .map(|_| vec![n])
                    }
                };
                match appended {
                    Err(e) => {
                        let typed =
                            e.as_conflict().is_some() || keel_core::Error::from(e).is_retryable();
                        assert!(typed, "an append in a transaction failed untyped");
                        tx.rollback().await.unwrap();
                    }
                    Ok(_) if roll_back => tx.rollback().await.unwrap(),
                    Ok(ns) => match tx.commit().await {
                        Ok(()) => committed.extend(ns),
                        Err(e) => assert!(
                            is_conflict(&e) || e.is_retryable(),
                            "a commit failed untyped: {e:?}"
                        ),
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
    committed.sort_unstable();
    assert!(!committed.is_empty());

    let mut stored = Vec::new();
    for s in &streams {
        let events = stream_of(&store, s, ReadStream::forward()).await;
        let versions: Vec<u64> = events.iter().map(|e| e.version.get()).collect();
        let dense: Vec<u64> = (1..=events.len() as u64).collect();
        assert_eq!(versions, dense, "{s} has dense versions");
        stored.extend(numbers(&events));
    }
    stored.sort_unstable();
    assert_eq!(stored, committed, "exactly the committed events are stored");
    let mut logged = numbers(&log_of(&store, ReadAll::from_start()).await);
    logged.sort_unstable();
    assert_eq!(
        logged, committed,
        "the global log holds each committed event once"
    );
}
