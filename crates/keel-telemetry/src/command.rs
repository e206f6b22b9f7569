//! The command pipeline's tracing layer: one span and one duration sample
//! per command.
//!
//! [`CommandTracingLayer`] is the outermost layer of a command pipeline (see
//! [`keel_core::command`] and `docs/command-pipeline.md`). For each
//! [`CommandEnvelope`] it
//!
//! 1. opens a `keel.command` span (`otel.name` = `command <type>`) with the
//!    command's type, id and correlation id, and the principal's subject
//!    (`enduser.id`) when the envelope already names one;
//! 2. makes that span a child of the envelope's incoming
//!    [`trace_context`](keel_core::Metadata::trace_context), when there is
//!    one, so a command sent by another service continues its trace;
//! 3. writes the span's own context back into the envelope's metadata, so the
//!    events the handler appends (with
//!    [`CommandEnvelope::event_metadata`]) carry the command's trace;
//! 4. runs the rest of the pipeline inside the span and records the outcome
//!    (`keel.outcome`: `accepted`, `rejected`, `unauthorized`, `forbidden`,
//!    `error`) on the span and in the `keel.command.duration` histogram.
//!
//! A layer below that learns who the caller is (the authentication layer)
//! can fill in `enduser.id` with
//! `tracing::Span::current().record("enduser.id", subject)`: its future runs
//! inside this span.

use std::task::{Context, Poll};
use std::time::Instant;

use keel_core::command::{BoxFuture, Command, CommandEnvelope, Handled, PipelineError};
use tower::{Layer, Service};
use tracing::Instrument as _;

use crate::metrics::{CommandOutcome, KeelMetrics};
use crate::propagation;

/// The name of the span opened for each command.
pub const COMMAND_SPAN: &str = "keel.command";

/// A [`Layer`] that traces and measures each command (see the
/// [module docs](self)).
///
/// ```
/// use keel_core::command::{Command, CommandEnvelope, CommandHandler, Handled, HandlerService};
/// use keel_core::PipelineError;
/// use keel_telemetry::{CommandTracingLayer, KeelMetrics};
/// use tower::{Layer, Service, ServiceExt};
///
/// struct Ping;
/// impl Command for Ping {
///     fn command_type(&self) -> &'static str { "ping" }
/// }
///
/// struct Pong;
/// #[async_trait::async_trait]
/// impl CommandHandler<Ping> for Pong {
///     type Output = &'static str;
///     async fn handle(&self, _: CommandEnvelope<Ping>) -> Result<Handled<&'static str>, PipelineError> {
///         Ok(Handled::new("pong"))
///     }
/// }
///
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let mut service = CommandTracingLayer::new(KeelMetrics::global()).layer(HandlerService::new(Pong));
/// let handled = service.ready().await.unwrap().call(CommandEnvelope::new(Ping)).await.unwrap();
/// assert_eq!(handled.output, "pong");
/// # });
/// ```
#[derive(Clone, Debug)]
pub struct CommandTracingLayer {
    metrics: Option<KeelMetrics>,
}

impl CommandTracingLayer {
    /// A layer recording `keel.command.duration` through `metrics`.
    #[must_use]
    pub fn new(metrics: KeelMetrics) -> Self {
        Self {
            metrics: Some(metrics),
        }
    }

    /// A layer that opens spans but records no metric.
    #[must_use]
    pub fn without_metrics() -> Self {
        Self { metrics: None }
    }
}

impl<S> Layer<S> for CommandTracingLayer {
    type Service = CommandTracing<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CommandTracing {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// The [`Service`] made by [`CommandTracingLayer`].
#[derive(Clone, Debug)]
pub struct CommandTracing<S> {
    inner: S,
    metrics: Option<KeelMetrics>,
}

impl<S> CommandTracing<S> {
    /// The wrapped service.
    pub fn inner(&self) -> &S {
        &self.inner
    }
}

/// The span for one command, child of the envelope's trace context when it
/// carries one.
fn command_span<C: Command>(envelope: &CommandEnvelope<C>) -> tracing::Span {
    let command_type = envelope.command_type();
    let span = tracing::info_span!(
        COMMAND_SPAN,
        otel.name = %format_args!("command {command_type}"),
        otel.status_code = tracing::field::Empty,
        keel.command.type = command_type,
        keel.command.id = %envelope.command_id,
        keel.correlation_id = tracing::field::Empty,
        enduser.id = tracing::field::Empty,
        keel.outcome = tracing::field::Empty,
        error.type = tracing::field::Empty,
    );
    if let Some(id) = envelope.correlation_id() {
        span.record("keel.correlation_id", tracing::field::display(id));
    }
    if let Some(principal) = &envelope.principal {
        span.record("enduser.id", principal.subject.as_str());
    }
    propagation::set_parent(&span, &envelope.metadata);
    span
}

impl<C, S, T> Service<CommandEnvelope<C>> for CommandTracing<S>
where
    C: Command,
    S: Service<CommandEnvelope<C>, Response = Handled<T>, Error = PipelineError>,
    S::Future: Send + 'static,
    T: Send + 'static,
{
    type Response = Handled<T>;
    type Error = PipelineError;
    type Future = BoxFuture<Result<Handled<T>, PipelineError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut envelope: CommandEnvelope<C>) -> Self::Future {
        let command_type = envelope.command_type();
        let span = command_span(&envelope);
        let started = Instant::now();
        let future = {
            let _entered = span.enter();
            // From here on, events appended with `event_metadata()` belong
            // to this command's span, not to the caller's.
            propagation::inject(&mut envelope.metadata);
            self.inner.call(envelope)
        };
        let metrics = self.metrics.clone();
        Box::pin(async move {
            let result = future.instrument(span.clone()).await;
            let outcome = CommandOutcome::of(&result);
            span.record("keel.outcome", outcome.as_str());
            match &result {
                Ok(_) => {}
                Err(keel_core::CommandError::Rejected(rejection)) => {
                    span.record("error.type", rejection.code());
                    tracing::info!(
                        parent: &span,
                        code = rejection.code(),
                        reason = %rejection,
                        "command rejected"
                    );
                }
                Err(keel_core::CommandError::Infrastructure(e)) => {
                    span.record("otel.status_code", "error");
                    span.record("error.type", e.code());
                    match outcome {
                        CommandOutcome::Unauthorized | CommandOutcome::Forbidden => {
                            tracing::info!(parent: &span, code = e.code(), error = %e, "command refused");
                        }
                        _ => {
                            tracing::warn!(parent: &span, code = e.code(), error = %e, "command failed");
                        }
                    }
                }
            }
            if let Some(metrics) = metrics {
                metrics.record_command(command_type, started.elapsed(), outcome);
            }
            result
        })
    }
}
