//! The tower layer every call of a factory's channels goes through:
//! trace context, bearer token, default deadline.

use std::error::Error as StdError;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::HeaderValue;
use http::header::AUTHORIZATION;
use tokio::time::Instant;
use tonic::Status;

use super::token::TokenSource;

/// The header carrying a call's deadline to the server.
pub const GRPC_TIMEOUT_HEADER: &str = "grpc-timeout";

type BoxError = Box<dyn StdError + Send + Sync>;

const GRPC_STATUS: &str = "grpc-status";
const GRPC_MESSAGE: &str = "grpc-message";
const CANCELLED: HeaderValue = HeaderValue::from_static("1");
const DEADLINE_EXCEEDED: HeaderValue = HeaderValue::from_static("4");
// Percent-encoding is not needed: plain ASCII without '%'.
const DEADLINE_MESSAGE: HeaderValue = HeaderValue::from_static("the call's deadline passed");

/// Puts the caller's context on every outgoing call:
///
/// * `traceparent` / `tracestate` of the current span (W3C trace context,
///   through keel-telemetry's propagation), so the server's span continues
///   the caller's trace;
/// * `authorization: Bearer <token>` from a [`TokenSource`], marked
///   sensitive so HTTP/2 never indexes it;
/// * a `grpc-timeout` for calls that set no deadline, when a default is
///   configured.
///
/// Headers the request already carries are kept. Failures get the codes
/// gRPC defines for them, which tonic alone does not always give:
///
/// * a call whose deadline passes ends with `DEADLINE_EXCEEDED`, whether
///   the client's timer ended it or the server answered `CANCELLED` after
///   the deadline (tonic reports both as `CANCELLED`);
/// * a call that failed in the transport (no connection, the connection
///   closed under it) ends with `UNAVAILABLE`, the code retries look for;
/// * a token source that fails ends the call before it is sent:
///   `UNAVAILABLE` for a retryable failure, `UNAUTHENTICATED` otherwise.
///
/// [`ChannelFactory`](super::ChannelFactory) applies it to every channel;
/// it also wraps any other tonic channel:
///
/// ```
/// # async fn f(channel: tonic::transport::Channel) {
/// use std::sync::Arc;
/// use keel_grpc::client::{CallContextLayer, StaticToken};
/// use keel_grpc::health_proto::health_client::HealthClient;
/// use tower::Layer as _;
///
/// let layer = CallContextLayer::new().with_token_source(Arc::new(StaticToken::new("t0k3n")));
/// let client = HealthClient::new(layer.layer(channel));
/// # let _ = client; }
/// ```
#[derive(Clone, Debug, Default)]
pub struct CallContextLayer {
    token: Option<Arc<dyn TokenSource>>,
    default_timeout: Option<Duration>,
}

impl CallContextLayer {
    /// Trace context only: no token, no default deadline.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a bearer token from `source` to every call.
    #[must_use]
    pub fn with_token_source(mut self, source: Arc<dyn TokenSource>) -> Self {
        self.token = Some(source);
        self
    }

    /// Gives calls without a deadline this one.
    #[must_use]
    pub fn with_default_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.default_timeout = timeout;
        self
    }
}

impl<S> tower::Layer<S> for CallContextLayer {
    type Service = CallContext<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CallContext {
            inner,
            token: self.token.clone(),
            default_timeout: self.default_timeout,
        }
    }
}

/// The service [`CallContextLayer`] wraps around a channel; generated
/// tonic clients take it where they take a `Channel`.
#[derive(Clone, Debug)]
pub struct CallContext<S> {
    inner: S,
    token: Option<Arc<dyn TokenSource>>,
    default_timeout: Option<Duration>,
}

impl<S, B, RB> tower::Service<http::Request<B>> for CallContext<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        // The clone takes the place of the service that was polled ready,
        // which makes the call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);

        // Read now, in the caller's span, not later in the future.
        add_trace_context(request.headers_mut());
        if let Some(timeout) = self.default_timeout
            && !request.headers().contains_key(GRPC_TIMEOUT_HEADER)
        {
            request
                .headers_mut()
                .insert(GRPC_TIMEOUT_HEADER, encode_timeout(timeout));
        }
        let deadline = request
            .headers()
            .get(GRPC_TIMEOUT_HEADER)
            .and_then(decode_timeout)
            .map(|timeout| Instant::now() + timeout);
        let token = self.token.clone();
        Box::pin(async move {
            if let Some(source) = token
                && !request.headers().contains_key(AUTHORIZATION)
            {
                let value = bearer(source.as_ref()).await?;
                request.headers_mut().insert(AUTHORIZATION, value);
            }
            let passed = || deadline.is_some_and(|d| Instant::now() >= d);
            match inner.call(request).await {
                Ok(mut response) => {
                    // A trailers-only answer: the status is in the headers.
                    if passed() && response.headers().get(GRPC_STATUS) == Some(&CANCELLED) {
                        let headers = response.headers_mut();
                        headers.insert(GRPC_STATUS, DEADLINE_EXCEEDED);
                        headers.insert(GRPC_MESSAGE, DEADLINE_MESSAGE);
                    }
                    Ok(response)
                }
                Err(err) => {
                    let err: BoxError = err.into();
                    let status = if timed_out(err.as_ref()) || passed() {
                        Status::deadline_exceeded("the call's deadline passed")
                    } else {
                        match err.downcast::<Status>() {
                            Ok(status) => return Err(status as BoxError),
                            Err(err) => Status::unavailable(format!("transport failure: {err}")),
                        }
                    };
                    Err(Box::new(status) as BoxError)
                }
            }
        })
    }
}

fn add_trace_context(headers: &mut http::HeaderMap) {
    if headers.contains_key("traceparent") {
        return;
    }
    if let Some(tc) = keel_telemetry::propagation::current_trace_context() {
        if let Ok(v) = HeaderValue::try_from(tc.traceparent()) {
            headers.insert("traceparent", v);
        }
        if let Some(Ok(v)) = tc.tracestate().map(HeaderValue::try_from) {
            headers.insert("tracestate", v);
        }
    }
}

async fn bearer(source: &dyn TokenSource) -> Result<HeaderValue, BoxError> {
    let token = source.token().await.map_err(|err| -> BoxError {
        let message = format!("no bearer token for the call: {err}");
        Box::new(if err.is_retryable() {
            Status::unavailable(message)
        } else {
            Status::unauthenticated(message)
        })
    })?;
    let mut value = HeaderValue::try_from(format!("Bearer {}", token.expose_secret())).map_err(
        |_| -> BoxError {
            Box::new(Status::unauthenticated(
                "the bearer token holds characters a header cannot carry",
            ))
        },
    )?;
    value.set_sensitive(true);
    Ok(value)
}

/// Whether tonic's client-side deadline ended the call.
fn timed_out(err: &(dyn StdError + 'static)) -> bool {
    let mut current = Some(err);
    while let Some(e) = current {
        if e.is::<tonic::TimeoutExpired>() {
            return true;
        }
        current = e.source();
    }
    false
}

/// `grpc-timeout` as gRPC writes it: at most eight digits and a unit.
pub(crate) fn encode_timeout(timeout: Duration) -> HeaderValue {
    const MAX: u128 = 99_999_999;
    let millis = timeout.as_millis().max(1);
    let text = if millis <= MAX {
        format!("{millis}m")
    } else if timeout.as_secs() as u128 <= MAX {
        format!("{}S", timeout.as_secs())
    } else {
        format!("{}H", (timeout.as_secs() / 3600).min(MAX as u64))
    };
    // Digits and a letter are always a valid header value.
    HeaderValue::try_from(text).unwrap_or_else(|_| HeaderValue::from_static("99999999H"))
}

/// Reads a `grpc-timeout` value (at most eight digits and a unit).
fn decode_timeout(value: &HeaderValue) -> Option<Duration> {
    let text = value.to_str().ok()?;
    let (digits, unit) = text.split_at(text.len().checked_sub(1)?);
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

    #[test]
    fn reads_grpc_timeouts_and_refuses_garbage() {
        let read = |s: &'static str| decode_timeout(&HeaderValue::from_static(s));
        assert_eq!(read("250m"), Some(Duration::from_millis(250)));
        assert_eq!(read("3S"), Some(Duration::from_secs(3)));
        assert_eq!(read("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(read("10u"), Some(Duration::from_micros(10)));
        for bad in ["", "m", "123456789m", "12x", "-1m", "1.5S"] {
            assert_eq!(read(bad), None, "{bad}");
        }
        for d in [Duration::from_millis(1), Duration::from_secs(200_000)] {
            assert_eq!(decode_timeout(&encode_timeout(d)), Some(d));
        }
    }

    #[test]
    fn timeouts_fit_the_grpc_format() {
        assert_eq!(encode_timeout(Duration::from_millis(250)), "250m");
        assert_eq!(encode_timeout(Duration::from_micros(10)), "1m");
        assert_eq!(encode_timeout(Duration::from_secs(200_000)), "200000S");
        assert_eq!(encode_timeout(Duration::from_secs(u64::MAX)), "99999999H");
    }
}
