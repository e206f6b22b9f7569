//! One module per example; each exposes `async fn run() -> Result`.

pub(crate) mod aggregate;
