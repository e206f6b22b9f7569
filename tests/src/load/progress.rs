//! The live progress line of a long run, on standard error.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A background task that prints a line every `interval` while a run
/// goes on. On a terminal it rewrites one line in place; into a file or
/// a pipe it prints one line per `interval` (so a log stays readable).
///
/// [`stop`](Self::stop) prints the final state once more and ends the
/// task; dropping the handle ends it without the final line.
#[derive(Debug)]
pub struct ProgressLine {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl ProgressLine {
    /// Starts printing `render(elapsed)` every `interval`.
    pub fn start<F>(interval: Duration, render: F) -> Self
    where
        F: Fn(Duration) -> String + Send + 'static,
    {
        let (stop, mut stopped) = watch::channel(false);
        let started = Instant::now();
        let in_place = std::io::stderr().is_terminal();
        let task = tokio::spawn(async move {
            let mut ticker = tokio::time::interval(interval);
            ticker.tick().await;
            loop {
                let last = tokio::select! {
                    _ = ticker.tick() => false,
                    _ = stopped.changed() => true,
                };
                let line = render(started.elapsed());
                let mut err = std::io::stderr().lock();
                // A progress line that cannot be written is not worth
                // failing a run for.
                let _ = if in_place {
                    write!(err, "\r\x1b[2K{line}{}", if last { "\n" } else { "" })
                } else {
                    writeln!(err, "{line}")
                };
                let _ = err.flush();
                if last {
                    break;
                }
            }
        });
        Self { stop, task }
    }

    /// Prints the final line and waits for the task to end.
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        let _ = (&mut self.task).await;
    }
}

impl Drop for ProgressLine {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A rate per second, `0` for an empty interval.
#[must_use]
pub fn per_second(count: u64, over: Duration) -> f64 {
    let secs = over.as_secs_f64();
    if secs == 0.0 {
        0.0
    } else {
        #[allow(
            clippy::cast_precision_loss,
            reason = "counts of a load run are far below 2^52"
        )]
        let count = count as f64;
        count / secs
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    #[tokio::test]
    async fn renders_while_running_and_once_more_at_stop() {
        let calls = Arc::new(AtomicU32::new(0));
        let counted = calls.clone();
        let line = ProgressLine::start(Duration::from_millis(20), move |elapsed| {
            counted.fetch_add(1, Ordering::SeqCst);
            format!("{} ms", elapsed.as_millis())
        });
        tokio::time::sleep(Duration::from_millis(110)).await;
        let while_running = calls.load(Ordering::SeqCst);
        assert!(while_running >= 2, "rendered {while_running} times");
        line.stop().await;
        // The final render, and at most one tick that raced with the stop.
        let after = calls.load(Ordering::SeqCst);
        assert!((while_running + 1..=while_running + 2).contains(&after));
    }

    #[test]
    fn rates() {
        assert!((per_second(500, Duration::from_millis(250)) - 2000.0).abs() < 1e-9);
        assert!(per_second(5, Duration::ZERO).abs() < f64::EPSILON);
    }
}
