//! One module per example; each exposes `async fn run(&Services) -> Result`
//! (the first needs no services).

use std::future::Future;
use std::time::Duration;

use crate::Result;

pub mod aggregate;
pub mod cache;
pub mod event_store;
pub mod outbox;
pub mod publishing;
pub mod repository;
pub mod subscription;

/// How long an example waits for something asynchronous (a subscription
/// catching up, a message arriving) before it calls the run failed. Generous,
/// because the Pub/Sub emulator can be slow to deliver on a busy machine.
pub(crate) const PATIENCE: Duration = Duration::from_secs(60);

/// Awaits `future`, failing with `what` after [`PATIENCE`].
pub(crate) async fn within<T>(what: &str, future: impl Future<Output = T>) -> Result<T> {
    tokio::time::timeout(PATIENCE, future)
        .await
        .map_err(|_| format!("timed out after {PATIENCE:?} waiting for {what}").into())
}

/// Polls `done` every 20 ms until it holds, failing with `what` after
/// [`PATIENCE`].
pub(crate) async fn wait_until(what: &str, mut done: impl FnMut() -> bool) -> Result {
    within(what, async {
        while !done() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}
