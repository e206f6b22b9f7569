//! The transactional outbox, its relay and the inbox, on PostgreSQL.
//!
//! A state-based change ("a customer signed up") and its integration event
//! must be one fact: publish after commit and a crash in between loses the
//! event; publish before and a rollback leaves a lie on the bus. So the
//! event is written by an [`OutboxWriter`] into `keel.outbox`, in the same
//! unit of work as the customer row; a [`Relay`] publishes committed rows
//! afterwards. On the consuming side an [`Inbox`] records "event X handled
//! by consumer Y" in the transaction that does the work, so a redelivered
//! message changes nothing.
//!
//! Both ends exist to join a PostgreSQL transaction, so there is no
//! in-memory variant (see `docs/outbox.md`); without `DATABASE_URL` this
//! example says so and does nothing. Event-sourced services need no outbox
//! table at all: see the `publishing` example.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use keel_core::{Delivery, EntityReader, EventHandler, EventPublisher, HandlerError, Message};
use keel_eventbus::SubscriptionConfig;
use keel_outbox::{
    Inbox, InboxHandler, OutboxMessage, OutboxStats, OutboxWriter, Relay, RelayConfig,
};
use serde_json::json;
use sqlx::PgConnection;
use tracing::info;
use uuid::Uuid;

use crate::examples::repository::{Customer, pg_customers};
use crate::examples::wait_until;
use crate::{Result, Services, ensure};

/// Where customer events are published.
const TOPIC: &str = "customers";

/// The consumer: it names the bus subscription and the inbox records.
const CONSUMER: &str = "welcome-mails";

/// The consumer's own table: one row per welcome mail "sent".
const CREATE_MAILS: &str = "CREATE TABLE IF NOT EXISTS keel_examples_welcome_mails (
    customer_id UUID PRIMARY KEY,
    run TEXT NOT NULL,
    email TEXT NOT NULL,
    sent_at TIMESTAMPTZ NOT NULL DEFAULT now()
)";

/// Queues a welcome mail for each new customer. Its insert and the inbox
/// record commit together, so each customer gets one mail however often
/// the bus delivers the event.
#[derive(Debug)]
struct QueueWelcomeMail;

#[async_trait]
impl InboxHandler for QueueWelcomeMail {
    async fn handle(
        &self,
        tx: &mut PgConnection,
        delivery: &Delivery,
    ) -> std::result::Result<(), HandlerError> {
        let payload = &delivery.message.payload;
        let (Some(customer_id), Some(run), Some(email)) = (
            payload["customer_id"]
                .as_str()
                .and_then(|s| Uuid::parse_str(s).ok()),
            payload["run"].as_str(),
            payload["email"].as_str(),
        ) else {
            return Err(HandlerError::reject(
                "customer.signed_up without customer_id, run or email",
            ));
        };
        // A plain INSERT: a second run of this work would fail on the
        // primary key. The inbox makes sure there is no second run.
        sqlx::query(
            "INSERT INTO keel_examples_welcome_mails (customer_id, run, email) VALUES ($1, $2, $3)",
        )
        .bind(customer_id)
        .bind(run)
        .bind(email)
        .execute(tx)
        .await
        .map_err(HandlerError::retry)?;
        info!(%customer_id, attempt = delivery.attempt, "welcome mail queued");
        Ok(())
    }
}

/// Counts deliveries on the way to the handler, so the example knows when
/// the duplicate has come and gone.
struct Counted<H> {
    inner: H,
    deliveries: AtomicU64,
}

#[async_trait]
impl<H: EventHandler> EventHandler for Counted<H> {
    async fn handle(&self, delivery: &Delivery) -> std::result::Result<(), HandlerError> {
        let outcome = self.inner.handle(delivery).await;
        self.deliveries.fetch_add(1, Ordering::SeqCst);
        outcome
    }
}

/// Runs the example (on PostgreSQL only).
///
/// # Errors
///
/// A failing database or bus, or a broken invariant: a rolled-back signup
/// published, a committed one not published, a mail queued twice, rows left
/// in the outbox.
pub async fn run(services: &Services) -> Result {
    let Some(database) = services.database() else {
        info!(
            "skipped: the outbox and inbox join PostgreSQL transactions; set DATABASE_URL to run this example"
        );
        return Ok(());
    };
    let pool = database.pool().clone();
    let run = services.run();
    let customers = pg_customers(database).await?;
    sqlx::query(CREATE_MAILS).execute(&pool).await?;
    let bus = services.event_bus().await?;

    // Consumer first (a subscription receives what is published after it
    // exists), behind the inbox.
    let inbox = Inbox::new(pool.clone(), CONSUMER, QueueWelcomeMail)?;
    let handler = Arc::new(Counted {
        inner: inbox,
        deliveries: AtomicU64::new(0),
    });
    let config = SubscriptionConfig::new(CONSUMER)
        .backoff(Duration::from_millis(100), Duration::from_millis(500))
        .shutdown_timeout(Duration::from_secs(10));
    let subscription = bus.port.subscribe(TOPIC, &config, handler.clone()).await?;

    // The relay: one per replica is fine, they share the work. It wakes on
    // the outbox's NOTIFY; the short poll is only a fallback.
    let publisher: Arc<dyn EventPublisher> = bus.port.clone();
    let relay = Relay::new(
        pool.clone(),
        publisher,
        RelayConfig::default()
            .with_name(format!("examples-{run}"))
            .with_poll_interval(Duration::from_millis(200)),
    )?
    .spawn();

    // Three signups, each one unit of work: the customer row and its event
    // commit together.
    let writer = OutboxWriter::new();
    let mut signed_up = Vec::new();
    for n in 1..=3 {
        let customer = Customer::numbered(run, n);
        let mut uow = database.begin().await?;
        customers.on(uow.conn()).insert(customer.clone()).await?;
        writer.write(uow.conn(), &signup(&customer)).await?;
        uow.commit().await?;
        signed_up.push(customer);
    }

    // A fourth signup fails after writing both (say, a later check in the
    // same transaction said no): the rollback takes the event with it.
    let abandoned = Customer::numbered(run, 4);
    let mut uow = database.begin().await?;
    customers.on(uow.conn()).insert(abandoned.clone()).await?;
    writer.write(uow.conn(), &signup(&abandoned)).await?;
    uow.rollback().await?;

    wait_until("three deliveries", || {
        handler.deliveries.load(Ordering::SeqCst) >= 3
    })
    .await?;

    // The bus delivers at least once: replay the first event (same id) as a
    // relay that crashed after publishing would. The inbox acknowledges it
    // without queuing a second mail.
    let duplicate = signup(&signed_up[0]).message().clone();
    let first_id = duplicate.event_id;
    bus.port.publish(TOPIC, &[duplicate]).await?;
    wait_until("the duplicate delivery", || {
        handler.deliveries.load(Ordering::SeqCst) >= 4
    })
    .await?;

    subscription.shutdown().await;
    relay.shutdown().await;
    bus.close().await;

    let mails: Vec<Uuid> = sqlx::query_scalar(
        "SELECT customer_id FROM keel_examples_welcome_mails WHERE run = $1 ORDER BY customer_id",
    )
    .bind(run)
    .fetch_all(&pool)
    .await?;
    let stats = OutboxStats::load(&pool).await?;
    info!(
        mails = mails.len(),
        pending = stats.pending,
        retrying = stats.retrying,
        "done"
    );
    let mut expected: Vec<Uuid> = signed_up.iter().map(|c| c.id).collect();
    expected.sort();
    ensure(
        mails == expected,
        "one welcome mail per committed signup, none for the rolled-back one",
    )?;
    ensure(
        customers.get(&abandoned.id).await?.is_none(),
        "the rolled-back customer was never stored",
    )?;
    ensure(
        handler.inner.has_handled(first_id).await?,
        "the inbox remembers the handled event",
    )?;
    ensure(stats.retrying == 0, "no outbox row is stuck retrying")?;
    Ok(())
}

/// The integration event for a signup. Its id is fixed by the customer id
/// here only so the example can replay it; normally every message gets a
/// fresh id.
fn signup(customer: &Customer) -> OutboxMessage {
    let message = Message::new(
        "customer.signed_up",
        json!({
            "customer_id": customer.id.to_string(),
            "run": customer.run,
            "email": customer.email,
        }),
    )
    .with_event_id(keel_core::EventId::from_uuid(customer.id));
    OutboxMessage::new(TOPIC, "Customer", customer.id.to_string(), message)
}
