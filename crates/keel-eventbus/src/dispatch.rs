//! Running a handler on one delivery, the same way on every backend.

use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures::FutureExt;
use keel_core::{Delivery, EventHandler, HandlerError};

use crate::codec::RawMessage;

/// What to do with a message after its handler ran.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Handled: acknowledge.
    Ack,
    /// Failed: redeliver, or dead-letter if this was the last attempt.
    Retry(String),
    /// Never deliverable: dead-letter now.
    DeadLetter(String),
}

impl Outcome {
    /// Applies the attempt limit: a retry on the last attempt becomes a dead
    /// letter.
    pub(crate) fn with_limit(self, attempt: u32, max_attempts: u32) -> Self {
        match self {
            Outcome::Retry(reason) if attempt >= max_attempts => Outcome::DeadLetter(format!(
                "gave up after {attempt} attempts; last error: {reason}"
            )),
            other => other,
        }
    }
}

/// Decodes `raw`, runs the handler (catching panics, enforcing the timeout)
/// and says what to do next.
pub(crate) async fn invoke(
    handler: &dyn EventHandler,
    raw: &RawMessage,
    attempt: u32,
    subscription: &str,
    timeout: Option<Duration>,
) -> Outcome {
    let message = match raw.decode() {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(subscription, error = %e, "dead-lettering a malformed message");
            return Outcome::DeadLetter(e.to_string());
        }
    };
    let event_id = message.event_id;
    let delivery = Delivery::new(message, attempt, subscription);
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
        Ok(Err(HandlerError::Reject(e))) => Outcome::DeadLetter(format!("rejected: {e}")),
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
    match &outcome {
        Outcome::Ack => {}
        Outcome::Retry(reason) => {
            tracing::warn!(subscription, %event_id, attempt, reason, "handler failed");
        }
        Outcome::DeadLetter(reason) => {
            tracing::warn!(subscription, %event_id, attempt, reason, "handler rejected the message");
        }
    }
    outcome
}
