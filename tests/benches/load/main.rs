//! The load run (#17): 10,000 orders through both example services,
//! Ordering and Shipping, each a separate process on PostgreSQL, Redis and
//! the Pub/Sub emulator.
//!
//! `cargo bench -p keel-tests --bench load` (settings: `KEEL_LOAD_ORDERS`,
//! `KEEL_LOAD_CONCURRENCY`, `KEEL_LOAD_CANCEL_EVERY`,
//! `KEEL_LOAD_SETTLE_SECS`; see `keel_tests::load::LoadConfig`).
//!
//! The run places every order through Ordering's gRPC API and pays it
//! (or cancels every n-th), a bounded number at a time, and waits until
//! Shipping's `shipment.dispatched` event for every paid order has
//! arrived on a subscription of the bench's own. It reports throughput,
//! the end-to-end latency from the PayOrder call to that arrival, the
//! command latencies, the CPU and memory of each process, and the same
//! run's references: a bare gRPC health check to Ordering and one hop
//! through the emulator (the SDK alone, and Keel's bus). It fails, with
//! a non-zero exit, when an order was lost, dispatched twice, or a
//! cancelled order shipped. The figures are in `docs/benchmarks.md`.

#![allow(
    clippy::print_stdout,
    reason = "a bench binary reports on standard output"
)]

mod driver;
mod probes;
mod report;
mod services;
mod verify;

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use keel_eventbus::{EventBus, SubscriptionConfig};
use keel_tests::load::{
    DispatchObserver, LoadConfig, MachineCpu, ProgressLine, UsageTracker, load_average, per_second,
};
use tokio::sync::Mutex;

use crate::driver::Driven;
use crate::probes::{EmulatorHop, Prober, References};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The consumer name of the bench's own subscription to Shipping's
/// shipments topic.
const OBSERVER: &str = "load-observer";

fn main() -> ExitCode {
    // `cargo test --all-targets` runs bench binaries without `--bench`:
    // a load run is not a test.
    if !std::env::args().any(|a| a == "--bench") {
        eprintln!("load: a bench; run it with `cargo bench -p keel-tests --bench load`");
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("load: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("load: FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), BoxError> {
    let config = LoadConfig::from_env()?;
    eprintln!(
        "load: {} orders, {} in flight, every {} cancelled; starting the services",
        config.orders,
        config.concurrency,
        if config.cancel_every == 0 {
            "none".to_owned()
        } else {
            format!("{}th", config.cancel_every)
        },
    );
    let running = services::start().await?;
    let result = measure(&config, &running).await;
    running.stop().await;
    result
}

async fn measure(config: &LoadConfig, running: &services::Running) -> Result<(), BoxError> {
    let run_id = uuid::Uuid::now_v7().simple().to_string()[24..].to_owned();

    // The bench's own view of Shipping's effect.
    let bus = running.bus().await?;
    let observer = Arc::new(DispatchObserver::new());
    let observing = bus
        .subscribe(
            running.shipments_topic(),
            &SubscriptionConfig::new(OBSERVER)
                .with_max_concurrent_handlers(64)
                .with_shutdown_timeout(Duration::from_secs(10)),
            observer.clone(),
        )
        .await?;

    // Resource use, sampled every half second from here on.
    let usage = Arc::new(Mutex::new(UsageTracker::new()));
    let sampler =
        services::sample_usage(running, usage.clone(), Duration::from_millis(500)).await?;

    // References while nothing else of this run is going on.
    let references = Arc::new(References::default());
    let mut hop = EmulatorHop::connect(running.emulator_host(), running.project(), &run_id).await?;
    for round in 0..60_u32 {
        let timeout = Duration::from_secs(10);
        references
            .health
            .record(probes::health_round_trip(&running.ordering_channel()).await?);
        if round.is_multiple_of(2) {
            references.raw_hop.record(hop.raw(timeout).await?);
        } else {
            references.keel_hop.record(hop.keel(timeout).await?);
        }
    }
    references.set_loaded(true);
    let prober = Prober::start(
        references.clone(),
        running.ordering_channel(),
        hop,
        Duration::from_millis(100),
    );

    // The load.
    let driven = Arc::new(Driven::default());
    usage.lock().await.mark_start();
    let machine_before = MachineCpu::read()?;
    let started = Instant::now();
    let progress = {
        let (driven, observer) = (driven.clone(), observer.clone());
        let paid_target = config.paid();
        ProgressLine::start(Duration::from_secs(1), move |elapsed| {
            let dispatched = observer.orders();
            format!(
                "load: {:>5.0}s placed {} paid {} cancelled {} failed {} | dispatched {dispatched}/{paid_target} | {:.0} cmd/s | load avg {:.1}",
                elapsed.as_secs_f64(),
                driven.placed.load(Ordering::Relaxed),
                driven.paid.load(Ordering::Relaxed),
                driven.cancelled.load(Ordering::Relaxed),
                driven.failed.load(Ordering::Relaxed),
                per_second(driven.commands(), elapsed),
                load_average().unwrap_or(f64::NAN),
            )
        })
    };
    let client = running.ordering_client();
    driver::drive(config, &client, &driven).await;
    let commands_done = started.elapsed();

    // Wait for the last shipment: give up only when nothing new arrived
    // for the settle time.
    let expected = driven.paid.load(Ordering::Relaxed);
    let mut last_count = observer.orders();
    let mut last_change = Instant::now();
    while (observer.orders() as u64) < expected {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = observer.orders();
        if now != last_count {
            (last_count, last_change) = (now, Instant::now());
        } else if last_change.elapsed() > config.settle {
            break;
        }
    }
    let all_arrived = started.elapsed();
    let machine_after = MachineCpu::read()?;
    // The measured window ends here: the checks below use CPU too.
    sampler.stop().await;
    progress.stop().await;
    let (hop, probe_failures) = prober.stop().await?;

    // Late duplicates would arrive about as fast as the first dispatches.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let checked = verify::check(config, running, &driven, &observer).await;
    observing.shutdown().await;
    hop.close().await;

    let usage = usage.lock().await;
    report::print(&report::Inputs {
        config,
        driven: &driven,
        observer: &observer,
        references: &references,
        usage: &usage,
        commands_done,
        all_arrived,
        machine_busy: machine_after.busy_share_since(&machine_before),
        probe_failures,
        checked: checked.as_ref().ok(),
    });
    checked.map(|_| ())
}
