//! Unit tests of envelopes, jitter and the builder's checks.

use super::*;

#[test]
fn envelopes_round_trip_and_reject_garbage() {
    let envelope = encode(Some(&vec![1, 2, 3])).unwrap();
    assert!(matches!(decode::<Vec<u8>>(&envelope), Decoded::Value(v) if v == [1, 2, 3]));
    let not_found = encode::<u8>(None).unwrap();
    assert!(matches!(decode::<u8>(&not_found), Decoded::NotFound));
    for garbage in [&b""[..], b"\x01{", b"\x00x", b"\x07[]", b"plain"] {
        assert!(
            matches!(decode::<Vec<u8>>(garbage), Decoded::Invalid),
            "{garbage:?}"
        );
    }
    // The right bytes for the wrong type are invalid too.
    assert!(matches!(decode::<String>(&envelope), Decoded::Invalid));
}

#[test]
fn jitter_shortens_within_bounds_and_varies() {
    let ttl = Duration::from_secs(100);
    let samples: Vec<Duration> = (0..1000).map(|_| jittered(ttl, 0.2)).collect();
    assert!(
        samples
            .iter()
            .all(|d| *d >= Duration::from_secs(80) && *d <= ttl)
    );
    let distinct: std::collections::HashSet<_> = samples.iter().collect();
    assert!(distinct.len() > 100, "jitter should spread TTLs out");
    assert_eq!(jittered(ttl, 0.0), ttl);
}

#[tokio::test]
async fn builder_refuses_bad_configuration() {
    let memory = crate::MemoryCache::new;
    for (builder, what) in [
        (CacheAside::builder(memory(), ""), "empty namespace"),
        (CacheAside::builder(memory(), "has:colon"), "colon"),
        (
            CacheAside::builder(memory(), "x".repeat(65)),
            "long namespace",
        ),
        (CacheAside::builder(memory(), "ok").jitter(1.0), "jitter"),
        (
            CacheAside::builder(memory(), "ok").jitter(-0.1),
            "negative jitter",
        ),
        (
            CacheAside::builder(memory(), "ok").ttl(Duration::ZERO),
            "zero ttl",
        ),
        (
            CacheAside::builder(memory(), "ok").timeout(Duration::ZERO),
            "timeout",
        ),
        (
            CacheAside::builder(memory(), "ok").local_tier(Duration::ZERO, 10),
            "local ttl",
        ),
    ] {
        assert!(
            matches!(builder.build().await, Err(CacheError::Config(_))),
            "{what}"
        );
    }
    assert!(
        CacheAside::builder(memory(), "users.v2-eu_1")
            .build()
            .await
            .is_ok()
    );
}
