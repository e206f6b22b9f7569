//! What the event store's bench binaries share: the workload scale, the
//! event they all write, timing writers and reporting a comparison.

use std::future::Future;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_core::{CorrelationId, Metadata};
use keel_eventstore::NewEvent;
use serde_json::json;

/// `KEEL_BENCH_SCALE` (default 1.0): shrinks or grows every workload.
pub(crate) fn scale() -> f64 {
    std::env::var("KEEL_BENCH_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0)
}

/// `base` scaled, at least 1.
pub(crate) fn n(base: usize) -> usize {
    ((base as f64) * scale()).max(1.0) as usize
}

/// The payload of the `i`th event: an order line of about 150 bytes.
pub(crate) fn payload(i: usize) -> serde_json::Value {
    json!({
        "order_id": format!("0190a6f2-7c1e-7d3a-9b1f-{i:012}"),
        "sku": "SKU-12345",
        "quantity": 3,
        "price_cents": 1999,
        "note": "leave at the door, ring twice",
    })
}

/// The metadata every event carries: a fresh correlation id and an actor.
pub(crate) fn metadata() -> Metadata {
    Metadata::new()
        .with_correlation_id(CorrelationId::new())
        .with_actor("bench")
}

/// The `i`th event as Keel appends it.
pub(crate) fn event(i: usize) -> NewEvent {
    NewEvent::from_json("order.line_added", &payload(i)).with_metadata(metadata())
}

/// Throughput and per-operation latencies of one side of a comparison,
/// summed over its rounds.
#[derive(Default)]
pub(crate) struct Stats {
    pub(crate) events: usize,
    pub(crate) elapsed: Duration,
    pub(crate) latencies: Vec<Duration>,
}

impl Stats {
    /// Adds another round's figures: events and time add up.
    pub(crate) fn merge(&mut self, other: Self) {
        self.events += other.events;
        self.elapsed += other.elapsed;
        self.latencies.extend(other.latencies);
    }

    /// Events per second.
    pub(crate) fn rate(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64()
    }

    /// The `p` quantile of the latencies (zero when there are none).
    pub(crate) fn pct(&mut self, p: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        self.latencies.sort_unstable();
        let i = ((self.latencies.len() as f64 - 1.0) * p).round() as usize;
        self.latencies[i]
    }
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

/// One Markdown row: Keel's rate and p50/p99, the other side's, and the
/// ratio of the rates (latencies shown only when Keel's were recorded).
pub(crate) fn report(name: &str, mut keel: Stats, mut other: Stats) {
    if keel.latencies.is_empty() {
        println!(
            "| {name} | {:.0} | – | {:.0} | – | {:.2}x |",
            keel.rate(),
            other.rate(),
            keel.rate() / other.rate()
        );
    } else {
        println!(
            "| {name} | {:.0} | {} / {} | {:.0} | {} / {} | {:.2}x |",
            keel.rate(),
            ms(keel.pct(0.5)),
            ms(keel.pct(0.99)),
            other.rate(),
            ms(other.pct(0.5)),
            ms(other.pct(0.99)),
            keel.rate() / other.rate()
        );
    }
}

/// Runs `writers` tasks, each calling `op(writer, i)` for every `i` in
/// `ops` and timing each call.
pub(crate) async fn run_writers<F, Fut>(
    writers: usize,
    ops: Range<usize>,
    events_per_op: usize,
    op: Arc<F>,
) -> Stats
where
    F: Fn(usize, usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send,
{
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..writers {
        let op = op.clone();
        let ops = ops.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(ops.len());
            for i in ops {
                let t = Instant::now();
                op(w, i).await;
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await.unwrap());
    }
    Stats {
        events: writers * ops.len() * events_per_op,
        elapsed: start.elapsed(),
        latencies,
    }
}
