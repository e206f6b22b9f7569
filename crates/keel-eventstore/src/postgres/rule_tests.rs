//! The expected-version rule, stated once as a table, and checked against
//! both places that implement it: the one-statement fast path (Rust-built
//! SQL, `fast`) and the `keel.append_events` procedure (plpgsql, the slow
//! path and appends in a caller's transaction). Each must agree with the
//! table on every row; the fast path may also decline (write nothing and
//! leave the decision to the procedure), but only where the table says the
//! append is refused.

use keel_core::{ExpectedVersion, StreamId, Version};
use keel_testkit::TestDatabase;
use sqlx::PgPool;

use super::append::{CallError, call_append_function};
use super::fast::fast_append;
use crate::event::NewEvent;

/// What the rule says an append to a stream holding `stored` events, with
/// `expected`, does: `Ok(first version written)` or `Err(actual version)`
/// for a conflict.
fn rule(stored: u64, expected: ExpectedVersion) -> Result<u64, u64> {
    let holds = match expected {
        ExpectedVersion::Any => true,
        ExpectedVersion::NoStream => stored == 0,
        ExpectedVersion::StreamExists => stored > 0,
        ExpectedVersion::Exact(v) => v.get() == stored,
    };
    if holds { Ok(stored + 1) } else { Err(stored) }
}

/// Every expectation against a missing stream and a stream of two events,
/// with batches of one and of three events.
fn table() -> Vec<(u64, ExpectedVersion, usize)> {
    let expectations = [
        ExpectedVersion::Any,
        ExpectedVersion::NoStream,
        ExpectedVersion::StreamExists,
        ExpectedVersion::Exact(Version::new(0)),
        ExpectedVersion::Exact(Version::new(1)),
        ExpectedVersion::Exact(Version::new(2)),
        ExpectedVersion::Exact(Version::new(3)),
    ];
    let mut rows = Vec::new();
    for stored in [0, 2] {
        for expected in expectations {
            for batch in [1, 3] {
                rows.push((stored, expected, batch));
            }
        }
    }
    rows
}

fn events(n: usize) -> Vec<NewEvent> {
    (0..n)
        .map(|i| NewEvent::from_json("rule.checked", &serde_json::json!({ "i": i })))
        .collect()
}

/// A fresh stream holding `stored` events.
async fn stream(pool: &PgPool, name: String, stored: u64) -> StreamId {
    let stream = StreamId::new(name).unwrap();
    if stored > 0 {
        let mut conn = pool.acquire().await.unwrap();
        let n = usize::try_from(stored).unwrap();
        let done = fast_append(&mut conn, &stream, ExpectedVersion::NoStream, &events(n))
            .await
            .unwrap()
            .expect("seeding a new stream");
        assert_eq!(done.next_expected_version, Version::new(stored));
    }
    stream
}

#[tokio::test]
async fn fast_path_and_procedure_follow_one_table() {
    let db = TestDatabase::create(&crate::MIGRATIONS).await.unwrap();
    let pool = db.pool();
    for (i, (stored, expected, batch)) in table().into_iter().enumerate() {
        let want = rule(stored, expected);
        let case = format!("{stored} stored, {expected:?}, batch of {batch}");

        let s = stream(pool, format!("Fast-{i}"), stored).await;
        let mut conn = pool.acquire().await.unwrap();
        match fast_append(&mut conn, &s, expected, &events(batch)).await {
            Ok(Some(done)) => assert_eq!(
                Ok(done.first_version.get()),
                want,
                "fast path wrote where the rule refuses: {case}"
            ),
            Ok(None) => assert!(want.is_err(), "fast path declined a valid append: {case}"),
            Err(e) => panic!("fast path failed: {case}: {e}"),
        }

        let s = stream(pool, format!("Proc-{i}"), stored).await;
        let mut conn = pool.acquire().await.unwrap();
        let outcome =
            match call_append_function(&mut conn, &s, expected, &events(batch), false).await {
                Ok(outcome) => outcome,
                Err(CallError::Raced) => panic!("no race here: {case}"),
                Err(CallError::Other(e)) => panic!("procedure failed: {case}: {e}"),
            };
        let got = match outcome.outcome {
            0 => Ok(u64::try_from(outcome.first_version.unwrap()).unwrap()),
            2 => Err(u64::try_from(outcome.actual_version).unwrap()),
            other => panic!("procedure returned outcome {other}: {case}"),
        };
        assert_eq!(got, want, "procedure disagrees with the rule: {case}");
    }
}
