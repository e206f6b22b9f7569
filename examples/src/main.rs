//! Runnable examples of Keel.
//!
//! `cargo run -p keel-examples` runs every example in turn;
//! `KEEL_EXAMPLE=<name> cargo run -p keel-examples` runs one, and
//! `KEEL_EXAMPLE=list` lists them. Examples use in-memory adapters unless
//! configured otherwise through environment variables, so they need no
//! running service.
//!
//! To add an example: write a module under `src/examples/` with an
//! `async fn run() -> Result` and add it to [`EXAMPLES`].

// The examples exist to show what happens, on the terminal.
#![allow(clippy::print_stdout, reason = "examples narrate on stdout")]

mod examples;

use std::future::Future;
use std::pin::Pin;
use std::process::ExitCode;

/// What an example returns.
type Result<T = (), E = Box<dyn std::error::Error + Send + Sync>> = std::result::Result<T, E>;

/// A registered example.
struct Example {
    name: &'static str,
    about: &'static str,
    run: fn() -> Pin<Box<dyn Future<Output = Result>>>,
}

/// Every example, in the order `cargo run -p keel-examples` runs them.
const EXAMPLES: &[Example] = &[Example {
    name: "aggregate",
    about: "an event-sourced aggregate driven through AggregateRoot (keel-core only)",
    run: || Box::pin(examples::aggregate::run()),
}];

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let wanted = std::env::var("KEEL_EXAMPLE").unwrap_or_default();
    let selected: Vec<&Example> = match wanted.trim() {
        "" | "all" => EXAMPLES.iter().collect(),
        "list" => {
            for example in EXAMPLES {
                println!("{:<12} {}", example.name, example.about);
            }
            return ExitCode::SUCCESS;
        }
        name => match EXAMPLES.iter().find(|e| e.name == name) {
            Some(example) => vec![example],
            None => {
                let names: Vec<&str> = EXAMPLES.iter().map(|e| e.name).collect();
                eprintln!(
                    "no example named {name:?}; KEEL_EXAMPLE takes one of: {}, all, list",
                    names.join(", ")
                );
                return ExitCode::from(2);
            }
        },
    };
    for example in selected {
        println!("=== {}: {}", example.name, example.about);
        if let Err(e) = (example.run)().await {
            eprintln!("example {} failed: {e}", example.name);
            return ExitCode::FAILURE;
        }
        println!();
    }
    ExitCode::SUCCESS
}
