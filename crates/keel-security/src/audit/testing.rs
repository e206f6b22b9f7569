//! The contract suite every implementation of [`keel_core::AuditLog`] (with
//! [`AuditHead`]) must pass (feature `testing`).
//!
//! Each function takes a fresh, empty log and panics when the
//! implementation breaks the rule it is named after. Run the whole suite
//! with [`audit_contract_suite!`](crate::audit_contract_suite) and a
//! factory returning `(Arc<dyn AuditHead>, guard)`:
//!
//! ```ignore
//! keel_security::audit_contract_suite!(|| async {
//!     let log: Arc<dyn AuditHead> = Arc::new(InMemoryAuditLog::new());
//!     (log, ())
//! });
//! ```
//!
//! Tampering is not part of the suite: how to alter a stored record
//! behind the store's back depends on the store (see the crate's
//! `tests/audit_postgres.rs` and the in-memory store's unit tests).

use std::collections::BTreeSet;
use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use keel_core::{
    AggregateRef, AuditEntry, AuditLog, AuditOutcome, AuditQuery, AuditRecord, ChainVerification,
    CommandId, CorrelationId, Error, ErrorKind,
};
use serde_json::{Value, json};

use keel_core::uow::{Transaction, TransactionSource};

use super::{
    AuditHead, AuditKey, AuditKeys, ChainHead, GENESIS_HASH, MAX_DETAILS_BYTES, MAX_TEXT_BYTES,
    record_hash,
};

/// The log under test.
pub type Subject = Arc<dyn AuditHead>;

/// When the suite's commands occurred; nanoseconds on purpose, to show
/// they are truncated to microseconds.
pub const EPOCH: &str = "2026-03-01T12:00:00.123456789Z";

fn epoch() -> DateTime<Utc> {
    EPOCH.parse().expect("EPOCH parses")
}

/// An accepted entry by `principal`, `minutes` after [`EPOCH`].
#[must_use]
pub fn entry(principal: &str, minutes: i64) -> AuditEntry {
    AuditEntry::new("order.place", AuditOutcome::Accepted)
        .with_principal(principal)
        .with_occurred_at(epoch() + Duration::minutes(minutes))
}

async fn all(log: &dyn AuditLog) -> Vec<AuditRecord> {
    let mut out = Vec::new();
    let mut query = AuditQuery::new().limit(AuditQuery::MAX_LIMIT);
    loop {
        let page = log.query(&query).await.expect("query");
        out.extend(page.records);
        match page.next_after {
            Some(after) => query = query.after(after),
            None => return out,
        }
    }
}

fn invalid_field(result: Result<AuditRecord, Error>) -> String {
    match result {
        Err(Error::Invalid(invalid)) => invalid.field.into_owned(),
        other => panic!("expected invalid input, got {other:?}"),
    }
}

fn sequences(records: &[AuditRecord]) -> Vec<u64> {
    records.iter().map(|r| r.sequence).collect()
}

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

/// A principal filter returns that principal's records only, oldest
/// first, and nothing for a principal that never acted.
pub async fn queries_filter_by_principal(log: Subject) {
    for i in 0..12 {
        let who = ["alice", "bob", "carol"][i % 3];
        log.append(entry(who, i as i64)).await.expect("append");
    }
    log.append(AuditEntry::new("anonymous.ping", AuditOutcome::Accepted))
        .await
        .expect("append");
    let bob = log
        .query(&AuditQuery::new().principal("bob"))
        .await
        .expect("query");
    assert_eq!(sequences(&bob.records), vec![2, 5, 8, 11]);
    assert!(
        bob.records
            .iter()
            .all(|r| r.entry.principal.as_deref() == Some("bob"))
    );
    assert_eq!(bob.next_after, None);
    let nobody = log
        .query(&AuditQuery::new().principal("Bob"))
        .await
        .expect("query");
    assert!(nobody.records.is_empty(), "matching is exact");
}

/// An aggregate filter matches kind and id exactly; combined filters all
/// apply.
pub async fn queries_filter_by_aggregate(log: Subject) {
    let targets = [
        AggregateRef::new("Order", "1"),
        AggregateRef::new("Order", "2"),
        AggregateRef::new("Invoice", "1"),
    ];
    for i in 0..9 {
        let who = if i < 5 { "alice" } else { "bob" };
        log.append(entry(who, i as i64).with_aggregate(targets[i % 3].clone()))
            .await
            .expect("append");
    }
    log.append(entry("alice", 20)).await.expect("append");
    let order1 = log
        .query(&AuditQuery::new().aggregate(AggregateRef::new("Order", "1")))
        .await
        .expect("query");
    assert_eq!(sequences(&order1.records), vec![1, 4, 7]);
    let invoice1 = log
        .query(&AuditQuery::new().aggregate(AggregateRef::new("Invoice", "1")))
        .await
        .expect("query");
    assert_eq!(sequences(&invoice1.records), vec![3, 6, 9]);
    let both = log
        .query(
            &AuditQuery::new()
                .aggregate(AggregateRef::new("Order", "1"))
                .principal("bob"),
        )
        .await
        .expect("query");
    assert_eq!(sequences(&both.records), vec![7]);
}

/// Every combination of principal, aggregate, `from` and `to` applies all
/// the filters given, page after page (run twice over, so that a store
/// caching its statements serves each combination more than once).
pub async fn combined_filters_all_apply(log: Subject) {
    let aggregates = [
        AggregateRef::new("Order", "1"),
        AggregateRef::new("Order", "2"),
    ];
    let mut stored = Vec::new();
    for i in 0..12_usize {
        let who = if i % 2 == 0 { "alice" } else { "bob" };
        let mut e = entry(who, i as i64);
        if i % 3 != 2 {
            e = e.with_aggregate(aggregates[i % 3].clone());
        }
        stored.push(log.append(e).await.expect("append"));
    }
    let at = |i: i64| stored[0].entry.occurred_at + Duration::minutes(i);
    for _ in 0..2 {
        for mask in 0..16_u8 {
            let principal = (mask & 1 != 0).then_some("alice");
            let aggregate = (mask & 2 != 0).then(|| aggregates[0].clone());
            let from = (mask & 4 != 0).then(|| at(2));
            let to = (mask & 8 != 0).then(|| at(10));
            let expected: Vec<u64> = stored
                .iter()
                .filter(|r| principal.is_none_or(|p| r.entry.principal.as_deref() == Some(p)))
                .filter(|r| aggregate.is_none() || r.entry.aggregate == aggregate)
                .filter(|r| from.is_none_or(|f| r.entry.occurred_at >= f))
                .filter(|r| to.is_none_or(|t| r.entry.occurred_at < t))
                .map(|r| r.sequence)
                .collect();
            let mut query = AuditQuery::new().between(from, to).limit(2);
            if let Some(p) = principal {
                query = query.principal(p);
            }
            if let Some(a) = &aggregate {
                query = query.aggregate(a.clone());
            }
            let mut found = Vec::new();
            loop {
                let page = log.query(&query).await.expect("query");
                found.extend(sequences(&page.records));
                match page.next_after {
                    Some(after) => query = query.after(after),
                    None => break,
                }
            }
            assert_eq!(found, expected, "filters {mask:04b}");
        }
    }
}

/// `from` is inclusive and `to` exclusive, compared at microsecond
/// precision; either may be left open.
pub async fn queries_filter_by_time_range(log: Subject) {
    for minutes in 0..10 {
        log.append(entry("alice", minutes)).await.expect("append");
    }
    let at = |minutes: i64| epoch() + Duration::minutes(minutes);
    let q = |from: Option<DateTime<Utc>>, to: Option<DateTime<Utc>>| {
        let log = log.clone();
        async move {
            let page = log
                .query(&AuditQuery::new().between(from, to))
                .await
                .expect("query");
            sequences(&page.records)
        }
    };
    // Stored instants are EPOCH cut to microseconds, plus whole minutes.
    let stored = |minutes: i64| {
        "2026-03-01T12:00:00.123456Z"
            .parse::<DateTime<Utc>>()
            .expect("time")
            + Duration::minutes(minutes)
    };
    assert_eq!(q(Some(stored(2)), Some(stored(5))).await, vec![3, 4, 5]);
    assert_eq!(q(Some(stored(8)), None).await, vec![9, 10]);
    assert_eq!(q(None, Some(stored(1))).await, vec![1]);
    // A bound a few nanoseconds past a stored instant excludes it as `from`
    // and includes it as `to`.
    let past = |m| stored(m) + Duration::nanoseconds(1);
    assert_eq!(q(Some(past(2)), Some(past(5))).await, vec![4, 5, 6]);
    assert_eq!(q(Some(at(3)), Some(at(3))).await, Vec::<u64>::new());
    assert_eq!(q(Some(at(100)), None).await, Vec::<u64>::new());
}

/// Keyset pages walk every matching record once, in order; `next_after`
/// is `None` on the last page, also when it is exactly full.
pub async fn pagination_walks_every_record(log: Subject) {
    for i in 0..30 {
        let who = if i % 3 == 0 { "bob" } else { "alice" };
        log.append(entry(who, i)).await.expect("append");
    }
    let mut seen = Vec::new();
    let mut query = AuditQuery::new().principal("alice").limit(7);
    let mut pages = 0;
    loop {
        let page = log.query(&query).await.expect("query");
        pages += 1;
        assert!(page.records.len() <= 7);
        seen.extend(sequences(&page.records));
        match page.next_after {
            Some(after) => {
                assert_eq!(Some(after), seen.last().copied());
                query = query.after(after);
            }
            None => break,
        }
    }
    let expected: Vec<u64> = (1..=30).filter(|s| (s - 1) % 3 != 0).collect();
    assert_eq!(seen, expected);
    assert_eq!(pages, 3, "20 records in pages of 7");

    // Exactly full last page: no empty page after it.
    let first = log
        .query(&AuditQuery::new().limit(15))
        .await
        .expect("query");
    assert_eq!(first.next_after, Some(15));
    let second = log
        .query(&AuditQuery::new().limit(15).after(15))
        .await
        .expect("query");
    assert_eq!(sequences(&second.records), (16..=30).collect::<Vec<_>>());
    assert_eq!(second.next_after, None);
    let beyond = log
        .query(&AuditQuery::new().after(u64::MAX))
        .await
        .expect("query");
    assert!(beyond.records.is_empty());
    assert_eq!(beyond.next_after, None);
}

/// A limit of 0 means the default page; a limit above the maximum is cut
/// to it.
pub async fn page_size_is_clamped(log: Subject) {
    let total = AuditQuery::MAX_LIMIT as usize + 5;
    let writers: Vec<_> = (0..5)
        .map(|w| {
            let log = log.clone();
            tokio::spawn(async move {
                for i in 0..total / 5 {
                    log.append(entry(&format!("writer-{w}"), i as i64))
                        .await
                        .expect("append");
                }
            })
        })
        .collect();
    for w in writers {
        w.await.expect("writer task");
    }
    let default = log.query(&AuditQuery::new()).await.expect("query");
    assert_eq!(default.records.len(), AuditQuery::DEFAULT_LIMIT as usize);
    assert_eq!(
        default.next_after,
        Some(u64::from(AuditQuery::DEFAULT_LIMIT))
    );
    let huge = log
        .query(&AuditQuery::new().limit(u32::MAX))
        .await
        .expect("query");
    assert_eq!(huge.records.len(), AuditQuery::MAX_LIMIT as usize);
    assert_eq!(huge.next_after, Some(u64::from(AuditQuery::MAX_LIMIT)));
    let rest = log
        .query(&AuditQuery::new().limit(u32::MAX).after(1_000))
        .await
        .expect("query");
    assert_eq!(
        sequences(&rest.records),
        (1_001..=1_005).collect::<Vec<_>>()
    );
    assert_eq!(rest.next_after, None);
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

/// An entry carrying command id `n` (a fixed UUID per `n`).
#[must_use]
pub fn command_entry(n: u32) -> AuditEntry {
    let mut e = entry(&format!("user-{}", n % 7), i64::from(n));
    e.command_id = Some(
        format!("01900000-0000-7000-8000-{n:012}")
            .parse::<CommandId>()
            .expect("a UUID"),
    );
    e.aggregate = Some(AggregateRef::new("Order", format!("o-{n}")));
    e.details = json!({"n": n, "total": 12.5, "lines": [{"sku": "A", "qty": 2}]});
    e
}

/// Appending an entry identical to a stored record with the same command
/// id returns that record (same sequence, hash and time) and writes
/// nothing; entries without a command id are never merged.
pub async fn retried_appends_return_the_original(log: Subject) {
    let first = log.append(command_entry(1)).await.expect("append");
    let second = log.append(command_entry(2)).await.expect("append");
    let again = log.append(command_entry(1)).await.expect("retry");
    assert_eq!(again, first, "a retry returns the original record");
    // A retry whose details went through storage's normalisation (jsonb
    // number forms, key order) is still the same entry.
    let mut renormalised = command_entry(2);
    renormalised.details =
        serde_json::from_str(r#"{"total": 1.25e1, "n": 2.0, "lines": [{"qty": 2, "sku": "A"}]}"#)
            .expect("json");
    assert_eq!(log.append(renormalised).await.expect("retry"), second);
    // Nanoseconds beyond what is stored do not make another entry either.
    let mut finer = command_entry(1);
    finer.occurred_at += Duration::nanoseconds(1);
    assert_eq!(log.append(finer).await.expect("retry"), first);

    let plain_a = log.append(entry("alice", 0)).await.expect("append");
    let plain_b = log.append(entry("alice", 0)).await.expect("append");
    assert_eq!(
        (plain_a.sequence, plain_b.sequence),
        (3, 4),
        "entries without a command id are not deduplicated"
    );
    let stored = all(log.as_ref()).await;
    assert_eq!(sequences(&stored), vec![1, 2, 3, 4]);
    assert_eq!(stored[0], first);
    assert_eq!(
        log.verify().await.expect("verify"),
        ChainVerification::Intact { records: 4 }
    );
    let third = log.append(command_entry(3)).await.expect("append");
    assert_eq!(third.prev_hash, plain_b.hash, "retries leave no gap");
}

/// Another attempt of command `n`: `variant` 0 is [`command_entry`]
/// itself; 1 failed at the same instant (only the outcome differs); 2
/// arrived a second later; 3 arrived at the same instant with other
/// details.
#[must_use]
pub fn command_attempt(n: u32, variant: u32) -> AuditEntry {
    let mut e = command_entry(n);
    match variant {
        0 => {}
        1 => {
            e.outcome = AuditOutcome::Failed {
                code: "keel.unavailable".into(),
            };
        }
        2 => e.occurred_at += Duration::seconds(1),
        _ => e.details = json!({"n": n, "variant": variant}),
    }
    e
}

/// `entry` as a store keeps it: `occurred_at` cut to microseconds.
fn as_stored(mut entry: AuditEntry) -> AuditEntry {
    entry.occurred_at = DateTime::from_timestamp_micros(entry.occurred_at.timestamp_micros())
        .expect("a representable time");
    entry
}

/// An entry whose command id is stored only with other content (the
/// command ran again: another receipt time, another outcome, other
/// details) is another attempt: it gets a record of its own, without an
/// error. Each attempt, retried, returns its own record; the chain stays
/// gapless and verifies.
pub async fn other_attempts_of_a_command_are_recorded(log: Subject) {
    let first = log.append(command_attempt(1, 0)).await.expect("append");
    let failed = log.append(command_attempt(1, 1)).await.expect("attempt");
    let other = log.append(command_entry(2)).await.expect("append");
    let later = log.append(command_attempt(1, 2)).await.expect("attempt");
    let changed = log.append(command_attempt(1, 3)).await.expect("attempt");
    assert_eq!(
        sequences(&[
            first.clone(),
            failed.clone(),
            other,
            later.clone(),
            changed.clone()
        ]),
        vec![1, 2, 3, 4, 5],
        "every attempt is a new record"
    );
    assert_eq!(failed.entry, as_stored(command_attempt(1, 1)));
    assert_eq!(failed.prev_hash, first.hash);

    // Retrying any attempt, in any order, finds that attempt.
    for (variant, original) in [(3, &changed), (0, &first), (2, &later), (1, &failed)] {
        let again = log
            .append(command_attempt(1, variant))
            .await
            .expect("retry");
        assert_eq!(&again, original, "attempt {variant} retried");
    }

    let stored = all(log.as_ref()).await;
    assert_eq!(sequences(&stored), vec![1, 2, 3, 4, 5]);
    let attempts: Vec<u64> = stored
        .iter()
        .filter(|r| r.entry.command_id == first.entry.command_id)
        .map(|r| r.sequence)
        .collect();
    assert_eq!(attempts, vec![1, 2, 4, 5]);
    assert_eq!(
        log.verify().await.expect("verify"),
        ChainVerification::Intact { records: 5 }
    );
    let next = log.append(entry("alice", 0)).await.expect("append");
    assert_eq!(next.sequence, 6);
    assert_eq!(next.prev_hash, changed.hash);
}

/// Sixteen tasks each append the same 40 commands, in different orders and
/// all at once (retries racing each other and the first attempt): each
/// command is stored exactly once, every task gets the same record for it,
/// sequences are gapless and the chain verifies.
pub async fn concurrent_retries_store_each_command_once(log: Subject) {
    const TASKS: u32 = 16;
    const COMMANDS: u32 = 40;
    let writers: Vec<_> = (0..TASKS)
        .map(|t| {
            let log = log.clone();
            tokio::spawn(async move {
                let mut got = Vec::with_capacity(COMMANDS as usize);
                for i in 0..COMMANDS {
                    // Every task starts at another command.
                    let n = (i + t * 7) % COMMANDS;
                    let record = log.append(command_entry(n)).await.expect("append");
                    got.push((n, record));
                }
                got
            })
        })
        .collect();
    let mut by_command: std::collections::BTreeMap<u32, AuditRecord> =
        std::collections::BTreeMap::new();
    for w in writers {
        for (n, record) in w.await.expect("writer task") {
            let first = by_command.entry(n).or_insert_with(|| record.clone());
            assert_eq!(*first, record, "command {n} answered with two records");
        }
    }
    assert_eq!(by_command.len(), COMMANDS as usize);
    let stored = all(log.as_ref()).await;
    assert_eq!(
        sequences(&stored),
        (1..=u64::from(COMMANDS)).collect::<Vec<_>>()
    );
    let ids: BTreeSet<_> = stored.iter().map(|r| r.entry.command_id).collect();
    assert_eq!(ids.len(), COMMANDS as usize, "a command was stored twice");
    assert_eq!(
        log.verify().await.expect("verify"),
        ChainVerification::Intact {
            records: u64::from(COMMANDS)
        }
    );
}

/// Twelve tasks append attempts of the same 20 commands at once, in
/// different orders: tasks `t` and `t + 4` send attempt `t % 4` of each
/// command ([`command_attempt`]), so every attempt is sent by three tasks
/// racing each other and the other attempts. Each attempt is stored
/// exactly once (four records per command), every task that sent it gets
/// the same record, sequences are gapless and the chain verifies.
pub async fn concurrent_attempts_are_each_stored_once(log: Subject) {
    const TASKS: u32 = 12;
    const VARIANTS: u32 = 4;
    const COMMANDS: u32 = 20;
    let writers: Vec<_> = (0..TASKS)
        .map(|t| {
            let log = log.clone();
            tokio::spawn(async move {
                let variant = t % VARIANTS;
                let mut got = Vec::with_capacity(COMMANDS as usize);
                for i in 0..COMMANDS {
                    let n = (i + t * 3) % COMMANDS;
                    let record = log
                        .append(command_attempt(n, variant))
                        .await
                        .expect("append");
                    got.push(((n, variant), record));
                }
                got
            })
        })
        .collect();
    let mut by_attempt: std::collections::BTreeMap<(u32, u32), AuditRecord> =
        std::collections::BTreeMap::new();
    for w in writers {
        for (attempt, record) in w.await.expect("writer task") {
            assert_eq!(
                record.entry,
                as_stored(command_attempt(attempt.0, attempt.1))
            );
            let first = by_attempt.entry(attempt).or_insert_with(|| record.clone());
            assert_eq!(
                *first, record,
                "attempt {attempt:?} answered with two records"
            );
        }
    }
    let total = u64::from(COMMANDS * VARIANTS);
    let distinct: BTreeSet<u64> = by_attempt.values().map(|r| r.sequence).collect();
    assert_eq!(distinct.len() as u64, total, "two attempts share a record");
    let stored = all(log.as_ref()).await;
    assert_eq!(sequences(&stored), (1..=total).collect::<Vec<_>>());
    for n in 0..COMMANDS {
        let id = command_entry(n).command_id;
        let count = stored.iter().filter(|r| r.entry.command_id == id).count();
        assert_eq!(count, VARIANTS as usize, "records of command {n}");
    }
    assert_eq!(
        log.verify().await.expect("verify"),
        ChainVerification::Intact { records: total }
    );
}

/// [`AuditHead::verify_after`] checks only what came after a verified head
/// and hands back the head to resume from; a head that no longer matches
/// the stored record, or lies past the end, is reported.
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

/// A transaction of no real backend: every store must refuse to join it.
#[derive(Debug)]
struct Foreign;

#[async_trait::async_trait]
impl Transaction for Foreign {
    fn backend(&self) -> &'static str {
        "foreign"
    }
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
    fn after_commit(&mut self, _: Box<dyn FnOnce() + Send>) {}
    async fn commit(self: Box<Self>) -> Result<(), Error> {
        Ok(())
    }
    async fn rollback(self: Box<Self>) -> Result<(), Error> {
        Ok(())
    }
}

/// `within(tx).append`: nothing is visible before the commit, nothing is
/// left by a rollback, the record is found (chained, verifiable) after the
/// commit; an entry repeated in the transaction, or repeating a committed
/// record, is stored once; invalid entries are refused with the field
/// named; a transaction of another backend is refused as `Internal` and
/// nothing is written.
pub async fn within_commits_with_the_transaction(log: Subject, source: Arc<dyn TransactionSource>) {
    let first = command_entry(1);
    let mut tx = source.begin().await.expect("begin");
    log.within(&mut *tx)
        .append(first.clone())
        .await
        .expect("append in tx");
    log.within(&mut *tx)
        .append(first.clone())
        .await
        .expect("repeat in tx");
    assert!(all(&*log).await.is_empty(), "visible before the commit");
    tx.rollback().await.expect("rollback");
    assert!(all(&*log).await.is_empty(), "left by a rollback");

    let mut tx = source.begin().await.expect("begin");
    log.within(&mut *tx)
        .append(first.clone())
        .await
        .expect("append in tx");
    log.within(&mut *tx)
        .append(first.clone())
        .await
        .expect("repeat in tx");
    log.within(&mut *tx)
        .append(command_entry(2))
        .await
        .expect("append in tx");
    tx.commit().await.expect("commit");
    let records = all(&*log).await;
    assert_eq!(sequences(&records), [1, 2]);
    assert_eq!(records[0].entry, as_stored(first.clone()));

    // A retry after the commit, in a transaction or on its own, finds it.
    let mut tx = source.begin().await.expect("begin");
    log.within(&mut *tx)
        .append(first.clone())
        .await
        .expect("retry in tx");
    tx.commit().await.expect("commit");
    assert_eq!(log.append(first).await.expect("retry"), records[0]);
    assert_eq!(all(&*log).await.len(), 2);
    assert_eq!(
        log.verify().await.expect("verify"),
        ChainVerification::Intact { records: 2 }
    );
    assert_eq!(log.pending().await.expect("pending"), 0);

    let mut tx = source.begin().await.expect("begin");
    let mut bad = entry("alice", 0);
    bad.command_type = String::new();
    match log.within(&mut *tx).append(bad).await {
        Err(Error::Invalid(invalid)) => assert_eq!(invalid.field, "command_type"),
        other => panic!("expected invalid input, got {other:?}"),
    }
    tx.rollback().await.expect("rollback");

    let mut foreign = Foreign;
    let err = log
        .within(&mut foreign)
        .append(command_entry(3))
        .await
        .expect_err("a foreign transaction");
    assert_eq!(err.kind(), ErrorKind::Internal, "{err}");
    assert!(err.to_string().contains("foreign"), "{err}");
    assert_eq!(all(&*log).await.len(), 2);
}

/// Sixteen transactions append at once, every third rolls back: the
/// committed records are all stored, chained once each in a gapless
/// chain that verifies; no record of a rolled-back one is.
pub async fn concurrent_transactions_chain_every_commit_once(
    log: Subject,
    source: Arc<dyn TransactionSource>,
) {
    let tasks: Vec<_> = (0..16u32)
        .map(|n| {
            let log = Arc::clone(&log);
            let source = Arc::clone(&source);
            tokio::spawn(async move {
                for round in 0..4u32 {
                    let i = n * 4 + round;
                    let mut tx = source.begin().await.expect("begin");
                    log.within(&mut *tx)
                        .append(command_entry(i))
                        .await
                        .expect("append in tx");
                    if i % 3 == 0 {
                        tx.rollback().await.expect("rollback");
                    } else {
                        tx.commit().await.expect("commit");
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("task");
    }
    let records = all(&*log).await;
    assert_eq!(sequences(&records), (1..=42).collect::<Vec<u64>>());
    let stored: BTreeSet<Option<CommandId>> = records.iter().map(|r| r.entry.command_id).collect();
    let expected: BTreeSet<Option<CommandId>> = (0..64u32)
        .filter(|i| i % 3 != 0)
        .map(|i| command_entry(i).command_id)
        .collect();
    assert_eq!(stored, expected);
    assert_eq!(
        log.verify().await.expect("verify"),
        ChainVerification::Intact { records: 42 }
    );
}

/// Runs every rule of the audit-log contract suite against the logs built
/// by `factory` (a closure returning a future of
/// `(Arc<dyn AuditHead>, guard)`), one `#[tokio::test]` per rule.
#[macro_export]
macro_rules! audit_contract_suite {
    ($factory:expr) => {
        ::keel_testkit::contract_tests! {
            factory: $factory,
            suite: keel_security::audit::testing,
            tests: [
                appends_chain_from_genesis,
                every_field_round_trips,
                details_survive_storage_and_rehash,
                empty_log_verifies,
                queries_filter_by_principal,
                queries_filter_by_aggregate,
                queries_filter_by_time_range,
                combined_filters_all_apply,
                pagination_walks_every_record,
                page_size_is_clamped,
                concurrent_appends_never_fork,
                oversized_details_are_refused,
                bad_entries_are_refused,
                injection_strings_are_stored_verbatim,
                bad_queries_are_refused,
                head_anchors_the_chain,
                retried_appends_return_the_original,
                other_attempts_of_a_command_are_recorded,
                concurrent_retries_store_each_command_once,
                concurrent_attempts_are_each_stored_once,
                incremental_verification_resumes,
            ],
        }
    };
}
