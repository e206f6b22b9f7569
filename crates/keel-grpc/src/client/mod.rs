//! The client side: shared channels, caller context on every call, and
//! retries for the calls that allow them.
//!
//! * [`ChannelFactory`] hands out one shared [`Channel`](tonic::transport::Channel)
//!   per [`Target`] (one endpoint or several balanced), configured by
//!   [`ChannelConfig`]: connect timeout, default call deadline, HTTP/2 and
//!   TCP keepalive. Every client of a target reuses it, so calls share one
//!   HTTP/2 connection per endpoint, and it reconnects by itself.
//! * [`CallContextLayer`] puts the caller's W3C trace context, a bearer
//!   token from a [`TokenSource`] ([`SecretToken`] over keel-security's
//!   [`SecretProvider`](keel_security::SecretProvider),
//!   [`RefreshingToken`] over a [`TokenIssuer`], or [`StaticToken`]) and
//!   the default deadline on every call.
//! * [`Retrier`] / [`GrpcClient::call`] retry a call only when the caller
//!   marks it [`Idempotency::Idempotent`], only on retryable codes
//!   (`UNAVAILABLE` by default), with jittered exponential backoff, the
//!   server's pushback and a retry budget.
//!
//! The guide is the "Client" section of `docs/grpc.md`.

mod config;
mod error;
mod factory;
mod layer;
mod retry;
mod token;

pub use config::{
    ChannelConfig, DEFAULT_CONNECT_TIMEOUT, DEFAULT_KEEPALIVE_INTERVAL, DEFAULT_KEEPALIVE_TIMEOUT,
    DEFAULT_REQUEST_TIMEOUT, Target,
};
pub use error::ClientError;
pub use factory::{ChannelFactory, GrpcClient, KeelChannel};
pub use layer::{CallContext, CallContextLayer, GRPC_TIMEOUT_HEADER};
pub use retry::{Idempotency, RETRY_PUSHBACK_KEY, Retrier, RetryPolicy};
pub use token::{
    DEFAULT_REFRESH_MARGIN, IssuedToken, RefreshingToken, SecretToken, StaticToken, TokenIssuer,
    TokenSource,
};
