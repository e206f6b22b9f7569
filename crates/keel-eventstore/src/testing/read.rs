//! Stream reads, the global log and typed decoding.

#[allow(unused_imports, reason = "the suite shares one set of imports")]
use super::*;

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

/// A page size chosen per read changes how many events each round trip
/// fetches, never what the read returns: stream reads both ways, with
/// starts and limits, global reads with filters and limits, inside a
/// transaction too.
pub async fn page_sizes_per_read_change_nothing_but_the_pages<S: Subject>(store: S) {
    let s = sid("Paged-1");
    store
        .append(&s, ExpectedVersion::NoStream, (1..=23).map(ev).collect())
        .await
        .unwrap();
    store
        .append(
            &sid("Other-1"),
            ExpectedVersion::Any,
            vec![ev(100), ev(101)],
        )
        .await
        .unwrap();
    store
        .append(&s, ExpectedVersion::Any, vec![ev(24)])
        .await
        .unwrap();
    let reads = [
        ReadStream::forward(),
        ReadStream::backward(),
        ReadStream::forward().from(Version::new(5)).limit(11),
        ReadStream::backward().from(Version::new(20)).limit(7),
    ];
    for read in reads {
        let whole = numbers(&stream_of(&store, &s, read).await);
        for page in [1, 2, 3, 7, 24, 1_000] {
            let paged = numbers(&stream_of(&store, &s, read.page_size(page)).await);
            assert_eq!(paged, whole, "{read:?} in pages of {page}");
        }
    }
    let logs = [
        ReadAll::from_start(),
        ReadAll::from_start().category("Paged"),
        ReadAll::from_start().limit(10),
        ReadAll::from_start().category("Other").limit(1),
    ];
    for read in logs {
        let whole = numbers(&log_of(&store, read.clone()).await);
        for page in [1, 2, 5, 1_000] {
            let paged = numbers(&log_of(&store, read.clone().page_size(page)).await);
            assert_eq!(paged, whole, "{read:?} in pages of {page}");
        }
    }
    // Zero is taken as one.
    let ones = numbers(&log_of(&store, ReadAll::from_start().page_size(0)).await);
    assert_eq!(ones.len(), 26);
    let mut tx = store.begin().await;
    let inside: Vec<RecordedEvent> = store
        .within(&mut *tx)
        .read_stream(&s, ReadStream::forward().page_size(4))
        .try_collect()
        .await
        .unwrap();
    assert_eq!(numbers(&inside), (1..=24).collect::<Vec<_>>());
    tx.rollback().await.unwrap();
}
