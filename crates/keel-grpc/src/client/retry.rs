//! Retries for idempotent calls: backoff with jitter, a retry budget,
//! retryable codes only.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng as _;
use tokio::time::Instant;
use tonic::{Code, Status};
use tower::retry::budget::{Budget as _, TpsBudget};

use super::error::ClientError;

/// The metadata key a server uses to tell a client when to retry
/// (milliseconds), or not to (a negative or unreadable value), as in
/// gRPC's retry design.
pub const RETRY_PUSHBACK_KEY: &str = "grpc-retry-pushback-ms";

/// Whether repeating a call is safe. The caller decides, per call: only
/// the caller knows whether the server deduplicates (a request id) or the
/// call only reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Idempotency {
    /// Repeating the call has the effect of making it once: reads, and
    /// commands the server deduplicates by request id. Retried.
    Idempotent,
    /// Repeating it could do the work twice. Never retried.
    NotIdempotent,
}

/// When and how often idempotent calls are retried.
///
/// The defaults: at most 3 attempts, on `UNAVAILABLE` only, backoff from
/// 50 ms doubling to at most 2 s with jitter (each wait is drawn between
/// half and all of the current backoff), no retry that would start after
/// 30 s, and a budget that lets retries add at most 20 % to the calls of
/// the last 10 s (plus 10 retries a second), so that a struggling server
/// is not buried under retries.
///
/// ```
/// use std::time::Duration;
/// use keel_grpc::client::RetryPolicy;
///
/// let policy = RetryPolicy::new()
///     .with_max_attempts(5)
///     .with_backoff(Duration::from_millis(20), Duration::from_secs(1))
///     .with_retryable_codes([tonic::Code::Unavailable, tonic::Code::ResourceExhausted]);
/// assert!(policy.validate().is_ok());
/// assert!(RetryPolicy::new().with_max_attempts(0).validate().is_err());
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    max_attempts: u32,
    initial_backoff: Duration,
    max_backoff: Duration,
    multiplier: f64,
    retryable: Vec<Code>,
    max_elapsed: Duration,
    budget_ttl: Duration,
    budget_min_per_sec: u32,
    budget_percent: f32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self::new()
    }
}

impl RetryPolicy {
    /// The defaults described above.
    #[must_use]
    pub fn new() -> Self {
        Self {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(2),
            multiplier: 2.0,
            retryable: vec![Code::Unavailable],
            max_elapsed: Duration::from_secs(30),
            budget_ttl: Duration::from_secs(10),
            budget_min_per_sec: 10,
            budget_percent: 0.2,
        }
    }

    /// No retries at all (one attempt).
    #[must_use]
    pub fn none() -> Self {
        Self::new().with_max_attempts(1)
    }

    /// Attempts per call, the first included (1 to 10).
    #[must_use]
    pub fn with_max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts;
        self
    }

    /// The first backoff and the cap it grows to.
    #[must_use]
    pub fn with_backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.initial_backoff = initial;
        self.max_backoff = max;
        self
    }

    /// How much the backoff grows after each retry (1.0 to 10.0).
    #[must_use]
    pub fn with_multiplier(mut self, multiplier: f64) -> Self {
        self.multiplier = multiplier;
        self
    }

    /// The codes worth a retry (default `UNAVAILABLE`). Codes that say the
    /// server decided (`INVALID_ARGUMENT`, `NOT_FOUND`, `ABORTED`…) or that
    /// the caller's deadline passed never should be.
    #[must_use]
    pub fn with_retryable_codes(mut self, codes: impl IntoIterator<Item = Code>) -> Self {
        self.retryable = codes.into_iter().collect();
        self
    }

    /// No retry starts later than this after the first attempt started.
    #[must_use]
    pub fn with_max_elapsed(mut self, max: Duration) -> Self {
        self.max_elapsed = max;
        self
    }

    /// The retry budget: over the last `ttl` (1 to 60 s), retries may add
    /// `percent` (0.0 to 10.0, e.g. 0.2 for 20 %) to the first attempts,
    /// plus `min_per_sec` retries a second whatever the traffic.
    #[must_use]
    pub fn with_budget(mut self, ttl: Duration, min_per_sec: u32, percent: f32) -> Self {
        self.budget_ttl = ttl;
        self.budget_min_per_sec = min_per_sec;
        self.budget_percent = percent;
        self
    }

    /// The attempts per call.
    #[must_use]
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// Whether a failure with `status` may be retried under this policy.
    #[must_use]
    pub fn is_retryable(&self, status: &Status) -> bool {
        self.retryable.contains(&status.code())
    }

    /// Checks every setting.
    ///
    /// # Errors
    ///
    /// [`ClientError::InvalidConfig`] naming the setting out of range.
    pub fn validate(&self) -> Result<(), ClientError> {
        if !(1..=10).contains(&self.max_attempts) {
            return Err(ClientError::config("max_attempts", "must be 1 to 10"));
        }
        if self.initial_backoff.is_zero() || self.max_backoff < self.initial_backoff {
            return Err(ClientError::config(
                "backoff",
                "the initial backoff must be more than zero and at most the maximum",
            ));
        }
        if !(1.0..=10.0).contains(&self.multiplier) {
            return Err(ClientError::config("multiplier", "must be 1.0 to 10.0"));
        }
        if self.max_elapsed.is_zero() {
            return Err(ClientError::config("max_elapsed", "must be more than zero"));
        }
        if !(Duration::from_secs(1)..=Duration::from_secs(60)).contains(&self.budget_ttl) {
            return Err(ClientError::config("budget_ttl", "must be 1 to 60 seconds"));
        }
        if self.budget_min_per_sec > 1_000_000 {
            return Err(ClientError::config(
                "budget_min_per_sec",
                "must be at most 1000000",
            ));
        }
        if !(0.0..=10.0).contains(&self.budget_percent) {
            return Err(ClientError::config("budget_percent", "must be 0.0 to 10.0"));
        }
        Ok(())
    }

    fn backoff(&self, retry: u32) -> Duration {
        let factor = self
            .multiplier
            .powi(i32::try_from(retry).unwrap_or(i32::MAX));
        let grown = self.initial_backoff.as_secs_f64() * factor;
        let capped = grown.min(self.max_backoff.as_secs_f64());
        // "Equal jitter": at least half the backoff, so retries do not
        // bunch up at zero, and spread over the other half.
        let wait = rand::rng().random_range(capped / 2.0..=capped);
        Duration::from_secs_f64(wait)
    }
}

/// Runs calls under a [`RetryPolicy`], with one retry budget shared by
/// every call made through it (and its clones).
///
/// Each attempt gets the attempt number (1 for the first) and makes the
/// call afresh, request included; a tonic request cannot be sent twice.
///
/// ```no_run
/// # async fn f(channel: tonic::transport::Channel) -> Result<(), tonic::Status> {
/// use keel_grpc::client::{Idempotency, Retrier, RetryPolicy};
/// use keel_grpc::health_proto::{HealthCheckRequest, health_client::HealthClient};
///
/// let retrier = Retrier::new(RetryPolicy::new()).expect("valid policy");
/// let reply = retrier
///     .call(Idempotency::Idempotent, |_attempt| {
///         let mut client = HealthClient::new(channel.clone());
///         async move { client.check(HealthCheckRequest::default()).await }
///     })
///     .await?;
/// # let _ = reply; Ok(()) }
/// ```
#[derive(Clone)]
pub struct Retrier {
    policy: Arc<RetryPolicy>,
    budget: Arc<TpsBudget>,
}

impl std::fmt::Debug for Retrier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Retrier")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl Retrier {
    /// A retrier with a fresh budget.
    ///
    /// # Errors
    ///
    /// [`ClientError::InvalidConfig`] when the policy does not
    /// [validate](RetryPolicy::validate).
    pub fn new(policy: RetryPolicy) -> Result<Self, ClientError> {
        policy.validate()?;
        let budget = TpsBudget::new(
            policy.budget_ttl,
            policy.budget_min_per_sec,
            policy.budget_percent,
        );
        Ok(Self {
            policy: Arc::new(policy),
            budget: Arc::new(budget),
        })
    }

    /// The policy.
    #[must_use]
    pub fn policy(&self) -> &RetryPolicy {
        &self.policy
    }

    /// Makes the call, and for an [`Idempotency::Idempotent`] one retries
    /// it while it fails with a retryable code, attempts and budget remain
    /// and the next attempt would start within the policy's time. The
    /// server's `grpc-retry-pushback-ms` replaces the backoff (a negative
    /// or unreadable one stops the retries).
    ///
    /// # Errors
    ///
    /// The last attempt's status.
    pub async fn call<T, F, Fut>(
        &self,
        idempotency: Idempotency,
        mut attempt: F,
    ) -> Result<T, Status>
    where
        F: FnMut(u32) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        self.budget.deposit();
        let started = Instant::now();
        let mut number = 1;
        loop {
            let status = match attempt(number).await {
                Ok(value) => return Ok(value),
                Err(status) => status,
            };
            if idempotency == Idempotency::NotIdempotent
                || number >= self.policy.max_attempts
                || !self.policy.is_retryable(&status)
            {
                return Err(status);
            }
            let wait = match pushback(&status) {
                Pushback::None => self.policy.backoff(number - 1),
                Pushback::After(wait) => wait,
                Pushback::Stop => return Err(status),
            };
            if started.elapsed() + wait > self.policy.max_elapsed || !self.budget.withdraw() {
                return Err(status);
            }
            tracing::debug!(
                attempt = number,
                code = ?status.code(),
                wait_ms = wait.as_millis() as u64,
                "retrying an idempotent gRPC call"
            );
            tokio::time::sleep(wait).await;
            number += 1;
        }
    }
}

enum Pushback {
    None,
    After(Duration),
    Stop,
}

fn pushback(status: &Status) -> Pushback {
    match status.metadata().get(RETRY_PUSHBACK_KEY) {
        None => Pushback::None,
        Some(value) => match value
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
        {
            Some(ms) => Pushback::After(Duration::from_millis(ms)),
            None => Pushback::Stop,
        },
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    fn fast() -> RetryPolicy {
        RetryPolicy::new().with_backoff(Duration::from_millis(1), Duration::from_millis(4))
    }

    async fn failing(retrier: &Retrier, idem: Idempotency, status: fn() -> Status) -> u32 {
        let count = AtomicU32::new(0);
        let result: Result<(), Status> = retrier
            .call(idem, |_| {
                count.fetch_add(1, Ordering::SeqCst);
                async move { Err(status()) }
            })
            .await;
        assert!(result.is_err());
        count.load(Ordering::SeqCst)
    }

    #[tokio::test]
    async fn retries_only_idempotent_calls_on_retryable_codes() {
        let r = Retrier::new(fast()).unwrap();
        let unavailable = || Status::unavailable("down");
        assert_eq!(failing(&r, Idempotency::Idempotent, unavailable).await, 3);
        assert_eq!(
            failing(&r, Idempotency::NotIdempotent, unavailable).await,
            1
        );
        assert_eq!(
            failing(&r, Idempotency::Idempotent, || Status::invalid_argument(
                "no"
            ))
            .await,
            1
        );
        assert_eq!(
            failing(&r, Idempotency::Idempotent, || Status::deadline_exceeded(
                "late"
            ))
            .await,
            1
        );
    }

    #[tokio::test]
    async fn stops_when_the_server_says_so_and_waits_as_it_asks() {
        let r = Retrier::new(fast()).unwrap();
        let stop = || {
            let mut s = Status::unavailable("overloaded");
            s.metadata_mut()
                .insert(RETRY_PUSHBACK_KEY, "-1".parse().unwrap());
            s
        };
        assert_eq!(failing(&r, Idempotency::Idempotent, stop).await, 1);
        let later = || {
            let mut s = Status::unavailable("overloaded");
            s.metadata_mut()
                .insert(RETRY_PUSHBACK_KEY, "2".parse().unwrap());
            s
        };
        assert_eq!(failing(&r, Idempotency::Idempotent, later).await, 3);
    }

    #[tokio::test]
    async fn succeeds_after_transient_failures() {
        let r = Retrier::new(fast().with_max_attempts(5)).unwrap();
        let got = r
            .call(Idempotency::Idempotent, |n| async move {
                if n < 4 {
                    Err(Status::unavailable("down"))
                } else {
                    Ok(n)
                }
            })
            .await
            .unwrap();
        assert_eq!(got, 4);
    }

    #[tokio::test]
    async fn the_budget_caps_retries_across_calls() {
        // No free retries a second, 10 % of calls: 100 failing calls may
        // retry about 10 times in all, not 200.
        let r = Retrier::new(
            fast()
                .with_budget(Duration::from_secs(10), 0, 0.1)
                .with_max_attempts(3),
        )
        .unwrap();
        let mut attempts = 0;
        for _ in 0..100 {
            attempts += failing(&r, Idempotency::Idempotent, || Status::unavailable("down")).await;
        }
        let retries = attempts - 100;
        assert!((5..=20).contains(&retries), "{retries} retries");
    }

    #[tokio::test]
    async fn gives_up_when_the_next_attempt_would_start_too_late() {
        let r = Retrier::new(
            RetryPolicy::new()
                // Jitter keeps every wait within 200 ms to 400 ms.
                .with_backoff(Duration::from_millis(400), Duration::from_millis(400))
                .with_max_elapsed(Duration::from_millis(150)),
        )
        .unwrap();
        assert_eq!(
            failing(&r, Idempotency::Idempotent, || Status::unavailable("down")).await,
            1
        );
    }

    #[test]
    fn refuses_out_of_range_settings() {
        for bad in [
            RetryPolicy::new().with_max_attempts(0),
            RetryPolicy::new().with_max_attempts(11),
            RetryPolicy::new().with_backoff(Duration::ZERO, Duration::from_secs(1)),
            RetryPolicy::new().with_backoff(Duration::from_secs(2), Duration::from_secs(1)),
            RetryPolicy::new().with_multiplier(0.5),
            RetryPolicy::new().with_multiplier(f64::NAN),
            RetryPolicy::new().with_max_elapsed(Duration::ZERO),
            RetryPolicy::new().with_budget(Duration::ZERO, 1, 0.1),
            RetryPolicy::new().with_budget(Duration::from_secs(61), 1, 0.1),
            RetryPolicy::new().with_budget(Duration::from_secs(10), 1, -1.0),
        ] {
            assert!(Retrier::new(bad.clone()).is_err(), "{bad:?}");
        }
        assert!(Retrier::new(RetryPolicy::none()).is_ok());
    }

    #[test]
    fn backoff_grows_to_its_cap_with_jitter() {
        let p = RetryPolicy::new();
        for retry in 0..10 {
            let cap = (0.05 * 2f64.powi(retry)).min(2.0);
            let wait = p.backoff(retry as u32).as_secs_f64();
            assert!(
                wait >= cap / 2.0 - 1e-9 && wait <= cap + 1e-9,
                "{retry}: {wait}"
            );
        }
    }
}
