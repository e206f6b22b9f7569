//! Snapshot history, export and import, retention.

#[allow(unused_imports, reason = "the suite shares one set of imports")]
use super::*;

use chrono::{DateTime, TimeZone, Utc};

use crate::{SnapshotRecord, SnapshotRetention, SnapshotSelection, export_ndjson, import_ndjson};

fn snap(stream: &str, version: u64, schema: u32, state: &str) -> Snapshot {
    Snapshot::new(sid(stream), Version::new(version), schema, state.to_owned())
}

async fn exported<S: Subject>(store: &S, selection: SnapshotSelection) -> Vec<SnapshotRecord> {
    let mut records: Vec<SnapshotRecord> = store
        .export_snapshots(selection)
        .try_collect()
        .await
        .expect("export");
    // Streams come grouped, in the backend's order: compare sorted.
    records.sort_by(|a, b| {
        (a.snapshot.stream_id.as_str(), a.snapshot.version)
            .cmp(&(b.snapshot.stream_id.as_str(), b.snapshot.version))
    });
    records
}

fn versions_of(records: &[SnapshotRecord], stream: &str) -> Vec<u64> {
    records
        .iter()
        .filter(|r| r.snapshot.stream_id.as_str() == stream)
        .map(|r| r.snapshot.version.get())
        .collect()
}

fn at(day: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2020, 1, day, 12, 0, 0)
        .single()
        .expect("a valid date")
}

/// Every saved snapshot is kept and exported with its schema version; NDJSON
/// export and import round-trip exactly (state text, schema version, time
/// taken); import is idempotent, keeps older versions beside newer ones and
/// refuses bad records and lines with nothing written.
pub async fn snapshot_archive_round_trip<S: Subject>(store: S) {
    // History: every save is kept, except one older than the newest.
    for (stream, version, schema, state) in [
        ("Arch-1", 2, 1, r#"{"n": 2}"#),
        ("Arch-1", 5, 1, r#"{"n":5, "tags":["a","b"]}"#),
        ("Arch-1", 3, 1, r#"{"n":3}"#), // older than 5: not stored
        ("Arch-1", 9, 2, r#"{"n":9,"ünïcode":"✓"}"#),
        ("Arch-2", 1, 7, "[1,2,3]"),
        ("Other-1", 4, 1, "null"),
    ] {
        store
            .save_snapshot(snap(stream, version, schema, state))
            .await
            .expect("save");
    }
    let all = exported(&store, SnapshotSelection::all()).await;
    assert_eq!(versions_of(&all, "Arch-1"), vec![2, 5, 9]);
    assert_eq!(versions_of(&all, "Arch-2"), vec![1]);
    assert_eq!(all.len(), 5);
    let nine = &all[2].snapshot;
    assert_eq!(
        (nine.schema_version, nine.state.as_str()),
        (2, r#"{"n":9,"ünïcode":"✓"}"#)
    );
    let loaded = store.load_snapshot(&sid("Arch-1")).await.unwrap().unwrap();
    assert_eq!(loaded.version, Version::new(9));

    let latest = exported(&store, SnapshotSelection::all().latest_only()).await;
    assert_eq!(
        latest
            .iter()
            .map(|r| (r.snapshot.stream_id.as_str(), r.snapshot.version.get()))
            .collect::<Vec<_>>(),
        vec![("Arch-1", 9), ("Arch-2", 1), ("Other-1", 4)]
    );
    let arch = exported(&store, SnapshotSelection::all().stream_prefix("Arch-")).await;
    assert_eq!(arch.len(), 4);
    let arch_latest = exported(
        &store,
        SnapshotSelection::all()
            .stream_prefix("Arch-")
            .latest_only(),
    )
    .await;
    assert_eq!(arch_latest.len(), 2);

    // NDJSON out; importing into a store that has it all skips everything.
    let mut file = Vec::new();
    let written = export_ndjson(&store, SnapshotSelection::all(), &mut file)
        .await
        .expect("export ndjson");
    assert_eq!(written, 5);
    let text = String::from_utf8(file.clone()).expect("utf-8");
    assert_eq!(text.lines().count(), 5);
    assert!(
        text.lines()
            .all(|l| l.contains(r#""format":"keel.snapshot""#))
    );
    let again = import_ndjson(&store, &mut file.as_slice(), 2)
        .await
        .expect("import");
    assert_eq!((again.imported, again.skipped), (0, 5));

    // Empty the store, then bring the file back: identical, times included.
    store
        .prune_snapshots(&SnapshotRetention::keep_latest(0).including_newest())
        .await
        .expect("prune all");
    assert!(exported(&store, SnapshotSelection::all()).await.is_empty());
    assert!(store.load_snapshot(&sid("Arch-1")).await.unwrap().is_none());
    let mut with_blank_lines = b"\n".to_vec();
    with_blank_lines.extend_from_slice(&file);
    with_blank_lines.extend_from_slice(b"\n\n");
    let back = import_ndjson(&store, &mut with_blank_lines.as_slice(), 2)
        .await
        .expect("import");
    assert_eq!((back.imported, back.skipped), (5, 0));
    assert_eq!(exported(&store, SnapshotSelection::all()).await, all);
    let loaded = store.load_snapshot(&sid("Arch-1")).await.unwrap().unwrap();
    assert_eq!((loaded.version.get(), loaded.schema_version), (9, 2));

    // An import may bring older versions beside a newer one: loads still
    // return the newest.
    let old = SnapshotRecord::new(snap("Arch-1", 1, 1, r#"{"n":1}"#), at(1));
    let report = store
        .import_snapshots(vec![old.clone(), old])
        .await
        .unwrap();
    assert_eq!((report.imported, report.skipped), (1, 1));
    assert_eq!(
        store
            .load_snapshot(&sid("Arch-1"))
            .await
            .unwrap()
            .unwrap()
            .version,
        Version::new(9)
    );
    assert_eq!(
        versions_of(&exported(&store, SnapshotSelection::all()).await, "Arch-1"),
        vec![1, 2, 5, 9]
    );

    // Bad records: refused, with nothing of the batch written.
    let before = exported(&store, SnapshotSelection::all()).await;
    for (bad, field) in [
        (snap("Bad-1", 1, 1, "{not json"), "state"),
        (snap("Bad-1", 0, 1, "{}"), "version"),
        (snap("Bad-1", 1, u32::MAX, "{}"), "schema_version"),
    ] {
        let good = SnapshotRecord::new(snap("Bad-2", 1, 1, "{}"), at(2));
        let e = store
            .import_snapshots(vec![good, SnapshotRecord::new(bad.clone(), at(2))])
            .await
            .unwrap_err();
        assert_eq!(invalid_field(&e), field);
        let e = store.save_snapshot(bad).await.unwrap_err();
        assert_eq!(invalid_field(&e), field, "save refuses it too");
    }
    assert_eq!(exported(&store, SnapshotSelection::all()).await, before);

    // Bad lines: the line number and the reason, nothing of the batch.
    let good_line = SnapshotRecord::new(snap("Line-1", 1, 1, "{}"), at(3))
        .to_ndjson()
        .unwrap();
    for (line, says) in [
        ("{\"format\":\"keel.snapshot\"", "line 2"),
        ("[1,2]", "not a snapshot record"),
        (
            &good_line.replace("\"format_version\":1", "\"format_version\":99"),
            "format_version: 99 is not supported",
        ),
        (
            &good_line.replace("keel.snapshot", "something.else"),
            "format",
        ),
        (&good_line.replace("\"Line-1\"", "\"\""), "line 2"),
        (
            &good_line.replace("\"version\":1", "\"version\":0"),
            "version",
        ),
        ("\u{0}\u{1}", "line 2"),
    ] {
        let input = format!("{good_line}\n{line}\n");
        let e = import_ndjson(&store, &mut input.as_bytes(), 100)
            .await
            .unwrap_err();
        let EventStoreError::Invalid(inv) = &e else {
            panic!("expected Invalid for {line:?}, got {e:?}");
        };
        assert!(
            inv.reason.starts_with("line 2") && inv.reason.contains(says),
            "{line:?}: {}",
            inv.reason
        );
    }
    let not_utf8 = [good_line.as_bytes(), b"\n\xff\xfe\n"].concat();
    let e = import_ndjson(&store, &mut not_utf8.as_slice(), 100)
        .await
        .unwrap_err();
    assert_eq!(invalid_field(&e), "snapshot line");
    assert_eq!(exported(&store, SnapshotSelection::all()).await, before);
}

/// Pruning by count per stream, by age and by stream prefix; the newest
/// snapshot of a stream goes only when asked; loads see the newest that is
/// left; pruning while writers save never loses a stream's newest snapshot.
pub async fn snapshot_retention_policy<S: Subject>(store: S) {
    let mut records = Vec::new();
    for v in 1..=5 {
        records.push(SnapshotRecord::new(
            snap("RetA-1", v, 1, "{}"),
            at(v as u32),
        ));
    }
    for v in 1..=3 {
        records.push(SnapshotRecord::new(
            snap("RetB-1", v, 1, "{}"),
            at(10 + v as u32),
        ));
    }
    records.push(SnapshotRecord::new(snap("RetC-1", 1, 1, "{}"), at(1)));
    store.import_snapshots(records).await.unwrap();

    // Deleting newest snapshots must be asked for.
    let e = store
        .prune_snapshots(&SnapshotRetention::keep_latest(0))
        .await
        .unwrap_err();
    assert_eq!(invalid_field(&e), "keep_latest");
    assert_eq!(exported(&store, SnapshotSelection::all()).await.len(), 9);

    // By count, one category: RetA keeps its three newest.
    let n = store
        .prune_snapshots(&SnapshotRetention::keep_latest(3).stream_prefix("RetA-"))
        .await
        .unwrap();
    assert_eq!(n, 2);
    let all = exported(&store, SnapshotSelection::all()).await;
    assert_eq!(versions_of(&all, "RetA-1"), vec![3, 4, 5]);
    assert_eq!(versions_of(&all, "RetB-1"), vec![1, 2, 3]);

    // By age: older than day 12, but never a stream's newest.
    let n = store
        .prune_snapshots(&SnapshotRetention::keep_latest(1).taken_before(at(12)))
        .await
        .unwrap();
    assert_eq!(n, 3, "RetA 3 and 4, RetB 1");
    let all = exported(&store, SnapshotSelection::all()).await;
    assert_eq!(versions_of(&all, "RetA-1"), vec![5]);
    assert_eq!(versions_of(&all, "RetB-1"), vec![2, 3]);
    assert_eq!(
        versions_of(&all, "RetC-1"),
        vec![1],
        "the newest stays however old"
    );
    // A relative age works the same way (everything here is years old).
    let n = store
        .prune_snapshots(&SnapshotRetention::keep_latest(1).older_than(Duration::from_secs(86_400)))
        .await
        .unwrap();
    assert_eq!(n, 1, "RetB 2");
    // Nothing is young enough to be spared by age except by count.
    let n = store
        .prune_snapshots(
            &SnapshotRetention::keep_latest(1).older_than(Duration::from_secs(86_400 * 365 * 100)),
        )
        .await
        .unwrap();
    assert_eq!(n, 0);

    // The newest too, when asked, for one category: loads then find none.
    let n = store
        .prune_snapshots(
            &SnapshotRetention::keep_latest(0)
                .including_newest()
                .stream_prefix("RetB-"),
        )
        .await
        .unwrap();
    assert_eq!(n, 1);
    assert!(store.load_snapshot(&sid("RetB-1")).await.unwrap().is_none());
    assert_eq!(
        store
            .load_snapshot(&sid("RetA-1"))
            .await
            .unwrap()
            .unwrap()
            .version,
        Version::new(5)
    );

    // Writers save ever newer snapshots while a pruner keeps one per
    // stream: no stream ever loses its newest.
    let streams = 4u64;
    let saves = 30u64;
    let writers: Vec<_> = (0..streams)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                for v in 1..=saves {
                    store
                        .save_snapshot(snap(
                            &format!("RetLive-{i}"),
                            v,
                            1,
                            &format!("{{\"v\":{v}}}"),
                        ))
                        .await
                        .expect("save while pruning");
                    let newest = store
                        .load_snapshot(&sid(&format!("RetLive-{i}")))
                        .await
                        .expect("load while pruning")
                        .expect("a snapshot is always there");
                    assert_eq!(newest.version, Version::new(v), "lost the newest snapshot");
                }
            })
        })
        .collect();
    let pruner = {
        let store = store.clone();
        tokio::spawn(async move {
            for _ in 0..20 {
                store
                    .prune_snapshots(&SnapshotRetention::keep_latest(1).stream_prefix("RetLive-"))
                    .await
                    .expect("prune while saving");
                tokio::task::yield_now().await;
            }
        })
    };
    for w in writers {
        w.await.expect("writer");
    }
    pruner.await.expect("pruner");
    store
        .prune_snapshots(&SnapshotRetention::keep_latest(1).stream_prefix("RetLive-"))
        .await
        .unwrap();
    let live = exported(&store, SnapshotSelection::all().stream_prefix("RetLive-")).await;
    assert_eq!(live.len() as u64, streams);
    assert!(
        live.iter()
            .all(|r| r.snapshot.version == Version::new(saves))
    );
}
