//! The Shipping service of Keel's examples as its own process; see
//! `keel_examples::service::shipping` and the "Two services" section of
//! `examples/README.md`.
//!
//! `shipping-service` runs it; `shipping-service token <scope>...` prints a token
//! signed with the configured HS256 key.

use keel_examples::service::{self, shipping};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match service::main_with_args(shipping::SERVICE, shipping::DEFAULT_ADDRESS, shipping::run).await
    {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{}: {e}", shipping::SERVICE);
            std::process::ExitCode::FAILURE
        }
    }
}
