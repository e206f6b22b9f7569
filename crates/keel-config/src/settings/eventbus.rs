use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{Check, Section};
use crate::duration;

/// Which event bus the service wires.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum BusBackend {
    /// The in-process bus (the default; needs no broker).
    #[default]
    Memory,
    /// Google Cloud Pub/Sub in `eventbus.project` (or its emulator).
    Pubsub,
}

/// `eventbus`: `keel-eventbus`'s backend, its Pub/Sub connection and the
/// defaults of every subscription.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct EventBusSettings {
    /// `memory` (default) or `pubsub`.
    pub backend: BusBackend,
    /// The Google Cloud project; required with `pubsub`.
    pub project: Option<String>,
    /// `host:port` of the Pub/Sub emulator (anonymous credentials).
    pub emulator_host: Option<String>,
    /// Another Pub/Sub endpoint (regional or private).
    pub endpoint: Option<String>,
    /// Create missing topics and subscriptions (default true; turn it off
    /// in production, where the service account has no admin rights).
    pub auto_create: bool,
    /// How long connecting waits for Pub/Sub's first answer (default 5s).
    #[serde(with = "duration::required")]
    pub connect_timeout: Duration,
    /// A prefix for every topic and subscription name (e.g. `staging`).
    pub name_prefix: Option<String>,
    /// Defaults for every subscription.
    pub subscription: BusSubscriptionSettings,
}

/// `eventbus.subscription`: retries, dead-lettering and flow control.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct BusSubscriptionSettings {
    /// Deliveries before a failing message is dead-lettered, 5 to 100
    /// (default 5).
    pub max_delivery_attempts: u32,
    /// The shortest redelivery backoff (default 10s).
    #[serde(with = "duration::required")]
    pub min_backoff: Duration,
    /// The longest redelivery backoff, at most 600s (default 600s).
    #[serde(with = "duration::required")]
    pub max_backoff: Duration,
    /// Handlers running at once (default 16).
    pub max_concurrent_handlers: usize,
    /// Messages held unacknowledged at once (default 1000).
    pub max_outstanding_messages: usize,
    /// The ack deadline, 10s to 600s (default 60s).
    #[serde(with = "duration::required")]
    pub ack_deadline: Duration,
    /// How long one handler may run (default off).
    #[serde(with = "duration::optional")]
    pub handler_timeout: Option<Duration>,
    /// How long in-flight handlers get on shutdown (default 30s).
    #[serde(with = "duration::required")]
    pub shutdown_timeout: Duration,
}

impl Default for EventBusSettings {
    fn default() -> Self {
        Self {
            backend: BusBackend::Memory,
            project: None,
            emulator_host: None,
            endpoint: None,
            auto_create: true,
            connect_timeout: Duration::from_secs(5),
            name_prefix: None,
            subscription: BusSubscriptionSettings::default(),
        }
    }
}

impl Default for BusSubscriptionSettings {
    fn default() -> Self {
        Self {
            max_delivery_attempts: 5,
            min_backoff: Duration::from_secs(10),
            max_backoff: Duration::from_secs(600),
            max_concurrent_handlers: 16,
            max_outstanding_messages: 1000,
            ack_deadline: Duration::from_secs(60),
            handler_timeout: None,
            shutdown_timeout: Duration::from_secs(30),
        }
    }
}

impl Section for EventBusSettings {
    const KEY: &'static str = "eventbus";

    fn validate(&self, check: &mut Check<'_>) {
        if self.backend == BusBackend::Pubsub && self.project.is_none() {
            check.fail("project", "required when eventbus.backend is pubsub");
        }
        #[cfg(feature = "eventbus")]
        {
            if let Some(project) = &self.project
                && keel_eventbus::PubSubConfig::new(project.clone()).is_err()
            {
                check.fail("project", "not a valid Google Cloud project id");
            }
            if let Some(host) = &self.emulator_host
                && keel_eventbus::PubSubConfig::emulator("p", host).is_err()
            {
                check.fail("emulator_host", "expected host:port");
            }
            if let Some(prefix) = &self.name_prefix
                && keel_eventbus::Naming::with_prefix(prefix.clone()).is_err()
            {
                check.fail("name_prefix", "not usable in a topic name");
            }
            if let Err(e) = self.subscription_config("keel").validate() {
                let key = match &e {
                    keel_eventbus::EventBusError::InvalidConfig { field, .. } => {
                        format!("subscription.{field}")
                    }
                    _ => "subscription".to_owned(),
                };
                check.fail(&key, e.to_string());
            }
        }
        if self.subscription.min_backoff > self.subscription.max_backoff {
            check.fail("subscription.min_backoff", "is longer than max_backoff");
        }
    }
}

#[cfg(feature = "eventbus")]
impl EventBusSettings {
    /// The Pub/Sub configuration, or `None` when the backend is `memory`.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`](crate::ConfigError) when the project or emulator
    /// host is refused (already reported when the configuration loaded).
    pub fn pubsub_config(&self) -> Result<Option<keel_eventbus::PubSubConfig>, crate::ConfigError> {
        if self.backend != BusBackend::Pubsub {
            return Ok(None);
        }
        let fail = |key: &str, e: keel_eventbus::EventBusError| crate::ConfigError {
            key: format!("eventbus.{key}"),
            source: crate::Source::Unset,
            message: e.to_string(),
        };
        let project = self.project.clone().ok_or_else(|| crate::ConfigError {
            key: "eventbus.project".to_owned(),
            source: crate::Source::Unset,
            message: "required when eventbus.backend is pubsub".to_owned(),
        })?;
        let mut config = match &self.emulator_host {
            Some(host) => keel_eventbus::PubSubConfig::emulator(project, host)
                .map_err(|e| fail("emulator_host", e))?,
            None => keel_eventbus::PubSubConfig::new(project).map_err(|e| fail("project", e))?,
        };
        if let Some(endpoint) = &self.endpoint {
            config = config.with_endpoint(endpoint.clone());
        }
        if let Some(prefix) = &self.name_prefix {
            let naming = keel_eventbus::Naming::with_prefix(prefix.clone())
                .map_err(|e| fail("name_prefix", e))?;
            config = config.with_naming(naming);
        }
        Ok(Some(
            config
                .with_auto_create(self.auto_create)
                .with_connect_timeout(self.connect_timeout),
        ))
    }

    /// The subscription settings of `consumer`, with these defaults.
    #[must_use]
    pub fn subscription_config(
        &self,
        consumer: impl Into<String>,
    ) -> keel_eventbus::SubscriptionConfig {
        let s = &self.subscription;
        let mut config = keel_eventbus::SubscriptionConfig::new(consumer)
            .with_max_delivery_attempts(s.max_delivery_attempts)
            .with_backoff(s.min_backoff, s.max_backoff)
            .with_max_concurrent_handlers(s.max_concurrent_handlers)
            .with_max_outstanding_messages(s.max_outstanding_messages)
            .with_ack_deadline(s.ack_deadline)
            .with_shutdown_timeout(s.shutdown_timeout);
        if let Some(timeout) = s.handler_timeout {
            config = config.with_handler_timeout(timeout);
        }
        config
    }
}
