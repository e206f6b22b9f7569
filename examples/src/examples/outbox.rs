//! The transactional outbox, its relay and the inbox, in one unit of work
//! with the repository.
//!
//! A state-based change ("a customer signed up") and its integration event
//! must be one fact: publish after commit and a crash in between loses the
//! event; publish before and a rollback leaves a lie on the bus. So a
//! command handler writes the customer row and the event through the same
//! transaction, `customers.within(tx)` and `outbox.within(tx)`, and the
//! command pipeline's [`TransactionalService`] commits both or neither. A
//! [`Relay`] publishes committed outbox rows afterwards. On the consuming
//! side an [`Inbox`] records "event X handled by consumer Y" in the
//! transaction that does the work, so a redelivered message changes
//! nothing.
//!
//! The same code runs on PostgreSQL (`PgOutbox`, `PgInbox`, `PgRepository`
//! joining a `keel_database::UnitOfWork`) and in memory (`InMemoryOutbox`,
//! `InMemoryInbox`, `InMemoryRepository` joining a `MemoryTransaction`).
//! Event-sourced services need no outbox table at all: see the
//! `publishing` example.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use keel_core::command::{
    Command, CommandEnvelope, Handled, PipelineError, TransactionalHandler, TransactionalService,
};
use keel_core::uow::Transaction;
use keel_core::{
    AggregateRef, CommandError, Delivery, DomainError, EntityRepository, EventHandler,
    EventPublisher, HandlerError, Message,
};
use keel_eventbus::SubscriptionConfig;
use keel_outbox::{
    InMemoryInbox, InMemoryOutbox, Inbox, InboxHandler, Outbox, OutboxMessage, OutboxStats,
    PgOutbox, Relay, RelayConfig, RelayHandle,
};
use keel_repository::{InMemoryRepository, Mapped, PgRepository};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tower::{Service, ServiceExt};
use tracing::info;
use uuid::Uuid;

use crate::examples::repository::{Customer, customers};
use crate::examples::wait_until;
use crate::{Result, Services, ensure};

/// Where customer events are published.
const TOPIC: &str = "customers";

/// The consumer: it names the bus subscription and the inbox records.
const CONSUMER: &str = "welcome-mails";

/// The consumer's own data: one row per welcome mail "sent".
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Mapped)]
#[keel(table = "keel_examples_welcome_mails")]
pub struct WelcomeMail {
    /// The customer the mail is for: one mail per customer.
    #[keel(id)]
    pub customer_id: Uuid,
    /// The example run, so runs sharing a database stay apart.
    #[keel(filterable)]
    pub run: String,
    /// Where the mail goes.
    pub email: String,
}

/// The command: sign a customer up. `blocked` plays a later check in the
/// same command that says no after both writes were made.
struct SignUp {
    customer: Customer,
    blocked: bool,
}

impl Command for SignUp {
    fn command_type(&self) -> &'static str {
        "customer.sign_up"
    }

    fn target(&self) -> Option<AggregateRef> {
        Some(AggregateRef::new("Customer", self.customer.id.to_string()))
    }
}

/// Writes the customer and its integration event through the command's
/// transaction. It never begins, commits or rolls back anything itself.
struct SignUpHandler {
    customers: Arc<dyn EntityRepository<Customer>>,
    outbox: Arc<dyn Outbox>,
}

#[async_trait]
impl TransactionalHandler<SignUp> for SignUpHandler {
    type Output = Uuid;

    async fn handle(
        &self,
        tx: &mut dyn Transaction,
        envelope: &CommandEnvelope<SignUp>,
    ) -> std::result::Result<Handled<Uuid>, PipelineError> {
        let customer = &envelope.command.customer;
        self.customers.within(tx).insert(customer.clone()).await?;
        self.outbox.within(tx).write(&signup(customer)).await?;
        if envelope.command.blocked {
            // Both writes above are rolled back with this answer.
            return Err(CommandError::Rejected(DomainError::new(
                "customer.blocked",
                "this address may not sign up",
            )));
        }
        Ok(Handled::new(customer.id).with_events(["customer.signed_up"]))
    }
}

/// Queues a welcome mail for each new customer. Its insert and the inbox
/// mark commit together, so each customer gets one mail however often the
/// bus delivers the event.
struct QueueWelcomeMail {
    mails: Arc<dyn EntityRepository<WelcomeMail>>,
}

#[async_trait]
impl InboxHandler for QueueWelcomeMail {
    async fn handle(
        &self,
        tx: &mut dyn Transaction,
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
        // A plain insert: a second run of this work would fail on the id.
        // The inbox makes sure there is no second run.
        let mail = WelcomeMail {
            customer_id,
            run: run.to_owned(),
            email: email.to_owned(),
        };
        self.mails
            .within(tx)
            .insert(mail)
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

/// The outbox, the consumer's inbox and mail table, and a running relay,
/// on whichever backend the services name.
struct Wiring {
    outbox: Arc<dyn Outbox>,
    memory_outbox: Option<InMemoryOutbox>,
    inbox: Inbox<QueueWelcomeMail>,
    mails: Arc<dyn EntityRepository<WelcomeMail>>,
    relay: RelayHandle,
}

async fn wire(services: &Services, publisher: Arc<dyn EventPublisher>) -> Result<Wiring> {
    let config = RelayConfig::default()
        .with_name(format!("examples-{}", services.run()))
        .with_poll_interval(Duration::from_millis(200));
    Ok(match services.database() {
        Some(db) => {
            let create = WelcomeMail::mapping().create_table_if_not_exists_sql();
            sqlx::query(&create).execute(db.pool()).await?;
            let mails: Arc<dyn EntityRepository<WelcomeMail>> =
                Arc::new(PgRepository::<WelcomeMail>::new(db.pool().clone())?);
            let inbox = Inbox::postgres(
                db,
                CONSUMER,
                QueueWelcomeMail {
                    mails: Arc::clone(&mails),
                },
            )?;
            // One relay per replica is fine: they share the work. It wakes
            // on the outbox's NOTIFY; the short poll is only a fallback.
            let relay = Relay::new(db.pool().clone(), publisher, config)?.spawn();
            Wiring {
                outbox: Arc::new(PgOutbox::new()),
                memory_outbox: None,
                inbox,
                mails,
                relay,
            }
        }
        None => {
            let outbox = InMemoryOutbox::new();
            let mails: Arc<dyn EntityRepository<WelcomeMail>> =
                Arc::new(InMemoryRepository::<WelcomeMail>::new()?);
            let inbox = Inbox::in_memory(
                &InMemoryInbox::new(),
                CONSUMER,
                QueueWelcomeMail {
                    mails: Arc::clone(&mails),
                },
            )?;
            let relay = Relay::in_memory(&outbox, publisher, config)?.spawn();
            Wiring {
                outbox: Arc::new(outbox.clone()),
                memory_outbox: Some(outbox),
                inbox,
                mails,
                relay,
            }
        }
    })
}

/// Runs the example.
///
/// # Errors
///
/// A failing database or bus, or a broken invariant: a rolled-back signup
/// published or stored, a committed one not published, a mail queued twice,
/// rows left in the outbox.
pub async fn run(services: &Services) -> Result {
    let run = services.run();
    let customers = customers(services).await?;
    let bus = services.event_bus().await?;
    let publisher: Arc<dyn EventPublisher> = bus.port.clone();
    let wiring = wire(services, publisher).await?;

    // Consumer first (a subscription receives what is published after it
    // exists), behind the inbox.
    let handler = Arc::new(Counted {
        inner: wiring.inbox,
        deliveries: AtomicU64::new(0),
    });
    let config = SubscriptionConfig::new(CONSUMER)
        .with_backoff(Duration::from_millis(100), Duration::from_millis(500))
        .with_shutdown_timeout(Duration::from_secs(10));
    let subscription = bus.port.subscribe(TOPIC, &config, handler.clone()).await?;

    // The command pipeline's innermost service: one transaction per
    // command, committed when the handler accepts it.
    let mut sign_up = TransactionalService::new(
        services.transactions(),
        SignUpHandler {
            customers: Arc::clone(&customers),
            outbox: Arc::clone(&wiring.outbox),
        },
    );

    // Three signups: the customer row and its event commit together.
    let mut signed_up = Vec::new();
    for n in 1..=3 {
        let customer = Customer::numbered(run, n);
        let command = SignUp {
            customer: customer.clone(),
            blocked: false,
        };
        sign_up
            .ready()
            .await?
            .call(CommandEnvelope::new(command))
            .await?;
        signed_up.push(customer);
    }

    // A fourth signup is refused after writing both: the rollback takes the
    // customer row and the event with it.
    let abandoned = Customer::numbered(run, 4);
    let refused = sign_up
        .ready()
        .await?
        .call(CommandEnvelope::new(SignUp {
            customer: abandoned.clone(),
            blocked: true,
        }))
        .await;
    ensure(
        matches!(refused, Err(CommandError::Rejected(_))),
        "the blocked signup is refused",
    )?;

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
    wiring.relay.shutdown().await;
    bus.close().await;

    let stats = match (services.database(), &wiring.memory_outbox) {
        (Some(db), _) => OutboxStats::load(db.pool()).await?,
        (None, Some(outbox)) => outbox.stats(),
        (None, None) => unreachable!("wire() builds one outbox or the other"),
    };
    let mut mails = Vec::new();
    for customer in signed_up.iter().chain([&abandoned]) {
        if let Some(mail) = wiring.mails.get(&customer.id).await? {
            mails.push(mail.entity.customer_id);
        }
    }
    info!(
        mails = mails.len(),
        pending = stats.pending,
        retrying = stats.retrying,
        "done"
    );
    let expected: Vec<Uuid> = signed_up.iter().map(|c| c.id).collect();
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
