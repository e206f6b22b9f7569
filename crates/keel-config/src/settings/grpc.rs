use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{Check, Section};
use crate::duration;

/// `grpc`: where and how the service's tonic server listens.
///
/// `keel-grpc` takes a tonic `Server` from the service, so these settings
/// are applied by the composition root:
///
/// ```text
/// Server::builder()
///     .tcp_keepalive(grpc.tcp_keepalive)
///     .concurrency_limit_per_connection(grpc.concurrency_limit_per_connection)
///     .timeout(grpc.request_timeout)           // when Some
///     .add_service(ServiceServer::new(svc)
///         .max_decoding_message_size(grpc.max_decoding_message_bytes)
///         .max_encoding_message_size(grpc.max_encoding_message_bytes))
///     .serve(grpc.address)
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct GrpcSettings {
    /// The address to listen on (default `0.0.0.0:50051`).
    pub address: SocketAddr,
    /// The deadline of a request without one of its own (default 30s; `0`
    /// turns it off).
    #[serde(with = "duration::optional")]
    pub request_timeout: Option<Duration>,
    /// The largest message a service decodes, in bytes (default 4 MiB).
    pub max_decoding_message_bytes: usize,
    /// The largest message a service encodes, in bytes (default 4 MiB).
    pub max_encoding_message_bytes: usize,
    /// Concurrent requests per connection (default 256).
    pub concurrency_limit_per_connection: usize,
    /// TCP keepalive probes on accepted connections (default 60s; `0` off).
    #[serde(with = "duration::optional")]
    pub tcp_keepalive: Option<Duration>,
}

impl Default for GrpcSettings {
    fn default() -> Self {
        Self {
            address: SocketAddr::from(([0, 0, 0, 0], 50051)),
            request_timeout: Some(Duration::from_secs(30)),
            max_decoding_message_bytes: 4 * 1024 * 1024,
            max_encoding_message_bytes: 4 * 1024 * 1024,
            concurrency_limit_per_connection: 256,
            tcp_keepalive: Some(Duration::from_secs(60)),
        }
    }
}

impl Section for GrpcSettings {
    const KEY: &'static str = "grpc";

    fn validate(&self, check: &mut Check<'_>) {
        for (key, n) in [
            (
                "max_decoding_message_bytes",
                self.max_decoding_message_bytes,
            ),
            (
                "max_encoding_message_bytes",
                self.max_encoding_message_bytes,
            ),
            (
                "concurrency_limit_per_connection",
                self.concurrency_limit_per_connection,
            ),
        ] {
            if n == 0 {
                check.fail(key, "must be at least 1");
            }
        }
    }
}
