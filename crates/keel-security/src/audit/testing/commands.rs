//! Rules on command ids: retried appends, other attempts of a command, and
//! both racing each other.

use std::collections::BTreeSet;

use chrono::Duration;
use keel_core::{
    AggregateRef, AuditEntry, AuditOutcome, AuditRecord, ChainVerification, CommandId,
};
use serde_json::json;

use super::{Subject, all, as_stored, entry, sequences};

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
