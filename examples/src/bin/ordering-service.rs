//! The Ordering service of Keel's examples as its own process; see
//! `keel_examples::service::ordering` and the "Two services" section of
//! `examples/README.md`.
//!
//! `ordering-service` runs it; `ordering-service token <scope>...` prints a token
//! signed with the configured HS256 key.

use keel_examples::service::{self, ordering};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match service::main_with_args(ordering::SERVICE, ordering::DEFAULT_ADDRESS, ordering::run).await
    {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{}: {e}", ordering::SERVICE);
            std::process::ExitCode::FAILURE
        }
    }
}
