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
//! * **Batched, read-your-own-writes**: events are applied in runs of up
//!   to [`ProjectionOptions::max_batch`] (default 100): each document the
//!   run touches is read once, changed in memory event by event, in log
//!   order, and the run's changes go out as one upsert and one delete,
//!   each waiting until Meilisearch applied it (bounded by
//!   [`ProjectionOptions::write_timeout`]), so the next run sees the
//!   current versions. When the projector fails on an event, what the
//!   events before it changed is written first and the projection stops
//!   before that event.
//! * **Rebuildable**: [`ProjectionHandle::rebuild`] replays the log from
//!   position 0 into a new index with the same settings, stops the live
//!   projection once the new index has caught up, lets it finish the last
//!   events, swaps the two indexes atomically (searches see the old
//!   contents or the new, never a half-built index), and resumes the live
//!   projection from the rebuild's position.
//! * **Observable**: lag (events not yet applied, and the age of the oldest
//!   one) is published as the gauges [`LAG_EVENTS`] and [`LAG_SECONDS`] and
//!   checked by a readiness [`HealthCheck`](keel_core::HealthCheck) ([`ProjectionHandle::readiness`]).

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use futures::TryStreamExt;
use keel_core::{BoxError, Position};
use keel_eventstore::{
    BatchFailure, Delivery, EventStore, RecordedEvent, Subscription, SubscriptionHandle,
    SubscriptionHandler, SubscriptionSupport,
};
use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Gauge, Meter};
use serde_json::Value;
use tokio::sync::watch;

use crate::engine::{SearchEngine, Wait};
use crate::error::{Result, SearchError};
use crate::names::{DocumentId, IndexName};
use crate::query::Document;
use crate::settings::IndexSettings;

mod handle;
mod options;

pub use handle::ProjectionHandle;
pub use options::{EventFilter, ProjectionOptions, ProjectionStatus, RebuildReport};

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

/// The handler the subscription calls: a run of events, the documents they
/// touch.
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
    /// Runs `write`, again after a pause while it fails for a retryable
    /// reason, up to [`ProjectionOptions::write_retries`] times.
    async fn retrying<F, Fut, T>(&self, mut write: F) -> Result<()>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let mut attempt = 0;
        loop {
            match write().await {
                Ok(_) => return Ok(()),
                Err(e) if e.is_retryable() && attempt < self.options.write_retries => {
                    attempt += 1;
                    let pause = Duration::from_millis(100 * 2u64.pow(attempt.min(5)));
                    tracing::warn!(projection = %self.options.name, error = %e, attempt, "search write failed; retrying");
                    tokio::time::sleep(pause).await;
                }
                Err(e) => return Err(e),
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
        // A run of one: the same path as every batch.
        self.handle_batch(&[Delivery::new(event, false)])
            .await
            .map_err(|failure| failure.source)
    }

    fn max_batch(&self) -> usize {
        self.options.max_batch
    }

    async fn handle_batch(
        &self,
        deliveries: &[Delivery<'_>],
    ) -> std::result::Result<(), BatchFailure> {
        let mut run = Run::default();
        let mut stopped = None;
        for (i, delivery) in deliveries.iter().enumerate() {
            if let Err(e) = self.step(delivery.event(), &mut run).await {
                stopped = Some((i, e));
                break;
            }
        }
        // What the run changed (up to a failed event) is written first.
        if let Err(w) = self.flush(&mut run).await {
            self.failed(deliveries[0].event(), &w);
            return Err(BatchFailure::new(0, w));
        }
        match stopped {
            Some((i, e)) => {
                self.failed(deliveries[i].event(), &e);
                Err(BatchFailure::new(i, e))
            }
            None => Ok(()),
        }
    }
}

/// The documents a run of events touched, as the events left them, and
/// what each event did (recorded in the status once the run is written).
#[derive(Default)]
struct Run {
    /// Each touched document after the run's events so far (`None`:
    /// deleted or never created), with whether an event changed it.
    docs: HashMap<DocumentId, (Option<Document>, bool)>,
    /// Each event's position and whether it changed a document (`None`:
    /// it concerns no document).
    steps: Vec<(Position, Option<bool>)>,
}

impl Apply {
    /// Records why the projection stopped.
    fn failed(&self, event: &RecordedEvent, e: &dyn fmt::Display) {
        // The subscription stops on a handler error; say why.
        self.status
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .failed = Some(format!("event at {}: {e}", event.position));
    }

    /// Applies `event` to the run's copy of its document (read from the
    /// index the first time the run touches it).
    async fn step(
        &self,
        event: &RecordedEvent,
        run: &mut Run,
    ) -> std::result::Result<(), BoxError> {
        let Some(id) = self.projector.document_id(event) else {
            run.steps.push((event.position, None));
            return Ok(());
        };
        let id = DocumentId::new(id)?;
        let stored = match run.docs.get(&id) {
            Some((doc, _)) => doc.clone(),
            None => {
                let doc = self.engine.get_document(&self.index, &id).await?;
                run.docs.insert(id.clone(), (doc.clone(), false));
                doc
            }
        };
        let current = match stored {
            Some(doc) if position_of(&doc).is_some_and(|p| p >= event.position) => {
                run.steps.push((event.position, Some(false)));
                return Ok(());
            }
            Some(mut doc) => {
                doc.remove(POSITION_FIELD);
                Some(doc)
            }
            None => None,
        };
        let next = self
            .projector
            .apply(current, event)?
            .map(|doc| self.stamp(doc, &id, event));
        run.docs.insert(id, (next, true));
        run.steps.push((event.position, Some(true)));
        Ok(())
    }

    /// Writes the run's changed documents (one upsert, one delete), then
    /// records its events in the status; the run is empty afterwards.
    async fn flush(&self, run: &mut Run) -> Result<()> {
        let mut upserts = Vec::new();
        let mut deletes = Vec::new();
        for (id, (doc, changed)) in run.docs.drain() {
            match (doc, changed) {
                (_, false) => {}
                (Some(doc), true) => upserts.push(doc),
                (None, true) => deletes.push(id),
            }
        }
        let written = upserts.len() + deletes.len();
        if !upserts.is_empty() {
            self.retrying(|| {
                self.engine.upsert_documents(
                    &self.index,
                    upserts.clone(),
                    Wait::applied(self.options.write_timeout),
                )
            })
            .await?;
        }
        if !deletes.is_empty() {
            self.retrying(|| {
                self.engine.delete_documents(
                    &self.index,
                    &deletes,
                    Wait::applied(self.options.write_timeout),
                )
            })
            .await?;
        }
        self.metrics
            .applied
            .add(written as u64, &self.metrics.attrs);
        for (position, changed) in run.steps.drain(..) {
            match changed {
                Some(applied) => self.mark(position, applied),
                None => {
                    self.status
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .position = Some(position);
                }
            }
        }
        Ok(())
    }

    /// `doc` as stored: with its primary key and the position of the event
    /// that made it.
    fn stamp(&self, mut doc: Document, id: &DocumentId, event: &RecordedEvent) -> Document {
        doc.insert(self.primary_key.clone(), Value::String(id.to_string()));
        doc.insert(
            POSITION_FIELD.to_owned(),
            Value::String(event.position.to_string()),
        );
        doc
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
