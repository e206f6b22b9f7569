//! Bearer authentication at the transport edge, for HTTP (axum) and gRPC
//! (tonic) servers.

use std::fmt;
use std::task::{Context, Poll};

use http::header::{AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use http::{HeaderValue, Request, Response, StatusCode};
use keel_core::command::BoxFuture;
use keel_core::{Error, ErrorKind};
use tower::{Layer, Service};

use crate::authn::JwtVerifier;
use crate::error::SecurityError;

/// How [`BearerAuth`] answers a request it refuses, for a response body
/// type `B`. [`ProblemJson`] suits HTTP APIs, [`GrpcStatus`] gRPC services.
pub trait Rejection<B>: Clone + Send + Sync + 'static {
    /// The response for a request refused with `error` (an
    /// [`Error::Unauthorized`], or an [`Error::Unavailable`] when the key
    /// set could not be fetched).
    fn reject(&self, error: &Error) -> Response<B>;
}

/// Refuses with an RFC 9457 `application/problem+json` body (the shape
/// `keel-http` uses for every error) and a `WWW-Authenticate: Bearer`
/// challenge: 401 for a missing or refused token, 503 when the key set
/// could not be fetched. Works with any body that can be built from a
/// `String`, such as `axum::body::Body`.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProblemJson;

/// Refuses the way gRPC expects: HTTP 200 with no body and the status in
/// the headers (`grpc-status: 16`, UNAUTHENTICATED; `14`, UNAVAILABLE, when
/// the key set could not be fetched), as tonic does for a status returned
/// before the handler runs. Works with any body that has a `Default`, such
/// as `tonic::body::Body`.
#[derive(Clone, Copy, Debug, Default)]
pub struct GrpcStatus;

impl<B: From<String>> Rejection<B> for ProblemJson {
    fn reject(&self, error: &Error) -> Response<B> {
        let (status, title, detail) = match error {
            Error::Unauthorized { reason } => {
                (StatusCode::UNAUTHORIZED, "Unauthorized", reason.as_str())
            }
            // Whatever failed on our side stays in our logs.
            _ => (
                StatusCode::SERVICE_UNAVAILABLE,
                "Service Unavailable",
                "the service cannot verify credentials right now",
            ),
        };
        let code = error.code();
        let body = serde_json::json!({
            "type": format!("urn:keel:problem:{code}"),
            "title": title,
            "status": status.as_u16(),
            "detail": detail,
            "code": code,
            "retryable": error.is_retryable(),
        });
        let mut response = Response::new(B::from(body.to_string()));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if status == StatusCode::UNAUTHORIZED {
            headers.insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl<B: Default> Rejection<B> for GrpcStatus {
    fn reject(&self, error: &Error) -> Response<B> {
        let (code, message) = match error {
            Error::Unauthorized { reason } => ("16", reason.as_str()),
            _ => ("14", "the service cannot verify credentials right now"),
        };
        let mut response = Response::new(B::default());
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        headers.insert("grpc-status", HeaderValue::from_static(code));
        if let Ok(value) = HeaderValue::from_str(&percent_encode(message)) {
            headers.insert("grpc-message", value);
        }
        response
    }
}

/// gRPC's `grpc-message` encoding: printable ASCII except `%` as is,
/// everything else as `%XX` of its UTF-8 bytes.
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if (0x20..=0x7e).contains(&byte) && byte != b'%' {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// A [`Layer`] for HTTP and gRPC servers that requires a valid bearer token
/// on every request.
///
/// It reads the `Authorization` header, verifies the token with the
/// [`JwtVerifier`] and puts the resulting
/// [`Principal`](keel_core::Principal) into the request's extensions
/// (axum: `Extension<Principal>`; tonic: `request.extensions()`). A request
/// without a valid token never reaches the inner service: it is answered by
/// the [`Rejection`] (problem+json by default, [`grpc`](Self::grpc) for
/// tonic).
///
/// A handler that then dispatches a command passes the principal on with
/// [`CommandEnvelope::with_principal`](keel_core::command::CommandEnvelope::with_principal)
/// into a pipeline whose
/// [`AuthenticationLayer`](super::AuthenticationLayer) trusts preset
/// principals, so the token is verified once.
///
/// ```no_run
/// use axum::{Extension, Router, routing::get};
/// use keel_security::pipeline::BearerAuthLayer;
/// use keel_security::{JwtVerifier, Principal};
///
/// async fn me(Extension(principal): Extension<Principal>) -> String {
///     principal.subject
/// }
///
/// fn routes(verifier: JwtVerifier) -> Router {
///     Router::new().route("/me", get(me)).layer(BearerAuthLayer::new(verifier))
/// }
/// ```
#[derive(Clone)]
pub struct BearerAuthLayer<R = ProblemJson> {
    verifier: JwtVerifier,
    rejection: R,
}

impl<R: fmt::Debug> fmt::Debug for BearerAuthLayer<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BearerAuthLayer")
            .field("verifier", &self.verifier)
            .field("rejection", &self.rejection)
            .finish()
    }
}

impl BearerAuthLayer<ProblemJson> {
    /// A layer answering refused requests with problem+json.
    #[must_use]
    pub fn new(verifier: JwtVerifier) -> Self {
        Self {
            verifier,
            rejection: ProblemJson,
        }
    }
}

impl BearerAuthLayer<GrpcStatus> {
    /// A layer answering refused requests with a gRPC status.
    #[must_use]
    pub fn grpc(verifier: JwtVerifier) -> Self {
        Self {
            verifier,
            rejection: GrpcStatus,
        }
    }
}

impl<R> BearerAuthLayer<R> {
    /// A layer answering refused requests with `rejection`.
    #[must_use]
    pub fn with_rejection<R2>(self, rejection: R2) -> BearerAuthLayer<R2> {
        BearerAuthLayer {
            verifier: self.verifier,
            rejection,
        }
    }
}

impl<S, R: Clone> Layer<S> for BearerAuthLayer<R> {
    type Service = BearerAuth<S, R>;

    fn layer(&self, inner: S) -> Self::Service {
        BearerAuth {
            inner,
            verifier: self.verifier.clone(),
            rejection: self.rejection.clone(),
        }
    }
}

/// The [`Service`] made by [`BearerAuthLayer`].
#[derive(Clone, Debug)]
pub struct BearerAuth<S, R> {
    inner: S,
    verifier: JwtVerifier,
    rejection: R,
}

impl<S, R, ReqB, ResB> Service<Request<ReqB>> for BearerAuth<S, R>
where
    S: Service<Request<ReqB>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: Rejection<ResB>,
    ReqB: Send + 'static,
    ResB: Send + 'static,
{
    type Response = Response<ResB>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Response<ResB>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<ReqB>) -> Self::Future {
        let mut inner = keel_core::command::take_ready(&mut self.inner);
        let verifier = self.verifier.clone();
        let rejection = self.rejection.clone();
        Box::pin(async move {
            let verified = match request.headers().get(AUTHORIZATION) {
                None => Err(SecurityError::MissingToken),
                Some(value) => match value.to_str() {
                    Ok(value) => verifier.verify_bearer(value).await,
                    Err(_) => Err(SecurityError::MissingToken),
                },
            };
            match verified {
                Ok(principal) => {
                    request.extensions_mut().insert(principal);
                    inner.call(request).await
                }
                Err(refused) => {
                    let error = Error::from(refused);
                    match error.kind() {
                        ErrorKind::Unauthorized => {
                            tracing::debug!(error = %error, "request refused: bearer token");
                        }
                        _ => {
                            tracing::warn!(error = %error, "bearer token could not be verified");
                        }
                    }
                    Ok(rejection.reject(&error))
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_messages_are_percent_encoded() {
        assert_eq!(percent_encode("no bearer token"), "no bearer token");
        assert_eq!(percent_encode("50% é\n"), "50%25 %C3%A9%0A");
    }

    #[test]
    fn problem_and_grpc_rejections() {
        let refused = Error::Unauthorized {
            reason: "token expired".into(),
        };
        let problem: Response<String> = ProblemJson.reject(&refused);
        assert_eq!(problem.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(problem.headers()[WWW_AUTHENTICATE], "Bearer");
        let body: serde_json::Value = serde_json::from_str(problem.body()).unwrap();
        assert_eq!(body["code"], "keel.unauthorized");
        assert_eq!(body["detail"], "token expired");
        assert_eq!(body["type"], "urn:keel:problem:keel.unauthorized");

        let grpc: Response<String> = GrpcStatus.reject(&refused);
        assert_eq!(grpc.status(), StatusCode::OK);
        assert_eq!(grpc.headers()["grpc-status"], "16");
        assert_eq!(grpc.headers()["grpc-message"], "token expired");
        assert!(grpc.body().is_empty());

        let down = Error::from(SecurityError::key_fetch(
            "https://idp.example/jwks",
            "HTTP status 503",
            None,
        ));
        let problem: Response<String> = ProblemJson.reject(&down);
        assert_eq!(problem.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(!problem.body().contains("idp.example"));
        let grpc: Response<String> = GrpcStatus.reject(&down);
        assert_eq!(grpc.headers()["grpc-status"], "14");
    }
}
