//! `cargo run -p keel-examples`: the tour of Keel, on in-memory adapters by
//! default and on real services when configured. `--help` says how.

// The binary prints its help, the example list and the section headers on
// stdout; everything else goes through `tracing`.
#![allow(clippy::print_stdout, reason = "help and headers are meant for stdout")]

use std::io::IsTerminal as _;
use std::process::ExitCode;
use std::time::Instant;

use keel_examples::services::ENVIRONMENT;
use keel_examples::{EXAMPLES, Example, Services};
use tracing::Instrument as _;

#[tokio::main]
async fn main() -> ExitCode {
    // `KEEL_EXAMPLE=name` or a first argument selects; an argument wins.
    let wanted = std::env::args()
        .nth(1)
        .or_else(|| std::env::var("KEEL_EXAMPLE").ok())
        .unwrap_or_default();
    let selected: Vec<&Example> = match wanted.trim() {
        "" | "all" => EXAMPLES.iter().collect(),
        "list" | "help" | "--help" | "-h" => {
            print_help();
            return ExitCode::SUCCESS;
        }
        name => match keel_examples::find(name) {
            Some(example) => vec![example],
            None => {
                let names: Vec<&str> = EXAMPLES.iter().map(|e| e.name).collect();
                eprintln!(
                    "no example named {name:?}; choose one of: {}, all, list",
                    names.join(", ")
                );
                return ExitCode::from(2);
            }
        },
    };

    // One configuration for the binary (keel-config): Keel's defaults and
    // these, then config/base.toml and config/<KEEL_ENV>.toml when present,
    // then the variables (KEEL_LOG_FORMAT=json, OTEL_EXPORTER_OTLP_ENDPOINT,
    // KEEL_TELEMETRY__LOG_FILTER, ...). With none of them it runs as is.
    let config = match keel_config::ConfigLoader::new()
        .set_default("service.name", "keel-examples")
        .set_default("service.version", env!("CARGO_PKG_VERSION"))
        // The OpenTelemetry SDK announces itself at info, and PostgreSQL
        // reports "already exists, skipping" as a notice: keep both quiet.
        .set_default(
            "telemetry.log_filter",
            "info,opentelemetry=warn,opentelemetry_sdk=warn,sqlx::postgres::notice=warn",
        )
        .load()
        .await
    {
        Ok(config) => config,
        Err(errors) => {
            eprintln!("{errors}");
            return ExitCode::FAILURE;
        }
    };
    // Readable text logs in development; no OTLP export unless an endpoint
    // is configured. Dropping the guard at the end of main flushes whatever
    // was buffered.
    let mut telemetry_config = config.telemetry_config();
    if keel_examples::progress::is_live() && std::io::stdout().is_terminal() {
        // Log lines and the live progress line share the terminal: route
        // the logs past the line instead of through it.
        telemetry_config = telemetry_config.log_writer(|| keel_examples::progress::LogWriter);
    }
    let telemetry = match keel_telemetry::init(telemetry_config) {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("cannot start telemetry: {e}");
            return ExitCode::FAILURE;
        }
    };

    let services = match Services::from_env().await {
        Ok(services) => services,
        Err(e) => {
            eprintln!("cannot reach the configured services: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("keel-examples, run {}", services.run());
    for line in services.describe() {
        println!("  {line}");
    }

    let mut failed = Vec::new();
    for example in selected {
        println!("\n=== {}: {}", example.name, example.about);
        let started = Instant::now();
        // Every log line of the example carries its name.
        let span = tracing::info_span!("example", example = example.name);
        match (example.run)(&services).instrument(span).await {
            Ok(()) => println!("--- {} ok in {:.2?}", example.name, started.elapsed()),
            Err(e) => {
                println!("--- {} FAILED: {e}", example.name);
                failed.push(example.name);
            }
        }
    }
    drop(telemetry);
    if failed.is_empty() {
        println!("\nall examples passed their checks");
        ExitCode::SUCCESS
    } else {
        eprintln!("\nfailed: {}", failed.join(", "));
        ExitCode::FAILURE
    }
}

fn print_help() {
    println!("A tour of Keel. Usage:");
    println!("  cargo run -p keel-examples [-- <example>|all|list]");
    println!("\nExamples (run in this order):");
    for example in EXAMPLES {
        println!("  {:<13} {}", example.name, example.about);
    }
    println!("\nEverything runs in memory unless these are set:");
    for (var, effect) in ENVIRONMENT {
        println!("  {var:<28} {effect}");
    }
}
