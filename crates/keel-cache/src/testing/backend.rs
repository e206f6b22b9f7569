//! The contract of the backend port: what every [`Backend`](crate::Backend) must do.

use std::time::Duration;

use keel_core::ErrorKind;

use crate::{CacheError, DEFAULT_MAX_KEY_BYTES, DEFAULT_MAX_VALUE_BYTES, Notice};

use super::{Subject, eventually, kind};

/// Values written can be read back and deleted, through the port.
pub async fn get_set_delete(s: Subject) {
    s.port.set("user:1", b"ada", None).await.unwrap();
    assert_eq!(s.port.get("user:1").await.unwrap(), Some(b"ada".to_vec()));
    assert_eq!(s.cache.read("user:1").await.unwrap(), Some(b"ada".to_vec()));
    assert!(s.port.delete("user:1").await.unwrap());
    assert_eq!(s.port.get("user:1").await.unwrap(), None);
    assert!(
        !s.port.delete("user:1").await.unwrap(),
        "second delete finds nothing"
    );
}

/// Absent keys read as `None` and delete as "not present".
pub async fn missing_keys(s: Subject) {
    assert_eq!(s.port.get("never-written").await.unwrap(), None);
    assert!(!s.port.delete("never-written").await.unwrap());
    assert_eq!(s.cache.remove(&["x", "y"]).await.unwrap(), 0);
    assert_eq!(s.cache.remove(&[]).await.unwrap(), 0);
}

/// Entries disappear after their TTL; entries without one stay.
pub async fn ttl_expiry(s: Subject) {
    s.port
        .set("short", b"1", Some(Duration::from_millis(150)))
        .await
        .unwrap();
    s.port.set("forever", b"2", None).await.unwrap();
    assert_eq!(s.port.get("short").await.unwrap(), Some(b"1".to_vec()));
    let gone = eventually(Duration::from_secs(3), || async {
        s.port.get("short").await.unwrap().is_none()
    })
    .await;
    assert!(gone, "an entry with a 150 ms TTL was still there after 3 s");
    assert_eq!(s.port.get("forever").await.unwrap(), Some(b"2".to_vec()));
}

/// Writing again replaces both the value and the expiry.
pub async fn overwrite_replaces_value_and_expiry(s: Subject) {
    s.port
        .set("k", b"old", Some(Duration::from_millis(150)))
        .await
        .unwrap();
    s.port.set("k", b"new", None).await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(s.port.get("k").await.unwrap(), Some(b"new".to_vec()));
}

/// Any bytes round-trip: every byte value, invalid UTF-8, empty values.
pub async fn binary_values(s: Subject) {
    let all: Vec<u8> = (0..=255).collect();
    s.port.set("all-bytes", &all, None).await.unwrap();
    assert_eq!(s.port.get("all-bytes").await.unwrap(), Some(all));
    s.port
        .set("invalid-utf8", &[0xff, 0xfe, 0x00, 0xc3], None)
        .await
        .unwrap();
    assert_eq!(
        s.port.get("invalid-utf8").await.unwrap(),
        Some(vec![0xff, 0xfe, 0x00, 0xc3])
    );
    s.port.set("empty", b"", None).await.unwrap();
    assert_eq!(s.port.get("empty").await.unwrap(), Some(Vec::new()));
    // Keys are UTF-8 and may contain spaces and punctuation.
    s.port
        .set("naïve key/with spaces:é", b"v", None)
        .await
        .unwrap();
    assert_eq!(
        s.port.get("naïve key/with spaces:é").await.unwrap(),
        Some(b"v".to_vec())
    );
}

/// A 4 MiB value round-trips intact.
pub async fn large_values(s: Subject) {
    let big: Vec<u8> = (0..4 * 1024 * 1024)
        .map(|i: u32| (i * 31 % 251) as u8)
        .collect();
    s.port.set("big", &big, None).await.unwrap();
    let back = s.port.get("big").await.unwrap().unwrap();
    assert_eq!(back.len(), big.len());
    assert!(back == big, "large value changed on the way");
}

/// Key prefixes separate users of one server; a second connection with the
/// same prefix sees the same keys.
pub async fn key_namespacing(s: Subject) {
    s.port.set("shared-name", b"mine", None).await.unwrap();
    assert_eq!(s.neighbour.read("shared-name").await.unwrap(), None);
    s.neighbour
        .write("shared-name", b"theirs", None)
        .await
        .unwrap();
    assert_eq!(
        s.port.get("shared-name").await.unwrap(),
        Some(b"mine".to_vec())
    );
    assert_eq!(
        s.peer.read("shared-name").await.unwrap(),
        Some(b"mine".to_vec())
    );
    assert_eq!(s.neighbour.remove(&["shared-name"]).await.unwrap(), 1);
    assert_eq!(
        s.port.get("shared-name").await.unwrap(),
        Some(b"mine".to_vec())
    );
}

/// Empty and long keys, large values and zero TTLs are refused with typed
/// errors, and nothing is written.
pub async fn bad_input(s: Subject) {
    assert!(matches!(s.cache.read("").await, Err(CacheError::EmptyKey)));
    assert!(matches!(
        s.cache.write("", b"v", None).await,
        Err(CacheError::EmptyKey)
    ));
    let long = "k".repeat(DEFAULT_MAX_KEY_BYTES + 1);
    assert!(matches!(
        s.cache.write(&long, b"v", None).await,
        Err(CacheError::KeyTooLong { .. })
    ));
    let huge = vec![0u8; DEFAULT_MAX_VALUE_BYTES + 1];
    assert!(matches!(
        s.cache.write("huge", &huge, None).await,
        Err(CacheError::ValueTooLarge { len, max }) if len == huge.len() && max == DEFAULT_MAX_VALUE_BYTES
    ));
    assert_eq!(
        s.cache.read("huge").await.unwrap(),
        None,
        "nothing half-written"
    );
    assert!(matches!(
        s.cache.write("zero", b"v", Some(Duration::ZERO)).await,
        Err(CacheError::InvalidArgument { field: "ttl", .. })
    ));
    assert_eq!(s.cache.read("zero").await.unwrap(), None);
    // Through the port, the same refusals are keel-core invalid input.
    let e = s.port.set("", b"v", None).await.unwrap_err();
    assert_eq!(kind(&e), ErrorKind::InvalidInput);
    let e = s.port.get(&long).await.unwrap_err();
    assert_eq!(kind(&e), ErrorKind::InvalidInput);
}

/// `write_if_absent` is atomic: of many concurrent writers (in two
/// processes), exactly one wins; it expires like any entry.
pub async fn write_if_absent_has_one_winner(s: Subject) {
    let mut tasks = Vec::new();
    for i in 0..64u32 {
        let backend = if i % 2 == 0 {
            s.cache.clone()
        } else {
            s.peer.clone()
        };
        tasks.push(tokio::spawn(async move {
            backend
                .write_if_absent("lock", &i.to_be_bytes(), Duration::from_millis(300))
                .await
                .unwrap()
        }));
    }
    let mut winners = 0;
    for task in tasks {
        if task.await.unwrap() {
            winners += 1;
        }
    }
    assert_eq!(winners, 1);
    let gone = eventually(Duration::from_secs(3), || async {
        s.cache.read("lock").await.unwrap().is_none()
    })
    .await;
    assert!(gone, "the lock did not expire");
    assert!(
        s.cache
            .write_if_absent("lock", b"again", Duration::from_secs(5))
            .await
            .unwrap()
    );
}

/// `remove_if_equals` removes only the expected value.
pub async fn remove_if_equals(s: Subject) {
    s.cache.write("lock", b"token-a", None).await.unwrap();
    assert!(!s.cache.remove_if_equals("lock", b"token-b").await.unwrap());
    assert_eq!(
        s.cache.read("lock").await.unwrap(),
        Some(b"token-a".to_vec())
    );
    assert!(s.peer.remove_if_equals("lock", b"token-a").await.unwrap());
    assert_eq!(s.cache.read("lock").await.unwrap(), None);
    assert!(!s.cache.remove_if_equals("lock", b"token-a").await.unwrap());
}

/// `read_or_insert` returns what is there, or stores and returns the
/// given value; either way the key then lives at least the TTL.
pub async fn read_or_insert(s: Subject) {
    let ttl = Duration::from_secs(60);
    assert_eq!(
        s.cache
            .read_or_insert("fence", b"first", ttl)
            .await
            .unwrap(),
        b"first"
    );
    assert_eq!(
        s.peer
            .read_or_insert("fence", b"second", ttl)
            .await
            .unwrap(),
        b"first",
        "a present value must win"
    );
    assert_eq!(
        s.cache.read("fence").await.unwrap(),
        Some(b"first".to_vec())
    );
    // A short remaining life is extended to the TTL.
    s.cache
        .write("short", b"v", Some(Duration::from_millis(200)))
        .await
        .unwrap();
    assert_eq!(
        s.cache
            .read_or_insert("short", b"other", ttl)
            .await
            .unwrap(),
        b"v"
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        s.cache.read("short").await.unwrap(),
        Some(b"v".to_vec()),
        "the life was not extended"
    );
    // A longer remaining life is not shortened.
    s.cache
        .write("long", b"v", Some(Duration::from_secs(30)))
        .await
        .unwrap();
    s.cache
        .read_or_insert("long", b"other", Duration::from_millis(100))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        s.cache.read("long").await.unwrap(),
        Some(b"v".to_vec()),
        "the life was shortened"
    );
    // A new entry expires after the TTL.
    s.cache
        .read_or_insert("brief", b"v", Duration::from_millis(150))
        .await
        .unwrap();
    let gone = eventually(Duration::from_secs(3), || async {
        s.cache.read("brief").await.unwrap().is_none()
    })
    .await;
    assert!(gone, "an entry inserted with a 150 ms TTL did not expire");
}

/// `write_guarded` stores only while every guard holds, absent guards
/// included.
pub async fn write_guarded_checks_every_guard(s: Subject) {
    s.cache.write("g1", b"a", None).await.unwrap();
    let ttl = Some(Duration::from_secs(60));
    assert!(
        s.cache
            .write_guarded("k", b"1", ttl, &[("g1", Some(b"a")), ("g2", None)])
            .await
            .unwrap()
    );
    assert_eq!(s.cache.read("k").await.unwrap(), Some(b"1".to_vec()));
    for (guards, what) in [
        (vec![("g1", Some(&b"b"[..]))], "a wrong value"),
        (vec![("g1", None)], "a present key expected absent"),
        (
            vec![("g2", Some(&b"a"[..]))],
            "an absent key expected present",
        ),
        (
            vec![("g1", Some(&b""[..]))],
            "an empty value is not absence",
        ),
        (
            vec![("g1", Some(&b"a"[..])), ("g2", Some(&b"x"[..]))],
            "one failing guard of two",
        ),
    ] {
        assert!(
            !s.peer.write_guarded("k", b"2", ttl, &guards).await.unwrap(),
            "{what}"
        );
        assert_eq!(
            s.cache.read("k").await.unwrap(),
            Some(b"1".to_vec()),
            "{what}"
        );
    }
    // No guards: a plain write; no TTL: no expiry.
    assert!(s.cache.write_guarded("k", b"3", None, &[]).await.unwrap());
    assert_eq!(s.cache.read("k").await.unwrap(), Some(b"3".to_vec()));
    assert!(matches!(
        s.cache.write_guarded("", b"x", None, &[]).await,
        Err(CacheError::EmptyKey)
    ));
}

/// `write_batch` writes, then removes, as one step that no guarded write
/// can fall inside: a guarded write racing a batch that moves its guard
/// and removes its key never leaves its value behind.
pub async fn write_batch_is_atomic_for_guarded_writes(s: Subject) {
    s.cache.write("gone", b"x", None).await.unwrap();
    s.cache
        .write_batch(
            &[
                ("a", b"1", None),
                ("b", b"2", Some(Duration::from_secs(60))),
            ],
            &["gone"],
        )
        .await
        .unwrap();
    assert_eq!(s.cache.read("a").await.unwrap(), Some(b"1".to_vec()));
    assert_eq!(s.cache.read("b").await.unwrap(), Some(b"2".to_vec()));
    assert_eq!(s.cache.read("gone").await.unwrap(), None);
    s.cache.write_batch(&[], &[]).await.unwrap();

    for round in 0..100u32 {
        let old = format!("fence-{round}");
        let new = format!("fence-{round}-moved");
        s.cache.write("fence", old.as_bytes(), None).await.unwrap();
        let (cache, peer) = (s.cache.clone(), s.peer.clone());
        let fill = tokio::spawn(async move {
            cache
                .write_guarded("data", b"stale", None, &[("fence", Some(old.as_bytes()))])
                .await
                .unwrap()
        });
        let evict = tokio::spawn(async move {
            peer.write_batch(&[("fence", new.as_bytes(), None)], &["data"])
                .await
                .unwrap();
        });
        let filled = fill.await.unwrap();
        evict.await.unwrap();
        assert_eq!(
            s.cache.read("data").await.unwrap(),
            None,
            "round {round}: a guarded write (stored: {filled}) outlived the batch that moved its guard"
        );
    }
}

/// Many keys go in one call, counting only those present.
pub async fn delete_many(s: Subject) {
    for k in ["a", "b", "c"] {
        s.port.set(k, b"v", None).await.unwrap();
    }
    assert_eq!(s.port.delete_many(&["a", "b", "zzz"]).await.unwrap(), 2);
    assert_eq!(s.port.get("a").await.unwrap(), None);
    assert_eq!(s.port.get("c").await.unwrap(), Some(b"v".to_vec()));
}

/// What one process publishes, another receives; other prefixes do not.
pub async fn publish_reaches_other_processes(s: Subject) {
    let mut theirs = s.peer.subscribe().unwrap();
    let mut neighbour = s.neighbour.subscribe().unwrap();
    assert!(theirs.wait_ready(Duration::from_secs(5)).await);
    assert!(neighbour.wait_ready(Duration::from_secs(5)).await);
    s.cache.publish(b"hello").await.unwrap();
    let received = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match theirs.recv().await {
                Some(Notice::Message(m)) => return m,
                Some(_) => {}
                None => panic!("subscription closed"),
            }
        }
    })
    .await
    .expect("no message within 5 s");
    assert_eq!(&*received, b"hello");
    // Nothing for the neighbour (skip its own subscription notices).
    let stray = tokio::time::timeout(Duration::from_millis(200), async {
        loop {
            if let Some(Notice::Message(m)) = neighbour.recv().await {
                return m;
            }
        }
    })
    .await;
    assert!(stray.is_err(), "a message crossed key prefixes");
}
