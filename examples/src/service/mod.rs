//! The two contexts as gRPC services: what the `ordering-service` and
//! `shipping-service` binaries run ([`ordering::run`], [`shipping::run`]).
//!
//! Each binary is a thin `main` around one of these functions. They read
//! the configuration once through keel-config, connect the backends it
//! names, apply Keel's migrations for the crates they link, wire the
//! context's application layer (the same code the in-process tour runs,
//! [`crate::contexts`]) and serve it with keel-grpc: health and reflection
//! without a token, every other call with a JWT verified by keel-security,
//! commands through the command pipeline (tracing, audit, authorization,
//! one transaction). SIGTERM or SIGINT stops them gracefully: readiness
//! turns `NOT_SERVING`, the server stops accepting and drains calls in
//! flight, subscriptions and relays stop after the work they hold,
//! telemetry is flushed, and the process exits 0.
//!
//! # Configuration
//!
//! Everything keel-config reads (`docs/configuration.md`): `KEEL_ENV`,
//! `KEEL_CONFIG_DIR`, `KEEL_<SECTION>__<KEY>` and the legacy names
//! (`DATABASE_URL`, `PUBSUB_EMULATOR_HOST`, `GOOGLE_CLOUD_PROJECT`,
//! `OTEL_EXPORTER_OTLP_ENDPOINT`, ...). On top of Keel's keys:
//!
//! | key | variable | default | meaning |
//! |---|---|---|---|
//! | `grpc.address` | `KEEL_GRPC__ADDRESS` | `127.0.0.1:50051` (ordering), `127.0.0.1:50052` (shipping) | where the gRPC server listens |
//! | `auth.hs256_key` | `KEEL_AUTH__HS256_KEY` | unset | shared HS256 key (32 bytes or more) tokens are signed with; else `security.jwt.jwks_url` |
//! | `security.jwt.issuers`, `.audiences` | `KEEL_SECURITY__JWT__ISSUERS=[..]` | required | accepted `iss` and `aud` |
//! | `eventbus.name_prefix` | `KEEL_EVENTBUS__NAME_PREFIX` | unset | prefix of every topic and subscription (and of Shipping's search index) |
//! | `ordering.snapshot_every` | `KEEL_ORDERING__SNAPSHOT_EVERY` | `3` | snapshot an order every this many events |
//! | `shipping.accept_schema_v2` | `KEEL_SHIPPING__ACCEPT_SCHEMA_V2` | `false` | accept `order.paid` of schema version 2 ("the fix deployed") |
//!
//! The bus is Pub/Sub when `eventbus.backend = "pubsub"` or an emulator
//! host is set (project `keel-examples` unless one is configured), else in
//! memory; the cache is Redis when `cache.backend = "redis"` or `REDIS_URL`
//! is set; Shipping's search index is Meilisearch when `MEILISEARCH_URL` is
//! set (with `MEILISEARCH_KEY`), else in memory. Without `database.url`
//! everything that would be in PostgreSQL is in memory: fine to try a
//! service alone, useless across processes.
//!
//! # Scopes
//!
//! | service | reads | commands |
//! |---|---|---|
//! | Ordering | `orders:read` (`GetOrder`) | `orders:write` (`PlaceOrder`, `PayOrder`, `CancelOrder`) |
//! | Shipping | `shipments:read` (`GetShipment`, `SearchShipments`, `GetStock`) | `shipments:write` |
//!
//! A read without its scope is refused at the edge; a command without its
//! scope is refused by the command pipeline, so the refusal is in the audit
//! log too.

mod auth;
mod backends;
pub mod ordering;
pub mod shipping;

use std::io::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use keel_config::{ConfigLoader, KeelConfig};
use keel_core::{HealthCheck, HealthReport};
use serde::Deserialize;

pub use auth::{AuthSettings, ScopePolicy, TokenRequest, mint_token, verifier};
pub use backends::{Backends, EMULATOR_PROJECT};

/// The issuer tokens minted by [`mint_token`] carry unless told otherwise.
pub const DEFAULT_ISSUER: &str = "keel-examples";

/// The audience both services accept unless configured otherwise.
pub const DEFAULT_AUDIENCE: &str = "keel-examples";

/// Loads the configuration of `service` (its name and default listen
/// address set as defaults, every layer of keel-config on top).
///
/// # Errors
///
/// Every problem keel-config finds, each naming its key and layer.
pub async fn load_config(service: &str, default_address: &str) -> crate::Result<KeelConfig> {
    let config = ConfigLoader::new()
        .set_default("service.name", service)
        .set_default("grpc.address", default_address)
        .load()
        .await?;
    Ok(config)
}

/// The service's own section `key`, every field defaulted.
///
/// # Errors
///
/// A value of the wrong type, naming the key and where it came from.
pub fn section<T: for<'de> Deserialize<'de> + Default>(
    config: &KeelConfig,
    key: &str,
) -> crate::Result<T> {
    match config.extract::<T>(key) {
        Ok(value) => Ok(value),
        // No key of the section is set anywhere: every field's default.
        Err(e)
            if e.len() == 1
                && e.for_key(key)
                    .is_some_and(|e| e.source == keel_config::Source::Unset) =>
        {
            Ok(T::default())
        }
        Err(e) => Err(e.into()),
    }
}

/// Readiness until the service has started, and again once it is stopping:
/// `NOT_SERVING` while migrations run and subscriptions start, and from the
/// first moment of a graceful shutdown, so load balancers stop sending work
/// before the server stops accepting it.
#[derive(Clone, Debug, Default)]
pub struct Lifecycle {
    ready: Arc<AtomicBool>,
}

impl Lifecycle {
    /// A lifecycle that is not ready yet.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Marks the service ready (`true`) or not.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    /// The readiness check to register.
    #[must_use]
    pub fn check(&self) -> LifecycleCheck {
        LifecycleCheck {
            ready: Arc::clone(&self.ready),
        }
    }
}

/// The health check of a [`Lifecycle`], named `lifecycle`.
#[derive(Debug)]
pub struct LifecycleCheck {
    ready: Arc<AtomicBool>,
}

#[async_trait]
impl HealthCheck for LifecycleCheck {
    fn name(&self) -> &str {
        "lifecycle"
    }

    async fn check(&self) -> HealthReport {
        if self.ready.load(Ordering::SeqCst) {
            HealthReport::healthy(Duration::ZERO)
        } else {
            HealthReport::unhealthy(Duration::ZERO, "starting or stopping")
        }
    }
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
///
/// # Errors
///
/// When the signal handlers cannot be installed.
pub async fn shutdown_signal() -> std::io::Result<&'static str> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        tokio::select! {
            _ = term.recv() => Ok("SIGTERM"),
            _ = int.recv() => Ok("SIGINT"),
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c().await?;
        Ok("Ctrl-C")
    }
}

/// What a service binary's `main` does with its command line: `token ...`
/// prints a token signed with the configured HS256 key (for grpcurl and
/// manual tests); anything else runs the service.
///
/// # Errors
///
/// Unknown arguments, a configuration without an HS256 key, or a failing
/// service.
pub async fn main_with_args<F, Fut>(service: &str, default_address: &str, run: F) -> crate::Result
where
    F: FnOnce(KeelConfig) -> Fut,
    Fut: std::future::Future<Output = crate::Result>,
{
    let args: Vec<String> = std::env::args().skip(1).collect();
    let config = load_config(service, default_address).await?;
    match args.first().map(String::as_str) {
        None => run(config).await,
        Some("token") => {
            let auth: AuthSettings = section(&config, "auth")?;
            let key = auth
                .hs256_key
                .ok_or("`token` needs auth.hs256_key (KEEL_AUTH__HS256_KEY)")?;
            let issuer = config
                .security
                .jwt
                .issuers
                .first()
                .cloned()
                .unwrap_or_else(|| DEFAULT_ISSUER.to_owned());
            let audience = config
                .security
                .jwt
                .audiences
                .first()
                .cloned()
                .unwrap_or_else(|| DEFAULT_AUDIENCE.to_owned());
            let scopes: Vec<&str> = args[1..].iter().map(String::as_str).collect();
            let token = mint_token(
                key.expose_secret().as_bytes(),
                &TokenRequest::new(&issuer, &audience, "user:cli").scopes(scopes),
            )?;
            // The token is the subcommand's output, for `$(...)` in a shell.
            writeln!(std::io::stdout(), "{token}")?;
            Ok(())
        }
        Some(other) => {
            Err(format!("unknown argument {other:?}; usage: {service} [token <scope>...]").into())
        }
    }
}

/// A shared handler as a handler of its own, so that a decorator such as
/// `keel_telemetry::TracedHandler` can wrap it while the service keeps its
/// `Arc` (for reads and shutdown).
pub(crate) struct Shared<H: ?Sized>(pub(crate) Arc<H>);

#[async_trait]
impl<H: keel_core::EventHandler + ?Sized> keel_core::EventHandler for Shared<H> {
    async fn handle(&self, delivery: &keel_core::Delivery) -> Result<(), keel_core::HandlerError> {
        self.0.handle(delivery).await
    }
}

/// A consumer span per delivery, child of the producer's span carried in
/// the message: the trace of the command that caused an event continues
/// in the service that handles it.
pub(crate) fn traced<H: keel_core::EventHandler + ?Sized + 'static>(
    handler: Arc<H>,
) -> Arc<dyn keel_core::EventHandler> {
    Arc::new(keel_telemetry::TracedHandler::without_metrics(Shared(
        handler,
    )))
}

/// The gRPC server both services start from: health and reflection, bearer
/// tokens checked by `verifier`, `policy`'s scope rules at the edge, the
/// configured request timeout (30 s when unset) and 10 s to drain on
/// shutdown. The caller adds its API and serves.
#[must_use]
pub fn grpc_server(
    config: &KeelConfig,
    backends: &Backends,
    verifier: keel_security::JwtVerifier,
    policy: ScopePolicy,
) -> keel_grpc::GrpcServer {
    keel_grpc::GrpcServer::builder()
        .health(backends.health.clone())
        .reflection(keel_grpc::proto::FILE_DESCRIPTOR_SET)
        .authenticate(verifier)
        .authorize(policy.edge())
        .timeout(
            config
                .grpc
                .request_timeout
                .unwrap_or(Duration::from_secs(30)),
        )
        .drain_timeout(Duration::from_secs(10))
}
