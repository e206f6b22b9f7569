//! Contract tests of units of work: `within(tx)` writes commit or roll back
//! with the transaction, its reads see its own writes, nobody else sees
//! them before commit, and conflicts are typed the same everywhere.

use super::*;

fn key(id: &str) -> String {
    id.to_owned()
}

/// Writes through `within(tx)` are seen inside the transaction at once,
/// by nobody outside before commit, and by everybody after.
pub async fn a_unit_of_work_commits_together(h: Harness) {
    let old = h.repo.insert(gadget("old", "before", 1)).await.unwrap();
    h.repo.insert(gadget("gone", "x", 2)).await.unwrap();
    let mut tx = h.transactions.begin().await.unwrap();
    {
        let repo = h.repo.within(&mut *tx);
        repo.insert(gadget("new", "fresh", 3)).await.unwrap();
        let mut changed = old.entity.clone();
        changed.name = "after".into();
        let updated = repo.update(changed, old.version).await.unwrap();
        assert_eq!(updated.version, Version::new(2));
        repo.soft_delete(&key("gone"), Version::new(1))
            .await
            .unwrap();
        // Inside: every read sees the unit's own writes.
        assert!(repo.exists(&key("new")).await.unwrap());
        assert_eq!(
            repo.get(&key("old")).await.unwrap().unwrap().entity.name,
            "after"
        );
        assert!(repo.get(&key("gone")).await.unwrap().is_none());
        assert_eq!(repo.count(&[], Deleted::Exclude).await.unwrap(), 2);
        let page = repo
            .list(&ListQuery::new(PageRequest::first(10)).filter(Filter::eq("name", "after")))
            .await
            .unwrap();
        assert_eq!(ids(&page.items), ["old"]);
        assert_eq!(
            repo.get_many(&[key("new"), key("old")])
                .await
                .unwrap()
                .len(),
            2
        );
    }
    // Outside, before commit: nothing.
    assert!(!h.repo.exists(&key("new")).await.unwrap());
    assert_eq!(
        h.repo.get(&key("old")).await.unwrap().unwrap().version,
        Version::new(1)
    );
    assert!(h.repo.exists(&key("gone")).await.unwrap());
    tx.commit().await.unwrap();
    // After: everything.
    assert!(h.repo.exists(&key("new")).await.unwrap());
    let now = h.repo.get(&key("old")).await.unwrap().unwrap();
    assert_eq!(
        (now.entity.name.as_str(), now.version),
        ("after", Version::new(2))
    );
    assert!(!h.repo.exists(&key("gone")).await.unwrap());
}

/// A rolled-back unit leaves no trace, whatever it wrote.
pub async fn a_rolled_back_unit_leaves_nothing(h: Harness) {
    let kept = h.repo.insert(gadget("kept", "k", 1)).await.unwrap();
    let mut tx = h.transactions.begin().await.unwrap();
    {
        let repo = h.repo.within(&mut *tx);
        repo.insert_many(
            (0..50)
                .map(|i| gadget(&format!("b{i:02}"), "y", i))
                .collect(),
        )
        .await
        .unwrap();
        repo.update(gadget("kept", "changed", 9), kept.version)
            .await
            .unwrap();
        repo.upsert(gadget("up", "u", 1)).await.unwrap();
        repo.hard_delete(&key("b00"), Version::new(1))
            .await
            .unwrap();
        assert_eq!(repo.count(&[], Deleted::Include).await.unwrap(), 51);
    }
    tx.rollback().await.unwrap();
    assert_eq!(h.repo.count(&[], Deleted::Include).await.unwrap(), 1);
    let after = h.repo.get(&key("kept")).await.unwrap().unwrap();
    assert_eq!(after, kept);
}

/// Version conflicts, not-found and not-deleted answers inside a unit are
/// the same typed errors as outside, and leave the unit usable.
pub async fn answers_inside_a_unit_are_typed(h: Harness) {
    let stored = h.repo.insert(gadget("a", "x", 1)).await.unwrap();
    let mut tx = h.transactions.begin().await.unwrap();
    {
        let repo = h.repo.within(&mut *tx);
        let err = repo
            .update(stored.entity.clone(), Version::new(9))
            .await
            .unwrap_err();
        assert_eq!(
            conflict(&err),
            (ExpectedVersion::Exact(Version::new(9)), Version::new(1))
        );
        let err = repo.restore(&key("zz"), Version::new(1)).await.unwrap_err();
        assert!(matches!(err, Error::NotFound { .. }), "{err:?}");
        let err = repo.restore(&key("a"), Version::new(1)).await.unwrap_err();
        assert_eq!(invalid_field(&err), "id");
        // Still usable: the answers were answers, not failed statements.
        repo.update(stored.entity.clone(), Version::new(1))
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
    assert_eq!(
        h.repo.get(&key("a")).await.unwrap().unwrap().version,
        Version::new(2)
    );
}

/// A taken id inside a unit is `AlreadyExists`, and like a failed
/// statement in PostgreSQL it aborts the unit: the commit fails and
/// nothing of it is stored.
pub async fn a_refused_write_aborts_the_unit(h: Harness) {
    h.repo.insert(gadget("a", "x", 1)).await.unwrap();
    let mut tx = h.transactions.begin().await.unwrap();
    {
        let repo = h.repo.within(&mut *tx);
        repo.insert(gadget("b", "y", 2)).await.unwrap();
        let err = repo.insert(gadget("a", "again", 3)).await.unwrap_err();
        assert!(matches!(err, Error::AlreadyExists { .. }), "{err:?}");
    }
    assert!(tx.commit().await.is_err(), "an aborted unit cannot commit");
    assert!(!h.repo.exists(&key("b")).await.unwrap());
    assert_eq!(
        h.repo.get(&key("a")).await.unwrap().unwrap().entity.name,
        "x"
    );
}

/// 8 tasks run 20 units each, every one reading a shared entity and
/// updating it with the version it read; every fifth unit rolls back.
/// Afterwards each entity's version is 1 + its committed updates and its
/// counter equals them: no update lost, none applied twice, none from a
/// rolled-back unit.
pub async fn concurrent_units_lose_no_update(h: Harness) {
    const ENTITIES: usize = 3;
    const TASKS: usize = 8;
    const UNITS: usize = 20;
    for e in 0..ENTITIES {
        h.repo
            .insert(gadget(&format!("shared{e}"), "s", 0))
            .await
            .unwrap();
    }
    let handles: Vec<_> = (0..TASKS)
        .map(|t| {
            let h = h.clone();
            tokio::spawn(async move {
                let mut committed = [0i64; ENTITIES];
                for u in 0..UNITS {
                    let e = (t + u) % ENTITIES;
                    let id = format!("shared{e}");
                    let mut tx = h.transactions.begin().await.unwrap();
                    let updated = {
                        let repo = h.repo.within(&mut *tx);
                        let cur = repo.get(&id).await.unwrap().unwrap();
                        let mut g = cur.entity.clone();
                        g.price += 1;
                        g.name = format!("task{t}-unit{u}");
                        repo.update(g, cur.version).await
                    };
                    match updated {
                        Ok(_) if u % 5 == 4 => tx.rollback().await.unwrap(),
                        Ok(_) => match tx.commit().await {
                            Ok(()) => committed[e] += 1,
                            Err(Error::Conflict(_) | Error::TransactionConflict { .. }) => {}
                            Err(other) => panic!("commit: {other:?}"),
                        },
                        Err(Error::Conflict(_)) => tx.rollback().await.unwrap(),
                        Err(other) => panic!("update: {other:?}"),
                    }
                }
                committed
            })
        })
        .collect();
    let mut committed = [0i64; ENTITIES];
    for handle in handles {
        for (total, n) in committed.iter_mut().zip(handle.await.expect("task")) {
            *total += n;
        }
    }
    assert!(committed.iter().sum::<i64>() > 0, "some units committed");
    for (e, n) in committed.iter().enumerate() {
        let now = h.repo.get(&format!("shared{e}")).await.unwrap().unwrap();
        assert_eq!(
            now.entity.price, *n,
            "shared{e}: every committed update, once"
        );
        assert_eq!(
            now.version,
            Version::new(1 + u64::try_from(*n).unwrap_or_default()),
            "shared{e}"
        );
    }
}
