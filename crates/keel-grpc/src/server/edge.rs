//! The per-call work of the server between the limits and the services:
//! deadline, authentication and authorization, the message-size limit,
//! routing, and cutting calls short on abort.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{HeaderMap, Request, Response};
use keel_core::Error;
use keel_core::command::BoxFuture;
use tokio::sync::watch;
use tonic::body::Body;

use super::auth::Auth;
use super::body::{AbortableBody, LimitedBody, aborted_status};
use super::router::Router;
use crate::status::{render, status_from_error};

pub(crate) struct Shared {
    pub(crate) router: Router,
    pub(crate) auth: Option<Auth>,
    pub(crate) timeout: Option<Duration>,
    pub(crate) max_message_size: usize,
    pub(crate) abort: watch::Receiver<bool>,
}

/// The innermost layer of the server's stack.
#[derive(Clone)]
pub(crate) struct Edge {
    pub(crate) shared: Arc<Shared>,
}

impl tower::Service<Request<Body>> for Edge {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let shared = Arc::clone(&self.shared);
        Box::pin(async move { Ok(shared.handle(request).await) })
    }
}

impl Shared {
    async fn handle(self: Arc<Self>, request: Request<Body>) -> Response<Body> {
        if *self.abort.borrow() {
            return aborted_status().into_http();
        }
        let deadline = match (self.timeout, grpc_timeout(request.headers())) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let path = request.uri().path().to_owned();
        let mut abort_rx = self.abort.clone();
        // A closed channel means the handle is gone: abort as well.
        let abort = async move {
            let _ = abort_rx.wait_for(|aborted| *aborted).await;
        };
        let work = self.dispatch(request, &path);
        let response = match deadline {
            Some(after) => tokio::select! {
                done = tokio::time::timeout(after, work) => done.unwrap_or_else(|_| {
                    tracing::debug!(grpc.method = %path, ?after, "deadline exceeded");
                    render(&Error::Timeout { operation: path.clone().into(), after }).into_http()
                }),
                () = abort => aborted_status().into_http(),
            },
            None => tokio::select! {
                done = work => done,
                () = abort => aborted_status().into_http(),
            },
        };
        response.map(|body| Body::new(AbortableBody::new(body, self.abort.clone())))
    }

    async fn dispatch(&self, mut request: Request<Body>, path: &str) -> Response<Body> {
        if let Some(auth) = &self.auth
            && !auth.is_public(path)
        {
            match auth.check(request.headers(), path).await {
                Ok(principal) => {
                    request.extensions_mut().insert(principal);
                }
                Err(refused) => return refusal(&refused, path),
            }
        }
        let limit = self.max_message_size;
        let request = request.map(|body| Body::new(LimitedBody::new(body, limit)));
        self.router.call(request).await
    }
}

/// The response for a call refused before its service ran.
fn refusal(error: &Error, path: &str) -> Response<Body> {
    match error.kind() {
        keel_core::ErrorKind::Unauthorized | keel_core::ErrorKind::Forbidden => {
            tracing::debug!(grpc.method = %path, error = %error, "call refused");
            render(error).into_http()
        }
        // The key set could not be fetched, or a hook failed: ours to log.
        _ => status_from_error(error).into_http(),
    }
}

/// The caller's deadline from the `grpc-timeout` header (an integer of at
/// most eight digits and a unit: `H`, `M`, `S`, `m`, `u` or `n`). A
/// malformed value is ignored, as if absent.
pub(crate) fn grpc_timeout(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::HealthService;
    use async_trait::async_trait;
    use keel_core::{HealthCheck, HealthReport};
    use keel_telemetry::HealthRegistry;
    use keel_telemetry::health::CheckOptions;

    struct Hangs;

    #[async_trait]
    impl HealthCheck for Hangs {
        fn name(&self) -> &str {
            "postgres"
        }
        async fn check(&self) -> HealthReport {
            std::future::pending().await
        }
    }

    /// The caller's `grpc-timeout` cuts a call short on the server, even
    /// when the server has no deadline of its own (tonic's client enforces
    /// the deadline too, so this is checked here, without a client).
    #[tokio::test]
    async fn the_callers_grpc_timeout_ends_the_call_on_the_server() {
        let registry = HealthRegistry::new();
        registry.register_with(Hangs, CheckOptions::new().timeout(Duration::from_secs(600)));
        let mut router = Router::default();
        router.add(HealthService::new(registry).into_server());
        let (_abort_tx, abort) = watch::channel(false);
        let shared = Arc::new(Shared {
            router,
            auth: None,
            timeout: None,
            max_message_size: 1024,
            abort,
        });
        let request = Request::post("/grpc.health.v1.Health/Check")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .header("grpc-timeout", "50m")
            // An empty HealthCheckRequest: an uncompressed message of 0 bytes.
            .body(Body::new(http_body_util::Full::new(
                bytes::Bytes::from_static(&[0, 0, 0, 0, 0]),
            )))
            .unwrap();
        let response = shared.handle(request).await;
        let status = tonic::Status::from_header_map(response.headers()).expect("a status");
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
        assert_eq!(
            status.metadata().get(crate::ERROR_CODE_KEY).unwrap(),
            "keel.timeout"
        );
    }

    #[test]
    fn grpc_timeouts_parse_and_garbage_is_ignored() {
        let parse = |v: &str| {
            let mut headers = HeaderMap::new();
            headers.insert("grpc-timeout", v.parse().unwrap());
            grpc_timeout(&headers)
        };
        assert_eq!(parse("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse("3S"), Some(Duration::from_secs(3)));
        assert_eq!(parse("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse("99999999n"), Some(Duration::from_nanos(99_999_999)));
        for bad in ["", "m", "123456789m", "10x", "-1S", "1.5S", "S10"] {
            assert_eq!(parse(bad), None, "{bad}");
        }
        assert_eq!(grpc_timeout(&HeaderMap::new()), None);
    }
}
