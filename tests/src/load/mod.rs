//! Pieces of the load run (`benches/load.rs`): its settings, latency
//! percentiles, resource use from `/proc`, the observer of the other
//! context's effect, and the live progress line.
//!
//! The bench drives orders through the Ordering service's gRPC API and
//! measures, per paid order, the time from the `PayOrder` call to the
//! moment Shipping's `shipment.dispatched` event for it arrives on a
//! subscription of its own ([`DispatchObserver`]). See
//! `docs/benchmarks.md` ("Two services under load") for the figures.

mod latency;
mod observer;
mod progress;
mod usage;

use std::time::Duration;

pub use latency::{LatencyRecorder, LatencySummary, Millis};
pub use observer::{DISPATCHED, Dispatch, DispatchObserver};
pub use progress::{ProgressLine, per_second};
pub use usage::{MachineCpu, ProcessUsage, UsageTracker, find_processes, load_average};

/// The variable setting how many orders the run places.
pub const ORDERS_VAR: &str = "KEEL_LOAD_ORDERS";
/// The variable setting how many orders are in flight at once.
pub const CONCURRENCY_VAR: &str = "KEEL_LOAD_CONCURRENCY";
/// The variable setting how often an order is cancelled instead of paid
/// (every n-th order; 0 for never).
pub const CANCEL_EVERY_VAR: &str = "KEEL_LOAD_CANCEL_EVERY";
/// The variable capping how many orders start per second (0 or unset: as
/// fast as the orders in flight allow).
pub const RATE_VAR: &str = "KEEL_LOAD_RATE";
/// The variable setting how long the run waits for the last shipment
/// after the last order was paid, in seconds.
pub const SETTLE_VAR: &str = "KEEL_LOAD_SETTLE_SECS";

/// What a load run does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadConfig {
    /// Orders placed (10,000 by default).
    pub orders: usize,
    /// Orders in flight at once (32 by default): each in-flight order is
    /// one task calling PlaceOrder, then PayOrder or CancelOrder.
    pub concurrency: usize,
    /// Every n-th order is cancelled instead of paid (100 by default, so
    /// 1 % of the orders); 0 cancels none.
    pub cancel_every: usize,
    /// How long to wait, after the last command, for the last shipment
    /// (120 s by default). The wait ends early when everything arrived;
    /// running out of it fails the run.
    pub settle: Duration,
    /// At most this many orders start per second (`None` by default: each
    /// starts as soon as one in flight ends). Below the services' capacity
    /// the end-to-end latency is the path's own, not a queue's.
    pub rate: Option<usize>,
}

impl Default for LoadConfig {
    fn default() -> Self {
        Self {
            orders: 10_000,
            concurrency: 32,
            cancel_every: 100,
            settle: Duration::from_secs(120),
            rate: None,
        }
    }
}

impl LoadConfig {
    /// The defaults, overridden by [`ORDERS_VAR`], [`CONCURRENCY_VAR`],
    /// [`CANCEL_EVERY_VAR`], [`SETTLE_VAR`] and [`RATE_VAR`] where set.
    ///
    /// # Errors
    ///
    /// [`keel_core::Error`] of kind invalid input naming the variable,
    /// when one is set but not a number, or is zero where zero makes no
    /// sense (orders, concurrency, settle).
    pub fn from_env() -> keel_core::Result<Self> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// Like [`from_env`](Self::from_env), reading variables through `var`.
    ///
    /// # Errors
    ///
    /// As [`from_env`](Self::from_env).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> keel_core::Result<Self> {
        let defaults = Self::default();
        let number = |name: &'static str, default: usize, zero_ok: bool| {
            let Some(raw) = var(name).filter(|v| !v.trim().is_empty()) else {
                return Ok(default);
            };
            match raw.trim().replace('_', "").parse::<usize>() {
                Ok(0) if !zero_ok => {
                    Err(keel_core::Error::invalid_input(name, "must be at least 1"))
                }
                Ok(n) => Ok(n),
                Err(_) => Err(keel_core::Error::invalid_input(
                    name,
                    format!("{raw:?} is not a whole number"),
                )),
            }
        };
        let settle_secs = number(
            SETTLE_VAR,
            usize::try_from(defaults.settle.as_secs()).unwrap_or(120),
            false,
        )?;
        Ok(Self {
            orders: number(ORDERS_VAR, defaults.orders, false)?,
            concurrency: number(CONCURRENCY_VAR, defaults.concurrency, false)?,
            cancel_every: number(CANCEL_EVERY_VAR, defaults.cancel_every, true)?,
            settle: Duration::from_secs(u64::try_from(settle_secs).unwrap_or(u64::MAX)),
            rate: Some(number(RATE_VAR, 0, true)?).filter(|r| *r > 0),
        })
    }

    /// When order number `n` (0-based) may start, counted from the run's
    /// start: `n / rate` seconds, or at once without a rate.
    #[must_use]
    pub fn start_offset(&self, n: usize) -> Duration {
        match self.rate {
            Some(rate) => Duration::from_secs_f64(n as f64 / rate as f64),
            None => Duration::ZERO,
        }
    }

    /// Whether order number `n` (0-based) is cancelled instead of paid.
    /// The first cancelled order is number `cancel_every - 1`, so that a
    /// run of fewer orders than `cancel_every` pays them all.
    #[must_use]
    pub fn cancels(&self, n: usize) -> bool {
        self.cancel_every != 0 && (n + 1).is_multiple_of(self.cancel_every)
    }

    /// How many orders the run pays.
    #[must_use]
    pub fn paid(&self) -> usize {
        self.orders - self.cancelled()
    }

    /// How many orders the run cancels.
    #[must_use]
    pub fn cancelled(&self) -> usize {
        self.orders.checked_div(self.cancel_every).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let pairs: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        }
    }

    #[test]
    fn defaults_and_overrides() {
        assert_eq!(
            LoadConfig::from_vars(vars(&[])).unwrap(),
            LoadConfig::default()
        );
        let c = LoadConfig::from_vars(vars(&[
            (ORDERS_VAR, "10_000"),
            (CONCURRENCY_VAR, " 64 "),
            (CANCEL_EVERY_VAR, "0"),
            (SETTLE_VAR, "30"),
            (RATE_VAR, "50"),
        ]))
        .unwrap();
        assert_eq!(
            c,
            LoadConfig {
                orders: 10_000,
                concurrency: 64,
                cancel_every: 0,
                settle: Duration::from_secs(30),
                rate: Some(50),
            }
        );
        assert_eq!(c.start_offset(100), Duration::from_secs(2));
        assert_eq!(LoadConfig::default().start_offset(100), Duration::ZERO);
        let unlimited = LoadConfig::from_vars(vars(&[(RATE_VAR, "0")])).unwrap();
        assert_eq!(unlimited.rate, None);
        assert_eq!((c.paid(), c.cancelled()), (10_000, 0));
    }

    #[test]
    fn bad_values_name_their_variable() {
        for (name, value) in [
            (ORDERS_VAR, "lots"),
            (ORDERS_VAR, "0"),
            (CONCURRENCY_VAR, "-3"),
            (SETTLE_VAR, "0"),
        ] {
            let err = LoadConfig::from_vars(vars(&[(name, value)])).unwrap_err();
            assert_eq!(
                err.kind(),
                keel_core::ErrorKind::InvalidInput,
                "{name}={value}"
            );
            assert!(err.to_string().contains(name), "{err}");
        }
    }

    #[test]
    fn every_nth_order_is_cancelled() {
        let c = LoadConfig {
            orders: 250,
            cancel_every: 100,
            ..LoadConfig::default()
        };
        let cancelled: Vec<usize> = (0..c.orders).filter(|&n| c.cancels(n)).collect();
        assert_eq!(cancelled, [99, 199]);
        assert_eq!((c.paid(), c.cancelled()), (248, 2));
        let small = LoadConfig { orders: 50, ..c };
        assert_eq!((small.paid(), small.cancelled()), (50, 0));
    }
}
