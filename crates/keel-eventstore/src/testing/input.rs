//! Idempotent retries, reused ids and bad input.

#[allow(unused_imports, reason = "the suite shares one set of imports")]
use super::*;

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
