//! The Pub/Sub health check, on `keel_core`'s [`HealthCheck`] port.

use std::time::Duration;

use async_trait::async_trait;
use google_cloud_gax::error::rpc::Code;
use keel_core::ports::health::ProbeLimits;
use keel_core::{HealthCheck, HealthReport};

use super::PubSubBus;

/// Default time limit of the Pub/Sub readiness check.
pub const DEFAULT_PUBSUB_HEALTH_TIMEOUT: Duration = Duration::from_secs(2);
/// Default latency above which the Pub/Sub readiness check reports
/// `Degraded`.
pub const DEFAULT_PUBSUB_DEGRADED_AFTER: Duration = Duration::from_millis(500);

/// Readiness: one cheap administrative call to Pub/Sub within a time limit.
///
/// By default it lists at most one topic of the project (it needs only the
/// `pubsub.topics.list` permission and no particular topic). With
/// [`topic`](Self::topic) it reads that topic instead, so a deleted topic
/// the service publishes to makes it unready too.
///
/// * `Healthy` when Pub/Sub answers in time;
/// * `Degraded` when it answers slower than `degraded_after`;
/// * `Unhealthy` when the call fails (unreachable, refused credentials, a
///   missing topic) or does not answer in time.
///
/// ```no_run
/// # async fn demo(bus: keel_eventbus::PubSubBus, registry: keel_telemetry::HealthRegistry) {
/// registry.register(bus.readiness_check().topic("orders"));
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct PubSubReadiness {
    bus: PubSubBus,
    name: String,
    topic: Option<String>,
    limits: ProbeLimits,
}

impl PubSubReadiness {
    /// A readiness check named `pubsub`, listing topics, with a 2 s limit,
    /// degraded above 500 ms.
    #[must_use]
    pub fn new(bus: PubSubBus) -> Self {
        Self {
            bus,
            name: "pubsub".to_owned(),
            topic: None,
            limits: ProbeLimits::new(DEFAULT_PUBSUB_HEALTH_TIMEOUT, DEFAULT_PUBSUB_DEGRADED_AFTER),
        }
    }

    /// Renames the check.
    #[must_use]
    pub fn named(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Checks that this topic (a logical name, mapped by the bus's naming
    /// convention) exists, instead of listing topics.
    #[must_use]
    pub fn topic(mut self, topic: impl Into<String>) -> Self {
        self.topic = Some(topic.into());
        self
    }

    /// The time limit for the call, the client's own retries included.
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.limits.timeout = timeout;
        self
    }

    /// The latency above which the check reports `Degraded`.
    #[must_use]
    pub fn degraded_after(mut self, threshold: Duration) -> Self {
        self.limits.degraded_after = threshold;
        self
    }

    async fn call(&self) -> Result<(), String> {
        let topics = &self.bus.inner.topics;
        let Some(topic) = &self.topic else {
            return self.bus.list_one_topic().await.map_err(|e| describe(&e));
        };
        let name = self.bus.naming.topic(topic).map_err(|e| e.to_string())?;
        let path = self.bus.topic_path(&name);
        match topics.get_topic().set_topic(&path).send().await {
            Ok(_) => Ok(()),
            Err(e) if e.status().is_some_and(|s| s.code == Code::NotFound) => {
                Err(format!("topic {path} does not exist"))
            }
            Err(e) => Err(describe(&e)),
        }
    }
}

fn describe(e: &google_cloud_pubsub::Error) -> String {
    match e.status() {
        Some(s) => format!("{}: {}", s.code.name(), s.message),
        None => e.to_string(),
    }
}

#[async_trait]
impl HealthCheck for PubSubReadiness {
    fn name(&self) -> &str {
        &self.name
    }

    async fn check(&self) -> HealthReport {
        self.limits.run(self.call(), tokio::time::sleep).await
    }
}

impl PubSubBus {
    /// The readiness check (one administrative call within a time limit);
    /// see [`PubSubReadiness`].
    #[must_use]
    pub fn readiness_check(&self) -> PubSubReadiness {
        PubSubReadiness::new(self.clone())
    }
}
