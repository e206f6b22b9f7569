//! Dead letters and provisioning: listing and replay, missing resources,
//! invalid settings, and the accounting of a large run.

use super::*;

/// Dead letters stay listed until replayed; replaying chosen ones publishes
/// them to the topic again (same event id) and removes only them.
pub async fn dead_letters_can_be_listed_and_replayed<B: TestBus>(bus: B) {
    let topic = unique("replay");
    let config = fast_config("fixer");
    let accept = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let accept2 = accept.clone();
    let rec = Recorder::new(move |_| {
        if accept2.load(Ordering::SeqCst) {
            Ok(())
        } else {
            Err(HandlerError::reject("bug in the handler"))
        }
    });
    let sub = bus.subscribe(&topic, &config, rec.clone()).await.unwrap();
    let messages: Vec<Message> = (0..3).map(msg).collect();
    bus.publish(&topic, &messages).await.unwrap();
    let dead = dead_letters_settled(&bus, &topic, "fixer", 3).await;
    assert_eq!(dead.len(), 3);
    // Listing again still finds them: listing does not consume.
    let again = dead_letters_settled(&bus, &topic, "fixer", 3).await;
    assert_eq!(again.len(), 3);

    accept.store(true, Ordering::SeqCst);
    let chosen = [messages[0].event_id, messages[2].event_id, EventId::new()];
    let replayed = bus
        .replay_dead_letters(&topic, "fixer", &chosen)
        .await
        .unwrap();
    assert_eq!(replayed, 2);
    wait_until("replayed messages handled", || {
        rec.was_handled(messages[0].event_id) && rec.was_handled(messages[2].event_id)
    })
    .await;
    let replayed_delivery = rec
        .handled()
        .into_iter()
        .find(|d| d.message.event_id == messages[0].event_id)
        .unwrap();
    assert_eq!(replayed_delivery.message, messages[0]);
    let left = dead_letters_settled(&bus, &topic, "fixer", 1).await;
    // Re-list after a pause: a replayed dead letter must not come back.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let left_later = dead_letters_settled(&bus, &topic, "fixer", 1).await;
    for l in [&left, &left_later] {
        let ids: Vec<_> = l.iter().filter_map(crate::DeadLetter::event_id).collect();
        assert_eq!(ids, [messages[1].event_id]);
    }
    assert!(!rec.was_handled(messages[1].event_id));
    sub.shutdown().await;
}

/// With auto-creation off, a missing topic or subscription is a typed error;
/// once provisioned, the strict bus works.
pub async fn missing_resources_without_auto_create<B: TestBus>(bus: B) {
    let strict = bus.without_auto_create();
    let topic = unique("strict");
    let config = fast_config("prod");
    let err = strict.publish(&topic, &[msg(1)]).await.unwrap_err();
    assert_eq!(err.kind(), keel_core::ErrorKind::NotFound, "{err}");
    let err = strict
        .publish_raw(&topic, &[RawMessage::encode(&msg(1)).unwrap()])
        .await
        .unwrap_err();
    assert!(matches!(err, EventBusError::TopicNotFound { .. }), "{err}");
    let err = strict
        .subscribe(&topic, &config, Recorder::accepting())
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            EventBusError::TopicNotFound { .. } | EventBusError::SubscriptionNotFound { .. }
        ),
        "{err}"
    );
    strict.ensure_topic(&topic).await.unwrap();
    let err = strict
        .subscribe(&topic, &config, Recorder::accepting())
        .await
        .unwrap_err();
    assert!(
        matches!(err, EventBusError::SubscriptionNotFound { .. }),
        "{err}"
    );
    // Provisioning is idempotent.
    strict.ensure_subscription(&topic, &config).await.unwrap();
    strict.ensure_subscription(&topic, &config).await.unwrap();
    strict.ensure_topic(&topic).await.unwrap();
    let rec = Recorder::accepting();
    let sub = strict
        .subscribe(&topic, &config, rec.clone())
        .await
        .unwrap();
    let m = msg(1);
    strict
        .publish(&topic, std::slice::from_ref(&m))
        .await
        .unwrap();
    wait_until("handled on the provisioned subscription", || {
        rec.was_handled(m.event_id)
    })
    .await;
    assert!(
        strict
            .dead_letters(&topic, "prod", 5)
            .await
            .unwrap()
            .is_empty(),
        "the dead-letter subscription was provisioned too"
    );
    sub.shutdown().await;
}

/// Bad settings and names are refused with typed errors before anything is
/// created.
pub async fn invalid_settings_are_refused<B: TestBus>(bus: B) {
    let topic = unique("invalid");
    for attempts in [4, 101] {
        let config = fast_config("c").with_max_delivery_attempts(attempts);
        let err = bus
            .subscribe(&topic, &config, Recorder::accepting())
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                EventBusError::InvalidConfig {
                    field: "max_delivery_attempts",
                    ..
                }
            ),
            "{err}"
        );
    }
    let err = bus
        .subscribe("bad topic", &fast_config("c"), Recorder::accepting())
        .await
        .unwrap_err();
    assert!(
        matches!(err, EventBusError::InvalidName { kind: "topic", .. }),
        "{err}"
    );
    let err = bus.publish("9lives", &[msg(1)]).await.unwrap_err();
    assert_eq!(err.kind(), keel_core::ErrorKind::InvalidInput);
    let err = bus
        .dead_letters(&topic, "never-subscribed", 10)
        .await
        .unwrap_err();
    assert!(
        matches!(err, EventBusError::SubscriptionNotFound { .. }),
        "{err}"
    );
}

/// Many messages, random transient failures and some poison: every
/// published message ends up handled or dead-lettered, never both, never
/// lost; effects applied through an inbox happen once per event.
pub async fn many_messages_with_random_failures_are_accounted_for<B: TestBus>(bus: B) {
    const N: u64 = 600;
    let topic = unique("bulk");
    let config = fast_config("bulk")
        .with_max_delivery_attempts(5)
        .with_max_concurrent_handlers(16);
    let max = config.max_delivery_attempts();
    let inbox: Arc<Mutex<HashSet<EventId>>> = Arc::default();
    let effects = Arc::new(AtomicUsize::new(0));
    let gave_up: Arc<Mutex<HashSet<EventId>>> = Arc::default();
    let (inbox2, effects2, gave_up2) = (inbox.clone(), effects.clone(), gave_up.clone());
    let rec = Recorder::new(move |d| {
        let n = d.message.payload["n"].as_u64().unwrap();
        // A cheap deterministic hash of (message, attempt) decides failures:
        // about 30 % of attempts fail, and every 37th message always fails.
        let roll =
            (n.wrapping_mul(2_654_435_761) ^ u64::from(d.attempt).wrapping_mul(40_503)) % 100;
        let fail = n % 37 == 0 || roll < 30;
        if fail {
            if d.attempt >= max {
                gave_up2.lock().unwrap().insert(d.message.event_id);
            }
            return Err(HandlerError::retry(format!("unlucky roll {roll}")));
        }
        if inbox2.lock().unwrap().insert(d.message.event_id) {
            effects2.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    });
    let sub = bus.subscribe(&topic, &config, rec.clone()).await.unwrap();
    let messages: Vec<Message> = (0..N).map(msg).collect();
    for chunk in messages.chunks(100) {
        bus.publish(&topic, chunk).await.unwrap();
    }
    wait_until("every message handled or given up", || {
        inbox.lock().unwrap().len() + gave_up.lock().unwrap().len() == N as usize
    })
    .await;
    let handled = inbox.lock().unwrap().clone();
    let gave_up = gave_up.lock().unwrap().clone();
    assert!(
        handled.is_disjoint(&gave_up),
        "a message was both handled and dead-lettered"
    );
    assert_eq!(effects.load(Ordering::SeqCst), handled.len());
    let dead = dead_letters_settled(&bus, &topic, "bulk", gave_up.len()).await;
    let dead_ids: HashSet<EventId> = dead
        .iter()
        .filter_map(crate::DeadLetter::event_id)
        .collect();
    assert_eq!(
        dead_ids, gave_up,
        "the dead-letter topic holds exactly the given-up messages"
    );
    let published: HashSet<EventId> = messages.iter().map(|m| m.event_id).collect();
    let accounted: HashSet<EventId> = handled.union(&dead_ids).copied().collect();
    assert_eq!(accounted, published, "published = handled + dead-lettered");
    assert!(
        gave_up.len() >= (N / 37) as usize,
        "the poison messages were dead-lettered"
    );
    for id in &gave_up {
        assert_eq!(rec.attempts_of(*id).len(), max as usize, "attempts of {id}");
    }
    sub.shutdown().await;
}
