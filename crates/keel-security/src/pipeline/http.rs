//! Bearer authentication at the transport edge, for HTTP (axum) and gRPC
//! (tonic) servers.

use std::fmt;
use std::task::{Context, Poll};

use http::header::AUTHORIZATION;
use http::{Request, Response};
use keel_core::command::BoxFuture;
use keel_core::{Error, ErrorKind};
use tower::{Layer, Service};

use crate::authn::JwtVerifier;
use crate::error::SecurityError;

/// How [`BearerAuth`] answers a request it refuses, for a response body
/// type `B`.
///
/// keel-security stays transport-agnostic: the transports render the
/// refusal. `keel_http::problem_response` answers with problem+json (401
/// or 503), `keel_grpc::status_response` with a gRPC status
/// (`UNAUTHENTICATED` or `UNAVAILABLE`). Any
/// `Fn(&Error) -> Response<B> + Clone + Send + Sync + 'static` is a
/// rejection, so a plain function does.
pub trait Rejection<B>: Clone + Send + Sync + 'static {
    /// The response for a request refused with `error` (an
    /// [`Error::Unauthorized`], or an [`Error::Unavailable`] when the key
    /// set could not be fetched).
    fn reject(&self, error: &Error) -> Response<B>;
}

impl<B, F> Rejection<B> for F
where
    F: Fn(&Error) -> Response<B> + Clone + Send + Sync + 'static,
{
    fn reject(&self, error: &Error) -> Response<B> {
        self(error)
    }
}

/// A [`Layer`] for HTTP and gRPC servers that requires a valid bearer token
/// on every request.
///
/// It reads the `Authorization` header, verifies the token with the
/// [`JwtVerifier`] and puts the resulting
/// [`Principal`](keel_core::Principal) into the request's extensions
/// (axum: `Extension<Principal>`; tonic: `request.extensions()`). A request
/// without a valid token never reaches the inner service: it is answered by
/// the [`Rejection`] the transport supplies (`keel_http::problem_response`
/// for axum, `keel_grpc::status_response` for tonic; `keel_grpc`'s server
/// builder has its own authentication with per-method exemptions and
/// authorization).
///
/// A handler that then dispatches a command passes the principal on with
/// [`CommandEnvelope::with_principal`](keel_core::command::CommandEnvelope::with_principal)
/// into a pipeline whose
/// [`AuthenticationLayer`](super::AuthenticationLayer) trusts preset
/// principals, so the token is verified once.
///
/// ```no_run
/// use axum::response::IntoResponse;
/// use axum::{Extension, Router, routing::get};
/// use keel_security::pipeline::BearerAuthLayer;
/// use keel_security::{JwtVerifier, Principal};
///
/// async fn me(Extension(principal): Extension<Principal>) -> String {
///     principal.subject
/// }
///
/// // keel_http::problem_response does this with a problem+json body.
/// fn refuse(error: &keel_core::Error) -> axum::response::Response {
///     (http::StatusCode::UNAUTHORIZED, error.describe().detail.into_owned()).into_response()
/// }
///
/// fn routes(verifier: JwtVerifier) -> Router {
///     Router::new().route("/me", get(me)).layer(BearerAuthLayer::new(verifier, refuse))
/// }
/// ```
#[derive(Clone)]
pub struct BearerAuthLayer<R> {
    verifier: JwtVerifier,
    rejection: R,
}

impl<R> fmt::Debug for BearerAuthLayer<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BearerAuthLayer")
            .field("verifier", &self.verifier)
            .finish_non_exhaustive()
    }
}

impl<R> BearerAuthLayer<R> {
    /// A layer verifying tokens with `verifier` and answering refused
    /// requests with `rejection`.
    #[must_use]
    pub fn new(verifier: JwtVerifier, rejection: R) -> Self {
        Self {
            verifier,
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
#[derive(Clone)]
pub struct BearerAuth<S, R> {
    inner: S,
    verifier: JwtVerifier,
    rejection: R,
}

impl<S: fmt::Debug, R> fmt::Debug for BearerAuth<S, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BearerAuth")
            .field("inner", &self.inner)
            .field("verifier", &self.verifier)
            .finish_non_exhaustive()
    }
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
    fn a_function_is_a_rejection() {
        fn refuse(error: &Error) -> Response<String> {
            Response::new(error.code().to_owned())
        }
        let refused = Error::Unauthorized {
            reason: "token expired".into(),
        };
        assert_eq!(refuse.reject(&refused).body(), "keel.unauthorized");
    }
}
