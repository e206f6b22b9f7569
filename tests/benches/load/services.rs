//! The two services under test, as separate processes (the `tests`
//! crate's [`ServiceStack`]), and what the bench needs of them.

use std::sync::Arc;
use std::time::Duration;

use keel_eventbus::{Naming, PubSubBus, PubSubConfig};
use keel_tests::load::{UsageTracker, find_processes};
use keel_tests::services::{ServiceStack, StackOptions};
use tokio::sync::{Mutex, watch};
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint};

use crate::BoxError;

pub(crate) use keel_tests::services::{OrderingClient, ShippingClient};

/// The Pub/Sub project the harness gives both services.
const PROJECT: &str = "keel-tests";
/// The topic Shipping publishes `shipment.dispatched` on.
const SHIPMENTS_TOPIC: &str = keel_examples::contexts::shipping::SHIPMENTS_TOPIC;

/// Both services, running.
pub(crate) struct Running {
    stack: ServiceStack,
    ordering: OrderingClient,
    shipping: ShippingClient,
    health: Channel,
    naming: Naming,
}

/// Starts both services on fresh databases (release builds: the harness
/// builds the binaries in the bench's own profile).
pub(crate) async fn start() -> Result<Running, BoxError> {
    let stack = ServiceStack::start(StackOptions::default()).await?;
    let ordering = stack.ordering_client()?;
    let shipping = stack.shipping_client()?;
    let health = Endpoint::from_shared(stack.ordering.endpoint())?
        .tcp_nodelay(true)
        .connect()
        .await?;
    let naming = Naming::with_prefix(stack.prefix().to_owned())?;
    Ok(Running {
        stack,
        ordering,
        shipping,
        health,
        naming,
    })
}

impl Running {
    pub(crate) fn ordering_client(&self) -> OrderingClient {
        self.ordering.clone()
    }

    pub(crate) fn shipping_client(&self) -> ShippingClient {
        self.shipping.clone()
    }

    /// A plain tonic channel to Ordering, without credentials (for the
    /// health-check reference).
    pub(crate) fn ordering_channel(&self) -> Channel {
        self.health.clone()
    }

    pub(crate) fn emulator_host(&self) -> &str {
        self.stack.pubsub_host()
    }

    pub(crate) fn project(&self) -> &str {
        PROJECT
    }

    /// The topic Shipping publishes `shipment.dispatched` on.
    pub(crate) fn shipments_topic(&self) -> &str {
        SHIPMENTS_TOPIC
    }

    /// A bus on the services' project and naming, for the observer.
    pub(crate) async fn bus(&self) -> Result<Arc<PubSubBus>, BoxError> {
        let config = PubSubConfig::emulator(PROJECT, self.stack.pubsub_host())?
            .with_naming(self.naming.clone());
        Ok(Arc::new(PubSubBus::connect(config).await?))
    }

    /// Stops both services with SIGTERM; a service that does not exit
    /// cleanly is reported (the run's figures stand).
    pub(crate) async fn stop(mut self) {
        if let Err(e) = self.stack.terminate().await {
            eprintln!("load: stopping the services: {e}");
        }
    }
}

/// A background task reading the CPU and memory of the services, the
/// PostgreSQL backends serving their databases, the emulator and the
/// bench itself.
pub(crate) struct UsageSampler {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl UsageSampler {
    /// Takes one last reading and stops.
    pub(crate) async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

pub(crate) async fn sample_usage(
    running: &Running,
    usage: Arc<Mutex<UsageTracker>>,
    every: Duration,
) -> Result<UsageSampler, BoxError> {
    // pg_stat_activity shows every database's backends: any pool will do.
    let admin = running.stack.ordering_db.pool().clone();
    let databases = vec![
        running.stack.ordering_db.name().to_owned(),
        running.stack.shipping_db.name().to_owned(),
    ];
    let port = running
        .emulator_host()
        .rsplit(':')
        .next()
        .unwrap_or("8085")
        .to_owned();
    let pid = |p: Option<u32>, name: &str| p.ok_or_else(|| format!("{name} is not running"));
    let services = [
        (
            "ordering service",
            pid(running.stack.ordering.pid(), "ordering")?,
        ),
        (
            "shipping service",
            pid(running.stack.shipping.pid(), "shipping")?,
        ),
        ("bench (client)", std::process::id()),
    ];
    let (stop, mut stopped) = watch::channel(false);
    let observe = move |usage: &mut UsageTracker, backends: &[u32]| {
        for (name, pid) in services {
            usage.observe(name, &[pid]);
        }
        usage.observe("postgres backends", backends);
        let emulator =
            find_processes(|line| line.contains("pubsub-emulator") && line.contains(&port));
        usage.observe("pub/sub emulator", &emulator);
    };
    // The first reading before returning, so that the start mark has
    // something to start from.
    let first = backends(&admin, &databases).await?;
    observe(&mut *usage.lock().await, &first);
    let task = tokio::spawn(async move {
        loop {
            let last = tokio::select! {
                () = tokio::time::sleep(every) => false,
                _ = stopped.changed() => true,
            };
            let now = backends(&admin, &databases).await.unwrap_or_default();
            observe(&mut *usage.lock().await, &now);
            if last {
                break;
            }
        }
    });
    Ok(UsageSampler { stop, task })
}

/// The pids of the PostgreSQL backends connected to `databases`.
async fn backends(admin: &sqlx::PgPool, databases: &[String]) -> Result<Vec<u32>, BoxError> {
    // A catalog view, not a fixed schema of Keel's: checked at run time.
    // The bench's own connection does not count.
    let pids: Vec<i32> = sqlx::query_scalar(
        "SELECT pid FROM pg_stat_activity WHERE datname = ANY($1) AND pid <> pg_backend_pid()",
    )
    .bind(databases)
    .fetch_all(admin)
    .await?;
    Ok(pids
        .into_iter()
        .filter_map(|p| u32::try_from(p).ok())
        .collect())
}
