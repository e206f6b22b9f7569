//! Decorators that add spans, trace propagation and metrics around the bus
//! ports.
//!
//! Keel's own buses (`keel-eventbus`) record the bus metrics themselves and
//! write the trace context on publish; wrap them with `without_metrics` to
//! add the producer and consumer spans without counting twice. `new` (with
//! metrics) is for buses that record nothing of their own.

use std::time::Instant;

use async_trait::async_trait;
use keel_core::{Delivery, EventHandler, EventPublisher, HandlerError, Message, Result};
use tracing::Instrument as _;

use crate::metrics::{DeadLetterReason, HandleOutcome, KeelMetrics};
use crate::propagation;

/// An [`EventPublisher`] that publishes inside a producer span, writes that
/// span's W3C context into each message's metadata, and records
/// `keel.bus.publish.*` metrics.
///
/// A message that already carries a trace context keeps it: an event relayed
/// from the outbox continues the trace of the request that stored it.
///
/// ```
/// use std::sync::Arc;
/// use keel_core::EventPublisher;
/// use keel_telemetry::{KeelMetrics, TracedPublisher};
///
/// fn wire<P: EventPublisher + 'static>(bus: P) -> Arc<dyn EventPublisher> {
///     Arc::new(TracedPublisher::new(bus, KeelMetrics::global()))
/// }
/// ```
#[derive(Debug, Clone)]
pub struct TracedPublisher<P> {
    inner: P,
    metrics: Option<KeelMetrics>,
}

impl<P> TracedPublisher<P> {
    /// Wraps `inner`, recording through `metrics`.
    pub fn new(inner: P, metrics: KeelMetrics) -> Self {
        Self {
            inner,
            metrics: Some(metrics),
        }
    }

    /// Wraps `inner` for spans and propagation only, for a publisher that
    /// records `keel.bus.publish.*` itself (Keel's buses do).
    pub fn without_metrics(inner: P) -> Self {
        Self {
            inner,
            metrics: None,
        }
    }

    /// The wrapped publisher.
    pub fn inner(&self) -> &P {
        &self.inner
    }
}

#[async_trait]
impl<P: EventPublisher> EventPublisher for TracedPublisher<P> {
    async fn publish(&self, topic: &str, messages: &[Message]) -> Result<()> {
        let span = tracing::info_span!(
            "keel.bus.publish",
            otel.name = %format_args!("publish {topic}"),
            otel.kind = "producer",
            otel.status_code = tracing::field::Empty,
            messaging.system = "keel",
            messaging.operation.type = "send",
            messaging.destination.name = %topic,
            messaging.batch.message_count = messages.len(),
            error.type = tracing::field::Empty,
        );
        let traced: Vec<Message> = {
            let _entered = span.enter();
            messages
                .iter()
                .map(|m| {
                    let metadata = propagation::with_current_trace(m.metadata.clone());
                    m.clone().with_metadata(metadata)
                })
                .collect()
        };
        let started = Instant::now();
        let result = self
            .inner
            .publish(topic, &traced)
            .instrument(span.clone())
            .await;
        if let Some(metrics) = &self.metrics {
            metrics.record_publish(
                topic,
                messages.len() as u64,
                started.elapsed(),
                result.is_ok(),
            );
        }
        if let Err(e) = &result {
            span.record("otel.status_code", "error");
            span.record("error.type", e.code());
            tracing::warn!(parent: &span, error = %e, code = e.code(), "publish failed");
        }
        result
    }
}

/// An [`EventHandler`] that handles each delivery inside a consumer span
/// that is a child of the producer's span, and records ack, nack, dead-letter
/// and handler-duration metrics.
///
/// ```
/// use keel_core::{Delivery, EventHandler, HandlerError};
/// use keel_telemetry::{KeelMetrics, TracedHandler};
///
/// struct SendReceipt;
///
/// #[async_trait::async_trait]
/// impl EventHandler for SendReceipt {
///     async fn handle(&self, _delivery: &Delivery) -> Result<(), HandlerError> {
///         Ok(())
///     }
/// }
///
/// let handler = TracedHandler::new(SendReceipt, KeelMetrics::global());
/// # let _ = handler;
/// ```
#[derive(Debug, Clone)]
pub struct TracedHandler<H> {
    inner: H,
    metrics: Option<KeelMetrics>,
}

impl<H> TracedHandler<H> {
    /// Wraps `inner`, recording through `metrics`.
    pub fn new(inner: H, metrics: KeelMetrics) -> Self {
        Self {
            inner,
            metrics: Some(metrics),
        }
    }

    /// Wraps `inner` for the consumer span only, for a handler run by a bus
    /// that records acks, nacks, dead letters and handler duration itself
    /// (Keel's buses do).
    pub fn without_metrics(inner: H) -> Self {
        Self {
            inner,
            metrics: None,
        }
    }

    /// The wrapped handler.
    pub fn inner(&self) -> &H {
        &self.inner
    }
}

#[async_trait]
impl<H: EventHandler> EventHandler for TracedHandler<H> {
    async fn handle(&self, delivery: &Delivery) -> std::result::Result<(), HandlerError> {
        let span = propagation::consumer_span(delivery);
        let started = Instant::now();
        let result = self.inner.handle(delivery).instrument(span.clone()).await;
        let elapsed = started.elapsed();
        let subscription = delivery.subscription.as_str();
        let metrics = self.metrics.as_ref();
        match &result {
            Ok(()) => {
                if let Some(m) = metrics {
                    m.record_handled(subscription, elapsed, HandleOutcome::Ack);
                }
            }
            Err(HandlerError::Reject(e)) => {
                if let Some(m) = metrics {
                    m.record_handled(subscription, elapsed, HandleOutcome::Reject);
                    m.record_dead_letter(subscription, DeadLetterReason::Rejected);
                }
                span.record("otel.status_code", "error");
                span.record("error.type", "reject");
                tracing::error!(
                    parent: &span,
                    error = %e,
                    "handler rejected the message; it goes to the dead-letter topic"
                );
            }
            // Retry, and any kind added later: the bus redelivers.
            Err(e) => {
                if let Some(m) = metrics {
                    m.record_handled(subscription, elapsed, HandleOutcome::Retry);
                }
                span.record("otel.status_code", "error");
                span.record("error.type", "retry");
                tracing::warn!(
                    parent: &span,
                    error = %e,
                    attempt = delivery.attempt,
                    "handler failed; the message will be redelivered"
                );
            }
        }
        result
    }
}
