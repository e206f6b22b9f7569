//! The two services under test, as separate processes, and what the
//! bench needs of them. (Wired to the `tests` crate's process harness.)

use std::sync::Arc;
use std::time::Duration;

use keel_eventbus::{Naming, PubSubBus, PubSubConfig};
use keel_proto::examples::ordering::v1::ordering_service_client::OrderingServiceClient;
use keel_proto::examples::shipping::v1 as shipping;
use keel_proto::examples::shipping::v1::shipping_service_client::ShippingServiceClient;
use keel_tests::load::{LoadConfig, UsageTracker, find_processes};
use tokio::sync::{Mutex, watch};
use tokio::task::JoinHandle;
use tonic::transport::Channel;

use crate::BoxError;
use crate::driver::{SKUS, quantity};

/// An Ordering client that sends the bench's bearer token.
pub(crate) type OrderingClient = OrderingServiceClient<Channel>;
/// A Shipping client that sends the bench's bearer token.
pub(crate) type ShippingClient = ShippingServiceClient<Channel>;

/// Both services, running.
pub(crate) struct Running {
    ordering_channel: Channel,
    shipping_channel: Channel,
    ordering_pid: u32,
    shipping_pid: u32,
    emulator_host: String,
    project: String,
    naming: Naming,
    shipments_topic: String,
    databases: Vec<String>,
    postgres_url: String,
}

/// Starts both services on fresh databases.
pub(crate) async fn start() -> Result<Running, BoxError> {
    Err("the process harness is not wired in yet".into())
}

impl Running {
    pub(crate) fn ordering_client(&self) -> OrderingClient {
        OrderingServiceClient::new(self.ordering_channel.clone())
    }

    pub(crate) fn shipping_client(&self) -> ShippingClient {
        ShippingServiceClient::new(self.shipping_channel.clone())
    }

    /// A channel to Ordering without credentials (for health checks).
    pub(crate) fn ordering_channel(&self) -> Channel {
        self.ordering_channel.clone()
    }

    pub(crate) fn emulator_host(&self) -> &str {
        &self.emulator_host
    }

    pub(crate) fn project(&self) -> &str {
        &self.project
    }

    /// The topic Shipping publishes `shipment.dispatched` on.
    pub(crate) fn shipments_topic(&self) -> &str {
        &self.shipments_topic
    }

    /// A bus on the services' project and naming, for the observer.
    pub(crate) async fn bus(&self) -> Result<Arc<PubSubBus>, BoxError> {
        let config = PubSubConfig::emulator(self.project.clone(), &self.emulator_host)?
            .with_naming(self.naming.clone());
        Ok(Arc::new(PubSubBus::connect(config).await?))
    }

    /// Adds enough stock of every product the run orders.
    pub(crate) async fn restock(&self, config: &LoadConfig) -> Result<(), BoxError> {
        let mut client = self.shipping_client();
        for n in 0..SKUS {
            let needed: u32 = (0..config.orders)
                .filter(|i| i % SKUS == n)
                .map(quantity)
                .sum();
            client
                .restock_item(shipping::RestockItemRequest {
                    request_id: uuid::Uuid::now_v7().to_string(),
                    sku: crate::driver::sku(n),
                    quantity: needed.max(1),
                })
                .await?;
        }
        Ok(())
    }

    pub(crate) async fn stop(self) {}
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
    let admin = sqlx::PgPool::connect(&running.postgres_url).await?;
    let databases = running.databases.clone();
    let port = running
        .emulator_host
        .rsplit(':')
        .next()
        .unwrap_or("8085")
        .to_owned();
    let services = [
        ("ordering service", running.ordering_pid),
        ("shipping service", running.shipping_pid),
        ("bench (client)", std::process::id()),
    ];
    let (stop, mut stopped) = watch::channel(false);
    let observe = move |usage: &mut UsageTracker, backends: &[u32]| {
        for (name, pid) in services {
            usage.observe(name, &[pid]);
        }
        usage.observe("postgres backends", backends);
        let emulator = find_processes(|line| {
            line.contains("pubsub-emulator") && line.contains(&format!("--port={port}"))
        });
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
        admin.close().await;
    });
    Ok(UsageSampler { stop, task })
}

/// The pids of the PostgreSQL backends connected to `databases`.
async fn backends(admin: &sqlx::PgPool, databases: &[String]) -> Result<Vec<u32>, BoxError> {
    // A catalog view, not a fixed schema of Keel's: checked at run time.
    let pids: Vec<i32> =
        sqlx::query_scalar("SELECT pid FROM pg_stat_activity WHERE datname = ANY($1)")
            .bind(databases)
            .fetch_all(admin)
            .await?;
    Ok(pids
        .into_iter()
        .filter_map(|p| u32::try_from(p).ok())
        .collect())
}
