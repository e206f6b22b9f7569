//! The Google Cloud Pub/Sub backend.

mod admin;
mod dead_letters;
mod event_bus;
mod health;
mod worker;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use google_cloud_gax::error::rpc::Code;
use google_cloud_pubsub::client::{
    BasePublisher, Publisher, Subscriber, SubscriptionAdmin, TopicAdmin,
};
use google_cloud_pubsub::error::PublishError;
use google_cloud_pubsub::model::Message as PsMessage;
use keel_core::BoxError;
use keel_telemetry::KeelMetrics;

pub use self::health::{
    DEFAULT_PUBSUB_DEGRADED_AFTER, DEFAULT_PUBSUB_HEALTH_TIMEOUT, PubSubReadiness,
};
use crate::codec::RawMessage;
use crate::codec::WireFormats;
use crate::error::{EventBusError, Result};
use crate::naming::Naming;

/// The environment variable naming the emulator (`host:port`).
pub const EMULATOR_HOST_VAR: &str = "PUBSUB_EMULATOR_HOST";

/// How to reach Pub/Sub: project, endpoint, credentials, naming, and
/// whether to create missing topics and subscriptions.
///
/// ```
/// use keel_eventbus::{Naming, PubSubConfig};
///
/// let config = PubSubConfig::emulator("local-project", "127.0.0.1:8085")
///     .unwrap()
///     .with_naming(Naming::with_prefix("dev").unwrap())
///     .with_auto_create(true);
/// assert_eq!(config.endpoint(), Some("http://127.0.0.1:8085"));
/// assert!(PubSubConfig::new("bad/project").is_err());
/// ```
#[derive(Clone, Debug)]
pub struct PubSubConfig {
    project: String,
    endpoint: Option<String>,
    anonymous: bool,
    naming: Naming,
    auto_create: bool,
    listing_first_wait: Duration,
    listing_idle_wait: Duration,
    connect_timeout: Duration,
    formats: WireFormats,
}

/// How long [`PubSubBus::connect`] waits for Pub/Sub's first answer by
/// default.
pub const DEFAULT_PUBSUB_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Pub/Sub's global endpoint, used when none is configured.
const DEFAULT_ENDPOINT: &str = "https://pubsub.googleapis.com";

impl PubSubConfig {
    /// Real Pub/Sub in `project`, with application default credentials
    /// (`GOOGLE_APPLICATION_CREDENTIALS`, the gcloud user credentials, or the
    /// metadata server on Google Cloud). Auto-creation is on.
    pub fn new(project: impl Into<String>) -> Result<Self> {
        let project = project.into();
        validate_project(&project)?;
        Ok(Self {
            project,
            endpoint: None,
            anonymous: false,
            naming: Naming::new(),
            auto_create: true,
            listing_first_wait: Duration::from_secs(3),
            listing_idle_wait: Duration::from_millis(500),
            connect_timeout: DEFAULT_PUBSUB_CONNECT_TIMEOUT,
            formats: WireFormats::new(),
        })
    }

    /// The emulator at `host` (`host:port`), with anonymous credentials.
    pub fn emulator(project: impl Into<String>, host: &str) -> Result<Self> {
        if host.is_empty() || host.contains('/') || host.contains(char::is_whitespace) {
            return Err(EventBusError::invalid_config(
                "emulator_host",
                format!("{host:?} is not host:port"),
            ));
        }
        let mut config = Self::new(project)?;
        config.endpoint = Some(format!("http://{host}"));
        config.anonymous = true;
        Ok(config)
    }

    /// The emulator when `PUBSUB_EMULATOR_HOST` is set, else real Pub/Sub
    /// with application default credentials.
    pub fn from_env(project: impl Into<String>) -> Result<Self> {
        match std::env::var(EMULATOR_HOST_VAR) {
            Ok(host) if !host.trim().is_empty() => Self::emulator(project, host.trim()),
            _ => Self::new(project),
        }
    }

    /// Talks to another endpoint (a regional or private one), keeping the
    /// credentials choice.
    #[must_use]
    pub fn with_endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.endpoint = Some(endpoint.into());
        self
    }

    /// Sets the naming convention.
    #[must_use]
    pub fn with_naming(mut self, naming: Naming) -> Self {
        self.naming = naming;
        self
    }

    /// Turns topic and subscription auto-creation on or off. Off in
    /// production: the service account then needs no admin rights, and a
    /// missing topic or subscription is an error.
    #[must_use]
    pub fn with_auto_create(mut self, on: bool) -> Self {
        self.auto_create = on;
        self
    }

    /// How long the first
    /// [`EventBus::dead_letters`](crate::EventBus::dead_letters) call of a
    /// consumer waits for dead letters to arrive, and how quiet the stream
    /// must then be, before answering (defaults: 3 s and 500 ms). Pub/Sub has no
    /// "peek": the bus holds the dead letters it has read (leases extended)
    /// until they are replayed or the bus is dropped.
    #[must_use]
    pub fn with_dead_letter_listing_waits(mut self, first: Duration, idle: Duration) -> Self {
        self.listing_first_wait = first;
        self.listing_idle_wait = idle;
        self
    }

    /// How long [`PubSubBus::connect`] waits for Pub/Sub to answer its first
    /// call (default [`DEFAULT_PUBSUB_CONNECT_TIMEOUT`]). Without an answer
    /// in that time, connecting fails with [`EventBusError::Unreachable`]
    /// instead of the client retrying a refused connection for half a
    /// minute. Any answer counts, a refusal of rights included: rights are
    /// checked by the calls that need them.
    #[must_use]
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Publishes each topic in the format `formats` gives it (JSON unless
    /// told otherwise). Subscribers read every format.
    #[must_use]
    pub fn with_wire_formats(mut self, formats: WireFormats) -> Self {
        self.formats = formats;
        self
    }

    /// The project id.
    #[must_use]
    pub fn project(&self) -> &str {
        &self.project
    }

    /// The endpoint, when not the default one.
    #[must_use]
    pub fn endpoint(&self) -> Option<&str> {
        self.endpoint.as_deref()
    }
}

fn validate_project(project: &str) -> Result<()> {
    let ok = !project.is_empty()
        && project.len() <= 100
        && project
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-.:_".contains(c));
    if ok {
        Ok(())
    } else {
        Err(EventBusError::InvalidName {
            kind: "project",
            name: project.to_owned(),
            reason: "must be 1 to 100 ASCII letters, digits and -.:_".into(),
        })
    }
}

/// An [`EventBus`](crate::EventBus) on Google Cloud Pub/Sub (or its
/// emulator), built on the official `google-cloud-pubsub` client.
///
/// * Publishing batches through one client publisher per topic; messages with
///   an ordering key are published in order.
/// * Each consumer gets the subscription `{topic}.{consumer}` with the
///   configured retry policy and a dead-letter policy pointing at
///   `{topic}.{consumer}.dlq`, which has a subscription of its own so dead
///   letters are kept (see [`Naming`]).
/// * Subscribing runs a streaming pull with flow control and automatic lease
///   extension; the stream is rebuilt with backoff whenever it fails.
/// * A failing message is nacked and redelivered by Pub/Sub after the retry
///   policy's backoff. On its last attempt, and at once when rejected or
///   malformed, Keel publishes it to the dead-letter topic itself, with the
///   reason, and acks it; Pub/Sub's own dead-lettering remains the safety net
///   for messages whose subscriber keeps crashing.
///
/// Clones share the connections.
#[derive(Clone)]
pub struct PubSubBus {
    inner: Arc<Inner>,
    naming: Naming,
    auto_create: bool,
    metrics: KeelMetrics,
    formats: WireFormats,
}

struct Inner {
    config: PubSubConfig,
    topics: TopicAdmin,
    subscriptions: SubscriptionAdmin,
    base_publisher: BasePublisher,
    publishers: Mutex<HashMap<String, Publisher>>,
    known_topics: Mutex<HashSet<String>>,
    readers: Mutex<HashMap<String, Arc<dead_letters::Reader>>>,
    /// Dropped with the bus, which stops the dead-letter readers.
    stop_readers: tokio::sync::watch::Sender<()>,
}

impl fmt::Debug for PubSubBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PubSubBus")
            .field("project", &self.inner.config.project)
            .field("endpoint", &self.inner.config.endpoint)
            .field("naming", &self.naming)
            .field("auto_create", &self.auto_create)
            .finish_non_exhaustive()
    }
}

fn connect_error(what: &str, e: impl std::error::Error + Send + Sync + 'static) -> EventBusError {
    EventBusError::Connect {
        message: format!("cannot build the {what} client: {e}"),
        source: Some(Box::new(e)),
    }
}

macro_rules! configure {
    ($builder:expr, $config:expr) => {{
        let mut b = $builder;
        if let Some(endpoint) = &$config.endpoint {
            b = b.with_endpoint(endpoint.clone());
        }
        if $config.anonymous {
            b = b.with_credentials(
                google_cloud_auth::credentials::anonymous::Builder::new().build(),
            );
        }
        b
    }};
}

// A path to the macro, for the `event_bus` submodule.
use configure;

impl PubSubBus {
    /// Connects to Pub/Sub and makes one cheap call (listing at most one
    /// topic) to see that it answers. Installs rustls' `ring` crypto provider
    /// as the process default when no provider is installed yet.
    ///
    /// # Errors
    ///
    /// [`EventBusError::Unreachable`], naming the endpoint, when Pub/Sub
    /// does not answer within the [connect
    /// timeout](PubSubConfig::with_connect_timeout);
    /// [`EventBusError::Connect`] when a client cannot be built (credentials,
    /// TLS); [`EventBusError::InvalidConfig`] for a zero timeout.
    pub async fn connect(config: PubSubConfig) -> Result<Self> {
        if config.connect_timeout.is_zero() {
            return Err(EventBusError::invalid_config(
                "connect_timeout",
                "must be positive",
            ));
        }
        let endpoint = config
            .endpoint
            .clone()
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_owned());
        let waited = config.connect_timeout;
        let unreachable = |source: Option<BoxError>| EventBusError::Unreachable {
            endpoint,
            waited,
            source,
        };
        let deadline = tokio::time::Instant::now() + waited;
        let Ok(bus) = tokio::time::timeout_at(deadline, Self::build(config)).await else {
            return Err(unreachable(None));
        };
        let bus = bus?;
        match tokio::time::timeout_at(deadline, bus.list_one_topic()).await {
            Err(_) => Err(unreachable(None)),
            // Pub/Sub answered, if only to refuse: it is there.
            Ok(Ok(())) => Ok(bus),
            Ok(Err(e)) if e.status().is_some() => Ok(bus),
            Ok(Err(e)) if e.is_authentication() => Err(EventBusError::Connect {
                message: format!("cannot get credentials: {e}"),
                source: Some(Box::new(e)),
            }),
            Ok(Err(e)) => Err(unreachable(Some(Box::new(e)))),
        }
    }

    /// Builds the clients without calling Pub/Sub, for a service that
    /// should start, and report itself unready through
    /// [`readiness_check`](Self::readiness_check), while Pub/Sub is out of
    /// reach; its first calls then wait for Pub/Sub with the client's own
    /// retries. [`connect`](Self::connect) is the fail-fast choice.
    ///
    /// # Errors
    ///
    /// [`EventBusError::Connect`] when a client cannot be built.
    pub async fn connect_lazy(config: PubSubConfig) -> Result<Self> {
        Self::build(config).await
    }

    /// The cheapest call that proves Pub/Sub answers: lists at most one
    /// topic of the project (needs only `pubsub.topics.list`).
    pub(crate) async fn list_one_topic(&self) -> google_cloud_pubsub::Result<()> {
        self.inner
            .topics
            .list_topics()
            .set_project(format!("projects/{}", self.project()))
            .set_page_size(1)
            .send()
            .await
            .map(|_| ())
    }

    /// Builds the clients; nothing is called yet.
    async fn build(config: PubSubConfig) -> Result<Self> {
        // Ignored error: another provider is already the process default.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let topics = configure!(TopicAdmin::builder(), config)
            .build()
            .await
            .map_err(|e| connect_error("topic admin", e))?;
        let subscriptions = configure!(SubscriptionAdmin::builder(), config)
            .build()
            .await
            .map_err(|e| connect_error("subscription admin", e))?;
        let base_publisher = configure!(BasePublisher::builder(), config)
            .build()
            .await
            .map_err(|e| connect_error("publisher", e))?;
        Ok(Self {
            naming: config.naming.clone(),
            formats: config.formats.clone(),
            auto_create: config.auto_create,
            metrics: KeelMetrics::global(),
            inner: Arc::new(Inner {
                config,
                topics,
                subscriptions,
                base_publisher,
                publishers: Mutex::default(),
                known_topics: Mutex::default(),
                readers: Mutex::default(),
                stop_readers: tokio::sync::watch::channel(()).0,
            }),
        })
    }

    /// The same connections, publishing each topic in the format
    /// `formats` gives it. Subscribers read every format.
    #[must_use]
    pub fn with_wire_formats(&self, formats: WireFormats) -> Self {
        Self {
            formats,
            ..self.clone()
        }
    }

    /// The same connections with auto-creation on or off.
    #[must_use]
    pub fn with_auto_create(&self, on: bool) -> Self {
        Self {
            auto_create: on,
            ..self.clone()
        }
    }

    /// The same connections, recording publishes, acks, nacks, dead letters
    /// and handler durations through `metrics` instead of the global meter
    /// provider's instruments taken at [`connect`](Self::connect).
    #[must_use]
    pub fn with_metrics(&self, metrics: KeelMetrics) -> Self {
        Self {
            metrics,
            ..self.clone()
        }
    }

    /// The same connections with another naming convention.
    #[must_use]
    pub fn with_naming(&self, naming: Naming) -> Self {
        Self {
            naming,
            ..self.clone()
        }
    }

    /// The project this bus works in.
    #[must_use]
    pub fn project(&self) -> &str {
        &self.inner.config.project
    }

    /// Flushes buffered publishes of every topic.
    pub async fn flush(&self) {
        let publishers: Vec<Publisher> = lock(&self.inner.publishers).values().cloned().collect();
        for p in publishers {
            p.flush().await;
        }
    }

    /// For a clean exit: flushes publishes and releases the dead letters
    /// held for listing. Subscriptions are stopped with their own
    /// [`Subscription::shutdown`](crate::Subscription::shutdown). The bus
    /// stays usable.
    pub async fn close(&self) {
        self.flush().await;
        self.inner.stop_readers.send_replace(());
        let readers: Vec<_> = lock(&self.inner.readers).drain().map(|(_, r)| r).collect();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while readers.iter().any(|r| r.is_alive()) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The reader holding a dead-letter subscription's messages, started on
    /// first use, once it has settled.
    async fn dead_letter_reader(&self, path: &str) -> Result<Arc<dead_letters::Reader>> {
        let existing = lock(&self.inner.readers)
            .get(path)
            .filter(|r| r.is_alive())
            .cloned();
        let reader = match existing {
            Some(r) => r,
            None => {
                if !admin::subscription_exists(&self.inner.subscriptions, path).await? {
                    return Err(EventBusError::SubscriptionNotFound {
                        subscription: path.to_owned(),
                    });
                }
                // A client of its own, as for subscriptions.
                let subscriber = configure!(Subscriber::builder(), self.inner.config)
                    .build()
                    .await
                    .map_err(|e| connect_error("subscriber", e))?;
                let mut readers = lock(&self.inner.readers);
                match readers.get(path).filter(|r| r.is_alive()) {
                    Some(r) => r.clone(),
                    None => {
                        let r = dead_letters::Reader::start(
                            subscriber,
                            path.to_owned(),
                            self.inner.stop_readers.subscribe(),
                        );
                        readers.insert(path.to_owned(), r.clone());
                        r
                    }
                }
            }
        };
        reader
            .settle(
                self.inner.config.listing_first_wait,
                self.inner.config.listing_idle_wait,
            )
            .await;
        if let Some(e) = reader.last_error() {
            tracing::warn!(
                subscription = path,
                error = e,
                "dead-letter listing may be incomplete"
            );
        }
        Ok(reader)
    }

    fn topic_path(&self, name: &str) -> String {
        format!("projects/{}/topics/{name}", self.inner.config.project)
    }

    fn subscription_path(&self, name: &str) -> String {
        format!(
            "projects/{}/subscriptions/{name}",
            self.inner.config.project
        )
    }

    fn publisher(&self, topic_path: &str) -> Publisher {
        let mut publishers = lock(&self.inner.publishers);
        publishers
            .entry(topic_path.to_owned())
            .or_insert_with(|| self.inner.base_publisher.publisher(topic_path).build())
            .clone()
    }

    async fn publish_owned(&self, topic: &str, messages: Vec<RawMessage>) -> Result<()> {
        let count = messages.len() as u64;
        let started = std::time::Instant::now();
        let result = self.publish_unrecorded(topic, messages).await;
        self.metrics
            .record_publish(topic, count, started.elapsed(), result.is_ok());
        result
    }

    async fn publish_unrecorded(&self, topic: &str, messages: Vec<RawMessage>) -> Result<()> {
        let name = self.naming.topic(topic)?;
        let path = self.topic_path(&name);
        if self.auto_create && !lock(&self.inner.known_topics).contains(&path) {
            admin::create_topic(&self.inner.topics, &path).await?;
            lock(&self.inner.known_topics).insert(path.clone());
        }
        publish_to(&self.publisher(&path), &path, messages).await
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub(crate) fn to_pubsub(raw: RawMessage) -> PsMessage {
    let mut m = PsMessage::new()
        .set_data(raw.data)
        .set_attributes(raw.attributes);
    if let Some(key) = raw.ordering_key {
        m = m.set_ordering_key(key);
    }
    m
}

pub(crate) fn from_pubsub(m: &PsMessage) -> RawMessage {
    let mut raw = RawMessage::new(
        m.data.to_vec(),
        m.attributes
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    );
    if !m.ordering_key.is_empty() {
        raw = raw.with_ordering_key(m.ordering_key.clone());
    }
    raw
}

/// Publishes and waits for every message; maps a missing topic to
/// [`EventBusError::TopicNotFound`] and resumes ordering keys paused by a
/// failure so later publishes are not blocked forever.
pub(crate) async fn publish_to(
    publisher: &Publisher,
    topic_path: &str,
    messages: Vec<RawMessage>,
) -> Result<()> {
    let keys: Vec<Option<String>> = messages.iter().map(|m| m.ordering_key.clone()).collect();
    let pending: Vec<_> = messages
        .into_iter()
        .map(|m| publisher.publish(to_pubsub(m)))
        .collect();
    let results = futures::future::join_all(pending).await;
    let mut first_error = None;
    for (result, key) in results.into_iter().zip(keys) {
        let Err(e) = result else { continue };
        if let Some(key) = key {
            publisher.resume_publish(key);
        }
        if first_error.is_none() {
            first_error = Some(e);
        }
    }
    match first_error {
        None => Ok(()),
        Some(PublishError::Rpc(e)) if e.status().is_some_and(|s| s.code == Code::NotFound) => {
            Err(EventBusError::TopicNotFound {
                topic: topic_path.to_owned(),
            })
        }
        Some(e) => Err(EventBusError::Publish {
            topic: topic_path.to_owned(),
            message: e.to_string(),
            source: Some(Box::new(e)),
        }),
    }
}
