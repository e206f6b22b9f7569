//! The periodic verifier: checks what was appended since its last check,
//! counts and logs what it finds, and reports the latest result as a
//! health check.

use std::borrow::Cow;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use keel_core::{ChainVerification, HealthCheck, HealthReport, HealthStatus, Probe};
use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Gauge, Meter};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::{AuditHead, ChainHead};

/// Failed verification passes, by `kind` (`broken` or `error`).
pub const VERIFY_FAILURES: &str = "keel.audit.verify.failures";
/// The sequence of the last record the verifier found intact.
pub const VERIFIED_SEQUENCE: &str = "keel.audit.verify.sequence";

/// How often a verifier checks unless told otherwise.
const DEFAULT_INTERVAL: Duration = Duration::from_secs(300);

/// A background task that checks an audit log at an interval,
/// incrementally: each pass runs [`AuditHead::verify_after`] from the last
/// head it found intact, so a pass reads only the records appended since
/// (plus the one it resumes from), however long the log is.
///
/// On a broken chain it logs at `error` level and counts
/// `keel.audit.verify.failures{kind="broken"}`; when the store cannot be
/// read, `warn` and `kind="error"`. It keeps its anchor on failure, so the
/// next pass checks the same records again. Its handle
/// ([`AuditVerifierHandle`]) returns the last result and is a
/// [`HealthCheck`].
///
/// The verifier's anchor is also a copy of the head held outside the
/// store: records cut from the end after a pass are reported by the next
/// one, even when the store's head was rewound with them. Records before
/// the anchor are not read again; start a fresh verifier (or call
/// [`AuditLog::verify`](keel_core::AuditLog::verify)) for a full walk.
///
/// ```no_run
/// # async fn run(log: std::sync::Arc<dyn keel_security::audit::AuditHead>) {
/// use std::time::Duration;
/// use keel_security::audit::AuditVerifier;
///
/// let verifier = AuditVerifier::spawn(log, Duration::from_secs(60));
/// // Register `verifier.clone()` as an `Arc<dyn HealthCheck>`; read the
/// // last result directly:
/// if let Some(status) = verifier.status() {
///     println!("{:?}", status.outcome);
/// }
/// # }
/// ```
pub struct AuditVerifier {
    log: Arc<dyn AuditHead>,
    interval: Duration,
    from: ChainHead,
    meter: Option<Meter>,
    broken_status: HealthStatus,
}

impl fmt::Debug for AuditVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditVerifier")
            .field("interval", &self.interval)
            .field("from", &self.from)
            .field("broken_status", &self.broken_status)
            .finish_non_exhaustive()
    }
}

impl AuditVerifier {
    /// A verifier of `log`, checking every 5 minutes from the genesis head
    /// (the first pass walks the whole chain), not yet started.
    #[must_use]
    pub fn new(log: Arc<dyn AuditHead>) -> Self {
        Self {
            log,
            interval: DEFAULT_INTERVAL,
            from: ChainHead::genesis(),
            meter: None,
            broken_status: HealthStatus::Degraded,
        }
    }

    /// Starts a verifier of `log` that checks every `interval` (first at
    /// once). Must be called within a Tokio runtime.
    #[must_use]
    pub fn spawn(log: Arc<dyn AuditHead>, interval: Duration) -> AuditVerifierHandle {
        Self::new(log).interval(interval).start()
    }

    /// Checks every `interval` (at least one millisecond).
    #[must_use]
    pub fn interval(mut self, interval: Duration) -> Self {
        self.interval = interval.max(Duration::from_millis(1));
        self
    }

    /// Starts from `head`, a head verified earlier (for example the last
    /// anchor of a previous run, kept outside the database), instead of
    /// walking the chain from its beginning.
    #[must_use]
    pub fn starting_from(mut self, head: ChainHead) -> Self {
        self.from = head;
        self
    }

    /// Records [`VERIFY_FAILURES`] and [`VERIFIED_SEQUENCE`] on `meter`
    /// instead of the global meter provider's Keel meter (what the other
    /// adapters record on).
    #[must_use]
    pub fn with_meter(mut self, meter: &Meter) -> Self {
        self.meter = Some(meter.clone());
        self
    }

    /// What the health check reports while the chain is broken:
    /// [`HealthStatus::Degraded`] by default, so a tampered log is flagged
    /// without taking the service out of load balancing;
    /// [`HealthStatus::Unhealthy`] for services that must stop serving.
    #[must_use]
    pub fn broken_status(mut self, status: HealthStatus) -> Self {
        self.broken_status = status;
        self
    }

    /// Starts the background task (within a Tokio runtime). It ends when
    /// every handle is dropped, or on [`AuditVerifierHandle::abort`].
    #[must_use]
    pub fn start(self) -> AuditVerifierHandle {
        let (requests, mut inbox) = mpsc::channel::<oneshot::Sender<VerifierStatus>>(16);
        let shared = Arc::new(Shared {
            status: Mutex::new(None),
            task: Mutex::new(None),
            broken_status: self.broken_status,
        });
        let meter = self
            .meter
            .unwrap_or_else(|| opentelemetry::global::meter(keel_telemetry::INSTRUMENTATION_SCOPE));
        let instruments = Instruments::new(&meter);
        let mut pass = Pass {
            log: self.log,
            anchor: self.from,
            passes: 0,
            instruments,
        };
        let interval = self.interval;
        let state = shared.clone();
        let task = tokio::spawn(async move {
            // The pass at start-up runs before any on-demand one.
            let first = pass.run().await;
            *lock(&state.status) = Some(first);
            let mut ticker =
                tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let reply = tokio::select! {
                    _ = ticker.tick() => None,
                    request = inbox.recv() => match request {
                        Some(reply) => Some(reply),
                        // Every handle is gone: nobody reads the result.
                        None => break,
                    },
                };
                let status = pass.run().await;
                *lock(&state.status) = Some(status.clone());
                if let Some(reply) = reply {
                    let _ = reply.send(status);
                }
            }
        });
        *lock(&shared.task) = Some(task);
        AuditVerifierHandle { shared, requests }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Each value is replaced whole: a panic elsewhere cannot leave it
    // half-changed.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// How a verification pass ended.
#[derive(Clone, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub enum VerifierOutcome {
    /// Every record since the previous anchor checked out.
    Intact {
        /// How many new records this pass checked.
        checked: u64,
    },
    /// A record does not check out (see [`ChainVerification::Broken`]).
    Broken {
        /// The first record that does not check out.
        sequence: u64,
        /// What is wrong with it.
        reason: String,
    },
    /// The log could not be read; the pass will be repeated.
    Error {
        /// The error, as displayed.
        message: String,
    },
}

/// The result of the latest verification pass.
#[derive(Clone, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub struct VerifierStatus {
    /// How the pass ended.
    pub outcome: VerifierOutcome,
    /// The last record known intact: where the next pass starts.
    pub verified: ChainHead,
    /// When the pass ended.
    pub finished_at: DateTime<Utc>,
    /// How many passes have run, this one included.
    pub passes: u64,
}

struct Instruments {
    failures: Counter<u64>,
    sequence: Gauge<u64>,
}

impl Instruments {
    fn new(meter: &Meter) -> Self {
        Self {
            failures: meter
                .u64_counter(VERIFY_FAILURES)
                .with_unit("{pass}")
                .with_description("Audit verification passes that found a fault or failed")
                .build(),
            sequence: meter
                .u64_gauge(VERIFIED_SEQUENCE)
                .with_unit("{record}")
                .with_description("The last audit record the verifier found intact")
                .build(),
        }
    }
}

/// One verifier's state between passes.
struct Pass {
    log: Arc<dyn AuditHead>,
    anchor: ChainHead,
    passes: u64,
    instruments: Instruments,
}

impl Pass {
    async fn run(&mut self) -> VerifierStatus {
        self.passes += 1;
        let outcome = match self.log.verify_after(&self.anchor).await {
            Ok(check) => match check.verification {
                ChainVerification::Intact { records } => {
                    self.anchor = check.head;
                    tracing::debug!(
                        checked = records,
                        through = self.anchor.sequence,
                        "audit chain verified"
                    );
                    VerifierOutcome::Intact { checked: records }
                }
                ChainVerification::Broken { sequence, reason } => {
                    tracing::error!(
                        sequence,
                        %reason,
                        verified_through = self.anchor.sequence,
                        "the audit chain is broken"
                    );
                    self.count("broken");
                    VerifierOutcome::Broken { sequence, reason }
                }
                other => VerifierOutcome::Error {
                    message: format!("unknown verification result {other:?}"),
                },
            },
            Err(err) => {
                tracing::warn!(error = %err, code = err.code(), "the audit chain could not be verified");
                self.count("error");
                VerifierOutcome::Error {
                    message: err.to_string(),
                }
            }
        };
        self.instruments.sequence.record(self.anchor.sequence, &[]);
        VerifierStatus {
            outcome,
            verified: self.anchor.clone(),
            finished_at: Utc::now(),
            passes: self.passes,
        }
    }

    fn count(&self, kind: &'static str) {
        self.instruments
            .failures
            .add(1, &[KeyValue::new("kind", kind)]);
    }
}

#[derive(Debug)]
struct Shared {
    status: Mutex<Option<VerifierStatus>>,
    task: Mutex<Option<JoinHandle<()>>>,
    broken_status: HealthStatus,
}

/// A running [`AuditVerifier`]: its last result, an on-demand pass, and a
/// [`HealthCheck`] named `audit_chain` (readiness) that reports the last
/// result: healthy when intact, the configured status (degraded by
/// default) when broken, degraded when the log could not be read or no
/// pass has finished yet.
///
/// Cheap to clone; the task stops when the last clone is dropped.
#[derive(Clone, Debug)]
pub struct AuditVerifierHandle {
    shared: Arc<Shared>,
    requests: mpsc::Sender<oneshot::Sender<VerifierStatus>>,
}

impl AuditVerifierHandle {
    /// The result of the latest finished pass, if any.
    #[must_use]
    pub fn status(&self) -> Option<VerifierStatus> {
        lock(&self.shared.status).clone()
    }

    /// Runs a pass now (after any pass under way, and always after the
    /// pass at start-up) and returns its result; `None` when the verifier
    /// was stopped.
    pub async fn verify_now(&self) -> Option<VerifierStatus> {
        let (reply, answer) = oneshot::channel();
        self.requests.send(reply).await.ok()?;
        answer.await.ok()
    }

    /// Stops the background task at once and returns when it has ended;
    /// the last status stays readable. Keel's handle rule, with one
    /// difference: this handle is cloned into health registries, so it is
    /// borrowed, not consumed, and the task ends with the last clone
    /// dropped. A verification pass only reads, so there is nothing to
    /// finish gracefully.
    pub async fn abort(&self) {
        let task = lock(&self.shared.task).take();
        if let Some(task) = task {
            task.abort();
            // Cancelled (or already finished): either way it has ended.
            let _ = task.await;
        }
    }
}

#[async_trait]
impl HealthCheck for AuditVerifierHandle {
    fn name(&self) -> &str {
        "audit_chain"
    }

    fn probes(&self) -> &[Probe] {
        &[Probe::Readiness]
    }

    async fn check(&self) -> HealthReport {
        let started = Instant::now();
        let Some(status) = self.status() else {
            return HealthReport::degraded(
                started.elapsed(),
                "no verification pass has finished yet",
            );
        };
        match status.outcome {
            VerifierOutcome::Intact { .. } => HealthReport::healthy(started.elapsed()).with_detail(
                format!("verified through record {}", status.verified.sequence),
            ),
            VerifierOutcome::Broken { sequence, reason } => {
                let detail: Cow<'static, str> = format!("audit record {sequence}: {reason}").into();
                match self.shared.broken_status {
                    HealthStatus::Healthy => {
                        HealthReport::healthy(started.elapsed()).with_detail(detail)
                    }
                    HealthStatus::Degraded => HealthReport::degraded(started.elapsed(), detail),
                    HealthStatus::Unhealthy => HealthReport::unhealthy(started.elapsed(), detail),
                }
            }
            VerifierOutcome::Error { message } => HealthReport::degraded(
                started.elapsed(),
                format!("the audit log could not be verified: {message}"),
            ),
        }
    }
}
