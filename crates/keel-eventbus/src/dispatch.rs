//! Running a handler on one delivery, the same way on every backend.

use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use futures::FutureExt;
use keel_core::{Delivery, EventHandler, HandlerError};
use keel_telemetry::KeelMetrics;
use keel_telemetry::metrics::{DeadLetterReason, HandleOutcome};

use crate::codec::RawMessage;

/// What to do with a message after its handler ran.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Handled: acknowledge.
    Ack,
    /// Failed: redeliver, or dead-letter if this was the last attempt.
    Retry(String),
    /// Never deliverable: dead-letter now, for this reason (the metric's
    /// label) and with this explanation.
    DeadLetter(DeadLetterReason, String),
}

impl Outcome {
    /// Applies the attempt limit: a retry on the last attempt becomes a dead
    /// letter.
    pub(crate) fn with_limit(self, attempt: u32, max_attempts: u32) -> Self {
        match self {
            Outcome::Retry(reason) if attempt >= max_attempts => Outcome::DeadLetter(
                DeadLetterReason::AttemptsExhausted,
                format!("gave up after {attempt} attempts; last error: {reason}"),
            ),
            other => other,
        }
    }
}

/// Where a handler's outcome is recorded, and after how many attempts a
/// failure counts as a dead letter rather than a nack.
pub(crate) struct Recorder<'a> {
    pub(crate) metrics: &'a KeelMetrics,
    pub(crate) max_attempts: u32,
}

impl Recorder<'_> {
    /// Records the standard bus metrics for one delivery: ack, nack (a
    /// retry before the last attempt), and the handler's duration when it
    /// ran. A dead letter is not counted here but by
    /// [`dead_lettered`](Self::dead_lettered), once it is on the dead-letter
    /// topic: a failed publish there sends the message round again, and it
    /// would otherwise be counted once per round.
    fn record(&self, subscription: &str, attempt: u32, ran: Option<Duration>, outcome: &Outcome) {
        let m = self.metrics;
        match outcome {
            Outcome::Ack => {
                if let Some(d) = ran {
                    m.record_handled(subscription, d, HandleOutcome::Ack);
                }
            }
            Outcome::Retry(_) if attempt >= self.max_attempts => {
                if let Some(d) = ran {
                    m.record_handled(subscription, d, HandleOutcome::RetriesExhausted);
                }
            }
            Outcome::Retry(_) => {
                if let Some(d) = ran {
                    m.record_handled(subscription, d, HandleOutcome::Retry);
                }
            }
            Outcome::DeadLetter(..) => {
                if let Some(d) = ran {
                    m.record_handled(subscription, d, HandleOutcome::Reject);
                }
            }
        }
    }

    /// Counts a message that is now on the dead-letter topic.
    pub(crate) fn dead_lettered(&self, subscription: &str, reason: DeadLetterReason) {
        self.metrics.record_dead_letter(subscription, reason);
    }
}

/// Decodes `raw`, runs the handler (catching panics, enforcing the timeout),
/// records the outcome through `recorder` and says what to do next.
pub(crate) async fn invoke(
    handler: &dyn EventHandler,
    raw: &RawMessage,
    attempt: u32,
    subscription: &str,
    timeout: Option<Duration>,
    recorder: &Recorder<'_>,
) -> Outcome {
    let message = match raw.decode() {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(subscription, error = %e, "dead-lettering a malformed message");
            let outcome = Outcome::DeadLetter(DeadLetterReason::Rejected, e.to_string());
            recorder.record(subscription, attempt, None, &outcome);
            return outcome;
        }
    };
    let event_id = message.event_id;
    let delivery = Delivery::new(message, attempt, subscription);
    let started = Instant::now();
    let run = AssertUnwindSafe(handler.handle(&delivery)).catch_unwind();
    let result = match timeout {
        Some(limit) => match tokio::time::timeout(limit, run).await {
            Ok(r) => r,
            Err(_) => Ok(Err(HandlerError::retry(format!(
                "handler timed out after {limit:?}"
            )))),
        },
        None => run.await,
    };
    let outcome = match result {
        Ok(Ok(())) => Outcome::Ack,
        Ok(Err(HandlerError::Reject(e))) => {
            Outcome::DeadLetter(DeadLetterReason::Rejected, format!("rejected: {e}"))
        }
        Ok(Err(e)) => Outcome::Retry(e.to_string()),
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a non-string payload".to_owned());
            Outcome::Retry(format!("handler panicked: {what}"))
        }
    };
    recorder.record(subscription, attempt, Some(started.elapsed()), &outcome);
    match &outcome {
        Outcome::Ack => {}
        Outcome::Retry(reason) => {
            tracing::warn!(subscription, %event_id, attempt, reason, "handler failed");
        }
        Outcome::DeadLetter(_, reason) => {
            tracing::warn!(subscription, %event_id, attempt, reason, "handler rejected the message");
        }
    }
    outcome
}
