//! Per-call overhead of `GrpcServer`'s stack (trace span with W3C
//! extraction, bearer authentication and an authorization hook, load
//! shedding over a concurrency limit, deadline, message-size limit, abort
//! wiring) against a bare tonic server serving the same trivial unary
//! service, in the same run, over loopback, with the same client.
//!
//! Run with `cargo bench -p keel-grpc --bench server_overhead`; figures
//! are in `docs/benchmarks.md`.

#![allow(
    missing_docs,
    reason = "criterion's macros generate undocumented items"
)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Duration;

use common::*;
use criterion::{Criterion, criterion_group, criterion_main};
use keel_core::Principal;
use keel_grpc::GrpcServer;
use keel_telemetry::{Telemetry, TelemetryConfig};
use tokio::runtime::Runtime;
use tonic::metadata::MetadataMap;
use tonic::transport::Channel;
use tonic::transport::server::TcpIncoming;

fn allow_all(_: &Principal, _: &str) -> Result<(), keel_core::Error> {
    Ok(())
}

struct Targets {
    bare: Channel,
    keel: Channel,
    keel_no_auth: Channel,
    metadata: MetadataMap,
}

fn setup(rt: &Runtime) -> Targets {
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let bare_addr = listener.local_addr().unwrap();
        // The baseline gets TCP_NODELAY too, as GrpcServer sets it.
        let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(EchoServer::default())
                .serve_with_incoming(incoming),
        );
        let keel = GrpcServer::builder()
            .add_service(EchoServer::default())
            .authenticate(verifier())
            .authorize(allow_all)
            .timeout(Duration::from_secs(10))
            .concurrency_limit(1024)
            .serve(addr())
            .await
            .unwrap();
        let keel_no_auth = GrpcServer::builder()
            .add_service(EchoServer::default())
            .timeout(Duration::from_secs(10))
            .serve(addr())
            .await
            .unwrap();
        let targets = Targets {
            bare: channel(bare_addr).await,
            keel: channel(keel.local_addr()).await,
            keel_no_auth: channel(keel_no_auth.local_addr()).await,
            metadata: {
                let mut m = MetadataMap::new();
                m.insert(
                    "authorization",
                    format!("Bearer {}", token("bench", &["clerk"], 3600))
                        .parse()
                        .unwrap(),
                );
                m.insert(
                    "traceparent",
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                        .parse()
                        .unwrap(),
                );
                m
            },
        };
        // The servers live as long as the process.
        std::mem::forget(keel);
        std::mem::forget(keel_no_auth);
        targets
    })
}

async fn one(channel: &Channel, metadata: Option<&MetadataMap>) {
    let mut request = tonic::Request::new(echo("ping"));
    if let Some(m) = metadata {
        *request.metadata_mut() = m.clone();
    }
    call(channel.clone(), request).await.expect("call");
}

async fn batch(channel: &Channel, metadata: Option<&MetadataMap>, n: usize) {
    futures::future::join_all((0..n).map(|_| one(channel, metadata))).await;
}

fn bench(c: &mut Criterion) {
    let _telemetry = Telemetry::build(
        TelemetryConfig::new("bench")
            .without_otlp()
            .log_writer(std::io::sink),
    )
    .unwrap()
    .install()
    .unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let t = setup(&rt);

    let mut group = c.benchmark_group("unary_call");
    group
        .sample_size(60)
        .measurement_time(Duration::from_secs(6));
    // Interleave the targets so drift in the machine's load hits all alike.
    group.bench_function("bare_tonic", |b| {
        b.to_async(&rt).iter(|| one(&t.bare, None));
    });
    group.bench_function("keel_full_stack", |b| {
        b.to_async(&rt).iter(|| one(&t.keel, Some(&t.metadata)));
    });
    group.bench_function("keel_without_auth", |b| {
        b.to_async(&rt)
            .iter(|| one(&t.keel_no_auth, Some(&t.metadata)));
    });
    group.finish();

    let mut group = c.benchmark_group("unary_16_in_flight");
    group
        .sample_size(30)
        .measurement_time(Duration::from_secs(6));
    group.bench_function("bare_tonic", |b| {
        b.to_async(&rt).iter(|| batch(&t.bare, None, 16));
    });
    group.bench_function("keel_full_stack", |b| {
        b.to_async(&rt)
            .iter(|| batch(&t.keel, Some(&t.metadata), 16));
    });
    group.finish();
}

/// CPU time this process's threads have used, in nanoseconds (the first
/// field of each thread's `schedstat`): unlike wall time, it does not grow
/// when other processes take the cores.
fn cpu_ns() -> u64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    tasks
        .filter_map(Result::ok)
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// Mean wall time and mean CPU time (client and server together, all
/// threads) per call over `calls` sequential calls.
async fn per_call(
    channel: &Channel,
    metadata: Option<&MetadataMap>,
    calls: u32,
) -> (Duration, Duration) {
    let cpu = cpu_ns();
    let start = std::time::Instant::now();
    for _ in 0..calls {
        one(channel, metadata).await;
    }
    let wall = start.elapsed() / calls;
    let cpu = Duration::from_nanos(cpu_ns().saturating_sub(cpu)) / calls;
    (wall, cpu)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Paired rounds: each round measures the three targets back to back, so
/// a burst of load from other processes hits all three; the added cost is
/// the median over rounds of (keel - bare).
#[allow(clippy::print_stderr, reason = "a bench reports its figures")]
fn paired(c: &mut Criterion) {
    let _ = c;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let t = setup(&rt);
    let rounds = 30;
    let calls = 300;
    let (mut bare, mut full, mut no_auth, mut added, mut added_no_auth) =
        (vec![], vec![], vec![], vec![], vec![]);
    let (mut cpu_bare, mut cpu_full, mut cpu_no_auth) = (vec![], vec![], vec![]);
    rt.block_on(async {
        // Warm up connections and caches.
        per_call(&t.bare, None, 200).await;
        per_call(&t.keel, Some(&t.metadata), 200).await;
        per_call(&t.keel_no_auth, Some(&t.metadata), 200).await;
        for round in 0..rounds {
            // Alternate the order so neither side always runs first.
            let (b, f, n) = if round % 2 == 0 {
                let b = per_call(&t.bare, None, calls).await;
                let f = per_call(&t.keel, Some(&t.metadata), calls).await;
                let n = per_call(&t.keel_no_auth, Some(&t.metadata), calls).await;
                (b, f, n)
            } else {
                let n = per_call(&t.keel_no_auth, Some(&t.metadata), calls).await;
                let f = per_call(&t.keel, Some(&t.metadata), calls).await;
                let b = per_call(&t.bare, None, calls).await;
                (b, f, n)
            };
            let us = |d: Duration| d.as_secs_f64() * 1e6;
            bare.push(us(b.0));
            full.push(us(f.0));
            no_auth.push(us(n.0));
            added.push(us(f.0) - us(b.0));
            added_no_auth.push(us(n.0) - us(b.0));
            cpu_bare.push(us(b.1));
            cpu_full.push(us(f.1));
            cpu_no_auth.push(us(n.1));
        }
    });
    eprintln!(
        "paired ({rounds} rounds x {calls} sequential calls): bare {:.1} us, keel full stack {:.1} us, keel without auth {:.1} us per call (medians)",
        median(bare.clone()),
        median(full.clone()),
        median(no_auth.clone()),
    );
    eprintln!(
        "added per call, median of round differences: full stack {:+.1} us, without auth {:+.1} us; ratio full/bare {:.2}x",
        median(added),
        median(added_no_auth),
        median(full) / median(bare),
    );
    let (cb, cf, cn) = (median(cpu_bare), median(cpu_full), median(cpu_no_auth));
    // 16 calls in flight: wall and CPU time per call.
    let batches = |channel: &Channel, metadata: Option<&MetadataMap>| {
        let (channel, metadata) = (channel.clone(), metadata.cloned());
        async move {
            let cpu = cpu_ns();
            let start = std::time::Instant::now();
            for _ in 0..40 {
                batch(&channel, metadata.as_ref(), 16).await;
            }
            let us = |n: u64| n as f64 / 1e3 / 640.0;
            (
                us(start.elapsed().as_nanos() as u64),
                us(cpu_ns().saturating_sub(cpu)),
            )
        }
    };
    let (mut concurrent_bare, mut concurrent_full, mut concurrent_no_auth) =
        (vec![], vec![], vec![]);
    rt.block_on(async {
        for _ in 0..10 {
            concurrent_bare.push(batches(&t.bare, None).await);
            concurrent_full.push(batches(&t.keel, Some(&t.metadata)).await);
            concurrent_no_auth.push(batches(&t.keel_no_auth, Some(&t.metadata)).await);
        }
    });
    let split = |v: Vec<(f64, f64)>| {
        let (w, c): (Vec<f64>, Vec<f64>) = v.into_iter().unzip();
        (median(w), median(c))
    };
    let (bw, bc) = split(concurrent_bare);
    let (fw, fc) = split(concurrent_full);
    let (nw, nc) = split(concurrent_no_auth);
    eprintln!(
        "16 in flight, per call (medians of 10 rounds x 640 calls): bare wall {bw:.1} us cpu {bc:.1} us; keel full wall {fw:.1} us cpu {fc:.1} us; keel without auth wall {nw:.1} us cpu {nc:.1} us"
    );
    eprintln!(
        "CPU per call (client + server, medians): bare {cb:.1} us, keel full stack {cf:.1} us ({:+.1} us), keel without auth {cn:.1} us ({:+.1} us)",
        cf - cb,
        cn - cb,
    );
}

criterion_group!(benches, bench, paired);
criterion_main!(benches);
