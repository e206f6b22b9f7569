//! A state-based entity through keel-repository: customers.
//!
//! Not everything is event-sourced. Reference data, read models and simple
//! aggregates are rows, and keel-core's `EntityRepository` port gives them
//! CRUD, optimistic locking (every row has a version), timestamps, soft
//! delete, filters, sorting and pagination. `#[derive(Mapped)]` declares the
//! table once; [`InMemoryRepository`] and [`PgRepository`] then behave the
//! same (one contract suite proves it).
//!
//! The example inserts 25 customers in one all-or-nothing batch, loses an
//! update race and retries it, soft-deletes one, then pages through the rest
//! with keyset cursors and with offsets, and shows that a cursor is bound to
//! the query it came from.

use std::collections::HashSet;
use std::sync::Arc;

use keel_core::{
    Deleted, Direction, EntityRepository, Error, Filter, ListQuery, PageRequest, Stored, Version,
};
use keel_database::Database;
use keel_repository::{InMemoryRepository, Mapped, PgRepository};
use serde::{Deserialize, Serialize};
use tracing::info;
use uuid::Uuid;

use crate::{Result, Services, ensure};

/// A customer of the bank, stored as a row.
///
/// The derive writes `keel_core::Entity` and `keel_repository::Mapped`:
/// the table, its columns, which may be filtered and sorted on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Mapped)]
#[keel(table = "keel_examples_customers")]
pub struct Customer {
    /// The customer's id.
    #[keel(id)]
    pub id: Uuid,
    /// The example run that created it, so runs sharing a database stay
    /// apart (a tenant id plays this part in a real service).
    #[keel(filterable)]
    pub run: String,
    /// The e-mail address.
    #[keel(filterable, sortable)]
    pub email: String,
    /// The service tier, 1 to 3.
    #[keel(filterable, sortable)]
    pub tier: i32,
    /// The display name.
    pub name: String,
}

impl Customer {
    /// Customer number `n` of this run.
    #[must_use]
    pub fn numbered(run: &str, n: i32) -> Self {
        Self {
            id: Uuid::now_v7(),
            run: run.to_owned(),
            email: format!("customer{n:02}@{run}.example"),
            tier: n % 3 + 1,
            name: format!("Customer {n}"),
        }
    }
}

/// A PostgreSQL repository of customers, creating the table when it is
/// missing. A service creates its tables in its own migrations;
/// `Customer::mapping().create_table_sql()` is the starting point for one.
///
/// # Errors
///
/// The table cannot be created, or it differs from the mapping.
pub async fn pg_customers(database: &Database) -> Result<PgRepository<Customer>> {
    let create = Customer::mapping().create_table_if_not_exists_sql();
    sqlx::query(&create).execute(database.pool()).await?;
    let repository = PgRepository::new(database.pool().clone())?;
    // Catch a table that drifted from the mapping at start-up, not on the
    // first write that needs the missing column.
    repository.verify_schema().await?;
    Ok(repository)
}

/// The customers repository as the port: PostgreSQL when configured, else
/// in memory.
///
/// # Errors
///
/// See [`pg_customers`].
pub async fn customers(services: &Services) -> Result<Arc<dyn EntityRepository<Customer>>> {
    Ok(match services.database() {
        Some(db) => Arc::new(pg_customers(db).await?),
        None => Arc::new(InMemoryRepository::<Customer>::new()?),
    })
}

/// Runs the example.
///
/// # Errors
///
/// A failing repository, or a broken invariant: a lost update not detected,
/// a soft-deleted customer still visible, pages that overlap, skip or come
/// out of order, a cursor accepted for another query.
pub async fn run(services: &Services) -> Result {
    let customers = customers(services).await?;
    let run = services.run();

    // One batch, one transaction: all 25 or none.
    let batch: Vec<Customer> = (1..=25).map(|n| Customer::numbered(run, n)).collect();
    let stored = customers.insert_many(batch).await?;
    ensure(
        stored.iter().all(|s| s.version == Version::new(1)),
        "inserted rows start at version 1",
    )?;

    // Optimistic locking: two editors read version 1; the slower one loses.
    let ada = stored[0].clone();
    let mut upgrade = ada.entity.clone();
    upgrade.tier = 3;
    let mut rename = ada.entity.clone();
    rename.name = "Ada L.".into();
    customers.update(upgrade, ada.version).await?;
    let Err(lost) = customers.update(rename, ada.version).await else {
        return Err("a write from a stale version was accepted: a lost update".into());
    };
    let conflict = lost
        .as_conflict()
        .ok_or_else(|| format!("expected a conflict, got {lost}"))?;
    info!(expected = ?conflict.expected, actual = %conflict.actual, "rename lost the race");
    ensure(
        conflict.actual == Version::new(2),
        "the conflict reports version 2",
    )?;
    // Reload and apply the change again to what is there now.
    let current = customers
        .get(&ada.entity.id)
        .await?
        .ok_or("customer vanished")?;
    let mut rename = current.entity.clone();
    rename.name = "Ada L.".into();
    let renamed = customers.update(rename, current.version).await?;
    ensure(
        renamed.entity.tier == 3
            && renamed.entity.name == "Ada L."
            && renamed.version == Version::new(3),
        "both edits kept, version 3",
    )?;

    // Soft delete: gone from every read unless asked for.
    let leaving = &stored[1];
    customers
        .soft_delete(&leaving.entity.id, leaving.version)
        .await?;
    ensure(
        customers.get(&leaving.entity.id).await?.is_none()
            && customers
                .get_including_deleted(&leaving.entity.id)
                .await?
                .is_some_and(|c| c.deleted_at.is_some()),
        "a soft-deleted customer is hidden, not gone",
    )?;
    let this_run = Filter::eq("run", run);
    let live = customers
        .count(std::slice::from_ref(&this_run), Deleted::Exclude)
        .await?;
    ensure(live == 24, format!("24 live customers, counted {live}"))?;

    // Keyset pagination: best tier first, then by e-mail. The cursor carries
    // the last row's sort keys, so page N costs what page 1 costs and rows
    // inserted meanwhile never shift a page.
    let query = ListQuery::new(PageRequest::first(10))
        .filter(this_run.clone())
        .sort_by("tier", Direction::Desc)
        .sort_by("email", Direction::Asc);
    let mut pages: Vec<Vec<Stored<Customer>>> = Vec::new();
    let mut page = customers.list(&query).await?;
    loop {
        info!(
            page = pages.len() + 1,
            items = page.items.len(),
            first = page.items.first().map(|c| c.entity.email.as_str()),
            "keyset page"
        );
        let next = page.next.take();
        pages.push(page.items);
        match next {
            Some(cursor) => {
                page = customers
                    .list(&query.clone().with_page(PageRequest::after(cursor, 10)))
                    .await?;
            }
            None => break,
        }
    }
    let sizes: Vec<usize> = pages.iter().map(Vec::len).collect();
    let all: Vec<&Customer> = pages.iter().flatten().map(|s| &s.entity).collect();
    let distinct: HashSet<Uuid> = all.iter().map(|c| c.id).collect();
    ensure(
        sizes == [10, 10, 4],
        format!("pages of 10, 10 and 4, got {sizes:?}"),
    )?;
    ensure(distinct.len() == 24, "no customer twice, none missing")?;
    ensure(
        all.windows(2)
            .all(|w| (-w[0].tier, &w[0].email) < (-w[1].tier, &w[1].email)),
        "sorted by tier descending, then e-mail",
    )?;

    // Offset pagination: simpler, with a total, but deep pages cost more and
    // concurrent inserts shift items. Page 2 here equals keyset page 2.
    let offset = customers
        .list(&query.clone().with_page(PageRequest::offset(2, 10)))
        .await?;
    info!(total = ?offset.total, items = offset.items.len(), "offset page 2");
    ensure(
        offset.total == Some(24),
        "the offset page reports the total",
    )?;
    ensure(
        offset.items.iter().map(|s| s.entity.id).collect::<Vec<_>>()
            == pages[1].iter().map(|s| s.entity.id).collect::<Vec<_>>(),
        "offset page 2 equals keyset page 2",
    )?;

    // A cursor belongs to its query: replaying it with another filter is
    // refused with a typed error instead of returning a wrong page.
    let first = customers.list(&query).await?;
    let cursor = first.next.ok_or("the first page has a next cursor")?;
    let other_query = query
        .clone()
        .filter(Filter::eq("tier", 1))
        .with_page(PageRequest::after(cursor, 10));
    match customers.list(&other_query).await {
        Err(Error::Invalid(refused)) => info!(%refused, "cursor replayed on another query"),
        other => return Err(format!("expected the cursor to be refused, got {other:?}").into()),
    }
    Ok(())
}
