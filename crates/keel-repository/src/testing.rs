//! The contract suite every implementation of the entity repository port
//! must pass (feature `testing`).
//!
//! Each function takes a [`Harness`] (a fresh, empty repository of
//! [`Gadget`]s and the clock it takes timestamps from) and panics when the
//! implementation misbehaves. Run the whole suite with [`contract_suite!`]:
//!
//! ```ignore
//! keel_repository::contract_suite!(|| async {
//!     let clock = Arc::new(ManualClock::at(keel_repository::testing::EPOCH.parse().unwrap()));
//!     let repo = InMemoryRepository::<Gadget>::new().unwrap().with_clock(clock.clone());
//!     (Harness::new(repo, clock), ())
//! });
//! ```
//!
//! [`contract_suite!`]: crate::contract_suite

use std::collections::BTreeSet;
use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use keel_core::{
    Clock, Cursor, Deleted, Direction, Entity, EntityRepository, Error, ExpectedVersion, Filter,
    ListQuery, ManualClock, Page, PageRequest, Stored, Version,
};
use uuid::Uuid;

use crate::{Column, ColumnType, Mapped, Mapping, Result, Row, RowWriter, Value};

/// Where the harness clock starts; nanoseconds on purpose, to show they are
/// truncated to microseconds.
pub const EPOCH: &str = "2026-03-01T12:00:00.123456789Z";

/// The entity the suite stores: one column of every supported type.
#[derive(Clone, Debug, PartialEq)]
pub struct Gadget {
    /// Text id (so injection strings can be ids).
    pub id: String,
    /// Filterable, sortable text.
    pub name: String,
    /// Nullable, filterable text.
    pub category: Option<String>,
    /// Filterable, sortable `BIGINT`.
    pub price: i64,
    /// Filterable, sortable `DOUBLE PRECISION`.
    pub rating: f64,
    /// Filterable, sortable `INTEGER`.
    pub stock: i32,
    /// Filterable boolean.
    pub active: bool,
    /// Filterable, sortable UUID.
    pub sku: Uuid,
    /// Filterable, sortable timestamp.
    pub released: DateTime<Utc>,
    /// A JSON document, stored only.
    pub specs: serde_json::Value,
}

impl Entity for Gadget {
    type Id = String;
    const NAME: &'static str = "gadget";

    fn id(&self) -> &String {
        &self.id
    }
}

impl Mapped for Gadget {
    fn mapping() -> Mapping {
        use ColumnType as T;
        Mapping::new("gadgets")
            .id("id", T::Text)
            .column(Column::new("name", T::Text).filterable().sortable())
            .column(Column::new("category", T::Text).nullable().filterable())
            .column(Column::new("price", T::I64).filterable().sortable())
            .column(Column::new("rating", T::F64).filterable().sortable())
            .column(Column::new("stock", T::I32).filterable().sortable())
            .column(Column::new("active", T::Bool).filterable())
            .column(Column::new("sku", T::Uuid).filterable().sortable())
            .column(
                Column::new("released", T::Timestamp)
                    .filterable()
                    .sortable(),
            )
            .column(Column::new("specs", T::Json))
    }

    fn id_value(id: &String) -> Value {
        id.into()
    }

    fn write(&self, row: &mut RowWriter<'_>) {
        row.set("id", &self.id)
            .set("name", &self.name)
            .set("category", self.category.clone())
            .set("price", self.price)
            .set("rating", self.rating)
            .set("stock", self.stock)
            .set("active", self.active)
            .set("sku", self.sku)
            .set("released", self.released)
            .set("specs", self.specs.clone());
    }

    fn read(row: &mut Row<'_>) -> Result<Self> {
        Ok(Gadget {
            id: row.get("id")?,
            name: row.get("name")?,
            category: row.get("category")?,
            price: row.get("price")?,
            rating: row.get("rating")?,
            stock: row.get("stock")?,
            active: row.get("active")?,
            sku: row.get("sku")?,
            released: row.get("released")?,
            specs: row.get("specs")?,
        })
    }
}

/// A gadget with defaults derived from its id, name and price.
pub fn gadget(id: &str, name: &str, price: i64) -> Gadget {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(id.as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    let seed = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    Gadget {
        id: id.to_owned(),
        name: name.to_owned(),
        category: None,
        price,
        rating: f64::from(seed % 50) / 10.0,
        stock: i32::try_from(seed % 100).unwrap_or(0),
        active: seed % 2 == 0,
        sku: Uuid::from_bytes(bytes),
        released: "2025-01-01T00:00:00Z"
            .parse::<DateTime<Utc>>()
            .unwrap_or_default()
            + Duration::seconds(price),
        specs: serde_json::json!({ "id": id, "tags": ["a", "b"] }),
    }
}

/// One repository under test and the clock it was given.
#[derive(Clone)]
pub struct Harness {
    /// The repository, empty.
    pub repo: Arc<dyn EntityRepository<Gadget>>,
    /// The clock the repository takes timestamps from.
    pub clock: Arc<ManualClock>,
}

impl std::fmt::Debug for Harness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Harness").finish_non_exhaustive()
    }
}

impl Harness {
    /// Wraps a repository and its clock.
    pub fn new(repo: impl EntityRepository<Gadget> + 'static, clock: Arc<ManualClock>) -> Self {
        Self {
            repo: Arc::new(repo),
            clock,
        }
    }

    fn now(&self) -> DateTime<Utc> {
        crate::value::truncate_micros(self.clock.now())
    }
}

/// The clock a harness should start with.
pub fn clock() -> Arc<ManualClock> {
    Arc::new(ManualClock::at(EPOCH.parse().unwrap_or_default()))
}

fn conflict(e: &Error) -> (ExpectedVersion, Version) {
    match e {
        Error::Conflict(c) => (c.expected, c.actual),
        other => panic!("expected a version conflict, got {other:?}"),
    }
}

fn invalid_field(e: &Error) -> String {
    match e {
        Error::Invalid(i) => i.field.to_string(),
        other => panic!("expected invalid input, got {other:?}"),
    }
}

fn ids(page: &[Stored<Gadget>]) -> Vec<String> {
    page.iter().map(|s| s.entity.id.clone()).collect()
}

async fn seed(h: &Harness, n: usize) -> Vec<Gadget> {
    let gadgets: Vec<Gadget> = (0..n)
        .map(|i| {
            let mut g = gadget(
                &format!("g{i:03}"),
                &format!("name-{}", i % 7),
                i64::try_from(i % 10).unwrap_or(0) * 100,
            );
            g.category = (i % 3 == 0).then(|| "tools".to_owned());
            g
        })
        .collect();
    h.repo.insert_many(gadgets.clone()).await.expect("seed");
    gadgets
}

async fn all_pages(h: &Harness, query: ListQuery, size: u32) -> Vec<String> {
    let mut out = Vec::new();
    let mut after: Option<Cursor> = None;
    loop {
        let page = h
            .repo
            .list(&query.clone().with_page(PageRequest::Keyset {
                after: after.clone(),
                size,
            }))
            .await
            .expect("keyset page");
        assert!(page.items.len() <= size as usize);
        assert_eq!(page.total, None, "keyset pages carry no total");
        out.extend(ids(&page.items));
        match page.next {
            Some(c) => after = Some(c),
            None => return out,
        }
    }
}

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

/// Many writers expecting the same version: exactly one wins.
pub async fn concurrent_writers_one_winner(h: Harness) {
    h.repo.insert(gadget("hot", "start", 0)).await.unwrap();
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let repo = Arc::clone(&h.repo);
            tokio::spawn(async move {
                let mut g = gadget("hot", &format!("writer-{i}"), i);
                g.stock = i32::try_from(i).unwrap_or(0);
                repo.update(g, Version::new(1)).await
            })
        })
        .collect();
    let mut winners = Vec::new();
    let mut conflicts = 0;
    for t in tasks {
        match t.await.expect("task") {
            Ok(s) => winners.push(s),
            Err(e) => {
                assert_eq!(conflict(&e).1, Version::new(2));
                conflicts += 1;
            }
        }
    }
    assert_eq!(winners.len(), 1, "exactly one winner");
    assert_eq!(conflicts, 15);
    let now = h.repo.get(&"hot".to_owned()).await.unwrap().unwrap();
    assert_eq!(now.version, Version::new(2));
    assert_eq!(
        now.entity, winners[0].entity,
        "the winner's write is stored"
    );
}

/// Read-modify-write loops that retry on conflict lose no update.
pub async fn retries_lose_no_update(h: Harness) {
    h.repo.insert(gadget("counter", "c", 0)).await.unwrap();
    let (tasks, each) = (8, 5);
    let handles: Vec<_> = (0..tasks)
        .map(|_| {
            let repo = Arc::clone(&h.repo);
            tokio::spawn(async move {
                let id = "counter".to_owned();
                let mut conflicts = 0u32;
                for _ in 0..each {
                    loop {
                        let cur = repo.get(&id).await.unwrap().unwrap();
                        let mut g = cur.entity.clone();
                        g.price += 1;
                        match repo.update(g, cur.version).await {
                            Ok(_) => break,
                            Err(Error::Conflict(_)) => conflicts += 1,
                            Err(e) => panic!("{e:?}"),
                        }
                    }
                }
                conflicts
            })
        })
        .collect();
    for t in handles {
        t.await.expect("task");
    }
    let end = h.repo.get(&"counter".to_owned()).await.unwrap().unwrap();
    assert_eq!(end.entity.price, tasks * each);
    assert_eq!(end.version, Version::new(1 + (tasks * each) as u64));
}

/// Equality, ranges, in-lists and prefixes on every filterable type.
pub async fn filters_select_exactly(h: Harness) {
    let all = seed(&h, 40).await;
    let check = |filters: Vec<Filter>, pred: &dyn Fn(&Gadget) -> bool| {
        let want: BTreeSet<String> = all
            .iter()
            .filter(|g| pred(g))
            .map(|g| g.id.clone())
            .collect();
        let h = h.clone();
        async move {
            let mut q = ListQuery::new(PageRequest::offset(1, 1000));
            for f in &filters {
                q = q.filter(f.clone());
            }
            let page = h.repo.list(&q).await.unwrap();
            let got: BTreeSet<String> = ids(&page.items).into_iter().collect();
            assert_eq!(got, want, "{filters:?}");
            assert_eq!(page.total, Some(want.len() as u64));
            assert_eq!(
                h.repo.count(&filters, Deleted::Exclude).await.unwrap(),
                want.len() as u64
            );
            assert!(
                !want.is_empty()
                    || filters
                        .iter()
                        .any(|f| matches!(f, Filter::In { values, .. } if values.is_empty()))
            );
        }
    };
    check(vec![Filter::eq("name", "name-3")], &|g| g.name == "name-3").await;
    check(vec![Filter::eq("category", "tools")], &|g| {
        g.category.as_deref() == Some("tools")
    })
    .await;
    check(vec![Filter::between("price", 200, 500)], &|g| {
        (200..=500).contains(&g.price)
    })
    .await;
    check(vec![Filter::at_least("rating", 2.5)], &|g| g.rating >= 2.5).await;
    check(vec![Filter::at_most("stock", 30)], &|g| g.stock <= 30).await;
    check(vec![Filter::eq("active", true)], &|g| g.active).await;
    check(vec![Filter::one_of("id", ["g001", "g017", "zzz"])], &|g| {
        ["g001", "g017"].contains(&g.id.as_str())
    })
    .await;
    check(vec![Filter::one_of("price", Vec::<i64>::new())], &|_| false).await;
    // An in-list on every other filterable type (one typed array parameter
    // each on PostgreSQL).
    let (a, b) = (&all[3], &all[11]);
    check(vec![Filter::one_of("price", [a.price, b.price])], &|g| {
        g.price == a.price || g.price == b.price
    })
    .await;
    check(vec![Filter::one_of("stock", [a.stock, b.stock])], &|g| {
        g.stock == a.stock || g.stock == b.stock
    })
    .await;
    check(vec![Filter::one_of("rating", [a.rating, b.rating])], &|g| {
        g.rating == a.rating || g.rating == b.rating
    })
    .await;
    check(vec![Filter::one_of("active", [false])], &|g| !g.active).await;
    check(vec![Filter::one_of("sku", [a.sku, b.sku])], &|g| {
        g.sku == a.sku || g.sku == b.sku
    })
    .await;
    check(
        vec![Filter::one_of("released", [a.released, b.released])],
        &|g| g.released == a.released || g.released == b.released,
    )
    .await;
    check(vec![Filter::one_of("category", ["tools"])], &|g| {
        g.category.as_deref() == Some("tools")
    })
    .await;
    check(vec![Filter::prefix("id", "g01")], &|g| {
        g.id.starts_with("g01")
    })
    .await;
    let sku = all[5].sku;
    check(vec![Filter::eq("sku", sku)], &|g| g.sku == sku).await;
    let t = all[7].released;
    check(vec![Filter::at_least("released", t)], &|g| g.released >= t).await;
    check(
        vec![
            Filter::prefix("name", "name-"),
            Filter::between("price", 100, 800),
            Filter::eq("category", "tools"),
        ],
        &|g| (100..=800).contains(&g.price) && g.category.is_some(),
    )
    .await;
    // Timestamps kept by the repository are filterable too.
    check(vec![Filter::at_most("created_at", h.now())], &|_| true).await;
}

/// `%`, `_` and `\` in a prefix match themselves only.
pub async fn prefix_is_literal(h: Harness) {
    let names = [
        "50% off",
        "500 units",
        "a_c",
        "abc",
        "back\\slash",
        "backXslash",
        "%",
        "_",
        "",
    ];
    let batch = names
        .iter()
        .enumerate()
        .map(|(i, n)| gadget(&format!("p{i}"), n, 1))
        .collect();
    h.repo.insert_many(batch).await.unwrap();
    for (prefix, want) in [
        ("50%", vec!["50% off"]),
        ("a_", vec!["a_c"]),
        ("back\\", vec!["back\\slash"]),
        ("%", vec!["%"]),
        ("_", vec!["_"]),
        ("", names.to_vec()),
        ("ABC", vec![]),
    ] {
        let page = h
            .repo
            .list(&ListQuery::new(PageRequest::first(100)).filter(Filter::prefix("name", prefix)))
            .await
            .unwrap();
        let got: BTreeSet<&str> = page.items.iter().map(|s| s.entity.name.as_str()).collect();
        assert_eq!(got, want.into_iter().collect(), "prefix {prefix:?}");
    }
}

/// SQL-injection strings in ids, filter values, prefixes and in-lists are
/// stored and matched as plain data.
pub async fn injection_strings_are_data(h: Harness) {
    let evil = [
        "'; DROP TABLE gadgets; --",
        "\" OR 1=1 --",
        "x' OR 'x'='x",
        "%",
        "_",
        "\\",
        "\\'; SELECT pg_sleep(10); --",
        "名前 ✓ 🚀",
        "$1",
        "?",
    ];
    let batch: Vec<Gadget> = evil
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let mut g = gadget(s, s, i64::try_from(i).unwrap_or(0));
            g.category = Some((*s).to_owned());
            g
        })
        .collect();
    h.repo.insert_many(batch).await.unwrap();
    h.repo.insert(gadget("plain", "plain", 99)).await.unwrap();
    for s in evil {
        let id = s.to_owned();
        let got = h
            .repo
            .get(&id)
            .await
            .unwrap()
            .expect("stored under its literal id");
        assert_eq!(got.entity.name, s);
        assert!(h.repo.exists(&id).await.unwrap());
        for f in [
            Filter::eq("name", s),
            Filter::eq("category", s),
            Filter::prefix("name", s),
            Filter::one_of("id", [s]),
        ] {
            let page = h
                .repo
                .list(&ListQuery::new(PageRequest::first(100)).filter(f.clone()))
                .await
                .unwrap();
            let matched = ids(&page.items);
            assert!(matched.contains(&id), "{f:?}");
            assert!(
                matched.iter().all(|m| m.starts_with(s)),
                "{f:?} matched {matched:?}"
            );
        }
        // Versioned writes with injection ids touch that row only.
        let mut g = got.entity.clone();
        g.price += 1000;
        h.repo.update(g, got.version).await.unwrap();
    }
    let moved = h
        .repo
        .count(&[Filter::at_least("price", 1000)], Deleted::Exclude)
        .await
        .unwrap();
    assert_eq!(moved, evil.len() as u64);
    // The table is still there, with every row.
    assert_eq!(
        h.repo.count(&[], Deleted::Exclude).await.unwrap(),
        evil.len() as u64 + 1
    );
    // A cursor made of an injection string is just a malformed cursor.
    let err = h
        .repo
        .list(&ListQuery::new(PageRequest::after(
            Cursor::new("'; DROP TABLE gadgets; --"),
            10,
        )))
        .await
        .unwrap_err();
    assert_eq!(invalid_field(&err), "cursor");
    assert_eq!(
        h.repo.count(&[], Deleted::Exclude).await.unwrap(),
        evil.len() as u64 + 1
    );
}

fn sorted(all: &[Gadget], cmp: impl Fn(&Gadget, &Gadget) -> std::cmp::Ordering) -> Vec<String> {
    let mut v = all.to_vec();
    v.sort_by(|a, b| cmp(a, b).then_with(|| a.id.as_bytes().cmp(b.id.as_bytes())));
    v.into_iter().map(|g| g.id).collect()
}

/// Several sort keys and directions, text in byte order, id as the last
/// tie-breaker.
pub async fn sorting_follows_declared_keys(h: Harness) {
    let mut all = seed(&h, 30).await;
    let extra = vec![
        gadget("u1", "Zebra", 5),
        gadget("u2", "apple", 5),
        gadget("u3", "Äpfel", 5),
    ];
    h.repo.insert_many(extra.clone()).await.unwrap();
    all.extend(extra);
    let q = ListQuery::new(PageRequest::offset(1, 1000))
        .sort_by("price", Direction::Desc)
        .sort_by("name", Direction::Asc);
    let got = ids(&h.repo.list(&q).await.unwrap().items);
    let want = sorted(&all, |a, b| {
        b.price
            .cmp(&a.price)
            .then_with(|| a.name.as_bytes().cmp(b.name.as_bytes()))
    });
    assert_eq!(got, want);

    let q = ListQuery::new(PageRequest::offset(1, 1000)).sort_by("rating", Direction::Desc);
    let got = ids(&h.repo.list(&q).await.unwrap().items);
    let want = sorted(&all, |a, b| b.rating.total_cmp(&a.rating));
    assert_eq!(got, want);

    let q = ListQuery::new(PageRequest::offset(1, 1000)).sort_by("id", Direction::Desc);
    let got = ids(&h.repo.list(&q).await.unwrap().items);
    let mut want = sorted(&all, |_, _| std::cmp::Ordering::Equal);
    want.reverse();
    assert_eq!(got, want);
}

/// Offset pages carry the total; a page past the end is empty.
pub async fn offset_pagination(h: Harness) {
    let all = seed(&h, 23).await;
    let want = sorted(&all, |a, b| a.price.cmp(&b.price));
    let mut got = Vec::new();
    for page in 1..=3 {
        let q = ListQuery::new(PageRequest::offset(page, 10)).sort_by("price", Direction::Asc);
        let p: Page<Stored<Gadget>> = h.repo.list(&q).await.unwrap();
        assert_eq!(p.total, Some(23));
        assert_eq!(p.next, None);
        assert_eq!(p.items.len(), if page < 3 { 10 } else { 3 });
        got.extend(ids(&p.items));
    }
    assert_eq!(got, want);
    let past = h
        .repo
        .list(&ListQuery::new(PageRequest::offset(9, 10)))
        .await
        .unwrap();
    assert!(past.items.is_empty());
    assert_eq!(past.total, Some(23));
}

/// Keyset pages walk every row once, in order, for one or mixed directions.
pub async fn keyset_pagination_walks_everything(h: Harness) {
    let all = seed(&h, 50).await;
    let q = ListQuery::new(PageRequest::first(1))
        .sort_by("price", Direction::Desc)
        .sort_by("name", Direction::Asc);
    let want = sorted(&all, |a, b| {
        b.price
            .cmp(&a.price)
            .then_with(|| a.name.as_bytes().cmp(b.name.as_bytes()))
    });
    assert_eq!(all_pages(&h, q, 7).await, want);

    let q = ListQuery::new(PageRequest::first(1)).sort_by("released", Direction::Desc);
    let want = sorted(&all, |a, b| b.released.cmp(&a.released));
    assert_eq!(all_pages(&h, q, 5).await, want);

    let q = ListQuery::new(PageRequest::first(1))
        .filter(Filter::eq("category", "tools"))
        .sort_by("stock", Direction::Asc);
    let tools: Vec<Gadget> = all
        .iter()
        .filter(|g| g.category.is_some())
        .cloned()
        .collect();
    let want = sorted(&tools, |a, b| a.stock.cmp(&b.stock));
    assert_eq!(all_pages(&h, q, 4).await, want);

    // Exactly one full page: no cursor to an empty page.
    let q = ListQuery::new(PageRequest::first(50));
    let p = h.repo.list(&q).await.unwrap();
    assert_eq!(p.items.len(), 50);
    assert!(p.next.is_none());
}

/// Rows inserted or deleted while a client pages never shift what it sees:
/// no row of the original set is skipped or repeated.
pub async fn keyset_is_stable_under_concurrent_writes(h: Harness) {
    seed(&h, 30).await;
    let q = ListQuery::new(PageRequest::first(10)).sort_by("name", Direction::Asc);
    let first = h.repo.list(&q).await.unwrap();
    let cursor = first.next.clone().expect("more pages");
    let last_seen = first.items.last().unwrap().entity.name.clone();
    // Rows sorting before and after the cursor arrive meanwhile.
    h.repo
        .insert_many(vec![
            gadget("n0", "aaa-before", 1),
            gadget("n1", "zzz-after", 1),
        ])
        .await
        .unwrap();
    let mut seen: Vec<String> = ids(&first.items);
    let mut after = Some(cursor);
    while let Some(c) = after {
        let p = h
            .repo
            .list(&q.clone().with_page(PageRequest::after(c, 10)))
            .await
            .unwrap();
        for s in &p.items {
            assert!(s.entity.name.as_bytes() >= last_seen.as_bytes());
        }
        seen.extend(ids(&p.items));
        after = p.next;
    }
    let unique: BTreeSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "no row twice");
    assert_eq!(seen.len(), 31, "30 originals and the row after the cursor");
    assert!(seen.contains(&"n1".to_owned()));
    assert!(!seen.contains(&"n0".to_owned()));
}

/// Every kind of bad input is a typed error naming what was wrong.
pub async fn bad_input_is_typed(h: Harness) {
    seed(&h, 12).await;
    let base = || ListQuery::new(PageRequest::first(5));
    let cases: Vec<(ListQuery, &str)> = vec![
        (base().sort_by("nope", Direction::Asc), "sort"),
        (base().sort_by("category", Direction::Asc), "sort"),
        (base().sort_by("specs", Direction::Asc), "sort"),
        (
            base()
                .sort_by("name", Direction::Asc)
                .sort_by("name", Direction::Desc),
            "sort",
        ),
        (base().filter(Filter::eq("nope", 1)), "filter"),
        (base().filter(Filter::eq("specs", "x")), "filter"),
        (base().filter(Filter::eq("price", "ten")), "filter"),
        (base().filter(Filter::eq("stock", i64::MAX)), "filter"),
        (base().filter(Filter::prefix("price", "1")), "filter"),
        (base().filter(Filter::eq("sku", "not-a-uuid")), "filter"),
        (base().filter(Filter::eq("released", "yesterday")), "filter"),
        (base().with_page(PageRequest::first(0)), "page"),
        (base().with_page(PageRequest::first(1001)), "page"),
        (base().with_page(PageRequest::offset(0, 10)), "page"),
        (base().with_page(PageRequest::offset(u64::MAX, 10)), "page"),
        (
            base().with_page(PageRequest::after(Cursor::new("garbage"), 5)),
            "cursor",
        ),
    ];
    for (q, field) in cases {
        let err = h.repo.list(&q).await.unwrap_err();
        assert_eq!(invalid_field(&err), field, "{q:?}: {err}");
    }
    assert!(
        h.repo
            .list(&base().with_page(PageRequest::first(1000)))
            .await
            .is_ok()
    );
    let err = h
        .repo
        .count(&[Filter::eq("nope", 1)], Deleted::Exclude)
        .await
        .unwrap_err();
    assert_eq!(invalid_field(&err), "filter");

    // Tampered and replayed cursors.
    let q = base().sort_by("price", Direction::Asc);
    let cursor = h.repo.list(&q).await.unwrap().next.expect("next page");
    let s = cursor.as_str();
    let flip = |i: usize| {
        let mut b = s.as_bytes().to_vec();
        b[i] = if b[i] == b'A' { b'B' } else { b'A' };
        Cursor::new(String::from_utf8(b).unwrap())
    };
    for bad in [flip(2), flip(s.len() - 2), Cursor::new(format!("{s}x"))] {
        let err = h
            .repo
            .list(&q.clone().with_page(PageRequest::after(bad, 5)))
            .await
            .unwrap_err();
        assert_eq!(invalid_field(&err), "cursor");
    }
    for other in [
        base().sort_by("price", Direction::Desc),
        base()
            .sort_by("price", Direction::Asc)
            .filter(Filter::eq("active", true)),
        base().sort_by("price", Direction::Asc).with_deleted(),
    ] {
        let err = h
            .repo
            .list(&other.with_page(PageRequest::after(cursor.clone(), 5)))
            .await
            .unwrap_err();
        assert_eq!(invalid_field(&err), "cursor");
    }
    // The genuine cursor still works, with another page size too.
    let next = h
        .repo
        .list(&q.with_page(PageRequest::after(cursor, 3)))
        .await
        .unwrap();
    assert_eq!(next.items.len(), 3);
}

/// Runs every contract test against a factory returning `(Harness, guard)`.
#[macro_export]
macro_rules! contract_suite {
    ($factory:expr) => {
        ::keel_testkit::contract_tests! {
            factory: $factory,
            suite: keel_repository::testing,
            tests: [
                insert_then_get,
                duplicate_id_is_already_exists,
                insert_many_is_all_or_nothing,
                get_many_keeps_order_and_skips,
                update_bumps_version_and_updated_at,
                stale_writes_are_conflicts,
                missing_entities_are_not_found,
                upsert_inserts_then_replaces,
                soft_delete_hides_everywhere,
                restore_brings_back,
                hard_delete_is_explicit,
                concurrent_writers_one_winner,
                retries_lose_no_update,
                filters_select_exactly,
                prefix_is_literal,
                injection_strings_are_data,
                sorting_follows_declared_keys,
                offset_pagination,
                keyset_pagination_walks_everything,
                keyset_is_stable_under_concurrent_writes,
                bad_input_is_typed,
            ],
        }
    };
}
