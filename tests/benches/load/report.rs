//! The report printed at the end of a load run.

use std::sync::atomic::Ordering;
use std::time::Duration;

use keel_tests::load::{
    DispatchObserver, LatencySummary, LoadConfig, Millis, UsageTracker, load_average, per_second,
};

use crate::driver::Driven;
use crate::probes::{Phased, References};
use crate::verify::Verified;

/// Everything the report shows.
pub(crate) struct Inputs<'a> {
    pub(crate) config: &'a LoadConfig,
    pub(crate) driven: &'a Driven,
    pub(crate) observer: &'a DispatchObserver,
    pub(crate) references: &'a References,
    pub(crate) usage: &'a UsageTracker,
    /// From the first command to the last command's answer.
    pub(crate) commands_done: Duration,
    /// From the first command to the last dispatch's arrival.
    pub(crate) all_arrived: Duration,
    /// The share of all cores busy during the run (anything on the
    /// machine).
    pub(crate) machine_busy: f64,
    pub(crate) probe_failures: u64,
    pub(crate) checked: Option<&'a Verified>,
}

pub(crate) fn print(r: &Inputs<'_>) {
    let d = r.driven;
    let (placed, paid, cancelled) = (
        d.placed.load(Ordering::Relaxed),
        d.paid.load(Ordering::Relaxed),
        d.cancelled.load(Ordering::Relaxed),
    );
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    println!();
    println!(
        "== load run: {} orders ({paid} paid, {cancelled} cancelled, {} failed), {} in flight, {} ==",
        r.config.orders,
        d.failed.load(Ordering::Relaxed),
        r.config.concurrency,
        r.config.rate.map_or_else(
            || "no rate limit".to_owned(),
            |n| format!("at most {n} orders/s")
        )
    );
    println!(
        "machine: {cores} cores, {:.0} % of them busy during the run (everything on the machine), load average {:.1} at the end",
        r.machine_busy * 100.0,
        load_average().unwrap_or(f64::NAN)
    );
    let commands = d.commands();
    println!(
        "throughput: {commands} commands in {:.1} s = {:.0} commands/s; {} orders paid and dispatched in {:.1} s = {:.0} orders/s end to end",
        r.commands_done.as_secs_f64(),
        per_second(commands, r.commands_done),
        r.observer.orders(),
        r.all_arrived.as_secs_f64(),
        per_second(r.observer.orders() as u64, r.all_arrived),
    );
    let _ = placed;

    let e2e = end_to_end(d, r.observer);
    println!("\nlatency");
    line(
        "end to end, PayOrder call -> shipment.dispatched received",
        e2e,
    );
    line("PlaceOrder call", d.place.summary());
    line("PayOrder call", d.pay.summary());
    line("CancelOrder call", d.cancel.summary());

    let refs = r.references;
    println!(
        "\nreferences, same run (idle = before the load; loaded = probed every 100 ms during it)"
    );
    phased("gRPC health check to Ordering", &refs.health);
    phased("emulator hop, SDK publish -> streaming pull", &refs.raw_hop);
    phased("emulator hop, Keel bus publish -> handler", &refs.keel_hop);
    if r.probe_failures > 0 {
        println!(
            "  ({} probes timed out or failed under load)",
            r.probe_failures
        );
    }

    println!("\nratios (p50 / p50)");
    let health = refs.health.loaded.summary();
    let raw = refs.raw_hop.loaded.summary();
    ratio(
        "PayOrder / health check, under load",
        d.pay.summary(),
        health,
    );
    ratio(
        "PlaceOrder / health check, under load",
        d.place.summary(),
        health,
    );
    ratio("end to end / SDK emulator hop, under load", e2e, raw);
    ratio(
        "end to end / SDK emulator hop, idle",
        e2e,
        refs.raw_hop.idle.summary(),
    );
    ratio(
        "Keel bus hop / SDK hop, idle",
        refs.keel_hop.idle.summary(),
        refs.raw_hop.idle.summary(),
    );
    ratio(
        "Keel bus hop / SDK hop, under load",
        refs.keel_hop.loaded.summary(),
        raw,
    );

    println!("\nresources during the run (CPU = user + system)");
    let orders = r.config.orders.max(1) as f64;
    let window = r.all_arrived.as_secs_f64();
    for group in r.usage.groups() {
        let cpu = r.usage.cpu(group).as_secs_f64();
        let processes = r.usage.peak_processes(group);
        println!(
            "  {group:<28} CPU {cpu:>7.2} s ({:>5.1} % of one core, {:.2} ms per order){}  peak RSS {:.0} MiB",
            cpu / window * 100.0,
            cpu * 1000.0 / orders,
            if processes > 1 {
                format!(", {processes} processes")
            } else {
                String::new()
            },
            r.usage.peak_rss(group) as f64 / (1024.0 * 1024.0),
        );
    }

    println!(
        "\nobserver: {} deliveries, {} redeliveries of an event already seen, {} other events",
        r.observer.deliveries(),
        r.observer.redeliveries(),
        r.observer.other_events()
    );
    match r.checked {
        Some(v) => println!(
            "check: PASSED: {} paid orders dispatched exactly once and shown shipped by Ordering; {} cancelled orders not dispatched and shown cancelled",
            v.paid, v.cancelled
        ),
        None => println!("check: FAILED (see the error below)"),
    }
}

/// Per paid order: its dispatch's arrival minus its PayOrder start.
fn end_to_end(driven: &Driven, observer: &DispatchObserver) -> Option<LatencySummary> {
    let started = driven
        .pay_started
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    let samples = started
        .iter()
        .filter_map(|(id, at)| {
            Some(
                observer
                    .dispatch(id)?
                    .first_seen
                    .saturating_duration_since(*at),
            )
        })
        .collect();
    LatencySummary::of(samples)
}

fn line(what: &str, summary: Option<LatencySummary>) {
    match summary {
        Some(s) => println!("  {what:<58} {s}"),
        None => println!("  {what:<58} (no samples)"),
    }
}

fn phased(what: &str, p: &Phased) {
    let show = |s: Option<LatencySummary>| {
        s.map_or_else(
            || "-".to_owned(),
            |s| {
                format!(
                    "p50 {} p99 {} (n={})",
                    Millis(s.p50),
                    Millis(s.p99),
                    s.count
                )
            },
        )
    };
    println!(
        "  {what:<44} idle {:<36} loaded {}",
        show(p.idle.summary()),
        show(p.loaded.summary())
    );
}

fn ratio(what: &str, subject: Option<LatencySummary>, baseline: Option<LatencySummary>) {
    if let (Some(s), Some(b)) = (subject, baseline) {
        let x = s.p50.as_secs_f64() / b.p50.as_secs_f64().max(1e-9);
        println!(
            "  {what:<44} {x:>7.1}x  ({} / {})",
            Millis(s.p50),
            Millis(b.p50)
        );
    }
}
