//! Keyed mode across a key rotation (run by each store's own tests, outside
//! the suite macro).

use keel_core::ChainVerification;

use super::{Subject, entry};
use crate::audit::{AuditKey, AuditKeys, ChainHead};

/// Test keys: 32 bytes of `byte`.
#[must_use]
pub fn test_key(id: &str, byte: u8) -> AuditKey {
    AuditKey::new(id, keel_telemetry::Secret::new(vec![byte; 32])).expect("a valid key")
}

/// Keyed mode across a key rotation, for a store whose keys `set_keys`
/// replaces (not part of the suite macro: the keys are the store's
/// configuration). Records sealed by an old key verify while it stays in
/// the keyring as a previous key; dropping it reports the first record it
/// sealed; leaving keyed mode verifies the plain chain as before.
pub async fn keyed_logs_rotate(log: Subject, set_keys: impl Fn(Option<AuditKeys>)) {
    let k1 = test_key("k1", 1);
    let k2 = test_key("k2", 2);
    set_keys(Some(AuditKeys::single(k1.clone())));
    for i in 0..3 {
        log.append(entry("alice", i)).await.expect("append");
    }
    assert_eq!(
        log.verify().await.expect("verify"),
        ChainVerification::Intact { records: 3 }
    );
    set_keys(Some(
        AuditKeys::new(k2.clone(), [k1.clone()]).expect("keyring"),
    ));
    for i in 3..5 {
        log.append(entry("bob", i)).await.expect("append");
    }
    assert_eq!(
        log.verify().await.expect("verify"),
        ChainVerification::Intact { records: 5 }
    );
    let check = log
        .verify_after(&ChainHead::genesis())
        .await
        .expect("verify");
    assert_eq!(check.verification, ChainVerification::Intact { records: 5 });

    // Without the old key, its records cannot be trusted.
    set_keys(Some(AuditKeys::single(k2.clone())));
    match log.verify().await.expect("verify") {
        ChainVerification::Broken { sequence, reason } => {
            assert_eq!(sequence, 1);
            assert!(reason.starts_with("unknown key"), "{reason}");
        }
        other => panic!("records of a dropped key verified: {other:?}"),
    }
    // A key under a known id but with other material fails every MAC.
    let impostor = test_key("k1", 9);
    set_keys(Some(AuditKeys::new(k2, [impostor]).expect("keyring")));
    match log.verify().await.expect("verify") {
        ChainVerification::Broken { sequence, reason } => {
            assert_eq!(sequence, 1);
            assert!(reason.starts_with("MAC mismatch"), "{reason}");
        }
        other => panic!("a wrong key verified: {other:?}"),
    }
    // Unkeyed, the MACs are ignored and the plain chain still holds.
    set_keys(None);
    log.append(entry("carol", 5)).await.expect("append");
    assert_eq!(
        log.verify().await.expect("verify"),
        ChainVerification::Intact { records: 6 }
    );
    // Back in keyed mode, the unsealed record is refused unless the
    // keyring says sealing starts after it.
    let ring = AuditKeys::new(test_key("k2", 2), [k1]).expect("keyring");
    set_keys(Some(ring.clone()));
    match log.verify().await.expect("verify") {
        ChainVerification::Broken { sequence, reason } => {
            assert_eq!(sequence, 6);
            assert!(reason.starts_with("MAC missing"), "{reason}");
        }
        other => panic!("an unsealed record verified: {other:?}"),
    }
    set_keys(Some(ring.required_from(7)));
    log.append(entry("dave", 6)).await.expect("append");
    assert_eq!(
        log.verify().await.expect("verify"),
        ChainVerification::Intact { records: 7 }
    );
}
