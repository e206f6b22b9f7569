//! A test service with hand-written prost messages (no codegen), a client
//! for it, tokens, and a server helper, shared by the server tests.
#![allow(
    dead_code,
    unreachable_pub,
    missing_docs,
    reason = "shared by several test binaries and a bench, each using a part"
)]

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use jsonwebtoken::{EncodingKey, Header};
use keel_core::{Error, ExpectedVersion, Principal, Version, VersionConflict};
use keel_grpc::StatusExt as _;
use keel_security::{Algorithm, JwtConfig, JwtVerifier, KeySource, Secret, VerificationKey};
use serde_json::json;
use tonic::body::Body;
use tonic::server::NamedService;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};
use tonic_prost::ProstCodec;

#[derive(Clone, PartialEq, prost::Message)]
pub struct EchoRequest {
    #[prost(string, tag = "1")]
    pub text: String,
    /// How long the handler sleeps before answering.
    #[prost(uint64, tag = "2")]
    pub sleep_ms: u64,
    /// An error the handler returns instead: `not_found`, `conflict`,
    /// `internal`, `rejected`.
    #[prost(string, tag = "3")]
    pub fail: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct EchoReply {
    #[prost(string, tag = "1")]
    pub text: String,
    /// The principal's subject, empty when the call was not authenticated.
    #[prost(string, tag = "2")]
    pub subject: String,
    /// The trace the handler ran in, empty when untraced.
    #[prost(string, tag = "3")]
    pub trace_id: String,
}

/// The same field numbers with a wire type the server's schema refuses.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Malformed {
    #[prost(uint64, tag = "1")]
    pub text: u64,
}

pub const ECHO_PATH: &str = "/keel.test.v1.Echo/Echo";
pub const SECRET_TEXT: &str = "postgres://app:hunter2@db.internal:5432";

/// `keel.test.v1.Echo`, written against tonic's server plumbing.
#[derive(Clone, Default)]
pub struct EchoServer {
    /// Calls that reached the handler.
    pub calls: Arc<AtomicUsize>,
    /// Calls that ran to their end (not cancelled).
    pub completed: Arc<AtomicUsize>,
}

impl NamedService for EchoServer {
    const NAME: &'static str = "keel.test.v1.Echo";
}

#[derive(Clone)]
struct EchoMethod(EchoServer);

impl tonic::server::UnaryService<EchoRequest> for EchoMethod {
    type Response = EchoReply;
    type Future = BoxFuture<'static, Result<Response<EchoReply>, Status>>;

    fn call(&mut self, request: Request<EchoRequest>) -> Self::Future {
        let server = self.0.clone();
        Box::pin(async move {
            server.calls.fetch_add(1, Ordering::SeqCst);
            let subject = request
                .extensions()
                .get::<Principal>()
                .map(|p| p.subject.clone())
                .unwrap_or_default();
            let trace_id = keel_telemetry::propagation::current_trace_context()
                .map(|tc| tc.trace_id().to_owned())
                .unwrap_or_default();
            let message = request.into_inner();
            if message.sleep_ms > 0 {
                tokio::time::sleep(Duration::from_millis(message.sleep_ms)).await;
            }
            match message.fail.as_str() {
                "not_found" => Err(Error::not_found("order 42")).or_status()?,
                "conflict" => Err(Error::from(VersionConflict {
                    subject: "Order-42".into(),
                    expected: ExpectedVersion::Exact(Version::new(3)),
                    actual: Version::new(4),
                }))
                .or_status()?,
                "internal" => Err(Error::internal(
                    SECRET_TEXT,
                    std::io::Error::other(SECRET_TEXT),
                ))
                .or_status()?,
                "rejected" => Err(keel_core::DomainError::new(
                    "order.already_shipped",
                    "the order has already shipped",
                ))
                .or_status()?,
                _ => {}
            }
            server.completed.fetch_add(1, Ordering::SeqCst);
            Ok(Response::new(EchoReply {
                text: message.text,
                subject,
                trace_id,
            }))
        })
    }
}

impl tower::Service<http::Request<Body>> for EchoServer {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<http::Response<Body>, Infallible>>;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let method = EchoMethod(self.clone());
        Box::pin(async move {
            if request.uri().path() != ECHO_PATH {
                return Ok(Status::unimplemented("no such method").into_http());
            }
            let mut grpc =
                tonic::server::Grpc::new(ProstCodec::<EchoReply, EchoRequest>::default());
            Ok(grpc.unary(method, request).await)
        })
    }
}

pub async fn channel(addr: std::net::SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .unwrap()
}

/// Calls `Echo` with any message type (so tests can send malformed ones).
pub async fn call<M: prost::Message + Send + Sync + 'static>(
    channel: Channel,
    request: Request<M>,
) -> Result<Response<EchoReply>, Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    grpc.unary(
        request,
        http::uri::PathAndQuery::from_static(ECHO_PATH),
        ProstCodec::<M, EchoReply>::default(),
    )
    .await
}

pub fn echo(text: &str) -> EchoRequest {
    EchoRequest {
        text: text.to_owned(),
        ..EchoRequest::default()
    }
}

const SIGNING_SECRET: &[u8] = b"a test-only HMAC secret for keel-grpc, 32+ bytes";

pub fn verifier() -> JwtVerifier {
    JwtVerifier::new(
        JwtConfig::new("https://idp.test", "orders-api", [Algorithm::HS256]),
        KeySource::fixed([
            VerificationKey::hmac(None, &Secret::new(SIGNING_SECRET.to_vec())).unwrap(),
        ]),
    )
    .unwrap()
}

/// A signed token for `subject` with `roles`, expiring in `expires_in` s.
pub fn token(subject: &str, roles: &[&str], expires_in: i64) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &json!({"iss": "https://idp.test", "aud": "orders-api", "sub": subject,
                "roles": roles, "exp": now + expires_in}),
        &EncodingKey::from_secret(SIGNING_SECRET),
    )
    .unwrap()
}

pub fn with_bearer<M>(message: M, token: &str) -> Request<M> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

pub fn addr() -> std::net::SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}
