//! The audit layer: one audit record per command, whatever its outcome.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use async_trait::async_trait;
use keel_core::command::{BoxFuture, Command, CommandEnvelope, Handled, PipelineError};
use keel_core::uow::{Accepted, BeforeCommit, BeforeCommitSteps, Transaction};
use keel_core::{AuditEntry, AuditLog, AuditOutcome, CommandError, Error, Principal};
use keel_telemetry::KeelMetrics;
use tower::{Layer, Service};

use super::PrincipalSlot;

/// What the audit layer does when the audit log refuses a record that is
/// appended on its own: the record of a refused or failed command, or of
/// an accepted one whose handler ran without a transaction.
///
/// The record of a command accepted in a transaction is written in that
/// transaction: if that fails, the command is rolled back and fails with
/// the audit log's error, whatever the policy (nothing was stored, so the
/// error is the truth).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
#[non_exhaustive]
pub enum AuditFailurePolicy {
    /// Log the failure (`error` level, with the entry), count it, and return
    /// the command's own result. The default: an accepted command's effects
    /// are already committed when its record is appended on its own, and an
    /// error would tell the caller it failed when it did not.
    #[default]
    Continue,
    /// Log and count as above, then return [`Error::Unavailable`]
    /// (`service = "audit"`) instead of the command's result, whatever it
    /// was. For services whose rule is "no answer without an audit record";
    /// an accepted command stays committed, so its callers must be able to
    /// retry it safely (idempotent commands).
    Fail,
}

/// A [`Layer`] that appends an [`AuditEntry`] to an [`AuditLog`] for every
/// command that passes through it, after the layers below have answered.
///
/// Place it outside the authentication and authorization layers (the order
/// [`CommandPipeline`](super::CommandPipeline) uses), so refused attempts
/// are recorded too. The entry holds:
///
/// * the principal's subject and tenant: the one the authentication layer
///   verified (passed up through a [`PrincipalSlot`] this layer leaves in
///   the extensions), or, with no authentication layer below, the one the
///   envelope arrived with; none when authentication failed;
/// * the command's id, type, [`audit_details`](Command::audit_details),
///   correlation id and receipt time;
/// * the event types and aggregate from the handler's [`Handled`] (the
///   aggregate falls back to [`Command::target`]);
/// * the outcome: [`Accepted`](AuditOutcome::Accepted);
///   [`Rejected`](AuditOutcome::Rejected) with the domain error's code and
///   message, or with `keel.unauthorized` / `keel.forbidden` and the
///   reason; [`Failed`](AuditOutcome::Failed) with the error's code for any
///   other infrastructure error.
///
/// # Where the record is written
///
/// * **Accepted, in a transaction.** The layer registers a
///   [`BeforeCommit`] step in the envelope's [`BeforeCommitSteps`]; a
///   [`TransactionalService`](keel_core::command::TransactionalService)
///   below runs it after the handler returned `Ok`, before the commit, and
///   the step writes the record with
///   [`AuditLog::within`]`(tx).append(..)`. The record commits with the
///   command's effects or not at all: a crash between the handler and the
///   commit leaves neither, a crash after the commit leaves both, and a
///   rolled-back command never leaves an "accepted" record. No second
///   commit is paid.
/// * **Accepted without a transaction** (no transactional service below,
///   e.g. an in-memory handler): appended on its own after the handler
///   returned.
/// * **Refused or failed** (authentication, authorization, a domain
///   rejection, an infrastructure error, a failed commit): nothing of the
///   command was stored, and the record is appended on its own.
///
/// See [`AuditFailurePolicy`] for what happens when an append on its own
/// fails.
///
/// Keel's audit logs are idempotent on the entry's command id: the same
/// entry appended twice (a retried append) is stored once. An envelope
/// that reuses a command id for a new attempt of a command (a client
/// resending it: a new receipt time, perhaps another outcome) makes a
/// different entry, which the log records as another attempt under the
/// same command id; every execution leaves its record.
#[derive(Clone)]
pub struct AuditLayer {
    log: Arc<dyn AuditLog>,
    on_failure: AuditFailurePolicy,
    metrics: Option<KeelMetrics>,
    failures: Arc<AtomicU64>,
}

impl fmt::Debug for AuditLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditLayer")
            .field("on_failure", &self.on_failure)
            .field("append_failures", &self.append_failures())
            .finish_non_exhaustive()
    }
}

impl AuditLayer {
    /// A layer appending to `log`, continuing when an append fails.
    #[must_use]
    pub fn new(log: Arc<dyn AuditLog>) -> Self {
        Self {
            log,
            on_failure: AuditFailurePolicy::default(),
            metrics: None,
            failures: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Sets what happens when an append fails.
    #[must_use]
    pub fn on_failure(mut self, policy: AuditFailurePolicy) -> Self {
        self.on_failure = policy;
        self
    }

    /// Counts failed appends in `keel.audit.append.failures` too.
    #[must_use]
    pub fn metrics(mut self, metrics: KeelMetrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// How many appends have failed since the layer was built (shared by
    /// every service it made).
    #[must_use]
    pub fn append_failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }
}

impl<S> Layer<S> for AuditLayer {
    type Service = Audit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Audit {
            inner,
            layer: self.clone(),
        }
    }
}

/// The [`Service`] made by [`AuditLayer`].
#[derive(Clone, Debug)]
pub struct Audit<S> {
    inner: S,
    layer: AuditLayer,
}

/// The outcome to record for a pipeline result.
fn outcome_of<T>(result: &Result<Handled<T>, PipelineError>) -> AuditOutcome {
    match result {
        Ok(_) => AuditOutcome::Accepted,
        Err(CommandError::Rejected(rejection)) => AuditOutcome::Rejected {
            code: rejection.code().to_owned(),
            reason: rejection.message().to_owned(),
        },
        Err(CommandError::Infrastructure(e)) => match e {
            Error::Unauthorized { reason } | Error::Forbidden { reason } => {
                AuditOutcome::Rejected {
                    code: e.code().to_owned(),
                    reason: reason.clone(),
                }
            }
            other => AuditOutcome::Failed {
                code: other.code().to_owned(),
            },
        },
    }
}

/// The audit layer's [`BeforeCommit`] step: the record of the accepted
/// command, written in its transaction.
struct AuditStep {
    layer: AuditLayer,
    /// The entry as far as the envelope tells it.
    entry: AuditEntry,
    slot: PrincipalSlot,
    preset: Option<Principal>,
}

impl fmt::Debug for AuditStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditStep")
            .field("command_type", &self.entry.command_type)
            .field("command_id", &self.entry.command_id)
            .finish_non_exhaustive()
    }
}

/// The principal to record: the verified one, else (when authentication
/// did not fail) the one the envelope arrived with.
fn principal_of(
    slot: &PrincipalSlot,
    preset: Option<&Principal>,
    unauthenticated: bool,
) -> Option<Principal> {
    match slot.get() {
        Some(verified) => Some(verified.clone()),
        None if unauthenticated => None,
        None => preset.cloned(),
    }
}

fn with_principal(mut entry: AuditEntry, principal: Option<Principal>) -> AuditEntry {
    if let Some(principal) = principal {
        entry.principal = Some(principal.subject);
        entry.tenant = principal.tenant;
    }
    entry
}

fn with_handled(
    mut entry: AuditEntry,
    event_types: &[String],
    aggregate: Option<&keel_core::AggregateRef>,
) -> AuditEntry {
    entry.outcome = AuditOutcome::Accepted;
    entry.event_types = event_types.to_vec();
    if let Some(aggregate) = aggregate {
        entry.aggregate = Some(aggregate.clone());
    }
    entry
}

#[async_trait]
impl BeforeCommit for AuditStep {
    async fn before_commit(
        &self,
        tx: &mut dyn Transaction,
        accepted: &Accepted<'_>,
    ) -> keel_core::Result<()> {
        let entry = with_principal(
            self.entry.clone(),
            principal_of(&self.slot, self.preset.as_ref(), false),
        );
        let entry = with_handled(entry, accepted.event_types, accepted.aggregate);
        match self.layer.log.within(tx).append(entry.clone()).await {
            Ok(()) => Ok(()),
            Err(e) => {
                // The command rolls back with this error: nothing of it is
                // stored, and the layer records it as failed on its own.
                self.layer.count_failure(&entry.command_type, &e, &entry);
                Err(Error::Unavailable {
                    service: "audit".into(),
                    message: "the audit record could not be written with the command".into(),
                    source: Some(Box::new(e)),
                })
            }
        }
    }
}

impl AuditLayer {
    fn count_failure(&self, command_type: &str, error: &Error, entry: &AuditEntry) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        if let Some(metrics) = &self.metrics {
            metrics.record_audit_failure(command_type);
        }
        tracing::error!(
            error = %error,
            code = error.code(),
            ?entry,
            "the audit record of a command could not be appended"
        );
    }
}

impl<C, S, T> Service<CommandEnvelope<C>> for Audit<S>
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
        let slot = PrincipalSlot::new();
        envelope.extensions.insert(slot.clone());
        let preset: Option<Principal> = envelope.principal.clone();
        let mut entry = AuditEntry::new(envelope.command_type(), AuditOutcome::Accepted)
            .with_occurred_at(envelope.received_at);
        entry.command_id = Some(envelope.command_id);
        entry.correlation_id = envelope.correlation_id();
        entry.aggregate = envelope.command.target();
        entry.details = envelope.command.audit_details();
        let command_type = envelope.command_type();

        let steps = match envelope.extensions.get::<BeforeCommitSteps>() {
            Some(steps) => steps.clone(),
            None => {
                let steps = BeforeCommitSteps::new();
                envelope.extensions.insert(steps.clone());
                steps
            }
        };
        steps.push(Arc::new(AuditStep {
            layer: self.layer.clone(),
            entry: entry.clone(),
            slot: slot.clone(),
            preset: preset.clone(),
        }));

        let future = self.inner.call(envelope);
        let layer = self.layer.clone();
        Box::pin(async move {
            let result = future.await;
            if result.is_ok() && steps.committed() {
                // Written in the command's transaction, committed with it.
                return result;
            }
            entry.outcome = outcome_of(&result);
            let unauthenticated = matches!(
                &result,
                Err(CommandError::Infrastructure(Error::Unauthorized { .. }))
            );
            let mut entry =
                with_principal(entry, principal_of(&slot, preset.as_ref(), unauthenticated));
            if let Ok(handled) = &result {
                entry = with_handled(entry, &handled.event_types, handled.aggregate.as_ref());
            }
            let Err(append_error) = layer.log.append(entry.clone()).await else {
                return result;
            };
            layer.count_failure(command_type, &append_error, &entry);
            match layer.on_failure {
                AuditFailurePolicy::Continue => result,
                AuditFailurePolicy::Fail => Err(CommandError::Infrastructure(Error::Unavailable {
                    service: "audit".into(),
                    message: "the audit record could not be appended".into(),
                    source: Some(Box::new(append_error)),
                })),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use keel_core::DomainError;

    use super::*;

    #[test]
    fn outcomes_follow_the_error_taxonomy() {
        let ok: Result<Handled<()>, PipelineError> = Ok(Handled::new(()));
        assert_eq!(outcome_of(&ok), AuditOutcome::Accepted);
        let rejected: Result<Handled<()>, PipelineError> = Err(CommandError::Rejected(
            DomainError::new("cart.empty", "the cart is empty"),
        ));
        assert_eq!(
            outcome_of(&rejected),
            AuditOutcome::Rejected {
                code: "cart.empty".into(),
                reason: "the cart is empty".into()
            }
        );
        let forbidden: Result<Handled<()>, PipelineError> = Err(Error::Forbidden {
            reason: "no role grants cart.rename".into(),
        }
        .into());
        assert_eq!(
            outcome_of(&forbidden),
            AuditOutcome::Rejected {
                code: "keel.forbidden".into(),
                reason: "no role grants cart.rename".into()
            }
        );
        let down: Result<Handled<()>, PipelineError> =
            Err(Error::unavailable("postgres", "down", std::io::Error::other("x")).into());
        assert_eq!(
            outcome_of(&down),
            AuditOutcome::Failed {
                code: "keel.unavailable".into()
            }
        );
    }
}
