//! The contract suite every implementation of the entity repository port
//! must pass (feature `testing`).
//!
//! Each function takes a [`Harness`] (a fresh, empty repository of
//! [`Gadget`]s and the clock it takes timestamps from) and panics when the
//! implementation misbehaves. Run the whole suite with [`contract_suite!`]:
//!
//! ```ignore
//! keel_repository::contract_suite!(|| async {
//!     let clock = keel_repository::testing::clock();
//!     let repo = InMemoryRepository::<Gadget>::new().unwrap().with_clock(clock.clone());
//!     (Harness::new(repo, clock, MemoryTransactions::new()), ())
//! });
//! ```
//!
//! [`contract_suite!`]: crate::contract_suite

use std::collections::BTreeSet;
use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use keel_core::uow::TransactionSource;
use keel_core::{
    Clock, Cursor, Deleted, Direction, Entity, EntityRepository, Error, ExpectedVersion, Filter,
    ListQuery, ManualClock, Page, PageRequest, Stored, Version,
};
use uuid::Uuid;

use crate::{Column, ColumnType, Mapped, Mapping, Result, Row, RowWriter, Value};

mod concurrency;
mod input;
mod limits;
mod listing;
mod units;
mod writes;

pub use concurrency::*;
pub use input::*;
pub use limits::*;
pub use listing::*;
pub use units::*;
pub use writes::*;

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

/// One repository under test, the clock it was given and where its units
/// of work come from.
#[derive(Clone)]
pub struct Harness {
    /// The repository, empty.
    pub repo: Arc<dyn EntityRepository<Gadget>>,
    /// The clock the repository takes timestamps from.
    pub clock: Arc<ManualClock>,
    /// Begins transactions the repository can join with `within(tx)`:
    /// `keel_database::Database` for PostgreSQL,
    /// [`MemoryTransactions`](keel_core::uow::MemoryTransactions) in memory.
    pub transactions: Arc<dyn TransactionSource>,
}

impl std::fmt::Debug for Harness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Harness").finish_non_exhaustive()
    }
}

impl Harness {
    /// Wraps a repository, its clock and its transaction source.
    pub fn new(
        repo: impl EntityRepository<Gadget> + 'static,
        clock: Arc<ManualClock>,
        transactions: impl TransactionSource + 'static,
    ) -> Self {
        Self {
            repo: Arc::new(repo),
            clock,
            transactions: Arc::new(transactions),
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
                field_name_injection_is_refused,
                a_unit_of_work_commits_together,
                a_rolled_back_unit_leaves_nothing,
                answers_inside_a_unit_are_typed,
                a_refused_write_aborts_the_unit,
                concurrent_units_lose_no_update,
                nul_characters_are_refused,
                sizes_have_limits,
                messages_are_bounded,
            ],
        }
    };
}
