//! Unit tests of the hash chain: the hash covers every field, the walk names the first fault.

use keel_core::{AggregateRef, CommandId, CorrelationId};
use serde_json::json;

use super::*;

fn entry() -> AuditEntry {
    let mut e = AuditEntry::new(
        "order.place",
        AuditOutcome::Rejected {
            code: "keel.forbidden".into(),
            reason: "no".into(),
        },
    )
    .with_principal("alice")
    .with_tenant("acme")
    .with_aggregate(AggregateRef::new("Order", "o-1"))
    .with_correlation_id(
        "01900000-0000-7000-8000-000000000002"
            .parse::<CorrelationId>()
            .unwrap(),
    )
    .with_occurred_at("2026-01-02T03:04:05.123456Z".parse().unwrap());
    e.command_id = Some(
        "01900000-0000-7000-8000-000000000001"
            .parse::<CommandId>()
            .unwrap(),
    );
    e.details = json!({"b": [1, 2.5, null], "a": {"z": true, "y": "x"}});
    e
}

fn at() -> DateTime<Utc> {
    "2026-01-02T03:04:06.000001Z".parse().unwrap()
}

#[test]
fn every_field_changes_the_hash() {
    let base = compute_hash(7, &entry(), at(), GENESIS_HASH);
    assert_eq!(base.len(), 64);
    let mut variants: Vec<AuditEntry> = Vec::new();
    let mut e = entry();
    e.principal = None;
    variants.push(e);
    let mut e = entry();
    e.principal = Some(String::new());
    variants.push(e);
    let mut e = entry();
    e.tenant = Some("acme2".into());
    variants.push(e);
    let mut e = entry();
    e.command_id = None;
    variants.push(e);
    let mut e = entry();
    e.command_type = "order.plac".into();
    variants.push(e);
    let mut e = entry();
    e.event_types = vec!["x".into()];
    variants.push(e);
    let mut e = entry();
    e.aggregate = Some(AggregateRef::new("Order", "o-2"));
    variants.push(e);
    let mut e = entry();
    e.outcome = AuditOutcome::Failed {
        code: "keel.forbidden".into(),
    };
    variants.push(e);
    let mut e = entry();
    e.correlation_id = None;
    variants.push(e);
    let mut e = entry();
    e.details = json!({"b": [1, 2.5, null], "a": {"z": false, "y": "x"}});
    variants.push(e);
    let mut e = entry();
    e.occurred_at += chrono::Duration::microseconds(1);
    variants.push(e);
    for v in &variants {
        assert_ne!(compute_hash(7, v, at(), GENESIS_HASH), base, "{v:?}");
    }
    assert_ne!(compute_hash(8, &entry(), at(), GENESIS_HASH), base);
    assert_ne!(
        compute_hash(
            7,
            &entry(),
            at() + chrono::Duration::microseconds(1),
            GENESIS_HASH
        ),
        base
    );
    assert_ne!(compute_hash(7, &entry(), at(), &"1".repeat(64)), base);
    assert_eq!(compute_hash(7, &entry(), at(), GENESIS_HASH), base);
}

#[test]
fn field_boundaries_are_unambiguous() {
    let mut a = entry();
    a.principal = Some("ab".into());
    a.tenant = Some("c".into());
    let mut b = entry();
    b.principal = Some("a".into());
    b.tenant = Some("bc".into());
    assert_ne!(
        compute_hash(1, &a, at(), GENESIS_HASH),
        compute_hash(1, &b, at(), GENESIS_HASH)
    );
    let mut a = entry();
    a.event_types = vec!["ab".into(), "c".into()];
    let mut b = entry();
    b.event_types = vec!["a".into(), "bc".into()];
    assert_ne!(
        compute_hash(1, &a, at(), GENESIS_HASH),
        compute_hash(1, &b, at(), GENESIS_HASH)
    );
    let mut a = entry();
    a.details = json!(["1"]);
    let mut b = entry();
    b.details = json!([1]);
    assert_ne!(
        compute_hash(1, &a, at(), GENESIS_HASH),
        compute_hash(1, &b, at(), GENESIS_HASH)
    );
}

#[test]
fn json_normalisations_of_jsonb_hash_alike() {
    let pairs = [
        (json!({"b": 1, "a": 2}), r#"{"a": 2, "b": 1}"#),
        (json!(100.0), "1e2"),
        (json!(-0.0), "0.0"),
        (json!(5.0), "5"),
        (json!(1.5e-7), "0.00000015"),
        (json!(1e300), &format!("1{}", "0".repeat(300))),
        (json!(18_446_744_073_709_551_615u64), "18446744073709551615"),
    ];
    for (value, stored) in pairs {
        let mut a = entry();
        a.details = value.clone();
        let mut b = entry();
        b.details = serde_json::from_str(stored).unwrap();
        assert_eq!(
            compute_hash(1, &a, at(), GENESIS_HASH),
            compute_hash(1, &b, at(), GENESIS_HASH),
            "{value} vs {stored}"
        );
    }
    assert_eq!(canonical_number(&serde_json::Number::from(-3)), "-3");
    assert_eq!(
        canonical_number(&serde_json::Number::from_f64(0.1).unwrap()),
        "0.1"
    );
}

#[test]
fn a_known_vector_stays_fixed() {
    // Guards the encoding: changing it silently would break every stored
    // chain. Update only together with the DOMAIN tag.
    let e = AuditEntry::new("t", AuditOutcome::Accepted)
        .with_occurred_at("2026-01-01T00:00:00Z".parse().unwrap());
    let h = compute_hash(1, &e, "2026-01-01T00:00:01Z".parse().unwrap(), GENESIS_HASH);
    assert_eq!(h, KNOWN_VECTOR);
}

const KNOWN_VECTOR: &str = "154dd5d278293dc4312e41331883e8667b652b264a0c464501ad1d113407895b";

#[test]
fn truncation_rounds_down_to_micros() {
    let t: DateTime<Utc> = "2026-01-01T00:00:00.123456789Z".parse().unwrap();
    assert_eq!(
        truncate_micros(t),
        "2026-01-01T00:00:00.123456Z"
            .parse::<DateTime<Utc>>()
            .unwrap()
    );
    let before: DateTime<Utc> = "1960-01-01T00:00:00.000000999Z".parse().unwrap();
    assert_eq!(
        truncate_micros(before),
        "1960-01-01T00:00:00Z".parse::<DateTime<Utc>>().unwrap()
    );
}

fn chain(n: u64) -> Vec<AuditRecord> {
    let mut prev = GENESIS_HASH.to_owned();
    (1..=n)
        .map(|sequence| {
            let e = entry();
            let hash = compute_hash(sequence, &e, at(), &prev);
            let r = AuditRecord::new(sequence, e, at(), prev.clone(), hash);
            prev = r.hash.clone();
            r
        })
        .collect()
}

fn walk(records: &[AuditRecord], anchor: Option<ChainHead>) -> ChainVerification {
    let mut w = ChainWalk::new(anchor);
    for r in records {
        if let Err(v) = w.check(r, None) {
            return v;
        }
    }
    w.finish()
}

fn broken_at(v: &ChainVerification) -> (u64, &str) {
    match v {
        ChainVerification::Broken { sequence, reason } => (*sequence, reason.as_str()),
        other => panic!("expected a broken chain, got {other:?}"),
    }
}

#[test]
fn the_walk_names_the_first_fault() {
    let records = chain(5);
    assert_eq!(
        walk(&records, None),
        ChainVerification::Intact { records: 5 }
    );
    assert_eq!(walk(&[], None), ChainVerification::Intact { records: 0 });

    let mut altered = records.clone();
    altered[2].entry.tenant = Some("evil".into());
    let v = walk(&altered, None);
    assert_eq!(broken_at(&v).0, 3);
    assert!(broken_at(&v).1.starts_with("content altered"));

    let mut gap = records.clone();
    gap.remove(1);
    let v = walk(&gap, None);
    assert_eq!(broken_at(&v).0, 2);
    assert!(broken_at(&v).1.starts_with("missing record"));

    let mut relinked = records.clone();
    relinked[1].entry.tenant = Some("evil".into());
    relinked[1].hash = record_hash(&relinked[1]);
    let v = walk(&relinked, None);
    assert_eq!(broken_at(&v).0, 3);
    assert!(broken_at(&v).1.starts_with("link broken"));

    let head = ChainHead {
        sequence: 5,
        hash: records[4].hash.clone(),
    };
    assert!(walk(&records, Some(head.clone())).is_intact());
    let v = walk(&records[..4], Some(head));
    assert_eq!(broken_at(&v).0, 5);
    let wrong = ChainHead {
        sequence: 2,
        hash: records[3].hash.clone(),
    };
    assert_eq!(broken_at(&walk(&records, Some(wrong))).0, 2);
}
