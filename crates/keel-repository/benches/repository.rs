//! `PgRepository` against the same statements written by hand with sqlx, in
//! the same run and on the same database; and keyset against offset
//! pagination over 100,000 rows.
//!
//! Needs PostgreSQL (`DATABASE_URL`, or 127.0.0.1:5432). Run with
//! `cargo bench -p keel-repository`; figures are in
//! `docs/benchmarks-repository.md`.

#![allow(
    missing_docs,
    reason = "criterion's macros generate undocumented items"
)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use keel_core::{
    Cursor, Direction, EntityReader, EntityWriter, ListQuery, PageRequest, Stored, Version,
};
use keel_repository::testing::{Gadget, gadget};
use keel_repository::{Mapped, PgRepository};
use keel_testkit::TestDatabase;
use sqlx::postgres::PgRow;
use sqlx::{PgPool, Row};
use tokio::runtime::Runtime;

const COLUMNS: &str = "id, name, category, price, rating, stock, active, sku, released, specs, \
                       version, created_at, updated_at, deleted_at";

/// What a careful hand-written repository would do: bind, run, decode.
fn decode(row: &PgRow) -> Stored<Gadget> {
    let g = Gadget {
        id: row.get(0),
        name: row.get(1),
        category: row.get(2),
        price: row.get(3),
        rating: row.get(4),
        stock: row.get(5),
        active: row.get(6),
        sku: row.get(7),
        released: row.get(8),
        specs: row.get(9),
    };
    let version: i64 = row.get(10);
    Stored::new(
        g,
        Version::new(version as u64),
        row.get::<DateTime<Utc>, _>(11),
        row.get(12),
        row.get(13),
    )
}

async fn sqlx_get(pool: &PgPool, id: &str) -> Option<Stored<Gadget>> {
    sqlx::query(&format!(
        "SELECT {COLUMNS} FROM gadgets WHERE id = $1 AND deleted_at IS NULL"
    ))
    .bind(id)
    .fetch_optional(pool)
    .await
    .unwrap()
    .map(|r| decode(&r))
}

async fn sqlx_insert(pool: &PgPool, g: &Gadget) -> Stored<Gadget> {
    let row = sqlx::query(&format!(
        "INSERT INTO gadgets (id, name, category, price, rating, stock, active, sku, released, \
         specs, version, created_at, updated_at, deleted_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 1, now(), now(), NULL) RETURNING {COLUMNS}"
    ))
    .bind(&g.id)
    .bind(&g.name)
    .bind(&g.category)
    .bind(g.price)
    .bind(g.rating)
    .bind(g.stock)
    .bind(g.active)
    .bind(g.sku)
    .bind(g.released)
    .bind(&g.specs)
    .fetch_one(pool)
    .await
    .unwrap();
    decode(&row)
}

async fn sqlx_update(pool: &PgPool, g: &Gadget, expected: i64) -> Stored<Gadget> {
    let row = sqlx::query(&format!(
        "UPDATE gadgets SET name = $2, category = $3, price = $4, rating = $5, stock = $6, \
         active = $7, sku = $8, released = $9, specs = $10, version = version + 1, \
         updated_at = now() WHERE id = $1 AND version = $11 AND deleted_at IS NULL \
         RETURNING {COLUMNS}"
    ))
    .bind(&g.id)
    .bind(&g.name)
    .bind(&g.category)
    .bind(g.price)
    .bind(g.rating)
    .bind(g.stock)
    .bind(g.active)
    .bind(g.sku)
    .bind(g.released)
    .bind(&g.specs)
    .bind(expected)
    .fetch_one(pool)
    .await
    .unwrap();
    decode(&row)
}

/// Call-by-call paired timings of two implementations: every sample runs
/// both, alternating which goes first, so load on a shared machine falls on
/// both alike. Criterion reports one side per benchmark; the paired totals
/// give the ratio printed at the end of each group.
#[derive(Default)]
struct Paired {
    a: std::sync::Mutex<(Duration, Duration, u64)>,
}

impl Paired {
    fn add(&self, a: Duration, b: Duration) {
        let mut t = self.a.lock().unwrap();
        t.0 += a;
        t.1 += b;
        t.2 += 1;
    }

    fn report(&self, group: &str, a: &str, b: &str) {
        let t = self.a.lock().unwrap();
        let n = t.2.max(1) as f64;
        let (ma, mb) = (t.0.as_secs_f64() / n * 1e6, t.1.as_secs_f64() / n * 1e6);
        eprintln!(
            "PAIRED {group}: {a} {ma:.1} us, {b} {mb:.1} us over {} pairs; {a} speed relative to {b} = {:.2}x",
            t.2,
            mb / ma
        );
    }
}

/// Runs `a` and `b` once each, in an order that alternates with `i`, and
/// returns their durations.
async fn pair<A, B>(i: u64, a: A, b: B) -> (Duration, Duration)
where
    A: std::future::Future,
    B: std::future::Future,
{
    if i.is_multiple_of(2) {
        let t = Instant::now();
        a.await;
        let ta = t.elapsed();
        let t = Instant::now();
        b.await;
        (ta, t.elapsed())
    } else {
        let t = Instant::now();
        b.await;
        let tb = t.elapsed();
        let t = Instant::now();
        a.await;
        (t.elapsed(), tb)
    }
}

struct Setup {
    _db: TestDatabase,
    pool: PgPool,
    repo: PgRepository<Gadget>,
}

fn setup(rt: &Runtime) -> Setup {
    rt.block_on(async {
        let db = TestDatabase::create(&keel_database::MIGRATIONS)
            .await
            .expect("PostgreSQL for benchmarks");
        sqlx::query(&Gadget::mapping().create_table_sql())
            .execute(db.pool())
            .await
            .unwrap();
        // Commits without waiting for the WAL flush, on both sides: the
        // figures then show library overhead rather than disk latency.
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(4)
            .connect_with(
                db.connect_options()
                    .options([("synchronous_commit", "off")]),
            )
            .await
            .unwrap();
        let repo = PgRepository::new(pool.clone()).unwrap();
        Setup {
            _db: db,
            pool,
            repo,
        }
    })
}

fn crud(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let s = setup(&rt);
    rt.block_on(async {
        s.repo.insert(gadget("hot-repo", "x", 1)).await.unwrap();
        sqlx_insert(&s.pool, &gadget("hot-sqlx", "x", 1)).await;
    });
    let counter = AtomicU64::new(0);
    let next = || counter.fetch_add(1, Ordering::Relaxed);

    let mut group = c.benchmark_group("get");
    let paired = Paired::default();
    for keel_side in [true, false] {
        let name = if keel_side { "keel" } else { "sqlx" };
        group.bench_function(name, |b| {
            b.to_async(&rt).iter_custom(|iters| {
                let (s, paired) = (&s, &paired);
                async move {
                    let mut timed = Duration::ZERO;
                    for i in 0..iters {
                        let (k, q) = pair(
                            i,
                            async { s.repo.get(&"hot-repo".to_owned()).await.unwrap().unwrap() },
                            async { sqlx_get(&s.pool, "hot-sqlx").await.unwrap() },
                        )
                        .await;
                        paired.add(k, q);
                        timed += if keel_side { k } else { q };
                    }
                    timed
                }
            });
        });
    }
    group.finish();
    paired.report("get", "keel", "sqlx");

    let mut group = c.benchmark_group("insert");
    let paired = Paired::default();
    for keel_side in [true, false] {
        let name = if keel_side { "keel" } else { "sqlx" };
        group.bench_function(name, |b| {
            b.to_async(&rt).iter_custom(|iters| {
                let (s, next, paired) = (&s, &next, &paired);
                async move {
                    let mut timed = Duration::ZERO;
                    for i in 0..iters {
                        let (a, b) = (
                            gadget(&format!("i{}", next()), "new", 5),
                            gadget(&format!("i{}", next()), "new", 5),
                        );
                        let (k, q) = pair(
                            i,
                            async { s.repo.insert(a).await.unwrap() },
                            sqlx_insert(&s.pool, &b),
                        )
                        .await;
                        paired.add(k, q);
                        timed += if keel_side { k } else { q };
                    }
                    timed
                }
            });
        });
    }
    group.finish();
    paired.report("insert", "keel", "sqlx");

    let mut group = c.benchmark_group("update");
    let paired = Paired::default();
    let keel_version = AtomicU64::new(1);
    let sqlx_version = AtomicU64::new(1);
    for keel_side in [true, false] {
        let name = if keel_side { "keel" } else { "sqlx" };
        group.bench_function(name, |b| {
            b.to_async(&rt).iter_custom(|iters| {
                let (s, kv, sv, paired) = (&s, &keel_version, &sqlx_version, &paired);
                async move {
                    let mut timed = Duration::ZERO;
                    for i in 0..iters {
                        let v = kv.fetch_add(1, Ordering::Relaxed);
                        let g = gadget("hot-repo", "updated", i64::try_from(v).unwrap());
                        let w = sv.fetch_add(1, Ordering::Relaxed);
                        let h = gadget("hot-sqlx", "updated", i64::try_from(w).unwrap());
                        let (k, q) = pair(
                            i,
                            async { s.repo.update(g, Version::new(v)).await.unwrap() },
                            sqlx_update(&s.pool, &h, i64::try_from(w).unwrap()),
                        )
                        .await;
                        paired.add(k, q);
                        timed += if keel_side { k } else { q };
                    }
                    timed
                }
            });
        });
    }
    group.finish();
    paired.report("update", "keel", "sqlx");
}

const ROWS: i64 = 100_000;
const PAGE: u32 = 100;

fn pagination(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let s = setup(&rt);
    let query = ListQuery::new(PageRequest::first(PAGE)).sort_by("price", Direction::Asc);
    let deep: Cursor = rt.block_on(async {
        sqlx::query(
            "INSERT INTO gadgets SELECT 'k' || lpad(i::text, 6, '0'), 'name-' || (i % 97), NULL, \
             (i * 7919) % 100000, (i % 50) / 10.0, i % 100, i % 2 = 0, gen_random_uuid(), \
             now() - make_interval(secs => i), '{}'::jsonb, 1, now(), now(), NULL \
             FROM generate_series(1, $1) AS i",
        )
        .bind(ROWS)
        .execute(&s.pool)
        .await
        .unwrap();
        // The index a service would add for a list sorted by price.
        sqlx::query("CREATE INDEX gadgets_price ON gadgets (price, id COLLATE \"C\")")
            .execute(&s.pool)
            .await
            .unwrap();
        sqlx::query("ANALYZE gadgets")
            .execute(&s.pool)
            .await
            .unwrap();
        // Walk to the start of page 1,000 once.
        let mut page = s.repo.list(&query).await.unwrap();
        for _ in 1..999 {
            let next = page.next.clone().expect("enough rows");
            page = s
                .repo
                .list(&query.clone().with_page(PageRequest::after(next, PAGE)))
                .await
                .unwrap();
        }
        page.next.expect("page 1,000 exists")
    });

    let mut group = c.benchmark_group("pagination_100k");
    let first = query.clone();
    let deep_query = query
        .clone()
        .with_page(PageRequest::after(deep.clone(), PAGE));
    for (name, page) in [
        ("keyset", PageRequest::first(PAGE)),
        ("keyset", PageRequest::after(deep, PAGE)),
        ("offset", PageRequest::offset(1, PAGE)),
        ("offset", PageRequest::offset(1_000, PAGE)),
    ] {
        let depth = match &page {
            PageRequest::Keyset { after: None, .. } | PageRequest::Offset { page: 1, .. } => 1,
            _ => 1_000,
        };
        let q = query.clone().with_page(page);
        group.bench_with_input(BenchmarkId::new(name, depth), &q, |b, q| {
            b.to_async(&rt).iter(|| async {
                let p = s.repo.list(q).await.unwrap();
                assert_eq!(p.items.len(), PAGE as usize);
                p
            });
        });
    }
    group.finish();

    // Page 1 and page 1,000 side by side, call by call.
    let paired = Paired::default();
    rt.block_on(async {
        for i in 0..200 {
            let (deep, shallow) = pair(
                i,
                async { s.repo.list(&deep_query).await.unwrap() },
                async { s.repo.list(&first).await.unwrap() },
            )
            .await;
            paired.add(deep, shallow);
        }
    });
    paired.report("keyset", "page 1,000", "page 1");
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(50)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(5));
    targets = crud, pagination
}
criterion_main!(benches);
