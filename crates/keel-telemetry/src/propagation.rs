//! W3C trace context through events and messages.
//!
//! A producer writes the current span's context into
//! [`Metadata::trace_context`](keel_core::Metadata) ([`inject`],
//! [`with_current_trace`]); a consumer starts its span as a child of it
//! ([`set_parent`], [`consumer_span`]). The wire format is always W3C
//! `traceparent`/`tracestate`, whatever propagator the process installs
//! globally, because that is what [`TraceContext`] stores.
//!
//! The producer side ([`current_trace_context`], [`inject`],
//! [`with_current_trace`]) needs only the `opentelemetry` API and is always
//! built: Keel's adapters call it on every append, outbox write and
//! publish. It reads the *active* OpenTelemetry context, which the
//! `tracing_opentelemetry` layer set up by [`init`](crate::init) activates
//! whenever a span is entered; with no subscriber, or outside any span, it
//! finds nothing and costs a thread-local read. The consumer side and
//! [`trace_context_of`] need the `sdk` feature.

#[cfg(feature = "sdk")]
use std::collections::HashMap;

#[cfg(feature = "sdk")]
use keel_core::Delivery;
use keel_core::{Metadata, TraceContext};
use opentelemetry::Context;
#[cfg(feature = "sdk")]
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{SpanContext, TraceContextExt as _, TraceFlags};
#[cfg(feature = "sdk")]
use opentelemetry_sdk::propagation::TraceContextPropagator;
#[cfg(feature = "sdk")]
use tracing::Span;
#[cfg(feature = "sdk")]
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

#[cfg(feature = "sdk")]
const TRACEPARENT: &str = "traceparent";
#[cfg(feature = "sdk")]
const TRACESTATE: &str = "tracestate";

/// The W3C form of a valid span context: `traceparent` version `00` with
/// only the sampled flag kept, and the `tracestate` header when not empty.
fn encode(sc: &SpanContext) -> Option<TraceContext> {
    if !sc.is_valid() {
        return None;
    }
    let traceparent = format!(
        "00-{}-{}-{:02x}",
        sc.trace_id(),
        sc.span_id(),
        sc.trace_flags() & TraceFlags::SAMPLED
    );
    let tracestate = sc.trace_state().header();
    let tracestate = (!tracestate.is_empty()).then_some(tracestate);
    TraceContext::new(traceparent, tracestate).ok()
}

/// The W3C trace context of the active OpenTelemetry context (the entered
/// span's, under [`init`](crate::init)), or `None` when there is none.
fn active_trace_context() -> Option<TraceContext> {
    Context::map_current(|cx| {
        // Checked before encoding so the common "no span" case allocates
        // nothing.
        let span = cx.span();
        let sc = span.span_context();
        if sc.is_valid() { encode(sc) } else { None }
    })
}

/// The W3C trace context of `span`, or `None` when it has no valid
/// OpenTelemetry context (disabled, or no OpenTelemetry layer).
#[cfg(feature = "sdk")]
#[must_use]
pub fn trace_context_of(span: &Span) -> Option<TraceContext> {
    encode(span.context().span().span_context())
}

/// The W3C trace context of the current span: the active OpenTelemetry
/// context, else (with the `sdk` feature) the current `tracing` span's,
/// which covers subscribers whose OpenTelemetry layer does not activate
/// contexts on entry.
#[must_use]
pub fn current_trace_context() -> Option<TraceContext> {
    let active = active_trace_context();
    #[cfg(feature = "sdk")]
    if active.is_none() {
        let span = Span::current();
        if span.is_none() {
            return None;
        }
        return trace_context_of(&span);
    }
    active
}

/// Writes the current span's trace context into `metadata`, replacing any
/// there. Returns whether a context was written.
pub fn inject(metadata: &mut Metadata) -> bool {
    match current_trace_context() {
        Some(tc) => {
            metadata.trace_context = Some(tc);
            true
        }
        None => false,
    }
}

/// `metadata` with the current span's trace context, unless it already
/// carries one (an event relayed from the outbox keeps the trace of the
/// request that stored it).
#[must_use]
pub fn with_current_trace(mut metadata: Metadata) -> Metadata {
    if metadata.trace_context.is_none() {
        inject(&mut metadata);
    }
    metadata
}

#[cfg(feature = "sdk")]
/// The OpenTelemetry context carried by `metadata`: a remote parent for a
/// consumer span, or an empty context when there is none.
#[must_use]
pub fn extract(metadata: &Metadata) -> Context {
    match &metadata.trace_context {
        Some(tc) => context_from(tc),
        None => Context::new(),
    }
}

#[cfg(feature = "sdk")]
/// The OpenTelemetry context of a W3C trace context.
#[must_use]
pub fn context_from(trace_context: &TraceContext) -> Context {
    let mut carrier = HashMap::with_capacity(2);
    carrier.insert(
        TRACEPARENT.to_owned(),
        trace_context.traceparent().to_owned(),
    );
    if let Some(state) = trace_context.tracestate() {
        carrier.insert(TRACESTATE.to_owned(), state.to_owned());
    }
    TraceContextPropagator::new().extract(&carrier)
}

#[cfg(feature = "sdk")]
/// Makes `span` a child of the trace carried by `metadata`. Call it before
/// the span is first entered. Returns whether a parent was set (`false`
/// when `metadata` carries no context, the span is disabled, or it has
/// already started).
pub fn set_parent(span: &Span, metadata: &Metadata) -> bool {
    let Some(tc) = &metadata.trace_context else {
        return false;
    };
    let cx = context_from(tc);
    if !cx.span().span_context().is_valid() {
        return false;
    }
    span.set_parent(cx).is_ok()
}

#[cfg(feature = "sdk")]
/// A consumer span for `delivery`, child of the producer's span when the
/// message carries a trace context, following the OpenTelemetry messaging
/// conventions (`process <subscription>`, kind consumer).
///
/// ```
/// use keel_core::{Delivery, Message};
/// use tracing::Instrument;
///
/// async fn handle(delivery: &Delivery) {
///     async { /* handle the message */ }
///         .instrument(keel_telemetry::propagation::consumer_span(delivery))
///         .await
/// }
/// ```
#[must_use]
pub fn consumer_span(delivery: &Delivery) -> Span {
    let message = &delivery.message;
    let span = tracing::info_span!(
        "keel.bus.process",
        otel.name = %format_args!("process {}", delivery.subscription),
        otel.kind = "consumer",
        otel.status_code = tracing::field::Empty,
        messaging.system = "keel",
        messaging.operation.type = "process",
        messaging.destination.subscription.name = %delivery.subscription,
        messaging.message.id = %message.event_id,
        messaging.message.delivery_attempt = delivery.attempt,
        keel.event_type = %message.event_type,
        error.type = tracing::field::Empty,
    );
    set_parent(&span, &message.metadata);
    span
}

#[cfg(all(test, feature = "sdk"))]
mod tests {
    use super::*;

    #[test]
    fn context_round_trips_through_trace_context() {
        let tc = TraceContext::new(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            Some("vendor=abc".to_owned()),
        )
        .unwrap();
        let cx = context_from(&tc);
        let sc = cx.span().span_context().clone();
        assert!(sc.is_remote());
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(sc.span_id().to_string(), "00f067aa0ba902b7");
        assert!(sc.is_sampled());
        assert_eq!(sc.trace_state().header(), "vendor=abc");
    }

    #[test]
    fn nothing_to_inject_without_a_subscriber() {
        let mut metadata = Metadata::new();
        let span = tracing::info_span!("no subscriber");
        let _entered = span.enter();
        assert!(!inject(&mut metadata));
        assert_eq!(metadata.trace_context, None);
        assert!(!extract(&metadata).span().span_context().is_valid());
    }
}
