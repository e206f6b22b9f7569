//! Projections: exactly-once effects, parked events, versions, health; and
//! the redelivery flag of subscriptions.
//!
//! The projections here write their effects through the store itself
//! (`store.within(tx).append(..)` to an `Effect-…` stream), a transactional
//! write both backends offer, so one suite proves both: an effect stream
//! holding each source event exactly once is exactly-once effect.

#[allow(unused_imports, reason = "the suite shares one set of imports")]
use super::*;

use keel_core::{HealthCheck, HealthStatus};

use super::subscriptions::{Collect, quick, until};
use crate::{
    Delivery, PoisonAction, Projection, ProjectionHandle, ProjectionId, ProjectionOptions,
    ProjectionRunner, ProjectionStatus,
};

/// Writes one effect event per source event (payload `n` copied) to
/// `Effect-<tag>`, through the runner's unit of work. Fails on the `n`s in
/// `poison` while `broken` is set.
#[derive(Clone)]
struct Effects<S> {
    store: Arc<S>,
    tag: String,
    poison: Arc<Mutex<HashSet<u64>>>,
    broken: Arc<AtomicBool>,
}

impl<S: Subject> Effects<S> {
    fn new(store: &Arc<S>, tag: &str) -> Self {
        Self {
            store: store.clone(),
            tag: tag.to_owned(),
            poison: Arc::default(),
            broken: Arc::new(AtomicBool::new(true)),
        }
    }

    fn poisoned(self, n: u64) -> Self {
        self.poison.lock().unwrap().insert(n);
        self
    }

    fn stream(&self) -> StreamId {
        sid(&format!("Effect-{}", self.tag))
    }

    async fn numbers(&self) -> Vec<u64> {
        numbers(&stream_of(&*self.store, &self.stream(), ReadStream::forward()).await)
    }
}

#[async_trait::async_trait]
impl<S: Subject> Projection for Effects<S> {
    async fn apply(
        &self,
        event: &RecordedEvent,
        tx: &mut dyn Transaction,
    ) -> Result<(), keel_core::BoxError> {
        let n = event.payload_value()?["n"].as_u64().unwrap_or(0);
        if self.broken.load(Ordering::SeqCst) && self.poison.lock().unwrap().contains(&n) {
            return Err(format!("event {n} is poison").into());
        }
        self.store
            .within(tx)
            .append(&self.stream(), ExpectedVersion::Any, vec![ev(n)])
            .await?;
        Ok(())
    }
}

fn options(name: &str, version: u32) -> ProjectionOptions {
    ProjectionOptions::new(ProjectionId::new(name, version).unwrap())
        .filter(ReadAll::from_start().category("Src"))
        .batch_size(7)
        .retry(3, Duration::from_millis(1), Duration::from_millis(5))
        .poll_interval(Duration::from_millis(50))
        .leadership_retry(Duration::from_millis(50))
}

fn spawn<S: Subject>(
    store: &Arc<S>,
    options: ProjectionOptions,
    projection: Effects<S>,
) -> ProjectionHandle {
    ProjectionRunner::spawn(store.clone(), store.transactions(), options, projection)
}

async fn until_projected(
    handle: &mut ProjectionHandle,
    what: &str,
    f: impl Fn(&ProjectionStatus) -> bool,
) {
    tokio::time::timeout(Duration::from_secs(30), handle.wait_for(f))
        .await
        .unwrap_or_else(|_| panic!("timed out waiting until {what}: {:?}", handle.status()));
}

async fn append_sources<S: Subject>(store: &S, numbers: std::ops::Range<u64>) -> Position {
    let mut last = Position::START;
    for n in numbers {
        let r = store
            .append(
                &sid(&format!("Src-{}", n % 4)),
                ExpectedVersion::Any,
                vec![ev(n)],
            )
            .await
            .unwrap();
        last = *r.positions.last().unwrap();
    }
    last
}

/// A projection's effects and its checkpoint commit together: after a
/// crash (`abort`) and a restart, and after a graceful stop and a
/// restart, every source event has exactly one effect, in log order; the
/// version became active when it caught up.
pub async fn projection_applies_each_event_once<S: Subject>(store: S) {
    let store = Arc::new(store);
    let id = ProjectionId::new("once", 1).unwrap();
    append_sources(&*store, 0..40).await;
    let effects = Effects::new(&store, "once");
    let mut handle = spawn(&store, options("once", 1), effects.clone());
    until_projected(&mut handle, "some applied", |s| s.applied >= 10).await;
    // A crash in the middle of the log: whatever was not committed rolls
    // back with its checkpoint.
    handle.abort().await;
    let last = append_sources(&*store, 40..55).await;
    let mut handle = spawn(&store, options("once", 1), effects.clone());
    until_projected(&mut handle, "caught up", |s| {
        s.caught_up && s.position == Some(last)
    })
    .await;
    handle.shutdown().await.unwrap();
    let last = append_sources(&*store, 55..60).await;
    let mut handle = spawn(&store, options("once", 1), effects.clone());
    until_projected(&mut handle, "caught up again", |s| {
        s.caught_up && s.position == Some(last)
    })
    .await;
    handle.shutdown().await.unwrap();

    let got = effects.numbers().await;
    assert_eq!(got, (0..60).collect::<Vec<_>>(), "one effect per event");
    let state = store.projection_state(&id).await.unwrap().unwrap();
    assert_eq!(state.checkpoint, last);
    assert!(state.caught_up_at.is_some());
    assert_eq!(
        store.active_projection_version("once").await.unwrap(),
        Some(1)
    );
}

/// A poison event is retried, then parked. Skip-and-continue moves past
/// it; halt stops the runner with `Parked`, the checkpoint before it.
/// Parked events are listed and replayed once, even when replayed twice.
pub async fn projection_parks_poison_events<S: Subject>(store: S) {
    let store = Arc::new(store);
    let last = append_sources(&*store, 0..12).await;

    // Skip and continue.
    let skipping = Effects::new(&store, "skip").poisoned(4).poisoned(9);
    let id = ProjectionId::new("skip", 1).unwrap();
    let mut handle = spawn(
        &store,
        options("skip", 1).on_poison(PoisonAction::SkipAndContinue),
        skipping.clone(),
    );
    until_projected(&mut handle, "past the poison", |s| {
        s.caught_up && s.position == Some(last)
    })
    .await;
    assert_eq!(handle.status().parked, 2);
    let check = handle.progress_check();
    assert_eq!(
        check.check().await.status,
        HealthStatus::Degraded,
        "parked events degrade"
    );
    handle.shutdown().await.unwrap();
    let expected: Vec<u64> = (0..12).filter(|n| *n != 4 && *n != 9).collect();
    assert_eq!(skipping.numbers().await, expected);
    let parked = store.parked_events(&id).await.unwrap();
    assert_eq!(parked.len(), 2);
    assert!(parked.iter().all(|p| p.skipped && p.attempts == 3));
    assert!(parked[0].error.contains("poison"), "{:?}", parked[0].error);
    assert!(parked[0].position < parked[1].position);

    // Replaying while still broken fails and keeps it parked.
    let transactions = store.transactions();
    let failed = ProjectionRunner::replay_parked(
        &*store,
        &*transactions,
        &skipping,
        &id,
        parked[0].position,
    )
    .await;
    assert!(
        matches!(failed, Err(EventStoreError::Parked { .. })),
        "{failed:?}"
    );
    assert_eq!(store.parked_events(&id).await.unwrap().len(), 2);
    skipping.broken.store(false, Ordering::SeqCst);
    let replays = futures::future::join_all((0..4).map(|_| {
        ProjectionRunner::replay_parked(&*store, &*transactions, &skipping, &id, parked[0].position)
    }))
    .await;
    let replayed = replays
        .into_iter()
        .filter(|r| match r {
            Ok(done) => *done,
            // A replay that lost the race at commit is refused, not applied.
            Err(e) => {
                assert!(e.is_retryable(), "{e:?}");
                false
            }
        })
        .count();
    assert_eq!(replayed, 1, "racing replays apply it once");
    assert!(
        ProjectionRunner::replay_parked(
            &*store,
            &*transactions,
            &skipping,
            &id,
            parked[1].position
        )
        .await
        .unwrap()
    );
    let mut got = skipping.numbers().await;
    got.sort_unstable();
    assert_eq!(got, (0..12).collect::<Vec<_>>());
    assert!(store.parked_events(&id).await.unwrap().is_empty());

    // Halt.
    let halting = Effects::new(&store, "halt").poisoned(6);
    let id = ProjectionId::new("halt", 1).unwrap();
    let handle = spawn(&store, options("halt", 1), halting.clone());
    let check = handle.progress_check();
    let outcome = tokio::time::timeout(Duration::from_secs(30), handle.join())
        .await
        .expect("the runner halts");
    let Err(EventStoreError::Parked { attempts, .. }) = outcome else {
        panic!("expected Parked, got {outcome:?}");
    };
    assert_eq!(attempts, 3);
    let report = check.check().await;
    assert_eq!(report.status, HealthStatus::Unhealthy, "{report:?}");
    assert_eq!(halting.numbers().await, (0..6).collect::<Vec<_>>());
    let parked = store.parked_events(&id).await.unwrap();
    assert_eq!(parked.len(), 1);
    assert!(!parked[0].skipped);
    assert!(
        store
            .projection_state(&id)
            .await
            .unwrap()
            .unwrap()
            .checkpoint
            < parked[0].position
    );

    // Fixed: replay it, then restart; nothing is applied twice.
    halting.broken.store(false, Ordering::SeqCst);
    assert!(
        ProjectionRunner::replay_parked(&*store, &*transactions, &halting, &id, parked[0].position)
            .await
            .unwrap()
    );
    assert_eq!(
        store
            .projection_state(&id)
            .await
            .unwrap()
            .unwrap()
            .checkpoint,
        parked[0].position
    );
    let mut handle = spawn(&store, options("halt", 1), halting.clone());
    until_projected(&mut handle, "caught up", |s| {
        s.caught_up && s.position == Some(last)
    })
    .await;
    handle.shutdown().await.unwrap();
    assert_eq!(halting.numbers().await, (0..12).collect::<Vec<_>>());
    assert!(store.parked_events(&id).await.unwrap().is_empty());

    // A halted event that is handled on restart (no replay) is cleared too.
    let again = Effects::new(&store, "halt-restart").poisoned(2);
    let id = ProjectionId::new("halt-restart", 1).unwrap();
    let handle = spawn(&store, options("halt-restart", 1), again.clone());
    assert!(handle.join().await.is_err());
    assert_eq!(store.parked_events(&id).await.unwrap().len(), 1);
    again.broken.store(false, Ordering::SeqCst);
    let mut handle = spawn(&store, options("halt-restart", 1), again.clone());
    until_projected(&mut handle, "caught up", |s| {
        s.caught_up && s.position == Some(last)
    })
    .await;
    handle.shutdown().await.unwrap();
    assert_eq!(again.numbers().await, (0..12).collect::<Vec<_>>());
    assert!(store.parked_events(&id).await.unwrap().is_empty());
}

/// Version 2 builds beside version 1 and becomes active only once caught
/// up; the active version cannot be retired, an incomplete one cannot be
/// activated, an unknown one is not found.
pub async fn projection_versions_switch_when_caught_up<S: Subject>(store: S) {
    let store = Arc::new(store);
    let last = append_sources(&*store, 0..20).await;
    let v1 = ProjectionId::new("model", 1).unwrap();
    let v2 = ProjectionId::new("model", 2).unwrap();
    assert_eq!(
        store.active_projection_version("model").await.unwrap(),
        None
    );
    let first = Effects::new(&store, "model-v1");
    let mut handle = spawn(&store, options("model", 1), first.clone());
    until_projected(&mut handle, "v1 caught up", |s| s.caught_up).await;
    assert_eq!(
        store.active_projection_version("model").await.unwrap(),
        Some(1)
    );

    // v2, without switching by itself: registered, not caught up.
    store.register_projection(&v2).await.unwrap();
    let refused = store.activate_projection(&v2, false).await;
    assert!(
        matches!(&refused, Err(EventStoreError::Invalid(_))),
        "{refused:?}"
    );
    let unknown = store
        .activate_projection(&ProjectionId::new("model", 3).unwrap(), false)
        .await
        .unwrap_err();
    assert_eq!(
        keel_core::Error::from(unknown).kind(),
        keel_core::ErrorKind::NotFound
    );
    let second = Effects::new(&store, "model-v2");
    let mut builder = spawn(&store, options("model", 2), second.clone());
    until_projected(&mut builder, "v2 caught up", |s| {
        s.caught_up && s.position == Some(last)
    })
    .await;
    assert_eq!(
        store.active_projection_version("model").await.unwrap(),
        Some(2),
        "v2 switched readers over once caught up"
    );
    assert_eq!(second.numbers().await, (0..20).collect::<Vec<_>>());

    // An older version never takes over again by itself.
    assert!(!store.activate_projection(&v1, true).await.unwrap());
    assert_eq!(
        store.active_projection_version("model").await.unwrap(),
        Some(2)
    );

    let refused = store.retire_projection(&v2).await;
    assert!(
        matches!(&refused, Err(EventStoreError::Invalid(_))),
        "{refused:?}"
    );
    handle.shutdown().await.unwrap();
    store.retire_projection(&v1).await.unwrap();
    assert_eq!(store.projection_state(&v1).await.unwrap(), None);
    builder.shutdown().await.unwrap();
    // Switching back by hand works as long as the version exists.
    assert_eq!(
        store.active_projection_version("model").await.unwrap(),
        Some(2)
    );
    assert!(store.activate_projection(&v2, false).await.unwrap());
}

/// Blocks in `apply` until released, so a projection can be held behind.
#[derive(Clone)]
struct Gate {
    open: Arc<tokio::sync::Semaphore>,
}

#[async_trait::async_trait]
impl Projection for Gate {
    async fn apply(
        &self,
        _event: &RecordedEvent,
        _tx: &mut dyn Transaction,
    ) -> Result<(), keel_core::BoxError> {
        self.open.acquire().await?.forget();
        Ok(())
    }
}

/// The progress check reports lag in events, a projection held behind as
/// stuck, a caught-up one as healthy; a subscription's too.
pub async fn progress_checks_report_lag_and_stalls<S: Subject>(store: S) {
    let store = Arc::new(store);
    append_sources(&*store, 0..5).await;
    let gate = Gate {
        open: Arc::new(tokio::sync::Semaphore::new(0)),
    };
    let mut handle = ProjectionRunner::spawn(
        store.clone(),
        store.transactions(),
        options("gated", 1),
        gate.clone(),
    );
    until_projected(&mut handle, "leading", |s| s.leader).await;
    let check = handle
        .progress_check()
        .stuck_after(Duration::ZERO)
        .named("gated");
    let report = check.check().await;
    assert_eq!(check.name(), "gated");
    assert_eq!(report.status, HealthStatus::Unhealthy, "{report:?}");
    assert!(
        report.detail.contains("stuck: 5 events behind"),
        "{report:?}"
    );
    gate.open.add_permits(5);
    until_projected(&mut handle, "caught up", |s| s.caught_up).await;
    let report = check.check().await;
    assert_eq!(report.status, HealthStatus::Healthy, "{report:?}");
    assert!(report.detail.contains("0 events behind"), "{report:?}");
    handle.shutdown().await.unwrap();

    // A subscription that stopped on a handler error is unhealthy.
    let failing = Collect::failing_once_on(3);
    let sub = Subscription::spawn(store.clone(), quick("health-sub"), failing);
    let check = sub.progress_check(store.clone());
    assert!(sub.join().await.is_err());
    let report = check.check().await;
    assert_eq!(report.status, HealthStatus::Unhealthy, "{report:?}");
    assert!(report.detail.contains("stopped"), "{report:?}");
    assert!(report.detail.contains("events behind"), "{report:?}");
}

/// Records each delivery's redelivery flag.
#[derive(Clone, Default)]
struct Flags {
    seen: Arc<Mutex<Vec<(u64, bool)>>>,
}

#[async_trait::async_trait]
impl SubscriptionHandler for Flags {
    async fn handle(&self, _event: &RecordedEvent) -> Result<(), keel_core::BoxError> {
        Err("handle_delivery is the entry point".into())
    }

    async fn handle_delivery(&self, delivery: Delivery<'_>) -> Result<(), keel_core::BoxError> {
        let n = delivery.payload_value()?["n"].as_u64().unwrap_or(0);
        self.seen
            .lock()
            .unwrap()
            .push((n, delivery.is_redelivery()));
        Ok(())
    }
}

/// After a crash, the events handed over since the last checkpoint come
/// again flagged as redeliveries; new events are not flagged; a fresh
/// subscription flags nothing.
pub async fn subscription_flags_redeliveries<S: Subject>(store: S) {
    let store = Arc::new(store);
    let s = sid("Flag-1");
    store
        .append(&s, ExpectedVersion::NoStream, (1..=10).map(ev).collect())
        .await
        .unwrap();
    // Checkpoints far apart: a crash leaves all ten unsaved.
    let sparse = || {
        quick("flags")
            .batch_size(4)
            .checkpoint(1_000, Duration::from_secs(3_600))
    };
    let first = Flags::default();
    let mut handle = Subscription::spawn(store.clone(), sparse(), first.clone());
    until(&mut handle, "all handled", |st| st.handled >= 10).await;
    handle.abort().await;
    assert_eq!(
        first.seen.lock().unwrap().clone(),
        (1..=10).map(|n| (n, false)).collect::<Vec<_>>(),
        "first deliveries are not flagged"
    );
    assert_eq!(
        store.load_checkpoint("flags").await.unwrap(),
        Some(Position::START),
        "started delivering, never checkpointed: at the start, on both stores"
    );
    store
        .append(&s, ExpectedVersion::Any, vec![ev(11), ev(12)])
        .await
        .unwrap();
    let second = Flags::default();
    let mut handle = Subscription::spawn(store.clone(), sparse(), second.clone());
    until(&mut handle, "all handled again", |st| st.handled >= 12).await;
    handle.shutdown().await.unwrap();
    let mut expected: Vec<(u64, bool)> = (1..=10).map(|n| (n, true)).collect();
    expected.extend([(11, false), (12, false)]);
    assert_eq!(second.seen.lock().unwrap().clone(), expected);
}
