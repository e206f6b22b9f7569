//! Drops the template databases (`keel_tpl_*`) the test kit left on the
//! PostgreSQL server tests use, and the per-test databases (`keel_test_*`)
//! of crashed tests that nobody is connected to.
//!
//! ```text
//! cargo run -p keel-testkit --bin keel-testkit-clean
//! DATABASE_URL=postgres://me@db.local/postgres cargo run -p keel-testkit --bin keel-testkit-clean
//! ```

// A command-line tool: printing what it dropped is its output.
#![allow(clippy::print_stdout)]

use std::process::ExitCode;

fn main() -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("keel-testkit-clean: cannot start a runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(keel_testkit::TestDatabase::drop_templates()) {
        Ok(dropped) if dropped.is_empty() => {
            println!("keel-testkit-clean: nothing to drop");
            ExitCode::SUCCESS
        }
        Ok(dropped) => {
            for name in &dropped {
                println!("dropped {name}");
            }
            println!("keel-testkit-clean: dropped {} database(s)", dropped.len());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("keel-testkit-clean: {e}");
            ExitCode::FAILURE
        }
    }
}
