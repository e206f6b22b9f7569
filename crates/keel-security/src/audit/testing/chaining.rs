//! Rules on the hash chain itself: how records link, what they keep, and
//! how a head anchors later verification.

use std::collections::BTreeSet;

use keel_core::{
    AggregateRef, AuditEntry, AuditOutcome, AuditQuery, ChainVerification, CommandId, CorrelationId,
};
use serde_json::json;

use super::{Subject, all, entry, epoch, sequences};
use crate::audit::{ChainHead, GENESIS_HASH, record_hash};

/// The first record links to the genesis hash, each next one to its
/// predecessor; sequences count from 1; every stored hash is the
/// recomputed one; `recorded_at` never goes back.
pub async fn appends_chain_from_genesis(log: Subject) {
    let mut prev = GENESIS_HASH.to_owned();
    let mut last_at = None;
    for i in 1..=5 {
        let record = log.append(entry("alice", i)).await.expect("append");
        assert_eq!(record.sequence, i as u64);
        assert_eq!(record.prev_hash, prev);
        assert_eq!(record.hash, record_hash(&record));
        assert_eq!(record.hash.len(), 64);
        assert_eq!(record.recorded_at.timestamp_subsec_nanos() % 1_000, 0);
        if let Some(last) = last_at {
            assert!(record.recorded_at >= last, "recorded_at went back");
        }
        last_at = Some(record.recorded_at);
        prev.clone_from(&record.hash);
    }
    let stored = all(log.as_ref()).await;
    assert_eq!(sequences(&stored), vec![1, 2, 3, 4, 5]);
    assert_eq!(stored.last().map(|r| r.hash.clone()), Some(prev));
    assert_eq!(
        log.verify().await.expect("verify"),
        ChainVerification::Intact { records: 5 }
    );
}

/// What `append` returns is exactly what `query` reads back, for every
/// field and every outcome; `occurred_at` is cut to microseconds.
pub async fn every_field_round_trips(log: Subject) {
    let full = |outcome| {
        let mut e = AuditEntry::new("order.ship", outcome)
            .with_principal("user-42")
            .with_tenant("acme")
            .with_aggregate(AggregateRef::new("Order", "0190-ab"))
            .with_correlation_id(CorrelationId::new())
            .with_occurred_at(epoch());
        e.command_id = Some(CommandId::new());
        e.event_types = vec!["order.shipped".into(), "stock.reserved".into()];
        e.details = json!({"carrier": "dhl", "parcels": 2, "weights": [1.5, 0.25]});
        e
    };
    let entries = [
        full(AuditOutcome::Accepted),
        full(AuditOutcome::Rejected {
            code: "order.already_shipped".into(),
            reason: "the order has already shipped".into(),
        }),
        full(AuditOutcome::Failed {
            code: "keel.unavailable".into(),
        }),
        AuditEntry::new("anonymous.ping", AuditOutcome::Accepted).with_occurred_at(epoch()),
    ];
    let mut appended = Vec::new();
    for e in entries.clone() {
        appended.push(log.append(e).await.expect("append"));
    }
    for (record, original) in appended.iter().zip(&entries) {
        let mut expected = original.clone();
        expected.occurred_at = "2026-03-01T12:00:00.123456Z".parse().expect("time");
        assert_eq!(record.entry, expected);
    }
    assert_eq!(all(log.as_ref()).await, appended);
    assert!(log.verify().await.expect("verify").is_intact());
}

/// Details documents come back equal and still re-hash to the stored
/// hash, whatever their key order and number forms.
pub async fn details_survive_storage_and_rehash(log: Subject) {
    let documents = [
        json!({"z": 1, "a": {"y": [true, false, null], "b": "x"}, "m": {}}),
        json!([1.0, 100.0, -0.0, 1.5e-7, 1e300, -2.5, 0.1]),
        json!({"u64": u64::MAX, "i64": i64::MIN, "zero": 0, "neg": -1}),
        json!("just a string with unicode: ünïcödé ✓ and \"quotes\" \\ and \n newline"),
        json!(null),
        json!({"nested": {"deeper": {"deepest": [[[]]]}}}),
    ];
    for details in &documents {
        let mut e = entry("alice", 0);
        e.details = details.clone();
        log.append(e).await.expect("append");
    }
    let stored = all(log.as_ref()).await;
    for (record, details) in stored.iter().zip(&documents) {
        assert_eq!(&record.entry.details, details);
        assert_eq!(record.hash, record_hash(record), "{details}");
    }
    assert_eq!(
        log.verify().await.expect("verify"),
        ChainVerification::Intact { records: 6 }
    );
}

/// An empty log verifies, has the genesis head, and has no records.
pub async fn empty_log_verifies(log: Subject) {
    assert_eq!(
        log.verify().await.expect("verify"),
        ChainVerification::Intact { records: 0 }
    );
    assert_eq!(log.head().await.expect("head"), ChainHead::genesis());
    let page = log.query(&AuditQuery::new()).await.expect("query");
    assert!(page.records.is_empty());
    assert_eq!(page.next_after, None);
}

/// Sixteen writers appending 25 records each at once leave sequences
/// 1..=400 without gap or duplicate, and an intact chain.
pub async fn concurrent_appends_never_fork(log: Subject) {
    const TASKS: usize = 16;
    const EACH: usize = 25;
    let writers: Vec<_> = (0..TASKS)
        .map(|t| {
            let log = log.clone();
            tokio::spawn(async move {
                let mut got = Vec::with_capacity(EACH);
                for i in 0..EACH {
                    let record = log
                        .append(entry(&format!("task-{t}"), i as i64))
                        .await
                        .expect("append");
                    got.push(record.sequence);
                }
                got
            })
        })
        .collect();
    let mut returned = BTreeSet::new();
    for w in writers {
        for sequence in w.await.expect("writer task") {
            assert!(
                returned.insert(sequence),
                "sequence {sequence} returned twice"
            );
        }
    }
    let total = (TASKS * EACH) as u64;
    assert_eq!(returned, (1..=total).collect::<BTreeSet<_>>());
    let stored = all(log.as_ref()).await;
    assert_eq!(sequences(&stored), (1..=total).collect::<Vec<_>>());
    for pair in stored.windows(2) {
        assert_eq!(pair[1].prev_hash, pair[0].hash);
    }
    assert_eq!(
        log.verify().await.expect("verify"),
        ChainVerification::Intact { records: total }
    );
    assert_eq!(log.head().await.expect("head").sequence, total);
}

/// The head names the latest record; a copy of it verifies later, while a
/// forged or too-far head does not.
pub async fn head_anchors_the_chain(log: Subject) {
    for i in 0..4 {
        log.append(entry("alice", i)).await.expect("append");
    }
    let head = log.head().await.expect("head");
    let stored = all(log.as_ref()).await;
    assert_eq!(head.sequence, 4);
    assert_eq!(head.hash, stored[3].hash);
    log.append(entry("alice", 9)).await.expect("append");
    assert!(log.verify_from(&head).await.expect("verify").is_intact());
    assert!(
        log.verify_from(&ChainHead::genesis())
            .await
            .expect("verify")
            .is_intact()
    );

    let forged = ChainHead {
        sequence: 2,
        hash: stored[3].hash.clone(),
    };
    match log.verify_from(&forged).await.expect("verify") {
        ChainVerification::Broken { sequence, reason } => {
            assert_eq!(sequence, 2);
            assert!(reason.starts_with("anchor mismatch"), "{reason}");
        }
        other => panic!("a forged anchor verified: {other:?}"),
    }
    let ahead = ChainHead {
        sequence: 9,
        hash: stored[3].hash.clone(),
    };
    match log.verify_from(&ahead).await.expect("verify") {
        ChainVerification::Broken { sequence, reason } => {
            assert_eq!(sequence, 6);
            assert!(reason.starts_with("missing record"), "{reason}");
        }
        other => panic!("an anchor past the end verified: {other:?}"),
    }
}

/// [`AuditHead::verify_after`](crate::audit::AuditHead::verify_after) checks
/// only what came after a verified head and hands back the head to resume
/// from; a head that no longer matches the stored record, or lies past the
/// end, is reported.
pub async fn incremental_verification_resumes(log: Subject) {
    let genesis = ChainHead::genesis();
    let empty = log.verify_after(&genesis).await.expect("verify");
    assert_eq!(empty.verification, ChainVerification::Intact { records: 0 });
    assert_eq!(empty.head, genesis);

    for i in 0..3 {
        log.append(entry("alice", i)).await.expect("append");
    }
    let first = log.verify_after(&genesis).await.expect("verify");
    assert_eq!(first.verification, ChainVerification::Intact { records: 3 });
    assert_eq!(first.head, log.head().await.expect("head"));

    let idle = log.verify_after(&first.head).await.expect("verify");
    assert_eq!(idle.verification, ChainVerification::Intact { records: 0 });
    assert_eq!(idle.head, first.head);

    for i in 3..5 {
        log.append(entry("bob", i)).await.expect("append");
    }
    let second = log.verify_after(&first.head).await.expect("verify");
    assert_eq!(
        second.verification,
        ChainVerification::Intact { records: 2 }
    );
    assert_eq!(second.head.sequence, 5);
    assert_eq!(second.head, log.head().await.expect("head"));

    let forged = ChainHead {
        sequence: 3,
        hash: second.head.hash.clone(),
    };
    let check = log.verify_after(&forged).await.expect("verify");
    match check.verification {
        ChainVerification::Broken { sequence, reason } => {
            assert_eq!(sequence, 3);
            assert!(reason.starts_with("anchor mismatch"), "{reason}");
        }
        other => panic!("a forged head verified: {other:?}"),
    }
    assert_eq!(check.head, forged, "a failed check does not move the head");

    let ahead = ChainHead {
        sequence: 9,
        hash: second.head.hash.clone(),
    };
    match log.verify_after(&ahead).await.expect("verify").verification {
        ChainVerification::Broken { sequence, reason } => {
            assert_eq!(sequence, 9);
            assert!(reason.starts_with("missing record"), "{reason}");
        }
        other => panic!("a head past the end verified: {other:?}"),
    }
}
