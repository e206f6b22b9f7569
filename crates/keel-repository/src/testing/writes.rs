//! Contract tests of the write operations: insert, update, upsert, soft
//! and hard delete, and what each refuses.

use super::*;

/// Insert stores version 1 and the clock's time; get returns every column
/// exactly as written (timestamps at microsecond precision).
pub async fn insert_then_get(h: Harness) {
    let mut g = gadget("a", "Anvil", 300);
    g.category = Some("tools".into());
    g.released = "2026-02-03T04:05:06.987654321Z".parse().unwrap();
    g.rating = -0.25;
    let stored = h.repo.insert(g.clone()).await.unwrap();
    assert_eq!(stored.version, Version::new(1));
    assert_eq!(stored.created_at, h.now());
    assert_eq!(stored.updated_at, h.now());
    assert_eq!(stored.deleted_at, None);
    g.released = "2026-02-03T04:05:06.987654Z".parse().unwrap();
    assert_eq!(stored.entity, g);

    let got = h.repo.get(&"a".to_owned()).await.unwrap().unwrap();
    assert_eq!(got, stored);
    assert!(h.repo.get(&"b".to_owned()).await.unwrap().is_none());
    assert!(h.repo.exists(&"a".to_owned()).await.unwrap());
    assert!(!h.repo.exists(&"b".to_owned()).await.unwrap());
}

/// A taken id is `AlreadyExists` and leaves the stored entity untouched.
pub async fn duplicate_id_is_already_exists(h: Harness) {
    h.repo.insert(gadget("a", "first", 1)).await.unwrap();
    let err = h.repo.insert(gadget("a", "second", 2)).await.unwrap_err();
    assert!(matches!(err, Error::AlreadyExists { .. }), "{err:?}");
    let got = h.repo.get(&"a".to_owned()).await.unwrap().unwrap();
    assert_eq!(got.entity.name, "first");
    assert_eq!(got.version, Version::new(1));
    // Soft-deleted ids are still taken.
    h.repo
        .soft_delete(&"a".to_owned(), Version::new(1))
        .await
        .unwrap();
    let err = h.repo.insert(gadget("a", "third", 3)).await.unwrap_err();
    assert!(matches!(err, Error::AlreadyExists { .. }), "{err:?}");
}

/// A batch with one taken or repeated id writes nothing.
pub async fn insert_many_is_all_or_nothing(h: Harness) {
    assert!(h.repo.insert_many(Vec::new()).await.unwrap().is_empty());
    h.repo.insert(gadget("b", "taken", 1)).await.unwrap();
    let batch = vec![
        gadget("a", "x", 1),
        gadget("b", "y", 2),
        gadget("c", "z", 3),
    ];
    let err = h.repo.insert_many(batch).await.unwrap_err();
    assert!(matches!(err, Error::AlreadyExists { .. }), "{err:?}");
    let repeated = vec![gadget("d", "x", 1), gadget("d", "y", 2)];
    let err = h.repo.insert_many(repeated).await.unwrap_err();
    assert!(matches!(err, Error::AlreadyExists { .. }), "{err:?}");
    assert_eq!(h.repo.count(&[], Deleted::Include).await.unwrap(), 1);
    assert!(h.repo.get(&"a".to_owned()).await.unwrap().is_none());

    let batch: Vec<Gadget> = (0..1_500)
        .map(|i| gadget(&format!("m{i:04}"), "many", i))
        .collect();
    let stored = h.repo.insert_many(batch.clone()).await.unwrap();
    assert_eq!(stored.len(), 1_500);
    for (s, g) in stored.iter().zip(&batch) {
        assert_eq!(s.entity.id, g.id, "results come back in input order");
        assert_eq!(s.version, Version::new(1));
    }
    assert_eq!(h.repo.count(&[], Deleted::Exclude).await.unwrap(), 1_501);
}

/// `get_many` keeps the order of first mention and skips missing and
/// soft-deleted ids.
pub async fn get_many_keeps_order_and_skips(h: Harness) {
    seed(&h, 5).await;
    h.repo
        .soft_delete(&"g003".to_owned(), Version::new(1))
        .await
        .unwrap();
    let want: Vec<String> = ["g004", "nope", "g001", "g003", "g004", "g000"]
        .map(String::from)
        .to_vec();
    let got = h.repo.get_many(&want).await.unwrap();
    assert_eq!(ids(&got), ["g004", "g001", "g000"]);
    assert!(h.repo.get_many(&[]).await.unwrap().is_empty());
}

/// Update replaces the entity, bumps the version and `updated_at`, keeps
/// `created_at`.
pub async fn update_bumps_version_and_updated_at(h: Harness) {
    let created = h.repo.insert(gadget("a", "before", 1)).await.unwrap();
    h.clock.advance(Duration::milliseconds(1500));
    let mut g = created.entity.clone();
    g.name = "after".into();
    g.category = Some("new".into());
    let updated = h.repo.update(g.clone(), Version::new(1)).await.unwrap();
    assert_eq!(updated.version, Version::new(2));
    assert_eq!(updated.entity, g);
    assert_eq!(updated.created_at, created.created_at);
    assert_eq!(updated.updated_at, h.now());
    assert!(updated.updated_at > created.updated_at);
    assert_eq!(h.repo.get(&"a".to_owned()).await.unwrap().unwrap(), updated);
}

/// A stale version is a structured conflict and nothing is written.
pub async fn stale_writes_are_conflicts(h: Harness) {
    let s = h.repo.insert(gadget("a", "v1", 1)).await.unwrap();
    let mut g = s.entity.clone();
    g.name = "v2".into();
    h.repo.update(g.clone(), Version::new(1)).await.unwrap();
    g.name = "stale".into();
    let id = "a".to_owned();
    for err in [
        h.repo.update(g.clone(), Version::new(1)).await.unwrap_err(),
        h.repo.update(g.clone(), Version::new(7)).await.unwrap_err(),
        h.repo
            .update(g.clone(), Version::new(u64::MAX))
            .await
            .unwrap_err(),
        h.repo.soft_delete(&id, Version::new(1)).await.unwrap_err(),
        h.repo.hard_delete(&id, Version::new(1)).await.unwrap_err(),
    ] {
        let (expected, actual) = conflict(&err);
        assert!(matches!(expected, ExpectedVersion::Exact(v) if v != Version::new(2)));
        assert_eq!(actual, Version::new(2));
    }
    let now = h.repo.get(&id).await.unwrap().unwrap();
    assert_eq!(now.entity.name, "v2");
    assert_eq!(now.version, Version::new(2));
}

/// Writes to an id that does not exist are `NotFound`.
pub async fn missing_entities_are_not_found(h: Harness) {
    let id = "ghost".to_owned();
    let v = Version::new(1);
    for err in [
        h.repo.update(gadget("ghost", "x", 1), v).await.unwrap_err(),
        h.repo.soft_delete(&id, v).await.unwrap_err(),
        h.repo.restore(&id, v).await.unwrap_err(),
        h.repo.hard_delete(&id, v).await.unwrap_err(),
    ] {
        assert!(matches!(err, Error::NotFound { .. }), "{err:?}");
    }
    assert_eq!(h.repo.count(&[], Deleted::Include).await.unwrap(), 0);
}

/// Upsert inserts at version 1, then replaces and bumps, and revives a
/// soft-deleted entity.
pub async fn upsert_inserts_then_replaces(h: Harness) {
    let first = h.repo.upsert(gadget("a", "one", 1)).await.unwrap();
    assert_eq!(first.version, Version::new(1));
    h.clock.advance(Duration::seconds(1));
    let second = h.repo.upsert(gadget("a", "two", 2)).await.unwrap();
    assert_eq!(second.version, Version::new(2));
    assert_eq!(second.entity.name, "two");
    assert_eq!(second.created_at, first.created_at);
    assert_eq!(second.updated_at, h.now());
    h.repo
        .soft_delete(&"a".to_owned(), Version::new(2))
        .await
        .unwrap();
    let revived = h.repo.upsert(gadget("a", "three", 3)).await.unwrap();
    assert_eq!(revived.version, Version::new(4));
    assert_eq!(revived.deleted_at, None);
    assert!(h.repo.exists(&"a".to_owned()).await.unwrap());
}

/// Soft-deleted entities disappear from every read unless asked for.
pub async fn soft_delete_hides_everywhere(h: Harness) {
    seed(&h, 6).await;
    let id = "g002".to_owned();
    h.clock.advance(Duration::seconds(3));
    let deleted = h.repo.soft_delete(&id, Version::new(1)).await.unwrap();
    assert_eq!(deleted.version, Version::new(2));
    assert_eq!(deleted.deleted_at, Some(h.now()));
    assert_eq!(deleted.updated_at, h.now());

    assert!(h.repo.get(&id).await.unwrap().is_none());
    assert!(!h.repo.exists(&id).await.unwrap());
    assert_eq!(h.repo.count(&[], Deleted::Exclude).await.unwrap(), 5);
    assert_eq!(h.repo.count(&[], Deleted::Include).await.unwrap(), 6);
    assert_eq!(h.repo.count(&[], Deleted::Only).await.unwrap(), 1);
    let live = h
        .repo
        .list(&ListQuery::new(PageRequest::offset(1, 100)))
        .await
        .unwrap();
    assert!(!ids(&live.items).contains(&id));
    assert_eq!(live.total, Some(5));
    let all = h
        .repo
        .list(&ListQuery::new(PageRequest::first(100)).with_deleted())
        .await
        .unwrap();
    assert!(ids(&all.items).contains(&id));
    let trash = h
        .repo
        .list(&ListQuery::new(PageRequest::first(100)).only_deleted())
        .await
        .unwrap();
    assert_eq!(ids(&trash.items), std::slice::from_ref(&id));
    assert_eq!(
        h.repo.get_including_deleted(&id).await.unwrap().unwrap(),
        deleted
    );

    // A deleted entity is not there for updates or a second delete.
    let err = h
        .repo
        .update(deleted.entity.clone(), Version::new(2))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err:?}");
    let err = h.repo.soft_delete(&id, Version::new(2)).await.unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err:?}");
}

/// Restore checks the version, and refuses a live entity.
pub async fn restore_brings_back(h: Harness) {
    seed(&h, 2).await;
    let id = "g001".to_owned();
    let err = h.repo.restore(&id, Version::new(1)).await.unwrap_err();
    assert_eq!(invalid_field(&err), "id", "restoring a live entity");
    h.repo.soft_delete(&id, Version::new(1)).await.unwrap();
    let (_, actual) = conflict(&h.repo.restore(&id, Version::new(1)).await.unwrap_err());
    assert_eq!(actual, Version::new(2));
    h.clock.advance(Duration::seconds(1));
    let restored = h.repo.restore(&id, Version::new(2)).await.unwrap();
    assert_eq!(restored.version, Version::new(3));
    assert_eq!(restored.deleted_at, None);
    assert_eq!(restored.updated_at, h.now());
    assert!(h.repo.exists(&id).await.unwrap());
}

/// Hard delete removes live or soft-deleted entities for good, with a
/// version check.
pub async fn hard_delete_is_explicit(h: Harness) {
    seed(&h, 3).await;
    let a = "g000".to_owned();
    let b = "g001".to_owned();
    h.repo.hard_delete(&a, Version::new(1)).await.unwrap();
    assert!(h.repo.get_including_deleted(&a).await.unwrap().is_none());
    h.repo.soft_delete(&b, Version::new(1)).await.unwrap();
    h.repo.hard_delete(&b, Version::new(2)).await.unwrap();
    assert!(h.repo.get_including_deleted(&b).await.unwrap().is_none());
    assert_eq!(h.repo.count(&[], Deleted::Include).await.unwrap(), 1);
    let err = h.repo.hard_delete(&a, Version::new(1)).await.unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err:?}");
    // The id is free again.
    let again = h.repo.insert(gadget("g000", "again", 1)).await.unwrap();
    assert_eq!(again.version, Version::new(1));
}
