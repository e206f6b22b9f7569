//! What every store does on append besides storing: the current trace
//! context written into events that carry none, and the
//! `keel.eventstore.append.*` metrics.

use std::time::Instant;

use keel_core::{StreamId, TraceContext};
use keel_telemetry::KeelMetrics;
use keel_telemetry::metrics::AppendOutcome;

use crate::error::{EventStoreError, Result};
use crate::event::NewEvent;

/// Gives events without a trace context the current span's, looked up once
/// and only when some event needs it.
pub(crate) fn trace(events: &mut [NewEvent]) {
    let mut current: Option<Option<TraceContext>> = None;
    for event in events {
        let metadata = event.metadata_mut();
        if metadata.trace_context.is_some() {
            continue;
        }
        match current.get_or_insert_with(keel_telemetry::propagation::current_trace_context) {
            Some(tc) => metadata.trace_context = Some(tc.clone()),
            // No span now: no other event of the batch will find one either.
            None => return,
        }
    }
}

/// One append call being measured: its streams' categories and event
/// counts, and when it started.
pub(crate) struct Appending {
    started: Instant,
    streams: Vec<(StreamId, u64)>,
}

impl Appending {
    /// Starts measuring an append to `streams`, after writing the trace
    /// context into their events.
    pub(crate) fn start<'a>(
        streams: impl IntoIterator<Item = (&'a StreamId, &'a mut Vec<NewEvent>)>,
    ) -> Self {
        let streams = streams
            .into_iter()
            .map(|(stream, events)| {
                trace(events);
                (stream.clone(), events.len() as u64)
            })
            .collect();
        Self {
            started: Instant::now(),
            streams,
        }
    }

    /// Records how the call ended and passes its result on. A multi-stream
    /// append records one sample per stream on success; a conflict is
    /// counted against the stream that conflicted; any other error against
    /// the first stream.
    pub(crate) fn finish<T>(self, metrics: &KeelMetrics, result: Result<T>) -> Result<T> {
        let took = self.started.elapsed();
        match &result {
            Ok(_) => {
                for (stream, events) in &self.streams {
                    metrics.record_append(stream.category(), *events, took, AppendOutcome::Ok);
                }
            }
            Err(e) => {
                let (outcome, subject) = match e {
                    EventStoreError::Conflict(c) => (AppendOutcome::Conflict, Some(&c.subject)),
                    _ => (AppendOutcome::Error, None),
                };
                let stream = subject
                    .and_then(|s| self.streams.iter().find(|(id, _)| id.as_str() == s))
                    .or(self.streams.first());
                if let Some((stream, _)) = stream {
                    metrics.record_append(stream.category(), 0, took, outcome);
                }
            }
        }
        result
    }
}

/// A store's instruments: the global meter provider's as they were when the
/// store was built, unless replaced with the store's `with_metrics`.
#[derive(Clone, Debug)]
pub(crate) struct StoreMetrics(pub(crate) KeelMetrics);

impl Default for StoreMetrics {
    fn default() -> Self {
        Self(KeelMetrics::global())
    }
}

#[cfg(feature = "postgres")]
impl crate::PostgresEventStore {
    /// Records `keel.eventstore.append.*` through `metrics` instead of the
    /// global meter provider's instruments taken when the store was built.
    #[must_use]
    pub fn with_metrics(mut self, metrics: KeelMetrics) -> Self {
        self.metrics = StoreMetrics(metrics);
        self
    }
}
