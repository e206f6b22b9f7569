//! Rules on reading the log back: filters, time ranges and pages.

use chrono::{DateTime, Duration, Utc};
use keel_core::{AggregateRef, AuditEntry, AuditOutcome, AuditQuery};

use super::{Subject, entry, epoch, sequences};

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
