//! Latency samples from many tasks, summarised as percentiles.

use std::fmt;
use std::sync::Mutex;
use std::time::Duration;

/// Collects durations from any number of tasks and summarises them.
///
/// Every sample is kept (a load run records tens of thousands, a few
/// hundred kilobytes), so the percentiles are exact rather than estimated
/// from buckets.
#[derive(Debug, Default)]
pub struct LatencyRecorder {
    samples: Mutex<Vec<Duration>>,
}

impl LatencyRecorder {
    /// An empty recorder.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one sample.
    pub fn record(&self, sample: Duration) {
        self.lock().push(sample);
    }

    /// How many samples were recorded.
    #[must_use]
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether nothing was recorded yet.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The summary of every sample so far; `None` when there is none.
    #[must_use]
    pub fn summary(&self) -> Option<LatencySummary> {
        LatencySummary::of(self.lock().clone())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Duration>> {
        // A panic while pushing cannot leave the vector half-written.
        self.samples
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Percentiles of a set of durations (nearest-rank: the p-th percentile
/// is a sample that was actually observed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LatencySummary {
    /// How many samples.
    pub count: usize,
    /// The smallest sample.
    pub min: Duration,
    /// The median.
    pub p50: Duration,
    /// The 90th percentile.
    pub p90: Duration,
    /// The 99th percentile.
    pub p99: Duration,
    /// The largest sample.
    pub max: Duration,
    /// The arithmetic mean.
    pub mean: Duration,
}

impl LatencySummary {
    /// Summarises `samples`; `None` when it is empty.
    #[must_use]
    pub fn of(mut samples: Vec<Duration>) -> Option<Self> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_unstable();
        let total: Duration = samples.iter().sum();
        let count = samples.len();
        Some(Self {
            count,
            min: samples[0],
            p50: percentile(&samples, 50.0),
            p90: percentile(&samples, 90.0),
            p99: percentile(&samples, 99.0),
            max: samples[count - 1],
            mean: total / u32::try_from(count).unwrap_or(u32::MAX),
        })
    }
}

impl fmt::Display for LatencySummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "p50 {} p90 {} p99 {} max {} (n={})",
            Millis(self.p50),
            Millis(self.p90),
            Millis(self.p99),
            Millis(self.max),
            self.count
        )
    }
}

/// The nearest-rank percentile of sorted, non-empty samples.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    // Rank ceil(p/100 * n), 1-based; clamped so p=0 gives the minimum.
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "a rank between 1 and the sample count, which fits every type involved"
    )]
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// A duration shown in milliseconds with a precision that suits it.
#[derive(Clone, Copy, Debug)]
pub struct Millis(pub Duration);

impl fmt::Display for Millis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_secs_f64() * 1000.0;
        if ms < 10.0 {
            write!(f, "{ms:.2} ms")
        } else if ms < 1000.0 {
            write!(f, "{ms:.1} ms")
        } else {
            write!(f, "{:.2} s", ms / 1000.0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn percentiles_are_nearest_rank_over_unsorted_input() {
        // 1..=100 ms, shuffled by a fixed stride.
        let samples: Vec<Duration> = (0..100).map(|i| ms((i * 37) % 100 + 1)).collect();
        let s = LatencySummary::of(samples).unwrap();
        assert_eq!(s.count, 100);
        assert_eq!(s.min, ms(1));
        assert_eq!(s.p50, ms(50));
        assert_eq!(s.p90, ms(90));
        assert_eq!(s.p99, ms(99));
        assert_eq!(s.max, ms(100));
        assert_eq!(s.mean, Duration::from_micros(50_500));
    }

    #[test]
    fn one_sample_is_every_percentile_and_none_is_no_summary() {
        let s = LatencySummary::of(vec![ms(7)]).unwrap();
        assert_eq!((s.p50, s.p99, s.max, s.min), (ms(7), ms(7), ms(7), ms(7)));
        assert_eq!(LatencySummary::of(Vec::new()), None);
        assert_eq!(LatencyRecorder::new().summary(), None);
    }

    #[test]
    fn a_slow_tail_shows_in_p99_but_not_in_the_median() {
        let mut samples = vec![ms(2); 990];
        samples.extend(vec![ms(500); 10]);
        let s = LatencySummary::of(samples).unwrap();
        assert_eq!(s.p50, ms(2));
        assert_eq!(s.p99, ms(2));
        assert_eq!(s.max, ms(500));
        let mut samples = vec![ms(2); 980];
        samples.extend(vec![ms(500); 20]);
        assert_eq!(LatencySummary::of(samples).unwrap().p99, ms(500));
    }

    #[test]
    fn samples_from_many_threads_are_all_kept() {
        let recorder = std::sync::Arc::new(LatencyRecorder::new());
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let r = recorder.clone();
                std::thread::spawn(move || {
                    for i in 0..1000 {
                        r.record(ms(t * 1000 + i));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let s = recorder.summary().unwrap();
        assert_eq!(s.count, 8000);
        assert_eq!((s.min, s.max), (ms(0), ms(7999)));
        assert_eq!(s.p50, ms(3999));
    }

    #[test]
    fn millis_picks_a_precision() {
        assert_eq!(Millis(Duration::from_micros(1234)).to_string(), "1.23 ms");
        assert_eq!(Millis(ms(123)).to_string(), "123.0 ms");
        assert_eq!(Millis(ms(2500)).to_string(), "2.50 s");
    }
}
