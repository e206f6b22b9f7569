//! [`GrpcServer`]: a tonic server with Keel's edge in a few lines.

mod auth;
mod body;
mod edge;
mod io;
mod router;

use std::convert::Infallible;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use keel_core::Error;
use keel_security::JwtVerifier;
use keel_telemetry::HealthRegistry;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tonic::body::Body;
use tonic::server::NamedService;
use tower::ServiceBuilder;
use tower::limit::GlobalConcurrencyLimitLayer;
use tower::load_shed::LoadShedLayer;

pub use auth::{Authorize, PolicyAuthorizer};

use crate::TraceLayer;
use crate::health::HealthService;

/// The default largest request message: 4 MiB, tonic's own default.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 4 * 1024 * 1024;
/// The default number of calls served at once across all connections.
pub const DEFAULT_CONCURRENCY_LIMIT: usize = 1024;
/// The default retry hint sent with `RESOURCE_EXHAUSTED`.
pub const DEFAULT_RETRY_AFTER: Duration = Duration::from_millis(100);
/// The default limit on a call's header block (metadata): 32 KiB.
pub const DEFAULT_MAX_HEADER_LIST_SIZE: u32 = 32 * 1024;
/// The default time a new connection has to send its HTTP/2 preface.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The default interval of HTTP/2 keepalive pings.
pub const DEFAULT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// The default time a ping may go unanswered before the connection is
/// closed.
pub const DEFAULT_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// The default time [`GrpcServerHandle::shutdown`] lets calls in flight
/// finish before cutting them.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Builds a tonic server with Keel's edge around the service's own
/// services.
///
/// Every call goes through, from the outside in:
///
/// 1. a server span (`<package.Service>/<Method>`) continuing the caller's
///    W3C trace ([`TraceLayer`]);
/// 2. load shedding over a global concurrency limit (tower's `LoadShed`
///    and `GlobalConcurrencyLimit`): a call beyond
///    [`concurrency_limit`](Self::concurrency_limit) is refused at once
///    with `RESOURCE_EXHAUSTED`, `keel-error-code: keel.resource_exhausted`
///    and `grpc-retry-pushback-ms`;
/// 3. the deadline: the shorter of [`timeout`](Self::timeout) and the
///    caller's `grpc-timeout`, answered `DEADLINE_EXCEEDED`;
/// 4. authentication ([`authenticate`](Self::authenticate)): the bearer
///    token becomes a [`Principal`](keel_core::Principal) in the request's
///    extensions (`request.extensions().get::<Principal>()` in a handler),
///    then the [`authorize`](Self::authorize) hook decides; refusals are
///    `UNAUTHENTICATED` / `PERMISSION_DENIED` with the stable code;
/// 5. the per-message size limit ([`max_message_size`](Self::max_message_size)),
///    checked on each message's length prefix before it is buffered;
/// 6. the service, found by name; unknown services are `UNIMPLEMENTED`.
///
/// Beside the service's own, it serves `grpc.health.v1.Health` from a
/// [`HealthRegistry`] ([`health`](Self::health)) and server reflection
/// (v1 and v1alpha) for the descriptor sets given to
/// [`reflection`](Self::reflection). Health and reflection need no token.
///
/// The connection is guarded too: a client must finish its HTTP/2 preface
/// within [`handshake_timeout`](Self::handshake_timeout), answer keepalive
/// pings, and keep its header block under
/// [`max_header_list_size`](Self::max_header_list_size).
///
/// ```no_run
/// # async fn run(registry: keel_telemetry::HealthRegistry, verifier: keel_security::JwtVerifier)
/// # -> Result<(), keel_core::Error> {
/// use std::time::Duration;
/// use keel_grpc::GrpcServer;
///
/// let server = GrpcServer::builder()
///     .health(registry)
///     .reflection(tonic_health::pb::FILE_DESCRIPTOR_SET)
///     .authenticate(verifier)
///     .timeout(Duration::from_secs(10))
///     .concurrency_limit(256)
///     // .add_service(OrdersServer::new(orders))
///     .serve("127.0.0.1:50051".parse().unwrap())
///     .await?;
/// // … on SIGTERM: let calls in flight finish, then stop.
/// server.shutdown().await?;
/// # Ok(()) }
/// ```
pub struct GrpcServer {
    router: router::Router,
    health: Option<HealthService>,
    descriptor_sets: Vec<Vec<u8>>,
    verifier: Option<JwtVerifier>,
    authorizer: Option<Arc<dyn Authorize>>,
    public: Vec<String>,
    timeout: Option<Duration>,
    max_message_size: usize,
    concurrency_limit: usize,
    retry_after: Duration,
    max_header_list_size: u32,
    handshake_timeout: Duration,
    keepalive_interval: Duration,
    keepalive_timeout: Duration,
    drain_timeout: Duration,
}

impl fmt::Debug for GrpcServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut services: Vec<_> = self.router.names().collect();
        services.sort_unstable();
        f.debug_struct("GrpcServer")
            .field("services", &services)
            .field("health", &self.health.is_some())
            .field("descriptor_sets", &self.descriptor_sets.len())
            .field("authenticated", &self.verifier.is_some())
            .field("authorized", &self.authorizer.is_some())
            .field("public", &self.public)
            .field("timeout", &self.timeout)
            .field("max_message_size", &self.max_message_size)
            .field("concurrency_limit", &self.concurrency_limit)
            .field("retry_after", &self.retry_after)
            .field("max_header_list_size", &self.max_header_list_size)
            .field("handshake_timeout", &self.handshake_timeout)
            .field("keepalive_interval", &self.keepalive_interval)
            .field("keepalive_timeout", &self.keepalive_timeout)
            .field("drain_timeout", &self.drain_timeout)
            .finish()
    }
}

impl Default for GrpcServer {
    fn default() -> Self {
        Self::builder()
    }
}

impl GrpcServer {
    /// A server with the defaults (the `DEFAULT_*` constants), no
    /// services, no authentication and no deadline of its own.
    #[must_use]
    pub fn builder() -> Self {
        Self {
            router: router::Router::default(),
            health: None,
            descriptor_sets: Vec::new(),
            verifier: None,
            authorizer: None,
            public: Vec::new(),
            timeout: None,
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            concurrency_limit: DEFAULT_CONCURRENCY_LIMIT,
            retry_after: DEFAULT_RETRY_AFTER,
            max_header_list_size: DEFAULT_MAX_HEADER_LIST_SIZE,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            keepalive_interval: DEFAULT_KEEPALIVE_INTERVAL,
            keepalive_timeout: DEFAULT_KEEPALIVE_TIMEOUT,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
        }
    }

    /// Adds a service (a tonic-generated `…Server`, or any service with a
    /// [`NamedService`] name). A second service with the same name
    /// replaces the first.
    #[must_use]
    pub fn add_service<S>(mut self, service: S) -> Self
    where
        S: tower::Service<Request<Body>, Response = Response<Body>, Error = Infallible>
            + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        self.router.add(service);
        self
    }

    /// Serves `grpc.health.v1.Health` from `registry`: `SERVING` while the
    /// readiness (service `""` or `readiness`) or liveness (`liveness`)
    /// probe passes, `NOT_SERVING` when a check fails, for example when
    /// the database stops answering. See [`HealthService`].
    #[must_use]
    pub fn health(mut self, registry: HealthRegistry) -> Self {
        self.health = Some(HealthService::new(registry));
        self
    }

    /// How often health `Watch` streams re-evaluate (default
    /// [`DEFAULT_WATCH_INTERVAL`](crate::DEFAULT_WATCH_INTERVAL)); only with [`health`](Self::health).
    #[must_use]
    pub fn health_watch_interval(mut self, interval: Duration) -> Self {
        self.health = self.health.map(|h| h.watch_interval(interval));
        self
    }

    /// Describes services for server reflection with an encoded
    /// `FileDescriptorSet` (what `tonic-prost-build` writes with
    /// `file_descriptor_set_path`, or Keel's own descriptor set). Call it
    /// once per set; the health service's set is added by itself. Without
    /// any call, reflection is not served.
    #[must_use]
    pub fn reflection(mut self, encoded_file_descriptor_set: impl AsRef<[u8]>) -> Self {
        self.descriptor_sets
            .push(encoded_file_descriptor_set.as_ref().to_vec());
        self
    }

    /// Requires a valid bearer token (`authorization: Bearer …`) on every
    /// call except health, reflection and [`public`](Self::public) ones;
    /// the verified [`Principal`](keel_core::Principal) goes into the
    /// request's extensions. A missing, malformed, expired or forged token
    /// is `UNAUTHENTICATED`; a key set that cannot be fetched is
    /// `UNAVAILABLE` (retryable).
    #[must_use]
    pub fn authenticate(mut self, verifier: JwtVerifier) -> Self {
        self.verifier = Some(verifier);
        self
    }

    /// Asks `authorizer` about every authenticated call; a refusal is
    /// `PERMISSION_DENIED`. Only with [`authenticate`](Self::authenticate).
    #[must_use]
    pub fn authorize(mut self, authorizer: impl Authorize) -> Self {
        self.authorizer = Some(Arc::new(authorizer));
        self
    }

    /// Lets calls to a service (`package.Service`) or a method
    /// (`/package.Service/Method`) through without a token.
    #[must_use]
    pub fn public(mut self, service_or_method: impl Into<String>) -> Self {
        self.public.push(service_or_method.into());
        self
    }

    /// The longest a call may take, shortened by the caller's own
    /// `grpc-timeout`; a call over it is cancelled and answered
    /// `DEADLINE_EXCEEDED` (`keel.timeout`). Without it, only the caller's
    /// deadline applies.
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// The largest request message, in bytes; a larger one is refused
    /// with `RESOURCE_EXHAUSTED` (`keel.invalid_input`, field `message`)
    /// before it is read.
    #[must_use]
    pub fn max_message_size(mut self, bytes: usize) -> Self {
        self.max_message_size = bytes;
        self
    }

    /// How many calls may run at once across all connections; more are
    /// shed with `RESOURCE_EXHAUSTED` rather than queued. At least 1.
    #[must_use]
    pub fn concurrency_limit(mut self, calls: usize) -> Self {
        self.concurrency_limit = calls.max(1);
        self
    }

    /// The retry hint sent with shed calls (`grpc-retry-pushback-ms`).
    #[must_use]
    pub fn retry_after(mut self, after: Duration) -> Self {
        self.retry_after = after;
        self
    }

    /// The largest header block (metadata) a call may carry, in bytes;
    /// HTTP/2 refuses a larger one before it reaches the edge.
    #[must_use]
    pub fn max_header_list_size(mut self, bytes: u32) -> Self {
        self.max_header_list_size = bytes;
        self
    }

    /// How long a new connection has to send the HTTP/2 preface and its
    /// first SETTINGS frame before it is closed.
    #[must_use]
    pub fn handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    /// HTTP/2 keepalive: a ping every `interval`, and the connection
    /// closed when one goes unanswered for `timeout`. This is also what
    /// closes a connection that stalls mid-frame.
    #[must_use]
    pub fn keepalive(mut self, interval: Duration, timeout: Duration) -> Self {
        self.keepalive_interval = interval;
        self.keepalive_timeout = timeout;
        self
    }

    /// How long [`GrpcServerHandle::shutdown`] waits for calls in flight
    /// before cutting them.
    #[must_use]
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.drain_timeout = timeout;
        self
    }

    /// Binds `addr` and serves in a background task.
    ///
    /// # Errors
    ///
    /// [`Error::Unavailable`] when the address cannot be bound;
    /// [`Error::Internal`] when a reflection descriptor set cannot be read.
    pub async fn serve(self, addr: SocketAddr) -> Result<GrpcServerHandle, Error> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| Error::unavailable("grpc", format!("cannot listen on {addr}"), e))?;
        self.serve_on(listener)
    }

    /// Serves the connections `listener` accepts, in a background task.
    ///
    /// # Errors
    ///
    /// [`Error::Internal`] when a reflection descriptor set cannot be read
    /// or the listener has no local address.
    pub fn serve_on(mut self, listener: TcpListener) -> Result<GrpcServerHandle, Error> {
        let local_addr = listener
            .local_addr()
            .map_err(|e| Error::internal("the gRPC listener has no address", e))?;
        if self.authorizer.is_some() && self.verifier.is_none() {
            tracing::warn!(
                "an authorization hook without authentication is never asked: call authenticate(..)"
            );
        }
        let mut public = std::mem::take(&mut self.public);
        if let Some(health) = self.health.take() {
            public.push(<tonic_health::pb::health_server::HealthServer<HealthService> as NamedService>::NAME.to_owned());
            self.router.add(health.into_server());
            self.descriptor_sets
                .push(tonic_health::pb::FILE_DESCRIPTOR_SET.to_vec());
        }
        if !self.descriptor_sets.is_empty() {
            self.add_reflection(&mut public)?;
        }
        let (abort_tx, abort_rx) = watch::channel(false);
        let shared = Arc::new(edge::Shared {
            router: self.router,
            auth: self.verifier.map(|verifier| auth::Auth {
                verifier,
                authorizer: self.authorizer,
                public,
            }),
            timeout: self.timeout,
            max_message_size: self.max_message_size,
            abort: abort_rx,
        });
        let retry_after = self.retry_after;
        let stack = ServiceBuilder::new()
            .layer(TraceLayer)
            .map_result(move |result: Result<Response<Body>, tower::BoxError>| {
                Ok::<_, tower::BoxError>(result.unwrap_or_else(|e| overloaded(&*e, retry_after)))
            })
            .layer(LoadShedLayer::new())
            .layer(GlobalConcurrencyLimitLayer::new(self.concurrency_limit))
            .service(edge::Edge { shared });
        let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
        let server = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(self.keepalive_interval))
            .http2_keepalive_timeout(Some(self.keepalive_timeout))
            .http2_max_header_list_size(self.max_header_list_size)
            .tcp_nodelay(true);
        let incoming = io::incoming(listener, self.handshake_timeout);
        let task = tokio::spawn(async move {
            server
                .serve_with_incoming_shutdown(stack, incoming, async {
                    let _ = shutdown_rx.await;
                })
                .await
        });
        tracing::info!(%local_addr, "gRPC server listening");
        Ok(GrpcServerHandle {
            local_addr,
            shutdown: Some(shutdown_tx),
            abort: abort_tx,
            task: Some(task),
            drain_timeout: self.drain_timeout,
        })
    }

    fn add_reflection(&mut self, public: &mut Vec<String>) -> Result<(), Error> {
        let sets = std::mem::take(&mut self.descriptor_sets);
        let v1 = sets
            .iter()
            .fold(tonic_reflection::server::Builder::configure(), |b, set| {
                b.register_encoded_file_descriptor_set(set)
            })
            .build_v1()
            .map_err(|e| Error::internal("cannot read a reflection descriptor set", e))?;
        let v1alpha = sets
            .iter()
            .fold(tonic_reflection::server::Builder::configure(), |b, set| {
                b.register_encoded_file_descriptor_set(set)
            })
            .build_v1alpha()
            .map_err(|e| Error::internal("cannot read a reflection descriptor set", e))?;
        public.push(service_name_of(&v1));
        public.push(service_name_of(&v1alpha));
        self.router.add(v1);
        self.router.add(v1alpha);
        Ok(())
    }
}

fn service_name_of<S: NamedService>(_: &S) -> String {
    S::NAME.to_owned()
}

/// The response for a call the limits refused (tower's `Overloaded`) or
/// any other error of the layers.
fn overloaded(
    error: &(dyn std::error::Error + Send + Sync + 'static),
    retry_after: Duration,
) -> Response<Body> {
    if error.is::<tower::load_shed::error::Overloaded>() {
        tracing::debug!("call shed: concurrency limit reached");
        return crate::status::render(&Error::ResourceExhausted {
            resource: "concurrent calls".into(),
            retry_after: Some(retry_after),
        })
        .into_http();
    }
    crate::status_from_error(&Error::internal_msg(format!(
        "server layer failed: {error}"
    )))
    .into_http()
}

/// A running [`GrpcServer`].
///
/// [`shutdown`](Self::shutdown) stops accepting connections, lets calls
/// in flight finish (cutting them with `UNAVAILABLE` after the drain
/// timeout) and waits for the server to end; [`abort`](Self::abort) cuts
/// calls in flight at once and waits; dropping the handle aborts without
/// waiting.
pub struct GrpcServerHandle {
    local_addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    abort: watch::Sender<bool>,
    task: Option<JoinHandle<Result<(), tonic::transport::Error>>>,
    drain_timeout: Duration,
}

impl fmt::Debug for GrpcServerHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GrpcServerHandle")
            .field("local_addr", &self.local_addr)
            .field(
                "running",
                &self.task.as_ref().is_some_and(|t| !t.is_finished()),
            )
            .finish_non_exhaustive()
    }
}

impl GrpcServerHandle {
    /// The address the server listens on (useful after binding port 0).
    #[must_use]
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting, lets calls in flight finish (at most the drain
    /// timeout, then cuts them with `UNAVAILABLE`), and waits for the
    /// server to end.
    ///
    /// # Errors
    ///
    /// [`Error::Internal`] when the server failed or its task panicked.
    pub async fn shutdown(mut self) -> Result<(), Error> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let Some(mut task) = self.task.take() else {
            return Ok(());
        };
        let outcome = match tokio::time::timeout(self.drain_timeout, &mut task).await {
            Ok(outcome) => outcome,
            Err(_) => {
                tracing::warn!(
                    after = ?self.drain_timeout,
                    "calls still in flight after the drain timeout: cutting them"
                );
                let _ = self.abort.send(true);
                task.await
            }
        };
        finish(outcome)
    }

    /// Cuts calls in flight (`UNAVAILABLE`), stops accepting, and waits
    /// for the server to end.
    ///
    /// # Errors
    ///
    /// [`Error::Internal`] when the server failed or its task panicked.
    pub async fn abort(mut self) -> Result<(), Error> {
        let _ = self.abort.send(true);
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        match self.task.take() {
            Some(task) => finish(task.await),
            None => Ok(()),
        }
    }
}

fn finish(
    outcome: Result<Result<(), tonic::transport::Error>, tokio::task::JoinError>,
) -> Result<(), Error> {
    match outcome {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(Error::internal("the gRPC server failed", e)),
        Err(e) => Err(Error::internal("the gRPC server task failed", e)),
    }
}

impl Drop for GrpcServerHandle {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            let _ = self.abort.send(true);
            if let Some(tx) = self.shutdown.take() {
                let _ = tx.send(());
            }
            task.abort();
        }
    }
}
