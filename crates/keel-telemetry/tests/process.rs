//! `init` is process-wide, so each case runs in a child process with a
//! controlled environment: the parent test re-runs this binary with one
//! ignored child test selected.
#![allow(clippy::print_stdout)] // a child reports success to its parent on stdout

use std::process::Command;
use std::time::Duration;

use keel_telemetry::{TelemetryConfig, TelemetryError, init};

/// Runs the ignored test `name` in a fresh process with `env` set (and the
/// OTLP variables removed unless given), returning its stdout.
fn run_child(name: &str, env: &[(&str, &str)]) -> String {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        name,
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ]);
    for var in [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_SDK_DISABLED",
        "RUST_LOG",
        "KEEL_LOG_FORMAT",
    ] {
        cmd.env_remove(var);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "child {name} failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(
        stdout.contains(&format!("{name}-passed")),
        "child {name} did not run\n{stdout}"
    );
    stdout
}

/// Names of this process's threads (Linux truncates them to 15 bytes).
fn thread_names() -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|n| n.trim().to_owned())
        .collect()
}

fn export_threads() -> Vec<String> {
    thread_names()
        .into_iter()
        .filter(|n| n.starts_with("OpenTelemetry") || n.starts_with("keel-otlp"))
        .collect()
}

/// Waits until an export thread whose name starts with each of `prefixes`
/// is running. The SDK starts its
/// processor threads in the background after `init` returns, so the test
/// polls for them rather than assuming they already exist. The bound only
/// keeps a broken build from hanging; it is not a performance claim.
fn wait_for_export_threads(prefixes: &[&str]) {
    const BOUND: Duration = Duration::from_secs(30);
    let started = std::time::Instant::now();
    loop {
        let threads = export_threads();
        if prefixes
            .iter()
            .all(|p| threads.iter().any(|t| t.starts_with(p)))
        {
            return;
        }
        assert!(
            started.elapsed() < BOUND,
            "export threads {prefixes:?} never started; running: {threads:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn without_an_endpoint_nothing_is_exported_and_nothing_runs() {
    let stdout = run_child(
        "child_without_endpoint",
        &[("RUST_LOG", "warn"), ("KEEL_LOG_FORMAT", "json")],
    );
    // The test harness may print its own prefix on the same line.
    let lines: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.find('{').map(|i| &l[i..]))
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "exactly the one warning is logged:\n{stdout}"
    );
    let line: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    assert_eq!(line["level"], "WARN");
    assert_eq!(line["message"], "shown");
    assert!(
        !stdout.contains("hidden"),
        "RUST_LOG=warn hides info:\n{stdout}"
    );
    assert!(!stdout.to_lowercase().contains("opentelemetry"), "{stdout}");
}

#[test]
#[ignore = "run in a child process by without_an_endpoint_nothing_is_exported_and_nothing_runs"]
fn child_without_endpoint() {
    let guard = init(TelemetryConfig::new("orders").environment("prod")).unwrap();
    assert!(!guard.is_exporting());
    assert_eq!(guard.otlp_endpoint(), None);
    let span = tracing::info_span!("work");
    span.in_scope(|| {
        tracing::info!("hidden");
        tracing::warn!("shown");
        // Spans still have ids, so context still propagates.
        assert!(keel_telemetry::propagation::current_trace_context().is_some());
    });
    guard.metrics().record_cache_miss("c");
    assert_eq!(export_threads(), Vec::<String>::new());
    guard.flush().unwrap();
    guard.shutdown().unwrap();
    assert_eq!(export_threads(), Vec::<String>::new());
    println!("child_without_endpoint-passed");
}

#[test]
fn with_an_endpoint_exporters_run_and_shut_down_within_the_timeout() {
    // Port 9 (discard) is closed on the test machines: exports fail fast,
    // and telemetry must neither panic nor hang on the way out.
    run_child(
        "child_with_endpoint",
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")],
    );
}

#[test]
#[ignore = "run in a child process by with_an_endpoint_exporters_run_and_shut_down_within_the_timeout"]
fn child_with_endpoint() {
    // Deliberately outside any Tokio runtime.
    let guard = init(
        TelemetryConfig::new("orders")
            .environment("prod")
            .otlp_timeout(Duration::from_secs(2)),
    )
    .unwrap();
    assert!(guard.is_exporting());
    assert_eq!(guard.otlp_endpoint(), Some("http://127.0.0.1:9"));
    tracing::info_span!("work").in_scope(|| tracing::info!("traced"));
    // Both the exporters' runtime thread and the SDK's processor threads
    // must come up; the SDK spawns the latter asynchronously.
    wait_for_export_threads(&["keel-otlp", "OpenTelemetry"]);
    drop(guard);
    println!("child_with_endpoint-passed");
}

#[test]
fn a_second_init_is_refused() {
    run_child("child_twice", &[]);
}

#[test]
#[ignore = "run in a child process by a_second_init_is_refused"]
fn child_twice() {
    let _guard = init(TelemetryConfig::new("a")).unwrap();
    let second = init(TelemetryConfig::new("b"));
    assert!(matches!(second, Err(TelemetryError::AlreadyInitialized(_))));
    println!("child_twice-passed");
}

#[test]
fn an_invalid_rust_log_is_reported() {
    run_child("child_bad_filter", &[("RUST_LOG", "info,[unclosed")]);
}

#[test]
#[ignore = "run in a child process by an_invalid_rust_log_is_reported"]
fn child_bad_filter() {
    let err = init(TelemetryConfig::new("a")).unwrap_err();
    assert!(
        matches!(err, TelemetryError::InvalidFilter { .. }),
        "{err:?}"
    );
    println!("child_bad_filter-passed");
}
