//! The command pipeline's tracing layer: the command span continues the
//! envelope's incoming trace, the handler's spans are its children, the
//! envelope carries the command span's context to the handler's events, and
//! each command's duration is recorded by outcome. A test binary of its own,
//! because it installs span exporters that other tests must not share.

mod common;

use std::sync::{Arc, Mutex};

use common::{MetricsProbe, attr, traced};
use keel_core::command::{Command, CommandEnvelope, CommandHandler, Handled, HandlerService};
use keel_core::{
    AggregateRef, CommandError, DomainError, Error, Metadata, PipelineError, Principal,
    TraceContext,
};
use keel_telemetry::metrics::names;
use keel_telemetry::{CommandTracingLayer, TelemetryConfig};
use tower::{Layer, Service, ServiceExt};
use tracing::instrument::WithSubscriber as _;

const REMOTE_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const REMOTE_SPAN: &str = "00f067aa0ba902b7";

struct Rename {
    name: String,
}

impl Command for Rename {
    fn command_type(&self) -> &'static str {
        "cart.rename"
    }
    fn target(&self) -> Option<AggregateRef> {
        Some(AggregateRef::new("Cart", "c-1"))
    }
}

/// Opens a span of its own and keeps the metadata its events would carry.
#[derive(Default)]
struct Renamer {
    event_metadata: Mutex<Vec<Metadata>>,
}

#[async_trait::async_trait]
impl CommandHandler<Rename> for Arc<Renamer> {
    type Output = ();

    async fn handle(
        &self,
        envelope: CommandEnvelope<Rename>,
    ) -> Result<Handled<()>, PipelineError> {
        let span = tracing::info_span!("load_cart");
        span.in_scope(|| {
            self.event_metadata
                .lock()
                .unwrap()
                .push(envelope.event_metadata());
        });
        match envelope.command.name.as_str() {
            "" => Err(CommandError::Rejected(DomainError::new(
                "cart.name_empty",
                "a cart needs a name",
            ))),
            "down" => Err(Error::unavailable(
                "postgres",
                "connection refused",
                std::io::Error::other("refused"),
            )
            .into()),
            _ => Ok(Handled::new(()).with_events(["cart.renamed"])),
        }
    }
}

fn incoming(name: &str) -> CommandEnvelope<Rename> {
    let metadata = Metadata::new().with_trace_context(
        TraceContext::new(format!("00-{REMOTE_TRACE}-{REMOTE_SPAN}-01"), None).unwrap(),
    );
    CommandEnvelope::new(Rename { name: name.into() })
        .with_metadata(metadata)
        .with_principal(Principal::new("user-7"))
}

#[tokio::test]
async fn the_handler_runs_in_a_child_of_the_incoming_trace() {
    let t = traced(TelemetryConfig::new("carts"));
    let probe = MetricsProbe::new();
    let handler = Arc::new(Renamer::default());
    let mut service = CommandTracingLayer::new(probe.metrics.clone())
        .layer(HandlerService::new(Arc::clone(&handler)));

    let envelope = incoming("groceries");
    let command_id = envelope.command_id;
    let correlation_id = envelope.correlation_id().unwrap();
    async {
        service.ready().await.unwrap().call(envelope).await.unwrap();
    }
    .with_subscriber(t.dispatch.clone())
    .await;

    let command = t.span("command cart.rename");
    let load = t.span("load_cart");
    assert_eq!(command.span_context.trace_id().to_string(), REMOTE_TRACE);
    assert_eq!(command.parent_span_id.to_string(), REMOTE_SPAN);
    assert!(command.parent_span_is_remote);
    assert_eq!(load.span_context.trace_id().to_string(), REMOTE_TRACE);
    assert_eq!(load.parent_span_id, command.span_context.span_id());

    assert_eq!(
        attr(&command, "keel.command.type").as_deref(),
        Some("cart.rename")
    );
    assert_eq!(
        attr(&command, "keel.command.id"),
        Some(command_id.to_string())
    );
    assert_eq!(
        attr(&command, "keel.correlation_id"),
        Some(correlation_id.to_string())
    );
    assert_eq!(attr(&command, "enduser.id").as_deref(), Some("user-7"));
    assert_eq!(attr(&command, "keel.outcome").as_deref(), Some("accepted"));

    // The events the handler appends name the command's span, not the
    // caller's, and keep the correlation id.
    let seen = handler.event_metadata.lock().unwrap()[0].clone();
    let tc = seen.trace_context.expect("trace context written back");
    assert_eq!(tc.trace_id(), REMOTE_TRACE);
    assert!(
        tc.traceparent()
            .contains(&command.span_context.span_id().to_string()),
        "{} should name the command span",
        tc.traceparent()
    );
    assert_eq!(seen.correlation_id, Some(correlation_id));
    assert_eq!(seen.causation_id, Some(command_id.into()));

    let duration = probe.point(
        names::COMMAND_DURATION,
        &[
            (names::ATTR_COMMAND_TYPE, "cart.rename"),
            (names::ATTR_OUTCOME, "accepted"),
        ],
    );
    assert_eq!(duration.value, 1.0);
    assert_eq!(duration.unit, "s");
}

#[tokio::test]
async fn a_command_without_incoming_context_starts_a_trace_and_outcomes_are_recorded() {
    let t = traced(TelemetryConfig::new("carts"));
    let probe = MetricsProbe::new();
    let handler = Arc::new(Renamer::default());
    let mut service = CommandTracingLayer::new(probe.metrics.clone())
        .layer(HandlerService::new(Arc::clone(&handler)));

    let (rejected, failed) = async {
        let rejected = service
            .ready()
            .await
            .unwrap()
            .call(CommandEnvelope::new(Rename {
                name: String::new(),
            }))
            .await
            .unwrap_err();
        let failed = service
            .ready()
            .await
            .unwrap()
            .call(CommandEnvelope::new(Rename {
                name: "down".into(),
            }))
            .await
            .unwrap_err();
        (rejected, failed)
    }
    .with_subscriber(t.dispatch.clone())
    .await;
    assert_eq!(rejected.as_rejection().unwrap().code(), "cart.name_empty");
    assert!(failed.as_infrastructure().unwrap().is_retryable());

    let spans = t.finished();
    let commands: Vec<_> = spans
        .iter()
        .filter(|s| s.name == "command cart.rename")
        .collect();
    assert_eq!(commands.len(), 2);
    for span in &commands {
        // A root span: no parent, its own trace.
        assert_eq!(span.parent_span_id, opentelemetry::trace::SpanId::INVALID);
        assert_ne!(span.span_context.trace_id().to_string(), REMOTE_TRACE);
        assert_eq!(attr(span, "enduser.id"), None);
    }
    let outcomes: Vec<_> = commands
        .iter()
        .map(|s| {
            (
                attr(s, "keel.outcome").unwrap(),
                attr(s, "error.type").unwrap(),
            )
        })
        .collect();
    assert_eq!(
        outcomes,
        [
            ("rejected".to_owned(), "cart.name_empty".to_owned()),
            ("error".to_owned(), "keel.unavailable".to_owned())
        ]
    );
    // Each handler still ran inside its command's trace.
    for metadata in handler.event_metadata.lock().unwrap().iter() {
        let tc = metadata.trace_context.as_ref().unwrap();
        assert!(commands.iter().any(|s| {
            tc.traceparent()
                .contains(&s.span_context.span_id().to_string())
        }));
    }

    for outcome in ["rejected", "error"] {
        let point = probe.point(
            names::COMMAND_DURATION,
            &[
                (names::ATTR_COMMAND_TYPE, "cart.rename"),
                (names::ATTR_OUTCOME, outcome),
            ],
        );
        assert_eq!(point.value, 1.0, "{outcome}");
    }
}
