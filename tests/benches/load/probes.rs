//! The references a load run is compared with, measured in the same run:
//! a bare gRPC round trip (the standard health check) to a service, and
//! one hop through the Pub/Sub emulator, both with the SDK alone and with
//! Keel's bus.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use google_cloud_pubsub::client::{Publisher, Subscriber};
use google_cloud_pubsub::model::Message as PsMessage;
use google_cloud_pubsub::subscriber::MessageStream;
use keel_core::{Delivery, EventHandler, EventPublisher, HandlerError, Message};
use keel_eventbus::{EventBus, Naming, PubSubBus, PubSubConfig, Subscription, SubscriptionConfig};
use keel_tests::load::LatencyRecorder;
use serde_json::json;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use crate::BoxError;

/// Recorders for the two phases of a run: before the load starts (idle)
/// and while it runs.
#[derive(Debug, Default)]
pub(crate) struct Phased {
    pub(crate) idle: LatencyRecorder,
    pub(crate) loaded: LatencyRecorder,
    under_load: AtomicBool,
}

impl Phased {
    pub(crate) fn record(&self, sample: Duration) {
        if self.under_load.load(Ordering::Relaxed) {
            self.loaded.record(sample);
        } else {
            self.idle.record(sample);
        }
    }

    pub(crate) fn set_loaded(&self, on: bool) {
        self.under_load.store(on, Ordering::Relaxed);
    }
}

/// One bare gRPC round trip: `grpc.health.v1.Health/Check` on the
/// service's own server (same process, same TLS-less channel, no
/// authentication, no database).
pub(crate) async fn health_round_trip(channel: &Channel) -> Result<Duration, BoxError> {
    let mut client = HealthClient::new(channel.clone());
    let start = Instant::now();
    client
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await?;
    Ok(start.elapsed())
}

/// One message through the emulator and back, two ways: the SDK's own
/// publisher and streaming pull, and Keel's bus (publish, then the
/// handler of a subscription). Each probe waits for its message before
/// the next is sent, so it measures latency, not throughput.
pub(crate) struct EmulatorHop {
    publisher: Publisher,
    stream: MessageStream,
    bus: Arc<PubSubBus>,
    keel_topic: String,
    keel_rx: mpsc::UnboundedReceiver<Instant>,
    keel_sub: Option<Subscription>,
}

/// Stamps the arrival of each probe message on Keel's bus.
struct Arrivals(mpsc::UnboundedSender<Instant>);

#[async_trait]
impl EventHandler for Arrivals {
    async fn handle(&self, _delivery: &Delivery) -> Result<(), HandlerError> {
        let _ = self.0.send(Instant::now());
        Ok(())
    }
}

impl EmulatorHop {
    /// Provisions a topic and subscription of its own for each path
    /// (names unique to this run) on the emulator at `host`.
    pub(crate) async fn connect(host: &str, project: &str, run: &str) -> Result<Self, BoxError> {
        let naming = Naming::with_prefix(format!("load-probe-{run}"))?;
        let bus = Arc::new(
            PubSubBus::connect(PubSubConfig::emulator(project, host)?.with_naming(naming.clone()))
                .await?,
        );
        let config = SubscriptionConfig::new("probe");
        // The raw path: topic and subscription provisioned through Keel,
        // messages through the SDK alone.
        bus.ensure_subscription("raw", &config).await?;
        let anonymous = || google_cloud_auth::credentials::anonymous::Builder::new().build();
        let publisher = Publisher::builder(format!(
            "projects/{project}/topics/{}",
            naming.topic("raw")?
        ))
        .with_endpoint(format!("http://{host}"))
        .with_credentials(anonymous())
        .build()
        .await?;
        let subscriber = Subscriber::builder()
            .with_endpoint(format!("http://{host}"))
            .with_credentials(anonymous())
            .build()
            .await?;
        let stream = subscriber
            .subscribe(format!(
                "projects/{project}/subscriptions/{}",
                naming.subscription("raw", "probe")?
            ))
            .build();
        let (tx, keel_rx) = mpsc::unbounded_channel();
        let keel_sub = bus
            .subscribe("keel", &config, Arc::new(Arrivals(tx)))
            .await?;
        Ok(Self {
            publisher,
            stream,
            bus,
            keel_topic: "keel".to_owned(),
            keel_rx,
            keel_sub: Some(keel_sub),
        })
    }

    /// One message through the SDK: publish, then receive and ack it.
    pub(crate) async fn raw(&mut self, timeout: Duration) -> Result<Duration, BoxError> {
        let id = uuid::Uuid::now_v7().to_string();
        let start = Instant::now();
        self.publisher
            .publish(PsMessage::new().set_data(id.clone().into_bytes()))
            .await?;
        let deadline = start + timeout;
        loop {
            let next = tokio::time::timeout_at(deadline.into(), self.stream.next()).await;
            let Ok(Some(received)) = next else {
                return Err("the SDK probe's message did not come back in time".into());
            };
            let (message, handler) = received?;
            handler.ack();
            // An earlier probe's message that timed out may still arrive.
            if message.data.as_ref() == id.as_bytes() {
                return Ok(start.elapsed());
            }
        }
    }

    /// One message through Keel's bus: publish, then its subscription's
    /// handler.
    pub(crate) async fn keel(&mut self, timeout: Duration) -> Result<Duration, BoxError> {
        while self.keel_rx.try_recv().is_ok() {}
        let start = Instant::now();
        self.bus
            .publish(&self.keel_topic, &[Message::new("load.probe", json!({}))])
            .await?;
        match tokio::time::timeout(timeout, self.keel_rx.recv()).await {
            Ok(Some(at)) => Ok(at.saturating_duration_since(start)),
            _ => Err("the Keel bus probe's message did not come back in time".into()),
        }
    }

    /// Stops the Keel subscription and closes the bus.
    pub(crate) async fn close(mut self) {
        if let Some(sub) = self.keel_sub.take() {
            sub.shutdown().await;
        }
        self.bus.close().await;
    }
}

/// What the reference probes measured.
#[derive(Debug, Default)]
pub(crate) struct References {
    /// Health-check round trips to Ordering.
    pub(crate) health: Phased,
    /// SDK publish → receive.
    pub(crate) raw_hop: Phased,
    /// Keel bus publish → handler.
    pub(crate) keel_hop: Phased,
}

impl References {
    pub(crate) fn set_loaded(&self, on: bool) {
        self.health.set_loaded(on);
        self.raw_hop.set_loaded(on);
        self.keel_hop.set_loaded(on);
    }
}

/// Runs the probes in the background, interleaved (health, SDK hop,
/// health, Keel hop, ...) with `pause` between rounds, until stopped.
/// Failed probes are counted, not fatal: under heavy load a reference
/// that times out says something too.
pub(crate) struct Prober {
    stop: watch::Sender<bool>,
    task: JoinHandle<(EmulatorHop, u64)>,
}

impl Prober {
    pub(crate) fn start(
        references: Arc<References>,
        channel: Channel,
        mut hop: EmulatorHop,
        pause: Duration,
    ) -> Self {
        let (stop, mut stopped) = watch::channel(false);
        let task = tokio::spawn(async move {
            let timeout = Duration::from_secs(10);
            let mut failures = 0_u64;
            let mut round = 0_u64;
            while !*stopped.borrow() {
                match health_round_trip(&channel).await {
                    Ok(d) => references.health.record(d),
                    Err(_) => failures += 1,
                }
                let hop_result = if round.is_multiple_of(2) {
                    hop.raw(timeout).await.map(|d| references.raw_hop.record(d))
                } else {
                    hop.keel(timeout)
                        .await
                        .map(|d| references.keel_hop.record(d))
                };
                if hop_result.is_err() {
                    failures += 1;
                }
                round += 1;
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    _ = stopped.changed() => {}
                }
            }
            (hop, failures)
        });
        Self { stop, task }
    }

    /// Stops probing; gives the emulator hop back with the failure count.
    pub(crate) async fn stop(self) -> Result<(EmulatorHop, u64), BoxError> {
        let _ = self.stop.send(true);
        Ok(self.task.await?)
    }
}
