//! Keeping a search index in sync with the event log: a projection on a
//! keel-eventstore catch-up subscription, rebuildable into a fresh index
//! that is swapped in once it has caught up.
//!
//! # How it stays correct
//!
//! * **Checkpointed**: the subscription stores its position; after a
//!   restart it resumes there (at least once: the events since the last
//!   checkpoint are delivered again).
//! * **Idempotent**: every document records the position of the last event
//!   applied to it (attribute [`POSITION_FIELD`]); an event at or before
//!   that position is skipped, so re-applying an event leaves the same
//!   document. A redelivered run of events replays in order, so deletions
//!   and re-creations end in the same state too.
//! * **Read-your-own-writes inside the projection**: each write waits until
//!   Meilisearch applied it (bounded by [`ProjectionOptions::write_timeout`]),
//!   so the next event for the same document sees the current version.
//!   Throughput is therefore one document write per event: fine for read
//!   models fed by commands, slow for bulk imports (use a rebuild).
//! * **Rebuildable**: [`ProjectionHandle::rebuild`] replays the log from
//!   position 0 into a new index with the same settings, stops the live
//!   projection once the new index has caught up, lets it finish the last
//!   events, swaps the two indexes atomically (searches see the old
//!   contents or the new, never a half-built index), and resumes the live
//!   projection from the rebuild's position.
//! * **Observable**: lag (events not yet applied, and the age of the oldest
//!   one) is published as the gauges [`LAG_EVENTS`] and [`LAG_SECONDS`] and
//!   checked by a readiness [`HealthCheck`] ([`ProjectionHandle::readiness`]).

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::TryStreamExt;
use keel_core::{BoxError, HealthCheck, HealthReport, Position, Probe};
use keel_eventstore::{
    EventStore, ReadAll, RecordedEvent, Subscription, SubscriptionHandle, SubscriptionHandler,
    SubscriptionOptions, SubscriptionSupport,
};
use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Gauge, Meter};
use serde_json::Value;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::engine::{SearchEngine, Wait};
use crate::error::{Result, SearchError};
use crate::names::{DocumentId, IndexName};
use crate::query::Document;
use crate::settings::IndexSettings;

/// The attribute that records, in every projected document, the position of
/// the last event applied to it (`"commit:sequence"`).
pub const POSITION_FIELD: &str = "_keel_position";

/// Gauge: events in the log (matching the projection's filter) not yet
/// applied to the index. Attribute `projection`.
pub const LAG_EVENTS: &str = "keel.search.projection.lag";

/// Gauge: age in seconds of the oldest event not yet applied (0 when caught
/// up). Attribute `projection`.
pub const LAG_SECONDS: &str = "keel.search.projection.lag_age";

/// Counter: documents written or deleted by the projection. Attribute
/// `projection`.
pub const APPLIED: &str = "keel.search.projection.applied";

/// Turns events into document changes.
///
/// ```
/// use keel_eventstore::RecordedEvent;
/// use keel_search::Document;
/// use keel_search::projection::SearchProjector;
///
/// /// Orders, searchable by customer and status.
/// struct Orders;
///
/// impl SearchProjector for Orders {
///     fn document_id(&self, event: &RecordedEvent) -> Option<String> {
///         event.stream_id.as_str().strip_prefix("Order-").map(str::to_owned)
///     }
///
///     fn apply(
///         &self,
///         current: Option<Document>,
///         event: &RecordedEvent,
///     ) -> Result<Option<Document>, keel_core::BoxError> {
///         let payload = event.payload_value()?;
///         let mut doc = current.unwrap_or_default();
///         match event.event_type.as_str() {
///             "order.placed" => {
///                 doc.insert("customer".into(), payload["customer"].clone());
///                 doc.insert("status".into(), "placed".into());
///             }
///             "order.shipped" => {
///                 doc.insert("status".into(), "shipped".into());
///             }
///             "order.deleted" => return Ok(None),
///             _ => {}
///         }
///         Ok(Some(doc))
///     }
/// }
/// ```
pub trait SearchProjector: Send + Sync + 'static {
    /// The id of the document `event` changes, or `None` when it changes
    /// none (the event is skipped).
    fn document_id(&self, event: &RecordedEvent) -> Option<String>;

    /// The document after `event`, given the current one (`None` when it
    /// does not exist; [`POSITION_FIELD`] removed). `Ok(None)` deletes it.
    /// The primary key and [`POSITION_FIELD`] are set by the projection.
    ///
    /// # Errors
    ///
    /// An error stops the projection before this event (it is delivered
    /// again on restart).
    fn apply(
        &self,
        current: Option<Document>,
        event: &RecordedEvent,
    ) -> std::result::Result<Option<Document>, BoxError>;
}

/// How a projection subscribes, writes and reports.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ProjectionOptions {
    /// The subscription's name (its checkpoint and leadership key).
    pub name: String,
    /// Which events it reads.
    pub filter: EventFilter,
    /// How long one write may take to be applied (default 30 s).
    pub write_timeout: Duration,
    /// Retries of a write that failed for a retryable reason (engine
    /// unreachable or slow) before the projection stops (default 5).
    pub write_retries: u32,
    /// How often lag is measured and published (default 5 s).
    pub lag_interval: Duration,
    /// Readiness fails when more events than this wait (default 1000).
    pub max_ready_lag: u64,
    /// The subscription's options beyond name and filter (batch size,
    /// checkpoint cadence, polling).
    pub subscription: SubscriptionOptions,
}

impl ProjectionOptions {
    /// Options with defaults for the projection `name`.
    pub fn new(name: impl Into<String>) -> Self {
        let name = name.into();
        Self {
            subscription: SubscriptionOptions::new(name.clone()),
            name,
            filter: EventFilter::default(),
            write_timeout: Duration::from_secs(30),
            write_retries: 5,
            lag_interval: Duration::from_secs(5),
            max_ready_lag: 1000,
        }
    }

    /// Reads only events passing `filter`.
    #[must_use]
    pub fn filter(mut self, filter: EventFilter) -> Self {
        self.filter = filter;
        self
    }

    /// Sets the per-write timeout.
    #[must_use]
    pub fn write_timeout(mut self, timeout: Duration) -> Self {
        self.write_timeout = timeout;
        self
    }

    /// Sets how often lag is measured.
    #[must_use]
    pub fn lag_interval(mut self, interval: Duration) -> Self {
        self.lag_interval = interval.max(Duration::from_millis(10));
        self
    }

    /// Sets the readiness threshold.
    #[must_use]
    pub fn max_ready_lag(mut self, events: u64) -> Self {
        self.max_ready_lag = events;
        self
    }

    /// Sets the subscription's other options (its name and filter are
    /// taken from these options).
    #[must_use]
    pub fn subscription(mut self, options: SubscriptionOptions) -> Self {
        self.subscription = options;
        self
    }

    fn subscription_for(&self, name: &str) -> SubscriptionOptions {
        let mut s = self.subscription.clone();
        s.name = name.to_owned();
        s.filter = self.filter.read_all(Position::START);
        s
    }
}

/// Which events of the log a projection reads: by stream category, stream
/// prefix and event type (all optional; an empty filter reads everything).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct EventFilter {
    /// Only streams of this category (`Category` or `Category-…`).
    pub category: Option<String>,
    /// Only streams whose id starts with this prefix.
    pub stream_prefix: Option<String>,
    /// Only these event types.
    pub event_types: Option<Vec<String>>,
}

impl EventFilter {
    /// Every event.
    #[must_use]
    pub fn all() -> Self {
        Self::default()
    }

    /// Only streams of `category`.
    #[must_use]
    pub fn category(mut self, category: impl Into<String>) -> Self {
        self.category = Some(category.into());
        self
    }

    /// Only streams whose id starts with `prefix`.
    #[must_use]
    pub fn stream_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.stream_prefix = Some(prefix.into());
        self
    }

    /// Only these event types.
    #[must_use]
    pub fn event_types<I: IntoIterator<Item = T>, T: Into<String>>(mut self, types: I) -> Self {
        self.event_types = Some(types.into_iter().map(Into::into).collect());
        self
    }

    /// The store's read options for this filter, after `position`.
    #[must_use]
    pub fn read_all(&self, position: Position) -> ReadAll {
        let mut r = ReadAll::after(position);
        if let Some(c) = &self.category {
            r = r.category(c.clone());
        }
        if let Some(p) = &self.stream_prefix {
            r = r.stream_prefix(p.clone());
        }
        if let Some(t) = &self.event_types {
            r = r.event_types(t.clone());
        }
        r
    }
}

/// What a projection reports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ProjectionStatus {
    /// The position of the last event handled (applied or skipped).
    pub position: Option<Position>,
    /// Events waiting at the last measurement.
    pub lag_events: u64,
    /// Age of the oldest waiting event at the last measurement.
    pub lag_age: Duration,
    /// Documents written or deleted since start.
    pub applied: u64,
    /// Events skipped because their document already reflected them.
    pub skipped: u64,
    /// Whether a rebuild is running.
    pub rebuilding: bool,
    /// Why the projection stopped, if it did.
    pub failed: Option<String>,
}

/// What a rebuild did.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct RebuildReport {
    /// The position the rebuilt index reflects.
    pub position: Option<Position>,
    /// Documents in the index after the swap.
    pub documents: u64,
    /// How long it took.
    pub took: Duration,
}

#[derive(Clone)]
struct Metrics {
    lag: Gauge<u64>,
    lag_age: Gauge<f64>,
    applied: Counter<u64>,
    attrs: Arc<[KeyValue]>,
}

impl Metrics {
    fn new(meter: &Meter, name: &str) -> Self {
        Self {
            lag: meter
                .u64_gauge(LAG_EVENTS)
                .with_unit("{event}")
                .with_description("Events not yet applied to the search index")
                .build(),
            lag_age: meter
                .f64_gauge(LAG_SECONDS)
                .with_unit("s")
                .with_description("Age of the oldest event not yet applied to the search index")
                .build(),
            applied: meter
                .u64_counter(APPLIED)
                .with_unit("{document}")
                .with_description("Documents written or deleted by search projections")
                .build(),
            attrs: Arc::from([KeyValue::new("projection", name.to_owned())]),
        }
    }
}

/// The handler the subscription calls: one event, one document.
struct Apply {
    engine: Arc<dyn SearchEngine>,
    projector: Arc<dyn SearchProjector>,
    index: IndexName,
    primary_key: String,
    options: ProjectionOptions,
    status: Arc<Mutex<ProjectionStatus>>,
    metrics: Metrics,
}

fn position_of(doc: &Document) -> Option<Position> {
    doc.get(POSITION_FIELD)?.as_str()?.parse().ok()
}

impl Apply {
    async fn write(&self, change: Option<Document>, id: &DocumentId) -> Result<()> {
        let wait = Wait::applied(self.options.write_timeout);
        let mut attempt = 0;
        loop {
            let r = match &change {
                Some(doc) => self
                    .engine
                    .upsert_documents(&self.index, vec![doc.clone()], wait)
                    .await
                    .map(drop),
                None => self
                    .engine
                    .delete_documents(&self.index, std::slice::from_ref(id), wait)
                    .await
                    .map(drop),
            };
            match r {
                Err(e) if e.is_retryable() && attempt < self.options.write_retries => {
                    attempt += 1;
                    let pause = Duration::from_millis(100 * 2u64.pow(attempt.min(5)));
                    tracing::warn!(projection = %self.options.name, error = %e, attempt, "search write failed; retrying");
                    tokio::time::sleep(pause).await;
                }
                other => return other,
            }
        }
    }

    fn mark(&self, position: Position, applied: bool) {
        let mut s = self.status.lock().unwrap_or_else(PoisonError::into_inner);
        s.position = Some(position);
        if applied {
            s.applied += 1;
        } else {
            s.skipped += 1;
        }
    }
}

#[async_trait]
impl SubscriptionHandler for Apply {
    async fn handle(&self, event: &RecordedEvent) -> std::result::Result<(), BoxError> {
        let outcome = self.apply(event).await;
        if let Err(e) = &outcome {
            // The subscription stops on a handler error; say why.
            self.status
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .failed = Some(format!("event at {}: {e}", event.position));
        }
        outcome
    }
}

impl Apply {
    async fn apply(&self, event: &RecordedEvent) -> std::result::Result<(), BoxError> {
        let Some(id) = self.projector.document_id(event) else {
            self.status
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .position = Some(event.position);
            return Ok(());
        };
        let id = DocumentId::new(id)?;
        let current = self.engine.get_document(&self.index, &id).await?;
        let current = match current {
            Some(doc) if position_of(&doc).is_some_and(|p| p >= event.position) => {
                self.mark(event.position, false);
                return Ok(());
            }
            Some(mut doc) => {
                doc.remove(POSITION_FIELD);
                Some(doc)
            }
            None => None,
        };
        let next = self.projector.apply(current, event)?;
        let change = next.map(|mut doc| {
            doc.insert(self.primary_key.clone(), Value::String(id.to_string()));
            doc.insert(
                POSITION_FIELD.to_owned(),
                Value::String(event.position.to_string()),
            );
            doc
        });
        self.write(change, &id).await?;
        self.metrics.applied.add(1, &self.metrics.attrs);
        self.mark(event.position, true);
        Ok(())
    }
}

/// Builds and starts a [`SearchProjection`].
///
/// ```no_run
/// # async fn example(
/// #     store: std::sync::Arc<keel_eventstore::PostgresEventStore>,
/// #     engine: std::sync::Arc<dyn keel_search::SearchEngine>,
/// #     projector: impl keel_search::projection::SearchProjector,
/// # ) -> keel_search::Result<()> {
/// use keel_search::projection::{EventFilter, ProjectionOptions, SearchProjection};
/// use keel_search::{IndexName, IndexSettings};
///
/// let handle = SearchProjection::new(store, engine, projector, IndexName::new("orders")?, "id")
///     .settings(IndexSettings::new().filterable(["status"]))
///     .options(ProjectionOptions::new("orders-search").filter(EventFilter::all().category("Order")))
///     .start()
///     .await?;
/// // Later, after changing the projector: replay everything into a new
/// // index and swap it in.
/// # let mut handle = handle;
/// handle.rebuild(std::time::Duration::from_secs(600)).await?;
/// handle.shutdown().await?;
/// # Ok(()) }
/// ```
pub struct SearchProjection<S: ?Sized> {
    store: Arc<S>,
    engine: Arc<dyn SearchEngine>,
    projector: Arc<dyn SearchProjector>,
    index: IndexName,
    primary_key: String,
    settings: IndexSettings,
    options: ProjectionOptions,
    meter: Option<Meter>,
}

impl<S: ?Sized> fmt::Debug for SearchProjection<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SearchProjection")
            .field("index", &self.index)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl<S> SearchProjection<S>
where
    S: EventStore + SubscriptionSupport + ?Sized + 'static,
{
    /// A projection of `store`'s log into `index` of `engine`, whose
    /// documents are identified by `primary_key`. Options default to a
    /// subscription named `search-{index}` reading the whole log.
    pub fn new(
        store: Arc<S>,
        engine: Arc<dyn SearchEngine>,
        projector: impl SearchProjector,
        index: IndexName,
        primary_key: &str,
    ) -> Self {
        Self {
            options: ProjectionOptions::new(format!("search-{index}")),
            store,
            engine,
            projector: Arc::new(projector),
            index,
            primary_key: primary_key.to_owned(),
            settings: IndexSettings::default(),
            meter: None,
        }
    }

    /// The index settings (applied when the index is created, and to every
    /// rebuilt index).
    #[must_use]
    pub fn settings(mut self, settings: IndexSettings) -> Self {
        self.settings = settings;
        self
    }

    /// Other options.
    #[must_use]
    pub fn options(mut self, options: ProjectionOptions) -> Self {
        self.options = options;
        self
    }

    /// Publishes lag on this meter (default: the global meter provider's
    /// `keel` meter).
    #[must_use]
    pub fn meter(mut self, meter: Meter) -> Self {
        self.meter = Some(meter);
        self
    }

    /// Creates the index if it is missing (with the settings), then starts
    /// the subscription and the lag monitor.
    ///
    /// # Errors
    ///
    /// [`SearchError::InvalidArgument`] for an empty name; what the engine
    /// reports while creating the index.
    pub async fn start(self) -> Result<ProjectionHandle<S>> {
        if self.options.name.is_empty() {
            return Err(SearchError::invalid(
                "projection",
                "the name must not be empty",
            ));
        }
        crate::engine::check_primary_key(&self.primary_key)?;
        let wait = Wait::applied(self.options.write_timeout);
        if !self.engine.index_exists(&self.index).await? {
            create_with_settings(
                &*self.engine,
                &self.index,
                &self.primary_key,
                &self.settings,
                wait,
            )
            .await?;
        }
        let meter = self
            .meter
            .clone()
            .unwrap_or_else(|| opentelemetry::global::meter("keel"));
        let metrics = Metrics::new(&meter, &self.options.name);
        let status = Arc::new(Mutex::new(ProjectionStatus::default()));
        let initial = self
            .store
            .load_checkpoint(&self.options.name)
            .await
            .map_err(|e| SearchError::Unavailable {
                message: "cannot read the projection's checkpoint".to_owned(),
                source: Some(Box::new(e)),
            })?;
        status
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .position = initial;
        let shared = Arc::new(Shared {
            store: Arc::clone(&self.store),
            engine: self.engine,
            projector: self.projector,
            index: self.index,
            primary_key: self.primary_key,
            settings: self.settings,
            options: self.options,
            status,
            metrics,
        });
        let live = shared.spawn_live();
        let (stop_tx, stop_rx) = watch::channel(false);
        let monitor = tokio::spawn(monitor(Arc::clone(&shared), stop_rx));
        Ok(ProjectionHandle {
            shared,
            live: Some(live),
            monitor: Some(monitor),
            stop: stop_tx,
        })
    }
}

async fn create_with_settings(
    engine: &dyn SearchEngine,
    index: &IndexName,
    primary_key: &str,
    settings: &IndexSettings,
    wait: Wait,
) -> Result<()> {
    engine.create_index(index, primary_key, wait).await?;
    let mut settings = settings.clone();
    // The position marker must be filterable for nothing and searchable
    // by no one; keep it out of the searchable attributes when they are
    // listed, and it is never displayed on purpose by the projector.
    if let Some(fields) = &mut settings.searchable_attributes {
        fields.retain(|f| f != POSITION_FIELD);
    }
    engine.apply_settings(index, &settings, wait).await?;
    Ok(())
}

struct Shared<S: ?Sized> {
    store: Arc<S>,
    engine: Arc<dyn SearchEngine>,
    projector: Arc<dyn SearchProjector>,
    index: IndexName,
    primary_key: String,
    settings: IndexSettings,
    options: ProjectionOptions,
    status: Arc<Mutex<ProjectionStatus>>,
    metrics: Metrics,
}

impl<S> Shared<S>
where
    S: EventStore + SubscriptionSupport + ?Sized + 'static,
{
    fn handler(&self, index: IndexName, status: Arc<Mutex<ProjectionStatus>>) -> Apply {
        Apply {
            engine: Arc::clone(&self.engine),
            projector: Arc::clone(&self.projector),
            index,
            primary_key: self.primary_key.clone(),
            options: self.options.clone(),
            status,
            metrics: self.metrics.clone(),
        }
    }

    fn spawn_live(&self) -> SubscriptionHandle {
        Subscription::spawn(
            Arc::clone(&self.store),
            self.options.subscription_for(&self.options.name),
            self.handler(self.index.clone(), Arc::clone(&self.status)),
        )
    }

    fn position(&self) -> Option<Position> {
        self.status
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .position
    }

    /// Events after `position` (up to `cap`), and the age of the first.
    async fn lag_after(&self, position: Option<Position>, cap: u64) -> Result<(u64, Duration)> {
        let filter = self
            .options
            .filter
            .read_all(position.unwrap_or(Position::START))
            .limit(cap);
        let events: Vec<RecordedEvent> =
            self.store
                .read_all(filter)
                .try_collect()
                .await
                .map_err(|e| SearchError::Unavailable {
                    message: "cannot read the event log".to_owned(),
                    source: Some(Box::new(e)),
                })?;
        let age = events
            .first()
            .map(|e| {
                (chrono::Utc::now() - e.recorded_at)
                    .to_std()
                    .unwrap_or_default()
            })
            .unwrap_or_default();
        Ok((events.len() as u64, age))
    }

    async fn measure(&self) -> Result<(u64, Duration)> {
        // Exact up to 10 000 (or the readiness threshold, if larger).
        let cap = self.options.max_ready_lag.saturating_add(1).max(10_000);
        let (events, age) = self.lag_after(self.position(), cap).await?;
        {
            let mut s = self.status.lock().unwrap_or_else(PoisonError::into_inner);
            s.lag_events = events;
            s.lag_age = age;
        }
        self.metrics.lag.record(events, &self.metrics.attrs);
        self.metrics
            .lag_age
            .record(age.as_secs_f64(), &self.metrics.attrs);
        Ok((events, age))
    }
}

async fn monitor<S>(shared: Arc<Shared<S>>, mut stop: watch::Receiver<bool>)
where
    S: EventStore + SubscriptionSupport + ?Sized + 'static,
{
    loop {
        if let Err(e) = shared.measure().await {
            tracing::warn!(projection = %shared.options.name, error = %e, "cannot measure projection lag");
        }
        tokio::select! {
            () = tokio::time::sleep(shared.options.lag_interval) => {}
            r = stop.wait_for(|s| *s) => { let _ = r; return; }
        }
    }
}

/// A running projection.
///
/// Keel's rule for background handles: [`shutdown`](Self::shutdown) stops
/// gracefully (the subscription finishes the event in hand and stores its
/// checkpoint); [`abort`](Self::abort) stops at once and returns once the
/// tasks have ended; dropping the handle aborts without waiting.
pub struct ProjectionHandle<S: ?Sized> {
    shared: Arc<Shared<S>>,
    live: Option<SubscriptionHandle>,
    monitor: Option<JoinHandle<()>>,
    stop: watch::Sender<bool>,
}

impl<S: ?Sized> fmt::Debug for ProjectionHandle<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProjectionHandle")
            .field("index", &self.shared.index)
            .field("name", &self.shared.options.name)
            .finish_non_exhaustive()
    }
}

impl<S> ProjectionHandle<S>
where
    S: EventStore + SubscriptionSupport + ?Sized + 'static,
{
    /// The latest status (lag as of the last measurement).
    #[must_use]
    pub fn status(&self) -> ProjectionStatus {
        self.shared
            .status
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The index the projection writes.
    #[must_use]
    pub fn index(&self) -> &IndexName {
        &self.shared.index
    }

    /// Measures the lag now (and publishes it).
    ///
    /// # Errors
    ///
    /// [`SearchError::Unavailable`] when the log cannot be read.
    pub async fn lag(&self) -> Result<(u64, Duration)> {
        self.shared.measure().await
    }

    /// Waits until no event is waiting, or fails after `timeout`.
    ///
    /// # Errors
    ///
    /// [`SearchError::Timeout`]; [`SearchError::Unavailable`] when the
    /// projection stopped with an error or the log cannot be read.
    pub async fn wait_caught_up(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(why) = self.status().failed {
                return Err(SearchError::Unavailable {
                    message: format!("the projection stopped: {why}"),
                    source: None,
                });
            }
            let (events, _) = self.shared.measure().await?;
            if events == 0 {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(SearchError::Timeout {
                    operation: format!("catching up projection {}", self.shared.options.name),
                    after: timeout,
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A readiness check for the service's health registry: unhealthy when
    /// more than [`ProjectionOptions::max_ready_lag`] events wait, the log
    /// cannot be read, or the projection stopped with an error.
    #[must_use]
    pub fn readiness(&self) -> Arc<dyn HealthCheck> {
        Arc::new(Readiness {
            shared: Arc::clone(&self.shared) as Arc<dyn Measure>,
            name: format!("search-projection-{}", self.shared.options.name),
        })
    }

    /// Replays the whole log (from position 0) into a new index with the
    /// projection's settings (so a rebuild also rolls out changed
    /// settings), then swaps it in for the live one once it has caught
    /// up, and resumes the live projection from there. The old contents
    /// are deleted afterwards. Searches keep using the old index until the
    /// atomic swap.
    ///
    /// On failure or timeout the live projection is restarted as it was
    /// and the new index deleted.
    ///
    /// # Errors
    ///
    /// [`SearchError::Timeout`] when the new index did not catch up within
    /// `timeout`; what the engine or the store reports.
    pub async fn rebuild(&mut self, timeout: Duration) -> Result<RebuildReport> {
        let started = Instant::now();
        let shared = Arc::clone(&self.shared);
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let shadow = IndexName::new(format!("{}__rebuild_{}", shared.index, &suffix[..8]))?;
        let rebuild_name = format!("{}-rebuild-{}", shared.options.name, &suffix[..8]);
        let wait = Wait::applied(shared.options.write_timeout);
        if let Err(e) = create_with_settings(
            &*shared.engine,
            &shadow,
            &shared.primary_key,
            &shared.settings,
            wait,
        )
        .await
        {
            let _ = shared.engine.delete_index(&shadow, wait).await;
            return Err(e);
        }
        shared
            .status
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .rebuilding = true;
        let rebuild_status = Arc::new(Mutex::new(ProjectionStatus::default()));
        let rebuild = Subscription::spawn(
            Arc::clone(&shared.store),
            shared.options.subscription_for(&rebuild_name),
            shared.handler(shadow.clone(), Arc::clone(&rebuild_status)),
        );
        let outcome = self
            .finish_rebuild(
                &shadow,
                &rebuild_name,
                rebuild,
                &rebuild_status,
                started,
                timeout,
            )
            .await;
        shared
            .status
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .rebuilding = false;
        if outcome.is_err() {
            let _ = shared.engine.delete_index(&shadow, wait).await;
            if self.live.is_none() {
                self.live = Some(shared.spawn_live());
            }
        }
        outcome
    }

    async fn finish_rebuild(
        &mut self,
        shadow: &IndexName,
        rebuild_name: &str,
        rebuild: SubscriptionHandle,
        rebuild_status: &Arc<Mutex<ProjectionStatus>>,
        started: Instant,
        timeout: Duration,
    ) -> Result<RebuildReport> {
        let shared = Arc::clone(&self.shared);
        let deadline = started + timeout;
        let rebuild_position = || {
            rebuild_status
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .position
        };
        let store_err = |e: keel_eventstore::EventStoreError| SearchError::Unavailable {
            message: "the event store failed during a rebuild".to_owned(),
            source: Some(Box::new(e)),
        };
        // 1. Let the new index catch up with the live one's neighbourhood.
        let mut live_stopped = false;
        loop {
            let (waiting, _) = shared
                .lag_after(rebuild_position(), shared.options.max_ready_lag.max(1) + 1)
                .await?;
            if !live_stopped && waiting <= shared.options.max_ready_lag {
                // 2. Stop the live projection: from here only the rebuild
                //    moves, so it can reach the head of the log.
                if let Some(live) = self.live.take() {
                    live.shutdown().await.map_err(store_err)?;
                }
                live_stopped = true;
            }
            if live_stopped && waiting == 0 {
                break;
            }
            let failed = rebuild_status
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .failed
                .clone();
            if let Some(why) = failed {
                rebuild.abort().await;
                return Err(SearchError::Unavailable {
                    message: why,
                    source: None,
                });
            }
            if Instant::now() >= deadline {
                rebuild.abort().await;
                return Err(SearchError::Timeout {
                    operation: format!("rebuilding search index {}", shared.index),
                    after: timeout,
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // 3. Stop the rebuild (it stores its checkpoint), swap, and move
        //    the live checkpoint to where the rebuild ended.
        rebuild.shutdown().await.map_err(store_err)?;
        let position = rebuild_position();
        let wait = Wait::applied(shared.options.write_timeout);
        shared
            .engine
            .swap_indexes(&shared.index, shadow, wait)
            .await?;
        if let Some(p) = position {
            shared
                .store
                .save_checkpoint(&shared.options.name, p)
                .await
                .map_err(store_err)?;
            shared
                .status
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .position = Some(p);
        }
        self.live = Some(shared.spawn_live());
        if let Err(e) = shared.engine.delete_index(shadow, wait).await {
            tracing::warn!(index = %shadow, error = %e, "cannot delete the replaced search index");
        }
        tracing::info!(projection = %shared.options.name, subscription = rebuild_name, "search index rebuilt and swapped in");
        let documents = shared.engine.document_count(&shared.index).await?;
        Ok(RebuildReport {
            position,
            documents,
            took: started.elapsed(),
        })
    }

    /// Stops gracefully: the subscription finishes the event in hand and
    /// stores its checkpoint.
    ///
    /// # Errors
    ///
    /// The error that stopped the subscription earlier, if any.
    pub async fn shutdown(mut self) -> Result<()> {
        let _ = self.stop.send(true);
        if let Some(m) = self.monitor.take() {
            let _ = m.await;
        }
        match self.live.take() {
            Some(live) => live.shutdown().await.map_err(|e| SearchError::Unavailable {
                message: "the projection's subscription failed".to_owned(),
                source: Some(Box::new(e)),
            }),
            None => Ok(()),
        }
    }

    /// Stops at once, like a crash (no final checkpoint), and returns when
    /// the tasks have ended.
    pub async fn abort(mut self) {
        if let Some(m) = self.monitor.take() {
            m.abort();
            let _ = m.await;
        }
        if let Some(live) = self.live.take() {
            live.abort().await;
        }
    }
}

impl<S: ?Sized> Drop for ProjectionHandle<S> {
    fn drop(&mut self) {
        if let Some(m) = self.monitor.take() {
            m.abort();
        }
    }
}

/// Lag measurement, without the store's type (for the health check).
#[async_trait]
trait Measure: Send + Sync {
    async fn measure_now(&self) -> Result<(u64, Duration)>;
    fn max_ready_lag(&self) -> u64;
    fn failed(&self) -> Option<String>;
}

#[async_trait]
impl<S> Measure for Shared<S>
where
    S: EventStore + SubscriptionSupport + ?Sized + 'static,
{
    async fn measure_now(&self) -> Result<(u64, Duration)> {
        self.measure().await
    }

    fn max_ready_lag(&self) -> u64 {
        self.options.max_ready_lag
    }

    fn failed(&self) -> Option<String> {
        self.status
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .failed
            .clone()
    }
}

struct Readiness {
    shared: Arc<dyn Measure>,
    name: String,
}

#[async_trait]
impl HealthCheck for Readiness {
    fn name(&self) -> &str {
        &self.name
    }

    fn probes(&self) -> &[Probe] {
        &[Probe::Readiness]
    }

    async fn check(&self) -> HealthReport {
        let started = Instant::now();
        if let Some(why) = self.shared.failed() {
            return HealthReport::unhealthy(
                started.elapsed(),
                format!("projection stopped: {why}"),
            );
        }
        let max = self.shared.max_ready_lag();
        match tokio::time::timeout(Duration::from_secs(5), self.shared.measure_now()).await {
            Err(_) => HealthReport::unhealthy(started.elapsed(), "no lag measurement within 5s"),
            Ok(Err(e)) => {
                HealthReport::unhealthy(started.elapsed(), format!("cannot measure lag: {e}"))
            }
            Ok(Ok((events, age))) if events > max => HealthReport::unhealthy(
                started.elapsed(),
                format!(
                    "more than {max} events behind (oldest waiting {:.1}s)",
                    age.as_secs_f64()
                ),
            ),
            Ok(Ok((0, _))) => HealthReport::healthy(started.elapsed()),
            Ok(Ok((events, age))) => HealthReport::healthy(started.elapsed()).with_detail(format!(
                "{events} events behind (oldest waiting {:.1}s)",
                age.as_secs_f64()
            )),
        }
    }
}
