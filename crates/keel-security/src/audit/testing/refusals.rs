//! Rules on what a log refuses: oversized or malformed entries, hostile
//! strings, meaningless queries.

use chrono::{DateTime, Duration, Utc};
use keel_core::{AggregateRef, AuditEntry, AuditOutcome, AuditQuery, Error, ErrorKind};
use serde_json::{Value, json};

use super::{Subject, all, entry, epoch, invalid_field, sequences};
use crate::audit::{ChainHead, MAX_DETAILS_BYTES, MAX_TEXT_BYTES};

/// Details above [`MAX_DETAILS_BYTES`] are refused with a typed error and
/// nothing is written; details at the limit are stored.
pub async fn oversized_details_are_refused(log: Subject) {
    // `"` + n bytes + `"` is the document's compact size.
    let sized = |n: usize| Value::String("x".repeat(n - 2));
    let mut too_big = entry("alice", 0);
    too_big.details = sized(MAX_DETAILS_BYTES + 1);
    let err = log.append(too_big).await.expect_err("oversized details");
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    assert_eq!(err.code(), "keel.invalid_input");
    assert!(matches!(&err, Error::Invalid(i) if i.field == "details"));
    assert!(all(log.as_ref()).await.is_empty(), "nothing was written");
    assert_eq!(log.head().await.expect("head"), ChainHead::genesis());

    let mut at_limit = entry("alice", 0);
    at_limit.details = sized(MAX_DETAILS_BYTES);
    let record = log.append(at_limit).await.expect("details at the limit");
    assert_eq!(record.sequence, 1, "a refused append takes no sequence");
    assert!(log.verify().await.expect("verify").is_intact());
}

/// Entries no store can keep are refused before anything is written,
/// naming the field; the chain goes on afterwards without a gap.
pub async fn bad_entries_are_refused(log: Subject) {
    let long = "x".repeat(MAX_TEXT_BYTES + 1);
    let cases: Vec<(AuditEntry, &str)> = vec![
        (AuditEntry::new("", AuditOutcome::Accepted), "command_type"),
        (
            AuditEntry::new(long.clone(), AuditOutcome::Accepted),
            "command_type",
        ),
        (entry("", 0), "principal"),
        (entry("nul\0byte", 0), "principal"),
        (entry("alice", 0).with_tenant(long.clone()), "tenant"),
        (
            entry("alice", 0).with_aggregate(AggregateRef::new("Order", "")),
            "aggregate.id",
        ),
        (
            AuditEntry::new(
                "order.place",
                AuditOutcome::Rejected {
                    code: String::new(),
                    reason: "no".into(),
                },
            ),
            "outcome.code",
        ),
        (
            AuditEntry::new(
                "order.place",
                AuditOutcome::Failed {
                    code: "keel.\0".into(),
                },
            ),
            "outcome.code",
        ),
        (
            {
                let mut e = entry("alice", 0);
                e.event_types = vec!["ok".into(), String::new()];
                e
            },
            "event_types",
        ),
        (
            {
                let mut e = entry("alice", 0);
                e.details = json!({"key\u{0}": 1});
                e
            },
            "details",
        ),
        (
            entry("alice", 0).with_occurred_at(DateTime::<Utc>::MIN_UTC),
            "occurred_at",
        ),
        (
            entry("alice", 0).with_occurred_at(DateTime::<Utc>::MAX_UTC),
            "occurred_at",
        ),
    ];
    for (bad, field) in cases {
        let shown = format!("{bad:?}");
        assert_eq!(invalid_field(log.append(bad).await), field, "{shown}");
    }
    assert!(all(log.as_ref()).await.is_empty(), "nothing was written");
    let record = log.append(entry("alice", 0)).await.expect("append");
    assert_eq!(record.sequence, 1);
    assert!(log.verify().await.expect("verify").is_intact());
}

fn keyed(s: &str) -> Value {
    let mut map = serde_json::Map::new();
    map.insert(s.to_owned(), Value::String(s.to_owned()));
    Value::Object(map)
}

/// Strings that look like SQL, LIKE patterns or JSON paths are stored and
/// matched as plain data.
pub async fn injection_strings_are_stored_verbatim(log: Subject) {
    let evil = [
        "'; DROP TABLE keel.audit_log; --",
        "%",
        "_",
        "alice' OR '1'='1",
        "$1",
        "\\x00",
        "{\"$ne\": null}",
    ];
    for (i, s) in evil.iter().enumerate() {
        let mut e = entry(s, i as i64)
            .with_tenant(*s)
            .with_aggregate(AggregateRef::new(*s, *s));
        e.command_type = (*s).to_owned();
        e.event_types = vec![(*s).to_owned()];
        e.details = keyed(s);
        e.outcome = AuditOutcome::Rejected {
            code: (*s).to_owned(),
            reason: (*s).to_owned(),
        };
        log.append(e).await.expect("append");
    }
    log.append(entry("alice", 99)).await.expect("append");
    for (i, s) in evil.iter().enumerate() {
        let by_principal = log
            .query(&AuditQuery::new().principal(*s))
            .await
            .expect("query");
        assert_eq!(sequences(&by_principal.records), vec![i as u64 + 1], "{s}");
        let record = &by_principal.records[0];
        assert_eq!(record.entry.command_type, *s);
        assert_eq!(record.entry.details, keyed(s));
        let by_aggregate = log
            .query(&AuditQuery::new().aggregate(AggregateRef::new(*s, *s)))
            .await
            .expect("query");
        assert_eq!(sequences(&by_aggregate.records), vec![i as u64 + 1], "{s}");
    }
    assert_eq!(all(log.as_ref()).await.len(), evil.len() + 1);
    assert!(log.verify().await.expect("verify").is_intact());
}

/// Queries that cannot mean anything are refused with a typed error.
pub async fn bad_queries_are_refused(log: Subject) {
    log.append(entry("alice", 0)).await.expect("append");
    let backwards = AuditQuery::new().between(Some(epoch()), Some(epoch() - Duration::seconds(1)));
    let err = log.query(&backwards).await.expect_err("from after to");
    assert!(
        matches!(&err, Error::Invalid(i) if i.field == "to"),
        "{err:?}"
    );
    let err = log
        .query(&AuditQuery::new().principal("a\0b"))
        .await
        .expect_err("NUL in filter");
    assert!(
        matches!(&err, Error::Invalid(i) if i.field == "principal"),
        "{err:?}"
    );
    // Extreme but meaningful bounds are fine.
    let wide = AuditQuery::new().between(
        Some(DateTime::<Utc>::MIN_UTC),
        Some(DateTime::<Utc>::MAX_UTC),
    );
    assert_eq!(log.query(&wide).await.expect("query").records.len(), 1);
}
