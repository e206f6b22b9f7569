//! Events on their way in ([`NewEvent`]) and on their way out
//! ([`RecordedEvent`]), append results and read options.

mod read;
#[cfg(test)]
mod tests;

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use keel_core::{
    DomainEvent, EventEnvelope, EventId, ExpectedVersion, Metadata, Position, StreamId, Version,
};
use serde::de::DeserializeOwned;

use crate::error::{EventStoreError, Result};

pub use read::{ReadAll, ReadDirection, ReadStream};

/// The default payload size limit: 1 MiB.
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 1024 * 1024;

/// The longest event type name accepted, in bytes.
pub const MAX_EVENT_TYPE_LEN: usize = 200;

/// The most metadata one event may carry, in bytes of text (actor, tenant,
/// trace context and the free pairs, keys included). Metadata describes an
/// event; anything larger belongs in the payload.
pub const MAX_METADATA_BYTES: usize = 64 * 1024;

/// The text an event's metadata holds, in bytes: what
/// [`MAX_METADATA_BYTES`] limits. Ids count at their fixed text length.
fn metadata_size(m: &keel_core::Metadata) -> usize {
    const ID: usize = 36;
    let ids =
        ID * (usize::from(m.correlation_id.is_some()) + usize::from(m.causation_id.is_some()));
    let trace = m.trace_context.as_ref().map_or(0, |t| {
        t.traceparent().len() + t.tracestate().map_or(0, str::len)
    });
    let extra: usize = m.extra.iter().map(|(k, v)| k.len() + v.len()).sum();
    ids + trace
        + m.actor.as_ref().map_or(0, String::len)
        + m.tenant.as_ref().map_or(0, |t| t.as_str().len())
        + extra
}

/// An event to append: id, type, schema version, JSON payload and metadata.
#[derive(Clone, Debug, PartialEq)]
pub struct NewEvent {
    event_id: EventId,
    event_type: String,
    schema_version: u32,
    payload: String,
    metadata: Metadata,
}

impl NewEvent {
    /// Serializes a domain event, with a fresh id and empty metadata.
    pub fn from_domain<E: DomainEvent>(event: &E) -> Result<Self> {
        let payload =
            serde_json::to_string(event).map_err(|source| EventStoreError::Serialize {
                event_type: event.event_type().to_owned(),
                source,
            })?;
        Ok(Self {
            event_id: EventId::new(),
            event_type: event.event_type().to_owned(),
            schema_version: event.schema_version(),
            payload,
            metadata: Metadata::new(),
        })
    }

    /// An event from a JSON value (schema version 1, fresh id).
    pub fn from_json(event_type: impl Into<String>, payload: &serde_json::Value) -> Self {
        Self {
            event_id: EventId::new(),
            event_type: event_type.into(),
            schema_version: 1,
            payload: payload.to_string(),
            metadata: Metadata::new(),
        }
    }

    /// An event from raw JSON bytes, validated here: bytes that are not one
    /// JSON value give [`EventStoreError::NotJson`].
    pub fn from_json_bytes(event_type: impl Into<String>, payload: &[u8]) -> Result<Self> {
        let event_type = event_type.into();
        let text = std::str::from_utf8(payload).map_err(|_| EventStoreError::NotJson {
            event_type: event_type.clone(),
            source: serde_json::from_slice::<serde::de::IgnoredAny>(payload)
                .err()
                .unwrap_or_else(|| serde::de::Error::custom("payload is not UTF-8")),
        })?;
        if let Err(source) = serde_json::from_str::<serde::de::IgnoredAny>(text) {
            return Err(EventStoreError::NotJson { event_type, source });
        }
        Ok(Self {
            event_id: EventId::new(),
            event_type,
            schema_version: 1,
            payload: text.to_owned(),
            metadata: Metadata::new(),
        })
    }

    /// Sets the event id (to make an append retryable, choose ids up front).
    #[must_use]
    pub fn with_id(mut self, id: EventId) -> Self {
        self.event_id = id;
        self
    }

    /// Sets the metadata.
    #[must_use]
    pub fn with_metadata(mut self, metadata: Metadata) -> Self {
        self.metadata = metadata;
        self
    }

    /// Sets the payload's schema version.
    #[must_use]
    pub fn with_schema_version(mut self, version: u32) -> Self {
        self.schema_version = version;
        self
    }

    /// The event id.
    #[must_use]
    pub fn event_id(&self) -> EventId {
        self.event_id
    }

    /// The event type.
    #[must_use]
    pub fn event_type(&self) -> &str {
        &self.event_type
    }

    /// The payload's schema version.
    #[must_use]
    pub fn schema_version(&self) -> u32 {
        self.schema_version
    }

    /// The JSON payload as text.
    #[must_use]
    pub fn payload_json(&self) -> &str {
        &self.payload
    }

    /// The metadata.
    #[must_use]
    pub fn metadata(&self) -> &Metadata {
        &self.metadata
    }

    /// The metadata, to fill in what the store adds (the trace context).
    pub(crate) fn metadata_mut(&mut self) -> &mut Metadata {
        &mut self.metadata
    }
}

/// Checks a batch before anything is written. Shared by every store so they
/// refuse exactly the same input.
pub(crate) fn validate_batch(
    expected: ExpectedVersion,
    events: &[NewEvent],
    max_payload_bytes: usize,
) -> Result<()> {
    if events.is_empty() {
        return Err(EventStoreError::invalid(
            "events",
            "an append needs at least one event",
        ));
    }
    if let ExpectedVersion::Exact(v) = expected
        && i64::try_from(v.get()).is_err()
    {
        return Err(EventStoreError::invalid(
            "expected_version",
            format!("{v} is beyond the largest storable version"),
        ));
    }
    let mut seen = HashSet::with_capacity(events.len());
    for e in events {
        if e.event_type.is_empty() || e.event_type.len() > MAX_EVENT_TYPE_LEN {
            return Err(EventStoreError::invalid(
                "event_type",
                format!("must be 1 to {MAX_EVENT_TYPE_LEN} bytes"),
            ));
        }
        if e.event_type.chars().any(char::is_control) {
            return Err(EventStoreError::invalid(
                "event_type",
                "must not contain control characters",
            ));
        }
        if e.schema_version == 0 || i32::try_from(e.schema_version).is_err() {
            return Err(EventStoreError::invalid(
                "schema_version",
                "must be between 1 and 2147483647",
            ));
        }
        if e.payload.len() > max_payload_bytes {
            return Err(EventStoreError::PayloadTooLarge {
                event_type: e.event_type.clone(),
                size: e.payload.len(),
                limit: max_payload_bytes,
            });
        }
        let metadata = metadata_size(&e.metadata);
        if metadata > MAX_METADATA_BYTES {
            return Err(EventStoreError::invalid(
                "metadata",
                format!(
                    "holds {metadata} bytes for event type {:?}; at most {MAX_METADATA_BYTES} are allowed",
                    e.event_type
                ),
            ));
        }
        if !seen.insert(e.event_id) {
            return Err(EventStoreError::invalid(
                "event_id",
                format!("{} appears twice in one append", e.event_id),
            ));
        }
    }
    Ok(())
}

/// An event as stored, with its payload still JSON text.
///
/// Decode it with [`decode`](Self::decode) (or through an
/// [`Upcasters`](crate::Upcasters) chain first), or keep it raw.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct RecordedEvent {
    /// The event's unique id.
    pub event_id: EventId,
    /// The stream it belongs to.
    pub stream_id: StreamId,
    /// Its version in the stream (the first event is 1).
    pub version: Version,
    /// Its position in the global log.
    pub position: Position,
    /// The stable event type name.
    pub event_type: String,
    /// The payload's schema version.
    pub schema_version: u32,
    /// When the store committed it (server clock).
    pub recorded_at: DateTime<Utc>,
    /// Correlation, causation, trace context, actor, tenant, free pairs.
    /// Read it like a [`Metadata`] (`event.metadata.correlation_id`); a
    /// stored event's metadata is parsed on first access.
    pub metadata: StoredMetadata,
    /// The payload as JSON text.
    pub payload: String,
}

/// An event's [`Metadata`], parsed from its stored JSON text the first time
/// it is read (dereference it like a `Metadata`).
///
/// Reading the global log mostly moves events along (to a projection that
/// looks at a few of them, to a relay that copies the text): parsing every
/// event's metadata up front was about a sixth of the time it took to read
/// one. Keel writes the text itself and the database keeps it valid JSON,
/// so it always parses; text that does not fit [`Metadata`] (written by
/// something else) reads as empty metadata, with a warning.
#[derive(Clone, Default)]
pub struct StoredMetadata {
    text: Option<Box<str>>,
    parsed: std::sync::OnceLock<Metadata>,
}

impl StoredMetadata {
    /// Metadata kept as JSON text, parsed on first access.
    #[must_use]
    pub fn from_json(text: impl Into<Box<str>>) -> Self {
        Self {
            text: Some(text.into()),
            parsed: std::sync::OnceLock::new(),
        }
    }

    /// The parsed metadata (as dereferencing does).
    #[must_use]
    pub fn get(&self) -> &Metadata {
        self.parsed.get_or_init(|| {
            let Some(text) = self.text.as_deref() else {
                return Metadata::default();
            };
            serde_json::from_str(text).unwrap_or_else(|error| {
                tracing::warn!(%error, "stored event metadata does not fit keel_core::Metadata; reading it as empty");
                Metadata::default()
            })
        })
    }

    /// The stored JSON text, when this came from a store that keeps text
    /// and has not been replaced.
    #[must_use]
    pub fn json(&self) -> Option<&str> {
        self.text.as_deref()
    }

    /// The parsed metadata, owned.
    #[must_use]
    pub fn into_metadata(self) -> Metadata {
        let _parsed = self.get();
        self.parsed.into_inner().unwrap_or_default()
    }
}

impl From<Metadata> for StoredMetadata {
    fn from(metadata: Metadata) -> Self {
        Self {
            text: None,
            parsed: std::sync::OnceLock::from(metadata),
        }
    }
}

impl std::ops::Deref for StoredMetadata {
    type Target = Metadata;

    fn deref(&self) -> &Metadata {
        self.get()
    }
}

impl std::fmt::Debug for StoredMetadata {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.get().fmt(f)
    }
}

impl PartialEq for StoredMetadata {
    fn eq(&self, other: &Self) -> bool {
        self.get() == other.get()
    }
}

impl PartialEq<Metadata> for StoredMetadata {
    fn eq(&self, other: &Metadata) -> bool {
        self.get() == other
    }
}

impl RecordedEvent {
    /// The payload as a JSON value.
    pub fn payload_value(&self) -> Result<serde_json::Value> {
        serde_json::from_str(&self.payload).map_err(|source| self.decode_error(source))
    }

    /// Decodes the payload into `E`, checking that the decoded event reports
    /// the stored event type.
    pub fn decode<E: DomainEvent>(&self) -> Result<EventEnvelope<E>> {
        let payload: E =
            serde_json::from_str(&self.payload).map_err(|source| self.decode_error(source))?;
        if payload.event_type() != self.event_type {
            return Err(EventStoreError::UnknownEventType {
                event_type: self.event_type.clone(),
                stream_id: self.stream_id.clone(),
                version: self.version,
            });
        }
        Ok(self.envelope_with(payload))
    }

    /// Decodes the payload into any deserializable type, without the event
    /// type check of [`decode`](Self::decode).
    pub fn decode_as<T: DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_str(&self.payload).map_err(|source| self.decode_error(source))
    }

    /// Wraps the decoded payload in an envelope.
    pub fn envelope_with<E>(&self, payload: E) -> EventEnvelope<E> {
        EventEnvelope::new(
            self.event_id,
            self.stream_id.clone(),
            self.version,
            self.position,
            self.event_type.clone(),
            self.schema_version,
            self.recorded_at,
            self.metadata.get().clone(),
            payload,
        )
    }

    fn decode_error(&self, source: serde_json::Error) -> EventStoreError {
        EventStoreError::Decode {
            event_type: self.event_type.clone(),
            schema_version: self.schema_version,
            stream_id: self.stream_id.clone(),
            version: self.version,
            source,
        }
    }
}

/// What an append stored.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct AppendResult {
    /// The stream appended to.
    pub stream_id: StreamId,
    /// The version of the first event of the batch.
    pub first_version: Version,
    /// The stream's version after the batch: pass it as the expected version
    /// of the next append.
    pub next_expected_version: Version,
    /// Each event's global position, in batch order.
    pub positions: Vec<Position>,
    /// `true` when the batch had been stored already by an earlier identical
    /// append and nothing new was written.
    pub was_retry: bool,
}

/// One stream's part of an atomic multi-stream append.
#[derive(Clone, Debug)]
pub struct StreamAppend {
    /// The stream to append to.
    pub stream_id: StreamId,
    /// What the stream's version must be.
    pub expected: ExpectedVersion,
    /// The events, in order.
    pub events: Vec<NewEvent>,
}

impl StreamAppend {
    /// Builds one stream's part of a multi-stream append.
    #[must_use]
    pub fn new(stream_id: StreamId, expected: ExpectedVersion, events: Vec<NewEvent>) -> Self {
        Self {
            stream_id,
            expected,
            events,
        }
    }
}

/// The default of [`StoreConfig::horizon_max_age`].
pub const DEFAULT_HORIZON_MAX_AGE: std::time::Duration = std::time::Duration::from_millis(5);

/// Settings shared by both stores.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoreConfig {
    /// The largest payload accepted, in bytes (default 1 MiB).
    pub max_payload_bytes: usize,
    /// Rows per read query (default 5,000). The PostgreSQL store streams the
    /// rows of each query as they are consumed, so this trades round trips
    /// against how long one query holds a pooled connection; the in-memory
    /// store copies this many events at a time.
    pub read_batch_size: u32,
    /// Whether appends send a `NOTIFY` so subscriptions wake at once
    /// (default on; without it they wake on their polling interval).
    pub notify_on_append: bool,
    /// How long a global-log read waits, at its end, for appending
    /// transactions still running to finish so that events committed before
    /// the read are not held back (default 5 s). See `docs/event-store.md`
    /// ("The read horizon").
    pub settle_timeout: std::time::Duration,
    /// How old a read horizon the PostgreSQL store's global reads may reuse
    /// (default 5 ms). The store's readers (global reads, subscriptions,
    /// projections, relays on one `PostgresEventStore` and its clones)
    /// share one horizon value, computed one reader at a time while the
    /// others wait for it. A read's first batch takes one computed since
    /// the read began (so readers woken together share it); its later
    /// batches reuse one up to this age. A reused
    /// horizon is never newer than a fresh one: it can delay an event by up
    /// to this age, never skip it (see `docs/event-store.md`, "The read
    /// horizon"). Zero computes it in every batch's own transaction, as
    /// before the cache existed. The in-memory store ignores it.
    pub horizon_max_age: std::time::Duration,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
            read_batch_size: 5_000,
            notify_on_append: true,
            settle_timeout: std::time::Duration::from_secs(5),
            horizon_max_age: DEFAULT_HORIZON_MAX_AGE,
        }
    }
}

impl StoreConfig {
    /// Sets the payload size limit.
    #[must_use]
    pub fn max_payload_bytes(mut self, bytes: usize) -> Self {
        self.max_payload_bytes = bytes;
        self
    }

    /// Sets the read batch size (at least 1).
    #[must_use]
    pub fn read_batch_size(mut self, rows: u32) -> Self {
        self.read_batch_size = rows.max(1);
        self
    }

    /// Sets how long a global-log read waits for running transactions.
    #[must_use]
    pub fn settle_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.settle_timeout = timeout;
        self
    }

    /// Sets how old a shared read horizon a global-read batch may reuse
    /// (`Duration::ZERO`: compute it in every batch).
    #[must_use]
    pub fn horizon_max_age(mut self, age: std::time::Duration) -> Self {
        self.horizon_max_age = age;
        self
    }

    /// Turns the append notification on or off.
    #[must_use]
    pub fn notify_on_append(mut self, on: bool) -> Self {
        self.notify_on_append = on;
        self
    }
}
