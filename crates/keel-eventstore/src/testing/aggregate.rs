//! Snapshots and the event-sourced aggregate repository.

#[allow(unused_imports, reason = "the suite shares one set of imports")]
use super::*;

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

#[derive(Default, Debug, serde::Serialize, serde::Deserialize, PartialEq)]
pub(super) struct Tally {
    pub(super) total: i64,
    pub(super) adds: u32,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub(super) enum TallyEvent {
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
