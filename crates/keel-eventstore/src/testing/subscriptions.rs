//! Checkpoints and catch-up subscriptions.

#[allow(unused_imports, reason = "the suite shares one set of imports")]
use super::*;

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
pub(super) struct Collect {
    seen: Arc<Mutex<Vec<RecordedEvent>>>,
    fail_on: Option<u64>,
    failed: Arc<AtomicBool>,
}

impl Collect {
    pub(super) fn failing_once_on(n: u64) -> Self {
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

/// Appends events numbered 1 to `n` to a new stream `stream` and returns
/// their positions, in order.
async fn numbered<S: Subject>(store: &S, stream: &str, n: u64) -> Vec<Position> {
    let s = sid(stream);
    store
        .append(&s, ExpectedVersion::NoStream, (1..=n).map(ev).collect())
        .await
        .unwrap();
    stream_of(store, &s, ReadStream::forward())
        .await
        .iter()
        .map(|e| e.position)
        .collect()
}

pub(super) fn quick(name: &str) -> SubscriptionOptions {
    SubscriptionOptions::new(name)
        .batch_size(8)
        .checkpoint(10, Duration::from_millis(100))
        .poll_interval(Duration::from_millis(50))
        .leadership_retry(Duration::from_millis(50))
}

pub(super) async fn until(
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
    handle.shutdown().await.unwrap();
    filtered.shutdown().await.unwrap();

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
    handle.shutdown().await.unwrap();
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
    let positions = numbered(&*store, "Redeliver-1", 10).await;

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
    handle.abort().await;

    let after_crash = Collect::default();
    let mut handle = Subscription::spawn(store.clone(), lazy, after_crash.clone());
    until(&mut handle, "redelivered after the crash", |s| {
        s.handled >= 4
    })
    .await;
    handle.shutdown().await.unwrap();
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

    a.abort().await;
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
    b.shutdown().await.unwrap();
    assert_eq!(first.numbers(), (1..=21).collect::<Vec<_>>());
    assert_eq!(
        second.numbers(),
        (22..=25).collect::<Vec<_>>(),
        "B resumes after A's checkpoint"
    );
}

/// Records what a batching handler was given; fails once, in the middle
/// of a batch, on the event numbered `fail_on`.
#[derive(Clone, Default)]
struct Batches {
    batches: Arc<Mutex<Vec<Vec<u64>>>>,
    handled: Arc<Mutex<Vec<u64>>>,
    fail_on: Option<u64>,
    failed: Arc<AtomicBool>,
}

#[async_trait::async_trait]
impl SubscriptionHandler for Batches {
    async fn handle(&self, _: &RecordedEvent) -> Result<(), keel_core::BoxError> {
        Err("a batching handler is called through handle_batch".into())
    }

    fn max_batch(&self) -> usize {
        4
    }

    async fn handle_batch(&self, deliveries: &[Delivery<'_>]) -> Result<(), BatchFailure> {
        let ns: Vec<u64> = deliveries
            .iter()
            .map(|d| d.payload_value().unwrap()["n"].as_u64().unwrap())
            .collect();
        self.batches.lock().unwrap().push(ns.clone());
        for (i, n) in ns.into_iter().enumerate() {
            if self.fail_on == Some(n) && !self.failed.swap(true, Ordering::SeqCst) {
                return Err(BatchFailure::new(i, "the handler refused this event"));
            }
            self.handled.lock().unwrap().push(n);
        }
        Ok(())
    }
}

/// A handler that takes events in batches gets at most its
/// `max_batch`, never across a checkpoint boundary, in log order; when it
/// fails part-way, the subscription stops before the failed event (the
/// ones before it count as handled and are checkpointed) and a restart
/// delivers from the failed event on.
pub async fn batched_handlers_stop_at_the_failed_event<S: Subject>(store: S) {
    let store = Arc::new(store);
    let positions = numbered(&*store, "Batched-1", 25).await;

    let failing = Batches {
        fail_on: Some(11),
        ..Batches::default()
    };
    // Checkpoints every 10 events; reads of 8.
    let handle = Subscription::spawn(store.clone(), quick("batched"), failing.clone());
    let err = tokio::time::timeout(Duration::from_secs(20), handle.join())
        .await
        .expect("the subscription stops")
        .unwrap_err();
    match err {
        EventStoreError::Handler { position, .. } => assert_eq!(position, positions[10]),
        other => panic!("expected a handler error, got {other:?}"),
    }
    assert_eq!(
        *failing.handled.lock().unwrap(),
        (1..=10).collect::<Vec<_>>()
    );
    assert_eq!(
        store.load_checkpoint("batched").await.unwrap(),
        Some(positions[9]),
        "the events before the failed one are checkpointed"
    );

    let retry = Batches::default();
    let mut handle = Subscription::spawn(store.clone(), quick("batched"), retry.clone());
    until(&mut handle, "the rest handled", |s| s.handled >= 15).await;
    handle.shutdown().await.unwrap();
    assert_eq!(
        *retry.handled.lock().unwrap(),
        (11..=25).collect::<Vec<_>>()
    );
    assert_eq!(
        store.load_checkpoint("batched").await.unwrap(),
        Some(positions[24])
    );
    for batches in [&failing.batches, &retry.batches] {
        for batch in batches.lock().unwrap().iter() {
            assert!(!batch.is_empty() && batch.len() <= 4, "{batch:?}");
            assert!(
                batch.windows(2).all(|w| w[1] == w[0] + 1),
                "in log order: {batch:?}"
            );
            // Checkpoints fall after every 10th handled event: 10, 20
            // (the first run), then 20 again counted from 11 (the second).
            let crosses = |last: u64| batch.contains(&last) && batch.contains(&(last + 1));
            assert!(
                !crosses(10) && !crosses(20),
                "a batch crossed a checkpoint boundary: {batch:?}"
            );
        }
    }
    assert!(
        retry.batches.lock().unwrap().iter().any(|b| b.len() > 1),
        "events were batched"
    );
}
