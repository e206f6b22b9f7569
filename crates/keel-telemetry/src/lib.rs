//! Observability for Keel services: structured logs, distributed traces,
//! metrics, trace propagation through events and messages, secret
//! redaction, and health checks.
//!
//! Every Keel service calls [`init`] once at startup. Adapters record
//! through [`KeelMetrics`] and the propagation helpers; the composition
//! root wraps bus ports in [`TracedPublisher`] and [`TracedHandler`] and
//! registers each adapter's health check in a [`HealthRegistry`].
//!
//! * **Logs**: JSON lines in production (with the current `trace_id` and
//!   `span_id`), readable text in development, or Google Cloud Logging's
//!   structured JSON ([`LogFormat::Gcp`], see [`gcplog`]), filtered by
//!   `RUST_LOG` (default `info`); `log` records are captured too.
//! * **Traces**: `tracing` spans become OpenTelemetry spans, exported over
//!   OTLP/gRPC when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//!   [`TelemetryConfig::otlp_endpoint`]) is set. With no endpoint nothing
//!   is exported, no exporter thread starts and nothing retries; spans
//!   still get ids, so trace context keeps flowing through the service.
//! * **Propagation**: [`propagation`] writes the current span's W3C trace
//!   context into [`Metadata`](keel_core::Metadata) and starts consumer
//!   spans as children of the producer's span.
//! * **Metrics**: [`KeelMetrics`] with stable names ([`metrics::names`]),
//!   exported over the same OTLP endpoint.
//! * **Commands**: [`CommandTracingLayer`] is the outermost layer of the
//!   command pipeline (`docs/command-pipeline.md`): a span per command that
//!   continues the envelope's trace, the command's own trace context written
//!   back into its metadata, and `keel.command.duration` by outcome.
//! * **Secrets**: [`Secret`] prints and serializes as `[REDACTED]`.
//! * **Health**: [`HealthRegistry`] runs liveness and readiness checks with
//!   timeouts and a short cache; `keel-http` and `keel-grpc` serve it.
//!
//! # Example
//!
//! ```no_run
//! use keel_core::Metadata;
//! use keel_telemetry::{Secret, TelemetryConfig};
//!
//! #[derive(Debug)]
//! struct Config { database_url: Secret<String> }
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     // Flushes buffered spans and metrics when dropped at the end of main.
//!     let telemetry = keel_telemetry::init(
//!         TelemetryConfig::new("orders")
//!             .environment("prod")
//!             .version(env!("CARGO_PKG_VERSION")),
//!     )?;
//!
//!     let config = Config { database_url: Secret::new("postgres://app:pw@db/orders".into()) };
//!     tracing::info!(?config, "starting"); // logs database_url: [REDACTED]
//!
//!     let span = tracing::info_span!("place_order");
//!     let _entered = span.enter();
//!     let metadata = keel_telemetry::propagation::with_current_trace(Metadata::new());
//!     assert!(metadata.trace_context.is_some());
//!     telemetry.metrics().record_cache_miss("orders");
//!     Ok(())
//! }
//! ```
//!
//! # Environment variables
//!
//! | variable | effect |
//! |---|---|
//! | `RUST_LOG` | log filter ([`EnvFilter`](tracing_subscriber::EnvFilter) syntax) |
//! | `KEEL_LOG_FORMAT` | `json`, `gcp` or `text`, overriding the environment's default |
//! | `OTEL_EXPORTER_OTLP_ENDPOINT` | OTLP/gRPC collector; unset means no export |
//! | `OTEL_EXPORTER_OTLP_HEADERS` | headers sent with each export (e.g. an API key) |
//! | `OTEL_SDK_DISABLED` | `true` turns export off |
//! | `OTEL_RESOURCE_ATTRIBUTES` | extra resource attributes |
//!
//! # Feature flags
//!
//! * `otlp` (default, implies `sdk`): OTLP/gRPC export through tonic, with
//!   TLS through rustls and the webpki roots for `https://` endpoints.
//!   Without it, an endpoint in the configuration is an error and
//!   everything else works.
//! * `sdk` (default): [`init`], the OpenTelemetry SDK providers, the
//!   `tracing` subscriber, the consumer-side propagation helpers
//!   ([`propagation::set_parent`], [`propagation::consumer_span`]) and the
//!   decorators. Without any feature the crate is the light part Keel's
//!   adapters depend on: [`KeelMetrics`] and [`metrics::names`],
//!   trace-context injection ([`propagation::with_current_trace`]), the
//!   [`HealthRegistry`] and [`Secret`], on the `opentelemetry` API crate
//!   only. Its instruments record nothing until a service installs a meter
//!   provider (which [`init`] does).
//! * `testing`: `testing::MetricsProbe`, Keel's instruments on an in-memory
//!   meter provider, to check in tests what an adapter records.
//!
//! The guide with the metric table is in `docs/telemetry.md`.

#[cfg(feature = "sdk")]
pub mod command;
#[cfg(feature = "sdk")]
mod config;
#[cfg(feature = "sdk")]
mod error;
#[cfg(feature = "sdk")]
pub mod gcplog;
pub mod health;
#[cfg(feature = "sdk")]
mod init;
#[cfg(feature = "sdk")]
mod logfmt;
pub mod metrics;
pub mod propagation;
mod secret;
#[cfg(feature = "testing")]
pub mod testing;
#[cfg(feature = "sdk")]
mod traced;

#[cfg(feature = "sdk")]
pub use command::{CommandTracing, CommandTracingLayer};
#[cfg(feature = "sdk")]
pub use config::{
    DEVELOPMENT_ENVIRONMENTS, LOG_FILTER_ENV, LOG_FORMAT_ENV, LogFormat, OTLP_ENDPOINT_ENV,
    SDK_DISABLED_ENV, Sampling, TRACES_SAMPLER_ARG_ENV, TRACES_SAMPLER_ENV, TelemetryConfig,
};
#[cfg(feature = "sdk")]
pub use error::{Result, TelemetryError};
pub use health::{CheckOptions, CheckResult, HealthRegistry, ProbeReport};
#[cfg(feature = "sdk")]
pub use init::{Telemetry, TelemetryGuard, check_filter, init};
pub use metrics::{INSTRUMENTATION_SCOPE, KeelMetrics};
pub use secret::{REDACTED, Secret};
#[cfg(feature = "sdk")]
pub use traced::{TracedHandler, TracedPublisher};
