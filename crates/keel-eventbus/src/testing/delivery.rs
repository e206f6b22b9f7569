//! Delivery: every field arrives, failures are retried with attempts,
//! poison and malformed messages are dead-lettered, order is kept.

use super::*;

/// Every field of a message survives the trip: id, type, schema version,
/// payload, correlation and causation ids, trace context, actor, tenant,
/// free metadata, ordering key; the first delivery is attempt 1.
pub async fn round_trip_keeps_every_field<B: TestBus>(bus: B) {
    let topic = unique("roundtrip");
    let config = fast_config("reader");
    let rec = Recorder::accepting();
    let sub = bus.subscribe(&topic, &config, rec.clone()).await.unwrap();
    let metadata = Metadata::new()
        .with_correlation_id(CorrelationId::new())
        .with_causation_id(CausationId::new())
        .with_trace_context(
            TraceContext::new(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                Some("keel=1".into()),
            )
            .unwrap(),
        )
        .with_actor("user:alice")
        .with_tenant(TenantId::new("acme").unwrap())
        .with_extra("source", "contract");
    let mut sent = Message::new(
        "order.placed",
        json!({ "order": "o-1", "lines": [1, 2, 3], "note": "ünïcode" }),
    )
    .with_metadata(metadata);
    sent.schema_version = 2;
    let unordered = msg(2);
    bus.publish(&topic, &[sent.clone(), unordered.clone()])
        .await
        .unwrap();
    wait_until("both messages handled", || rec.handled().len() == 2).await;
    let got = rec
        .handled()
        .into_iter()
        .find(|d| d.message.event_id == sent.event_id)
        .expect("the message arrived");
    assert_eq!(got.message, sent);
    assert_eq!(got.attempt, 1);
    assert_eq!(got.subscription, sub.name());
    assert!(sub.name().ends_with(&format!("{topic}.reader")));
    sub.shutdown().await;
}

/// A handler that fails is called again with a higher attempt number until
/// it succeeds; the message is then not dead-lettered.
pub async fn failed_handler_is_retried_with_attempts<B: TestBus>(bus: B) {
    let topic = unique("retry");
    let config = fast_config("retrier");
    let rec = Recorder::new(|d| {
        if d.attempt < 3 {
            Err(HandlerError::retry("not yet"))
        } else {
            Ok(())
        }
    });
    let sub = bus.subscribe(&topic, &config, rec.clone()).await.unwrap();
    let m = msg(1);
    bus.publish(&topic, std::slice::from_ref(&m)).await.unwrap();
    wait_until("handled on the third attempt", || {
        rec.was_handled(m.event_id)
    })
    .await;
    assert_eq!(rec.attempts_of(m.event_id), [1, 2, 3]);
    sub.shutdown().await;
    assert!(
        bus.dead_letters(&topic, "retrier", 10)
            .await
            .unwrap()
            .is_empty()
    );
}

/// A message whose handler always fails is delivered exactly
/// `max_delivery_attempts` times, then dead-lettered with the last error;
/// other messages on the subscription are handled meanwhile.
pub async fn poison_message_is_dead_lettered_after_max_attempts<B: TestBus>(bus: B) {
    let topic = unique("poison");
    let config = fast_config("victim").with_max_delivery_attempts(5);
    let rec = Recorder::new(|d| {
        if d.message.payload["poison"] == json!(true) {
            Err(HandlerError::retry("cannot digest this"))
        } else {
            Ok(())
        }
    });
    let sub = bus.subscribe(&topic, &config, rec.clone()).await.unwrap();
    let poison = Message::new("test.poison", json!({ "poison": true }));
    let healthy: Vec<Message> = (0..5).map(msg).collect();
    bus.publish(&topic, std::slice::from_ref(&poison))
        .await
        .unwrap();
    bus.publish(&topic, &healthy).await.unwrap();
    wait_until("healthy messages handled", || {
        healthy.iter().all(|m| rec.was_handled(m.event_id))
    })
    .await;
    // List once the last attempt was made: the emulator can stall a publish
    // to a dead-letter topic while a listing holds a stream on it.
    wait_until("the last attempt", || {
        rec.attempts_of(poison.event_id).len() == 5
    })
    .await;
    let dead = dead_letters_settled(&bus, &topic, "victim", 1).await;
    assert_eq!(
        dead.len(),
        1,
        "dead letters {dead:?}; poison attempts {:?}",
        rec.attempts_of(poison.event_id)
    );
    assert_eq!(dead[0].event_id(), Some(poison.event_id));
    assert_eq!(dead[0].message().unwrap(), poison);
    assert_eq!(dead[0].attempts, Some(5));
    let reason = dead[0].reason.clone().unwrap_or_default();
    assert!(reason.contains("cannot digest this"), "{reason}");
    // Give a stray sixth delivery the chance to show up before counting.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(rec.attempts_of(poison.event_id), [1, 2, 3, 4, 5]);
    for m in &healthy {
        assert_eq!(rec.attempts_of(m.event_id), [1]);
    }
    sub.shutdown().await;
}

/// `HandlerError::Reject` dead-letters at once, recording the reason.
pub async fn rejected_message_is_dead_lettered_at_once<B: TestBus>(bus: B) {
    let topic = unique("reject");
    let config = fast_config("picky");
    let rec = Recorder::new(|_| Err(HandlerError::reject("unknown customer")));
    let sub = bus.subscribe(&topic, &config, rec.clone()).await.unwrap();
    let m = msg(1);
    bus.publish(&topic, std::slice::from_ref(&m)).await.unwrap();
    let dead = dead_letters_settled(&bus, &topic, "picky", 1).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].event_id(), Some(m.event_id));
    assert_eq!(dead[0].attempts, Some(1));
    let reason = dead[0].reason.clone().unwrap_or_default();
    assert!(reason.contains("rejected: unknown customer"), "{reason}");
    assert_eq!(
        dead[0].subscription.as_deref(),
        Some(sub.name()),
        "the dead letter names its subscription"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(rec.attempts_of(m.event_id), [1]);
    sub.shutdown().await;
}

/// A panicking handler does not kill the subscriber: the message is
/// redelivered and the next attempt succeeds.
pub async fn panicking_handler_is_retried<B: TestBus>(bus: B) {
    let topic = unique("panic");
    let config = fast_config("fragile");
    let rec = Recorder::new(|d| {
        assert!(d.attempt > 1, "first attempt blows up");
        Ok(())
    });
    let sub = bus.subscribe(&topic, &config, rec.clone()).await.unwrap();
    let first = msg(1);
    bus.publish(&topic, std::slice::from_ref(&first))
        .await
        .unwrap();
    wait_until("handled after the panic", || {
        rec.was_handled(first.event_id)
    })
    .await;
    assert_eq!(rec.attempts_of(first.event_id), [1, 2]);
    // The subscriber is still alive for the next message.
    let second = msg(2);
    bus.publish(&topic, std::slice::from_ref(&second))
        .await
        .unwrap();
    wait_until("next message handled", || rec.was_handled(second.event_id)).await;
    assert!(!sub.is_finished());
    sub.shutdown().await;
}

/// Messages that are not Keel messages (not JSON, missing or invalid
/// attributes) never reach the handler, are dead-lettered with the reason,
/// and do not stop the subscriber.
pub async fn malformed_messages_are_dead_lettered<B: TestBus>(bus: B) {
    let topic = unique("malformed");
    let config = fast_config("strict");
    let rec = Recorder::accepting();
    let sub = bus.subscribe(&topic, &config, rec.clone()).await.unwrap();
    let good = msg(1);
    let template = RawMessage::encode(&msg(0)).unwrap();
    let mut not_json = template.clone();
    not_json.data = b"<xml/>".to_vec();
    not_json
        .attributes
        .insert("keel-event-id".into(), EventId::new().to_string());
    let mut no_type = template.clone();
    no_type.attributes.remove("keel-event-type");
    no_type
        .attributes
        .insert("keel-event-id".into(), EventId::new().to_string());
    let mut bad_version = template.clone();
    bad_version
        .attributes
        .insert("keel-schema-version".into(), "zero".into());
    bad_version
        .attributes
        .insert("keel-event-id".into(), EventId::new().to_string());
    let foreign = RawMessage::new(b"hello".to_vec(), BTreeMap::new());
    let bad = [not_json, no_type, bad_version, foreign];
    bus.publish_raw(&topic, &bad).await.unwrap();
    bus.publish(&topic, std::slice::from_ref(&good))
        .await
        .unwrap();
    wait_until("the good message handled", || {
        rec.was_handled(good.event_id)
    })
    .await;
    let dead = dead_letters_settled(&bus, &topic, "strict", bad.len()).await;
    assert_eq!(dead.len(), bad.len(), "{dead:?}");
    for d in &dead {
        assert!(d.message().is_err());
        let reason = d.reason.clone().unwrap_or_default();
        assert!(reason.starts_with("malformed message"), "{reason}");
    }
    let mut reasons: Vec<String> = dead.iter().filter_map(|d| d.reason.clone()).collect();
    reasons.sort();
    assert!(
        reasons.iter().any(|r| r.contains("not JSON")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("keel-event-type")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("keel-schema-version")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("keel-event-id")),
        "{reasons:?}"
    );
    assert_eq!(
        rec.deliveries().len(),
        1,
        "only the good message reached the handler"
    );
    assert!(!sub.is_finished());
    sub.shutdown().await;
}

/// On an ordered subscription, messages sharing an ordering key are handled
/// one at a time and in publish order, even with concurrent handlers and
/// failures that cause redeliveries; different keys proceed in parallel.
pub async fn ordering_key_order_is_kept<B: TestBus>(bus: B) {
    const KEYS: usize = 4;
    const PER_KEY: u64 = 15;
    let topic = unique("ordered");
    let config = fast_config("sequencer")
        .with_ordered(true)
        .with_max_concurrent_handlers(8);
    let busy: Arc<Mutex<HashSet<String>>> = Arc::default();
    let overlaps = Arc::new(AtomicUsize::new(0));
    let (busy2, overlaps2) = (busy.clone(), overlaps.clone());
    let rec = Recorder::new(move |d| {
        let key = d.message.ordering_key.clone().expect("keyed");
        if !busy2.lock().unwrap().insert(key.clone()) {
            overlaps2.fetch_add(1, Ordering::SeqCst);
        }
        std::thread::sleep(Duration::from_millis(2));
        busy2.lock().unwrap().remove(&key);
        // Every fourth message fails once, forcing redeliveries mid-stream.
        let n = d.message.payload["n"].as_u64().unwrap();
        if n % 4 == 1 && d.attempt == 1 {
            return Err(HandlerError::retry("transient"));
        }
        Ok(())
    });
    let sub = bus.subscribe(&topic, &config, rec.clone()).await.unwrap();
    let mut expected: HashMap<String, Vec<u64>> = HashMap::new();
    for n in 0..PER_KEY {
        let batch: Vec<Message> = (0..KEYS)
            .map(|k| {
                let key = format!("Stream-{k}");
                expected.entry(key.clone()).or_default().push(n);
                msg(n).with_ordering_key(key)
            })
            .collect();
        bus.publish(&topic, &batch).await.unwrap();
    }
    let total = KEYS * PER_KEY as usize;
    wait_until("every ordered message handled", || {
        rec.handled().len() >= total
    })
    .await;
    let mut got: HashMap<String, Vec<u64>> = HashMap::new();
    for d in rec.handled() {
        got.entry(d.message.ordering_key.clone().unwrap())
            .or_default()
            .push(d.message.payload["n"].as_u64().unwrap());
    }
    assert_eq!(got, expected);
    assert_eq!(
        overlaps.load(Ordering::SeqCst),
        0,
        "same-key handlers overlapped"
    );
    sub.shutdown().await;
}
