//! The SDK's reqwest client with a time limit on every request, so a server
//! that accepts connections but never answers cannot hang a caller.

use std::time::Duration;

use async_trait::async_trait;
use meilisearch_sdk::errors::Error;
use meilisearch_sdk::request::{HttpClient, Method};
use meilisearch_sdk::reqwest::ReqwestClient;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// [`ReqwestClient`] (rustls) with a per-request timeout; a request that
/// runs out of time fails with [`RequestTimedOut`] (inside the SDK's
/// `Error::Other`), which the engine reports as `SearchError::Timeout`.
#[derive(Clone, Debug)]
pub struct TimedClient {
    inner: ReqwestClient,
    timeout: Duration,
}

/// A request to Meilisearch ran out of time.
#[derive(Debug, thiserror::Error)]
#[error("no answer from Meilisearch within {0:?}")]
pub struct RequestTimedOut(pub Duration);

impl TimedClient {
    pub(super) fn new(inner: ReqwestClient, timeout: Duration) -> Self {
        Self { inner, timeout }
    }
}

#[async_trait]
impl HttpClient for TimedClient {
    async fn request<Query, Body, Output>(
        &self,
        url: &str,
        method: Method<Query, Body>,
        expected_status_code: u16,
    ) -> Result<Output, Error>
    where
        Query: Serialize + Send + Sync,
        Body: Serialize + Send + Sync,
        Output: DeserializeOwned + 'static + Send,
    {
        tokio::time::timeout(
            self.timeout,
            self.inner.request(url, method, expected_status_code),
        )
        .await
        .unwrap_or_else(|_| Err(Error::Other(Box::new(RequestTimedOut(self.timeout)))))
    }

    async fn stream_request<
        Query: Serialize + Send + Sync,
        Body: futures::io::AsyncRead + Send + Sync + 'static,
        Output: DeserializeOwned + 'static,
    >(
        &self,
        url: &str,
        method: Method<Query, Body>,
        content_type: &str,
        expected_status_code: u16,
    ) -> Result<Output, Error> {
        tokio::time::timeout(
            self.timeout,
            self.inner
                .stream_request(url, method, content_type, expected_status_code),
        )
        .await
        .unwrap_or_else(|_| Err(Error::Other(Box::new(RequestTimedOut(self.timeout)))))
    }

    fn is_tokio(&self) -> bool {
        true
    }
}
