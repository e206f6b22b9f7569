//! Subscriptions starting and stopping: graceful shutdown, abort, crash
//! redelivery, competing consumers.

use super::*;

/// `shutdown` lets a running handler finish and acks its message: a later
/// subscriber of the same consumer does not see it again.
pub async fn graceful_shutdown_finishes_in_flight<B: TestBus>(bus: B) {
    let topic = unique("shutdown");
    let config = fast_config("worker");
    let started = Arc::new(tokio::sync::Notify::new());
    let finished = Arc::new(AtomicUsize::new(0));
    struct Slow {
        started: Arc<tokio::sync::Notify>,
        finished: Arc<AtomicUsize>,
    }
    #[async_trait]
    impl EventHandler for Slow {
        async fn handle(&self, _: &Delivery) -> Result<(), HandlerError> {
            self.started.notify_one();
            tokio::time::sleep(Duration::from_millis(500)).await;
            self.finished.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }
    let handler = Arc::new(Slow {
        started: started.clone(),
        finished: finished.clone(),
    });
    let sub = bus.subscribe(&topic, &config, handler).await.unwrap();
    let m = msg(1);
    bus.publish(&topic, std::slice::from_ref(&m)).await.unwrap();
    tokio::time::timeout(PATIENCE, started.notified())
        .await
        .expect("the handler started");
    sub.shutdown().await;
    assert_eq!(
        finished.load(Ordering::SeqCst),
        1,
        "shutdown waited for the handler"
    );

    let rec = Recorder::accepting();
    let next = bus.subscribe(&topic, &config, rec.clone()).await.unwrap();
    // A sentinel proves the new subscriber is live before the check below.
    // The Pub/Sub emulator can still hand a message published right after
    // a shutdown to the stream that just closed and then never redeliver it
    // (real Pub/Sub does after the ack deadline), so a fresh sentinel goes
    // out every few seconds until one arrives.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let mut sentinels = Vec::new();
    'live: loop {
        let sentinel = msg(2 + sentinels.len() as u64);
        bus.publish(&topic, std::slice::from_ref(&sentinel))
            .await
            .unwrap();
        sentinels.push(sentinel.event_id);
        let resend_at = tokio::time::Instant::now() + Duration::from_secs(5);
        while tokio::time::Instant::now() < resend_at {
            if sentinels.iter().any(|id| rec.was_handled(*id)) {
                break 'live;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out after {PATIENCE:?} waiting for any of {} sentinels",
                sentinels.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        rec.attempts_of(m.event_id).is_empty(),
        "a message finished during shutdown was redelivered"
    );
    next.shutdown().await;
}

/// A subscriber that dies mid-handler (its task aborted, nothing acked)
/// loses nothing: the message is redelivered to the next subscriber.
pub async fn killed_subscriber_message_is_redelivered<B: TestBus>(bus: B) {
    let topic = unique("killed");
    let config = fast_config("mortal");
    let started = Arc::new(tokio::sync::Notify::new());
    struct Hang(Arc<tokio::sync::Notify>);
    #[async_trait]
    impl EventHandler for Hang {
        async fn handle(&self, _: &Delivery) -> Result<(), HandlerError> {
            self.0.notify_one();
            std::future::pending::<()>().await;
            Ok(())
        }
    }
    // The doomed subscriber stops extending its lease after 20 s at the
    // latest, so a lease kept alive past the kill (the client's lease keeper
    // can outlive an aborted task in the same process) still runs out well
    // within PATIENCE; a real crash closes the connection and ends it sooner.
    let doomed_config = config.clone().with_max_lease(Duration::from_secs(20));
    let doomed = bus
        .subscribe(&topic, &doomed_config, Arc::new(Hang(started.clone())))
        .await
        .unwrap();
    let m = msg(1);
    bus.publish(&topic, std::slice::from_ref(&m)).await.unwrap();
    tokio::time::timeout(PATIENCE, started.notified())
        .await
        .expect("the handler started");
    drop(doomed);

    let rec = Recorder::accepting();
    let survivor = bus.subscribe(&topic, &config, rec.clone()).await.unwrap();
    wait_until("redelivered to the survivor", || {
        rec.was_handled(m.event_id)
    })
    .await;
    let attempts = rec.attempts_of(m.event_id);
    assert!(
        attempts[0] >= 2,
        "a redelivery counts as a new attempt: {attempts:?}"
    );
    survivor.shutdown().await;
}

/// `abort` stops at once and returns only when every handler it started has
/// ended: afterwards no handler is running, none starts, none finishes
/// (so nothing more is acked).
pub async fn abort_returns_after_handlers_ended<B: TestBus>(bus: B) {
    const CONCURRENT: usize = 8;
    const FINISHING: usize = 12;
    let topic = unique("abort");
    let config = fast_config("aborted").with_max_concurrent_handlers(CONCURRENT);
    // Twelve calls finish, then every handler slot hangs: the abort finds
    // exactly eight handlers running.
    let tracker = Tracker::hanging_after(Duration::from_millis(10), FINISHING);
    let sub = bus
        .subscribe(&topic, &config, tracker.clone())
        .await
        .unwrap();
    let messages: Vec<Message> = (0..40).map(msg).collect();
    bus.publish(&topic, &messages).await.unwrap();
    wait_until("twelve handled, eight hanging", || {
        tracker.finished().len() == FINISHING && tracker.running() == CONCURRENT
    })
    .await;
    sub.abort().await;
    assert_eq!(tracker.running(), 0, "a handler still runs after abort");
    let (started, finished) = (tracker.started(), tracker.finished());
    assert_eq!(started, FINISHING + CONCURRENT);
    // Longer than a handler's pause: a handler left behind would show now.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(tracker.started(), started, "a handler started after abort");
    assert_eq!(
        tracker.finished(),
        finished,
        "a handler finished after abort"
    );
}

/// Subscribers of one consumer share the messages (each handled once);
/// another consumer gets every message too.
pub async fn competing_consumers_share_and_fan_out<B: TestBus>(bus: B) {
    let topic = unique("fanout");
    let a = fast_config("shared");
    let b = fast_config("auditor");
    let (r1, r2, r3) = (
        Recorder::accepting(),
        Recorder::accepting(),
        Recorder::accepting(),
    );
    let s1 = bus.subscribe(&topic, &a, r1.clone()).await.unwrap();
    let s2 = bus.subscribe(&topic, &a, r2.clone()).await.unwrap();
    let s3 = bus.subscribe(&topic, &b, r3.clone()).await.unwrap();
    let messages: Vec<Message> = (0..40).map(msg).collect();
    bus.publish(&topic, &messages).await.unwrap();
    let unique_ids = |recs: &[&Recorder]| {
        recs.iter()
            .flat_map(|r| r.handled())
            .map(|d| d.message.event_id)
            .collect::<HashSet<_>>()
            .len()
    };
    wait_until("the shared consumer handled all", || {
        unique_ids(&[&r1, &r2]) == messages.len()
    })
    .await;
    wait_until("the auditor handled all", || {
        unique_ids(&[&r3]) == messages.len()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let shared_total = r1.handled().len() + r2.handled().len();
    assert_eq!(
        shared_total,
        messages.len(),
        "a shared message was handled twice"
    );
    assert_ne!(s1.name(), s3.name());
    assert_eq!(s1.name(), s2.name());
    for s in [s1, s2, s3] {
        s.shutdown().await;
    }
}
