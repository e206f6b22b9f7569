//! A read model built by a catch-up subscription over the global log.
//!
//! Projections do not ask aggregates for their state: they follow the
//! store's global log, in commit-safe order, and keep their own view. A
//! [`Subscription`] reads from its stored checkpoint (the whole history the
//! first time), hands each event to a [`SubscriptionHandler`], then waits
//! for new events and delivers them as they commit. Checkpoints are stored
//! as it goes and on a graceful stop, so a restarted subscription carries
//! on where it stopped.
//!
//! Delivery is at least once (after a crash, events since the last stored
//! checkpoint come again), so the projector remembers the last position it
//! applied and skips anything at or before it.
//!
//! The example writes a history, catches up on it, follows live appends,
//! stops, misses some events while stopped, resumes from the checkpoint,
//! and compares the read model with a fresh fold of the log.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::TryStreamExt;
use keel_core::{AggregateRepository, BoxError, Metadata, Position};
use keel_eventstore::{
    EventSourcedRepository, EventStoreBackend, ReadAll, RecordedEvent, Subscription,
    SubscriptionHandler, SubscriptionOptions,
};
use tracing::info;

use crate::domain::{AccountCommand, AccountEvent};
use crate::examples::within;
use crate::{Result, Services, ensure};

/// One row of the read model: what a balance screen shows.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BalanceRow {
    /// The account's owner.
    pub owner: String,
    /// The balance in cents.
    pub balance: i64,
    /// Deposits and withdrawals so far.
    pub transactions: u32,
}

/// The read model: balances by stream id, plus the projector's bookkeeping.
#[derive(Debug, Default)]
struct ReadModel {
    rows: BTreeMap<String, BalanceRow>,
    /// The last position applied; anything at or before it is a redelivery.
    last_applied: Option<Position>,
    /// Events applied (each once).
    applied: u64,
    /// Deliveries skipped because they were already applied.
    skipped: u64,
}

impl ReadModel {
    fn apply(&mut self, stream: &str, event: &AccountEvent) {
        let row = self.rows.entry(stream.to_owned()).or_default();
        match event {
            AccountEvent::Opened { owner } => row.owner.clone_from(owner),
            AccountEvent::Deposited { amount } => {
                row.balance += amount;
                row.transactions += 1;
            }
            AccountEvent::Withdrawn { amount } => {
                row.balance -= amount;
                row.transactions += 1;
            }
            AccountEvent::Closed => {}
        }
    }
}

/// Projects account events into [`BalanceRow`]s. In a service the rows
/// would live in a table (or `keel-repository`) and the last position next
/// to them, written in one transaction.
#[derive(Debug, Default)]
struct BalanceProjector {
    model: Mutex<ReadModel>,
}

#[async_trait]
impl SubscriptionHandler for BalanceProjector {
    async fn handle(&self, event: &RecordedEvent) -> std::result::Result<(), BoxError> {
        let decoded = event.decode::<AccountEvent>()?;
        let mut model = self.model.lock().map_err(|_| "read model lock poisoned")?;
        if model
            .last_applied
            .is_some_and(|last| event.position <= last)
        {
            model.skipped += 1;
            return Ok(());
        }
        model.apply(event.stream_id.as_str(), &decoded.payload);
        model.last_applied = Some(event.position);
        model.applied += 1;
        Ok(())
    }
}

/// Runs the example.
///
/// # Errors
///
/// A failing store, a subscription that does not catch up within 30 s, or a
/// broken invariant: an event applied twice or missed, a checkpoint not
/// stored, a read model that differs from a fold of the log.
pub async fn run(services: &Services) -> Result {
    let store = services.event_store();
    let accounts =
        EventSourcedRepository::<crate::domain::Account, dyn EventStoreBackend>::new(store.clone());
    let run = services.scope("sub");
    let metadata = Metadata::new().with_actor("clerk:subscription-example");
    // Only this run's accounts: on a shared database the log holds more.
    let filter = ReadAll::from_start().stream_prefix(format!("Account-{run}-"));
    let name = format!("balances-{run}");

    // A history written before the projection exists: 3 accounts, 9 events.
    let owners = ["grace", "edsger", "barbara"];
    for (i, owner) in (1_i64..).zip(owners) {
        let id = format!("{run}-{owner}");
        accounts
            .execute(
                &id,
                AccountCommand::Open {
                    owner: owner.into(),
                },
                &metadata,
            )
            .await?;
        accounts
            .execute(&id, AccountCommand::Deposit { amount: 100 * i }, &metadata)
            .await?;
        accounts
            .execute(&id, AccountCommand::Withdraw { amount: 10 * i }, &metadata)
            .await?;
    }

    let projector = Arc::new(BalanceProjector::default());
    let options = SubscriptionOptions::new(name.clone())
        .filter(filter.clone())
        .checkpoint(5, Duration::from_millis(200))
        .poll_interval(Duration::from_millis(100));

    // Catch up on the history, then keep following.
    let mut subscription = Subscription::spawn(store.clone(), options.clone(), projector.clone());
    let status = within("catching up", subscription.wait_for(|s| s.handled >= 9)).await?;
    info!(handled = status.handled, position = ?status.position, leader = status.leader, "caught up");
    ensure(
        status.handled == 9,
        "the catch-up delivers the 9 events of the history",
    )?;

    // Live: appended while the subscription runs, delivered within a poll.
    let grace = format!("{run}-grace");
    accounts
        .execute(&grace, AccountCommand::Deposit { amount: 42 }, &metadata)
        .await?;
    let status = within("the live event", subscription.wait_for(|s| s.handled >= 10)).await?;
    info!(handled = status.handled, "live event projected");

    // A graceful stop stores the checkpoint.
    subscription.shutdown().await?;
    let checkpoint = store.load_checkpoint(&name).await?;
    info!(checkpoint = ?checkpoint, "stopped");
    let last_applied = projector
        .model
        .lock()
        .map_err(|_| "read model lock poisoned")?
        .last_applied;
    ensure(
        checkpoint.is_some() && checkpoint == last_applied,
        "the checkpoint is the last applied position",
    )?;

    // Events committed while nobody listens are not lost: the next instance
    // starts after the checkpoint and delivers exactly those.
    let edsger = format!("{run}-edsger");
    accounts
        .execute(&edsger, AccountCommand::Withdraw { amount: 50 }, &metadata)
        .await?;
    accounts
        .execute(&grace, AccountCommand::Withdraw { amount: 2 }, &metadata)
        .await?;
    let mut resumed = Subscription::spawn(store.clone(), options, projector.clone());
    let status = within("resuming", resumed.wait_for(|s| s.handled >= 2)).await?;
    // Give it a moment to show it delivers nothing more than those two.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let handled_after_resume = resumed.status().handled;
    resumed.shutdown().await?;
    info!(handled = status.handled, "resumed from the checkpoint");
    ensure(
        handled_after_resume == 2,
        format!(
            "the resumed subscription delivers only the 2 missed events, not {handled_after_resume}"
        ),
    )?;

    // The read model equals a fresh fold of the same slice of the log.
    let mut expected = ReadModel::default();
    let log: Vec<_> = store.read_all(filter).try_collect().await?;
    for event in &log {
        expected.apply(
            event.stream_id.as_str(),
            &event.decode::<AccountEvent>()?.payload,
        );
    }
    let model = projector.model.lock().map_err(|_| "lock poisoned")?;
    for (stream, row) in &model.rows {
        info!(%stream, owner = %row.owner, balance = row.balance, transactions = row.transactions, "balance row");
    }
    ensure(
        model.applied == 12 && log.len() == 12,
        format!(
            "12 events applied once each (applied {}, log {})",
            model.applied,
            log.len()
        ),
    )?;
    ensure(model.skipped == 0, "no redelivery after graceful stops")?;
    ensure(
        model.rows == expected.rows,
        "the read model matches the log",
    )?;
    ensure(
        model
            .rows
            .get(&format!("Account-{grace}"))
            .map(|r| r.balance)
            == Some(100 - 10 + 42 - 2),
        "grace's balance is 130",
    )?;
    Ok(())
}
