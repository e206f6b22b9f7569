//! Ordering's read model, an order summary, kept by a
//! [`ProjectionRunner`] and rebuilt as a new version without downtime.
//!
//! Version 1 knows each order's status. Version 2 also keeps who placed it
//! and what it costs, so that it can answer "what has each customer
//! ordered" ([`per_customer`]). Version 2 is built from the start of the
//! log beside version 1; readers keep reading version 1 until version 2 has
//! caught up, then switch in one step ([`rebuild`]). On PostgreSQL each
//! version is a table; in memory it is a [`MemoryCell`]. Either way the rows
//! commit with the projection's checkpoint, so no event counts twice.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use keel_core::BoxError;
use keel_core::uow::{MemoryCell, MemoryTransaction, Transaction, TransactionSource, join};
use keel_database::UnitOfWork;
use keel_eventstore::{
    EventStoreBackend, ProjectionHandle, ProjectionId, ProjectionOptions, ProjectionRunner,
    ReadAll, RecordedEvent,
};
use ordering_domain::OrderEvent;
use sqlx::Row as _;
use tracing::info;

use crate::examples::within;
use crate::{Result, Services, ensure};

/// One order in the summary. Version 1 fills `status` only.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OrderRow {
    /// `placed`, `paid`, `cancelled` or `shipped`.
    pub status: String,
    /// Who placed it (version 2).
    pub customer_id: Option<String>,
    /// Its total in minor units (version 2).
    pub total_minor: Option<i64>,
}

/// What one customer has ordered, from version 2 of the summary.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CustomerSummary {
    /// Orders placed.
    pub orders: usize,
    /// Of which shipped.
    pub shipped: usize,
    /// The total of the orders not cancelled, in minor units.
    pub total_minor: i64,
}

/// Version 2's answer: every customer's orders, by customer id.
#[must_use]
pub fn per_customer(rows: &BTreeMap<String, OrderRow>) -> BTreeMap<String, CustomerSummary> {
    let mut customers: BTreeMap<String, CustomerSummary> = BTreeMap::new();
    for row in rows.values() {
        let Some(customer) = &row.customer_id else {
            continue;
        };
        let summary = customers.entry(customer.clone()).or_default();
        summary.orders += 1;
        if row.status == "shipped" {
            summary.shipped += 1;
        }
        if row.status != "cancelled" {
            summary.total_minor += row.total_minor.unwrap_or(0);
        }
    }
    customers
}

type Rows = BTreeMap<String, OrderRow>;

enum Model {
    Memory(Arc<MemoryCell<Rows>>),
    Postgres {
        pool: sqlx::PgPool,
        table: String,
        run: String,
    },
}

/// One version of the order summary: the projection handler and the reads.
pub struct OrderSummary {
    version: u32,
    stream_prefix: String,
    model: Model,
}

impl std::fmt::Debug for OrderSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OrderSummary")
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

impl OrderSummary {
    /// Version `version` (1 or 2) of the summary of the orders whose streams
    /// start with `stream_prefix`; on PostgreSQL its table
    /// (`keel_examples_order_summary_v<version>`, rows keyed by run) is
    /// created when missing.
    ///
    /// # Errors
    ///
    /// When the table cannot be created.
    pub async fn new(services: &Services, version: u32, stream_prefix: &str) -> Result<Self> {
        let model = match services.database() {
            Some(db) => {
                let table = format!("keel_examples_order_summary_v{version}");
                let extra = if version >= 2 {
                    ", customer_id text NOT NULL, total_minor bigint NOT NULL"
                } else {
                    ""
                };
                sqlx::query(&format!(
                    "CREATE TABLE IF NOT EXISTS {table} (run text NOT NULL, order_id text NOT NULL, \
                     status text NOT NULL{extra}, PRIMARY KEY (run, order_id))"
                ))
                .execute(db.pool())
                .await?;
                Model::Postgres {
                    pool: db.pool().clone(),
                    table,
                    run: services.run().to_owned(),
                }
            }
            None => Model::Memory(Arc::new(MemoryCell::new(Rows::new()))),
        };
        Ok(Self {
            version,
            stream_prefix: stream_prefix.to_owned(),
            model,
        })
    }

    /// Every order in this version, as committed.
    ///
    /// # Errors
    ///
    /// When the table cannot be read.
    pub async fn read(&self) -> Result<Rows> {
        match &self.model {
            Model::Memory(cell) => Ok(cell.read(Clone::clone)),
            Model::Postgres { pool, table, run } => {
                let columns = if self.version >= 2 {
                    "order_id, status, customer_id, total_minor"
                } else {
                    "order_id, status, NULL::text AS customer_id, NULL::bigint AS total_minor"
                };
                let rows = sqlx::query(&format!("SELECT {columns} FROM {table} WHERE run = $1"))
                    .bind(run)
                    .fetch_all(pool)
                    .await?;
                rows.into_iter()
                    .map(|row| {
                        Ok((
                            row.try_get("order_id")?,
                            OrderRow {
                                status: row.try_get("status")?,
                                customer_id: row.try_get("customer_id")?,
                                total_minor: row.try_get("total_minor")?,
                            },
                        ))
                    })
                    .collect::<std::result::Result<Rows, sqlx::Error>>()
                    .map_err(Into::into)
            }
        }
    }

    /// Drops this run's rows of this version: what retiring it leaves to the
    /// owner of the read model.
    async fn drop_rows(&self) -> Result {
        match &self.model {
            Model::Memory(cell) => cell.write(|rows| {
                rows.clear();
                Ok::<_, keel_core::Error>(())
            })?,
            Model::Postgres { pool, table, run } => {
                sqlx::query(&format!("DELETE FROM {table} WHERE run = $1"))
                    .bind(run)
                    .execute(pool)
                    .await?;
            }
        }
        Ok(())
    }

    /// The change `event` makes to its order's row, keyed by order id.
    fn change(&self, event: &RecordedEvent) -> Result<Option<(String, Change)>, BoxError> {
        let stream = event.stream_id.as_str();
        // Streams are `Order-<order id>`; the filter passes this run's only.
        let Some(order_id) = stream
            .starts_with(&self.stream_prefix)
            .then(|| stream.strip_prefix("Order-"))
            .flatten()
        else {
            return Ok(None);
        };
        let change = match serde_json::from_value::<OrderEvent>(event.payload_value()?)? {
            OrderEvent::Placed {
                customer_id, total, ..
            } => Change::Placed(OrderRow {
                status: "placed".to_owned(),
                customer_id: (self.version >= 2).then_some(customer_id),
                total_minor: (self.version >= 2).then_some(total.amount_minor),
            }),
            OrderEvent::Paid { .. } => Change::Status("paid"),
            OrderEvent::Cancelled { .. } => Change::Status("cancelled"),
            OrderEvent::Shipped { .. } => Change::Status("shipped"),
        };
        Ok(Some((order_id.to_owned(), change)))
    }
}

#[derive(Clone, Debug)]
enum Change {
    Placed(OrderRow),
    Status(&'static str),
}

#[async_trait]
impl keel_eventstore::Projection for OrderSummary {
    async fn apply(&self, event: &RecordedEvent, tx: &mut dyn Transaction) -> Result<(), BoxError> {
        let Some((order_id, change)) = self.change(event)? else {
            return Ok(());
        };
        match &self.model {
            Model::Memory(cell) => {
                cell.write_in(join::<MemoryTransaction>(tx)?, move |rows| {
                    match &change {
                        Change::Placed(row) => {
                            rows.insert(order_id.clone(), row.clone());
                        }
                        Change::Status(status) => {
                            if let Some(row) = rows.get_mut(&order_id) {
                                (*status).clone_into(&mut row.status);
                            }
                        }
                    }
                    Ok::<_, keel_core::Error>(())
                })?;
            }
            Model::Postgres { table, run, .. } => {
                let uow = UnitOfWork::join(tx)?;
                match change {
                    Change::Placed(row) if self.version >= 2 => {
                        sqlx::query(&format!(
                            "INSERT INTO {table} (run, order_id, status, customer_id, total_minor) \
                             VALUES ($1, $2, $3, $4, $5)"
                        ))
                        .bind(run)
                        .bind(&order_id)
                        .bind(&row.status)
                        .bind(&row.customer_id)
                        .bind(row.total_minor)
                        .execute(uow.conn())
                        .await?;
                    }
                    Change::Placed(row) => {
                        sqlx::query(&format!(
                            "INSERT INTO {table} (run, order_id, status) VALUES ($1, $2, $3)"
                        ))
                        .bind(run)
                        .bind(&order_id)
                        .bind(&row.status)
                        .execute(uow.conn())
                        .await?;
                    }
                    Change::Status(status) => {
                        sqlx::query(&format!(
                            "UPDATE {table} SET status = $3 WHERE run = $1 AND order_id = $2"
                        ))
                        .bind(run)
                        .bind(&order_id)
                        .bind(status)
                        .execute(uow.conn())
                        .await?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// The summary's projection name for one run: each run (and each example
/// in it) has its own, so runs sharing a database never share versions.
#[must_use]
pub fn projection_name(scope: &str) -> String {
    format!("order-summary-{scope}")
}

/// Starts version `version` of the summary over the streams under
/// `stream_prefix`, `batch_size` events per unit of work.
///
/// # Errors
///
/// When the projection id is invalid or the table cannot be created.
pub async fn start(
    services: &Services,
    store: Arc<dyn EventStoreBackend>,
    transactions: Arc<dyn TransactionSource>,
    name: &str,
    stream_prefix: &str,
    version: u32,
    batch_size: u64,
) -> Result<(Arc<OrderSummary>, ProjectionHandle, ProjectionId)> {
    let id = ProjectionId::new(name, version)?;
    let summary = Arc::new(OrderSummary::new(services, version, stream_prefix).await?);
    let options = ProjectionOptions::new(id.clone())
        .filter(ReadAll::from_start().stream_prefix(stream_prefix))
        .batch_size(batch_size)
        .poll_interval(Duration::from_millis(50));
    let handle = ProjectionRunner::spawn(store, transactions, options, Arc::clone(&summary));
    Ok((summary, handle, id))
}

/// What the rebuild saw.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rebuild {
    /// Reads of the active version while version 2 was built (all complete).
    pub reads_v1: usize,
    /// Reads after the switch to version 2 (all complete).
    pub reads_v2: usize,
    /// The version readers use at the end.
    pub active: u32,
    /// Events the active version is behind the log at the end.
    pub lag_events: u64,
    /// Version 2's answer per customer.
    pub customers: BTreeMap<String, CustomerSummary>,
}

/// Version 1, running, with what a complete model must show.
pub struct Current {
    /// Its reads.
    pub summary: Arc<OrderSummary>,
    /// Its runner.
    pub handle: ProjectionHandle,
    /// Its id.
    pub id: ProjectionId,
}

impl std::fmt::Debug for Current {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Current")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// Rebuilds the summary as version 2 beside `v1`, while a reader keeps
/// reading whichever version is active, then retires version 1.
///
/// `expected` is every order's final status: version 1 must show it before
/// the rebuild starts, and every read, of either version, must show all of
/// it. Version 2 is built two events per unit of work, so a reader sent to
/// it too early would see a half-built model and fail the run.
///
/// # Errors
///
/// A read that saw a half-built model, a version that does not catch up in
/// time, or a failing backend.
pub async fn rebuild(
    services: &Services,
    store: Arc<dyn EventStoreBackend>,
    transactions: Arc<dyn TransactionSource>,
    v1: Current,
    stream_prefix: &str,
    expected: &BTreeMap<String, String>,
) -> Result<Rebuild> {
    let name = v1.id.name().to_owned();
    let statuses = |rows: &Rows| -> BTreeMap<String, String> {
        rows.iter()
            .map(|(id, row)| (id.clone(), row.status.clone()))
            .collect()
    };
    within("version 1 of the order summary caught up", async {
        while statuses(&v1.summary.read().await?) != *expected {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok::<_, BoxError>(())
    })
    .await??;

    // The reader: like a query endpoint, it asks which version is active
    // and reads that one, every 2 ms, and checks what it got. It starts
    // before version 2 does, so it reads version 1 at least once however
    // fast version 2 catches up.
    let v2_model: Arc<OnceLock<Arc<OrderSummary>>> = Arc::new(OnceLock::new());
    let stop = Arc::new(AtomicBool::new(false));
    let reads: Arc<[AtomicUsize; 3]> = Arc::new(Default::default());
    let reader = {
        let (store, stop, reads, expected) = (
            Arc::clone(&store),
            Arc::clone(&stop),
            Arc::clone(&reads),
            expected.clone(),
        );
        let (v1_model, v2_model) = (Arc::clone(&v1.summary), Arc::clone(&v2_model));
        let name = name.clone();
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let version = store.active_projection_version(&name).await?.unwrap_or(1);
                let model = match version {
                    1 => Arc::clone(&v1_model),
                    2 => match v2_model.get() {
                        Some(model) => Arc::clone(model),
                        // Active before `start` handed it over: next time.
                        None => {
                            tokio::time::sleep(Duration::from_millis(2)).await;
                            continue;
                        }
                    },
                    _ => return Err::<(), BoxError>("an unknown version is active".into()),
                };
                let seen = statuses(&model.read().await?);
                if seen != expected {
                    return Err::<(), BoxError>(
                        format!(
                            "a reader of version {version} saw {} of {} orders complete",
                            seen.iter()
                                .filter(|(k, v)| expected.get(*k) == Some(v))
                                .count(),
                            expected.len()
                        )
                        .into(),
                    );
                }
                reads[usize::from(version >= 2) + 1].fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            Ok(())
        })
    };
    within("a first read of version 1", async {
        while reads[1].load(Ordering::SeqCst) == 0 && !reader.is_finished() {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await?;

    let (v2, v2_handle, v2_id) = start(
        services,
        Arc::clone(&store),
        transactions,
        &name,
        stream_prefix,
        2,
        2,
    )
    .await?;
    let _ = v2_model.set(Arc::clone(&v2));

    let outcome = within("version 2 active and read", async {
        loop {
            if reader.is_finished()
                || (store.active_projection_version(&name).await? == Some(2)
                    && reads[2].load(Ordering::SeqCst) >= 3)
            {
                return Ok::<_, BoxError>(());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    reader.await??;
    outcome??;

    // Version 1 is no longer read: stop it, retire it, drop its rows.
    v1.handle.shutdown().await?;
    store.retire_projection(&v1.id).await?;
    v1.summary.drop_rows().await?;
    let active = store.active_projection_version(&name).await?.unwrap_or(0);
    let checkpoint = store
        .projection_state(&v2_id)
        .await?
        .ok_or("version 2 has no state")?
        .checkpoint;
    let lag = store
        .lag_after(
            checkpoint,
            &ReadAll::from_start().stream_prefix(stream_prefix),
        )
        .await?;
    let rows = v2.read().await?;
    v2_handle.shutdown().await?;
    ensure(statuses(&rows) == *expected, "version 2 holds every order")?;
    let rebuild = Rebuild {
        reads_v1: reads[1].load(Ordering::SeqCst),
        reads_v2: reads[2].load(Ordering::SeqCst),
        active,
        lag_events: lag.events,
        customers: per_customer(&rows),
    };
    info!(
        reads_of_v1 = rebuild.reads_v1,
        reads_of_v2 = rebuild.reads_v2,
        active = rebuild.active,
        customers = rebuild.customers.len(),
        "order summary rebuilt as version 2; every read saw a complete model"
    );
    Ok(rebuild)
}
