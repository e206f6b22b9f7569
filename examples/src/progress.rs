//! Progress of a long run, for a person watching it.
//!
//! On a terminal (stderr is one) a [`Reporter`] keeps one line at the
//! bottom up to date, several times a second; log lines written through
//! [`LogWriter`] appear above it instead of through it. Elsewhere (CI, a
//! file, a pipe) it logs the same numbers as a plain `progress` line every
//! few seconds, and only once the run has lasted a moment, so a short run
//! logs none.

use std::io::{IsTerminal as _, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::task::JoinHandle;
use tracing::info;

/// The line drawn on stderr, if any. Kept behind one lock with the writes
/// of log lines so that neither cuts into the other.
static LINE: Mutex<Option<String>> = Mutex::new(None);

fn line() -> MutexGuard<'static, Option<String>> {
    LINE.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// ANSI: back to the start of the line and erase it.
const ERASE: &str = "\r\x1b[2K";

/// Whether progress is drawn as a live line: stderr is a terminal.
#[must_use]
pub fn is_live() -> bool {
    std::io::stderr().is_terminal()
}

/// A log writer for `keel_telemetry::TelemetryConfig::log_writer` that
/// writes to stdout and, when stdout and stderr share a terminal, lifts the
/// live line out of the way of each log line and draws it again below.
#[derive(Clone, Copy, Debug, Default)]
pub struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let line = line();
        let mut err = std::io::stderr().lock();
        if line.is_some() {
            err.write_all(ERASE.as_bytes())?;
            err.flush()?;
        }
        let mut out = std::io::stdout().lock();
        out.write_all(buf)?;
        out.flush()?;
        if let Some(text) = line.as_deref() {
            err.write_all(text.as_bytes())?;
            err.flush()?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stdout().flush()
    }
}

fn draw(text: Option<String>) {
    let mut line = line();
    let mut err = std::io::stderr().lock();
    // A terminal gone away is no reason to fail the run.
    let _ = err.write_all(ERASE.as_bytes());
    if let Some(text) = &text {
        let _ = err.write_all(text.as_bytes());
    }
    let _ = err.flush();
    *line = text;
}

/// Reports a run's progress until [`finish`](Self::finish)ed.
#[derive(Debug)]
pub struct Reporter {
    stop: Arc<AtomicBool>,
    task: Option<JoinHandle<()>>,
}

impl Reporter {
    /// Starts reporting what `sample` says (one short line, e.g. `orders 12
    /// placed, 9 paid`): live on a terminal, else in a log line every
    /// `every` once the run has lasted `every`.
    pub fn spawn(sample: impl Fn() -> String + Send + 'static, every: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let live = is_live();
        let task = {
            let stop = Arc::clone(&stop);
            tokio::spawn(async move {
                let tick = if live {
                    Duration::from_millis(100)
                } else {
                    every
                };
                loop {
                    tokio::time::sleep(tick).await;
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    if live {
                        draw(Some(sample()));
                    } else {
                        info!(progress = %sample(), "progress");
                    }
                }
            })
        };
        Self {
            stop,
            task: Some(task),
        }
    }

    /// Stops reporting and takes the live line away.
    pub async fn finish(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
        if is_live() {
            draw(None);
        }
    }
}

impl Drop for Reporter {
    fn drop(&mut self) {
        // A run that failed early must not leave the line ticking.
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}
