//! Retrying whole transactions after serialization failures and deadlocks.

use std::error::Error as StdError;
use std::time::Duration;

use crate::error::{DatabaseError, Result, chain_has_transaction_conflict};

/// How often and how patiently [`Database::transaction`](crate::Database::transaction)
/// re-runs a transaction that PostgreSQL aborted with a serialization failure
/// (`40001`) or a deadlock (`40P01`).
///
/// Waits grow exponentially from `initial_backoff` up to `max_backoff`, each
/// one drawn uniformly between half and all of the nominal value ("equal
/// jitter"), so that colliding transactions spread out instead of colliding
/// again in lockstep.
///
/// ```
/// use std::time::Duration;
/// use keel_database::RetryPolicy;
///
/// let policy = RetryPolicy::default()
///     .max_attempts(10)
///     .initial_backoff(Duration::from_millis(5))
///     .max_backoff(Duration::from_millis(200));
/// assert_eq!(policy.attempts(), 10);
/// assert!(policy.backoff(3) <= Duration::from_millis(40));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    attempts: u32,
    initial_backoff: Duration,
    max_backoff: Duration,
}

impl Default for RetryPolicy {
    /// 5 attempts, backoff from 10 ms up to 1 s.
    fn default() -> Self {
        Self {
            attempts: 5,
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_secs(1),
        }
    }
}

impl RetryPolicy {
    /// A policy that runs the transaction once and never retries.
    #[must_use]
    pub fn never() -> Self {
        Self {
            attempts: 1,
            ..Self::default()
        }
    }

    /// Total attempts, including the first (at least 1).
    #[must_use]
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.attempts = attempts;
        self
    }

    /// The wait before the second attempt.
    #[must_use]
    pub fn initial_backoff(mut self, d: Duration) -> Self {
        self.initial_backoff = d;
        self
    }

    /// The longest wait between two attempts.
    #[must_use]
    pub fn max_backoff(mut self, d: Duration) -> Self {
        self.max_backoff = d;
        self
    }

    /// Total attempts, including the first.
    #[must_use]
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// The nominal (un-jittered) wait after failed attempt number `attempt`
    /// (1-based): `initial_backoff * 2^(attempt-1)`, capped at
    /// `max_backoff`.
    #[must_use]
    pub fn backoff(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(31);
        self.initial_backoff
            .saturating_mul(1u32 << exp)
            .min(self.max_backoff)
    }

    /// The wait actually slept: uniformly between half and all of
    /// [`backoff`](Self::backoff).
    pub(crate) fn jittered_backoff(&self, attempt: u32) -> Duration {
        let nominal = self.backoff(attempt);
        let half = nominal / 2;
        let spread = u64::try_from((nominal - half).as_nanos()).unwrap_or(u64::MAX);
        if spread == 0 {
            return nominal;
        }
        half + Duration::from_nanos(rand::random_range(0..=spread))
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if self.attempts == 0 || self.attempts > 1000 {
            return Err(crate::config::config_error(
                "retry.max_attempts",
                format!("must be between 1 and 1000, got {}", self.attempts),
            ));
        }
        if self.max_backoff < self.initial_backoff {
            return Err(crate::config::config_error(
                "retry.max_backoff",
                "must not be shorter than retry.initial_backoff",
            ));
        }
        Ok(())
    }
}

/// An error type that [`Database::transaction`](crate::Database::transaction)
/// can return from the closure and inspect for retries.
///
/// It must be able to hold a [`DatabaseError`] (for failures of `BEGIN` and
/// `COMMIT`) and say whether it is a serialization failure or deadlock.
/// Implemented for [`DatabaseError`], [`keel_core::Error`] and boxed
/// errors; implement it for your own error type with
/// [`chain_has_transaction_conflict`]:
///
/// ```
/// use keel_database::{DatabaseError, TransactionError, chain_has_transaction_conflict};
///
/// #[derive(Debug, thiserror::Error)]
/// enum AppError {
///     #[error("order {0} is closed")]
///     Closed(u64),
///     #[error(transparent)]
///     Database(#[from] DatabaseError),
/// }
///
/// impl TransactionError for AppError {
///     fn is_transaction_conflict(&self) -> bool {
///         chain_has_transaction_conflict(self)
///     }
/// }
/// ```
pub trait TransactionError: From<DatabaseError> {
    /// Whether the transaction was aborted by a serialization failure or a
    /// deadlock, so that running it again may succeed.
    fn is_transaction_conflict(&self) -> bool;
}

impl TransactionError for DatabaseError {
    fn is_transaction_conflict(&self) -> bool {
        DatabaseError::is_transaction_conflict(self)
    }
}

impl TransactionError for keel_core::Error {
    fn is_transaction_conflict(&self) -> bool {
        chain_has_transaction_conflict(self)
    }
}

impl TransactionError for Box<dyn StdError + Send + Sync + 'static> {
    fn is_transaction_conflict(&self) -> bool {
        chain_has_transaction_conflict(&**self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let p = RetryPolicy::default()
            .initial_backoff(Duration::from_millis(10))
            .max_backoff(Duration::from_millis(100));
        assert_eq!(p.backoff(1), Duration::from_millis(10));
        assert_eq!(p.backoff(2), Duration::from_millis(20));
        assert_eq!(p.backoff(4), Duration::from_millis(80));
        assert_eq!(p.backoff(5), Duration::from_millis(100));
        assert_eq!(p.backoff(u32::MAX), Duration::from_millis(100));
        for attempt in 1..10 {
            let j = p.jittered_backoff(attempt);
            assert!(j >= p.backoff(attempt) / 2 && j <= p.backoff(attempt));
        }
    }

    #[test]
    fn invalid_policies_are_refused() {
        assert!(RetryPolicy::default().max_attempts(0).validate().is_err());
        assert!(
            RetryPolicy::default()
                .initial_backoff(Duration::from_secs(2))
                .max_backoff(Duration::from_secs(1))
                .validate()
                .is_err()
        );
        assert!(RetryPolicy::never().validate().is_ok());
    }

    #[test]
    fn boxed_and_keel_errors_are_inspected() {
        let boxed: Box<dyn StdError + Send + Sync> = Box::new(DatabaseError::RowNotFound);
        assert!(!TransactionError::is_transaction_conflict(&boxed));
        let keel = keel_core::Error::from(DatabaseError::PoolClosed);
        assert!(!TransactionError::is_transaction_conflict(&keel));
    }
}
