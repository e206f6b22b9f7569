//! Building and installing the subscriber and the OpenTelemetry providers.

use std::fmt;
use std::io::IsTerminal;
use std::sync::{Arc, OnceLock};

use opentelemetry::KeyValue;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing::Dispatch;
use tracing_subscriber::fmt::format::JsonFields;
use tracing_subscriber::fmt::writer::BoxMakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

use crate::config::{LOG_FILTER_ENV, LogFormat, Sampling, TelemetryConfig};
use crate::error::{Result, TelemetryError};
use crate::gcplog::GcpLines;
use crate::logfmt::JsonLines;
use crate::metrics::{INSTRUMENTATION_SCOPE, KeelMetrics};

/// Targets whose spans never become OpenTelemetry spans: the export
/// machinery itself (tracing it would feed the exporter its own work).
const EXPORT_MACHINERY: &[&str] = &[
    "opentelemetry",
    "opentelemetry_sdk",
    "opentelemetry_otlp",
    "tonic",
    "h2",
    "hyper",
    "hyper_util",
    "tower",
];

/// Sets up logs, traces and metrics for the whole process and returns the
/// guard that flushes them when dropped.
///
/// Installs the global `tracing` subscriber (and routes `log` records to
/// it), the global OpenTelemetry tracer and meter providers, and the W3C
/// trace-context propagator. Call it once, early in `main`, and keep the
/// guard alive until the end of `main`.
///
/// When an OTLP endpoint is configured, export runs on a small dedicated
/// runtime, so this may be called inside or outside a Tokio runtime, and
/// the guard may be dropped in either.
///
/// ```no_run
/// # fn main() -> Result<(), keel_telemetry::TelemetryError> {
/// let _telemetry = keel_telemetry::init(
///     keel_telemetry::TelemetryConfig::new("orders").environment("prod"),
/// )?;
/// tracing::info!("orders service starting");
/// # Ok(()) }
/// ```
///
/// # Errors
///
/// [`TelemetryError::AlreadyInitialized`] on a second call, and the
/// configuration errors of [`Telemetry::build`].
pub fn init(config: TelemetryConfig) -> Result<TelemetryGuard> {
    Telemetry::build(config)?.install()
}

/// Logs, traces and metrics built from a [`TelemetryConfig`] but not yet
/// installed globally.
///
/// [`init`] is `Telemetry::build(config)?.install()`. Keep the two steps
/// apart to scope the subscriber to a test with
/// [`tracing::dispatcher::with_default`] or
/// [`WithSubscriber`](tracing::instrument::WithSubscriber).
pub struct Telemetry {
    dispatch: Dispatch,
    guard: TelemetryGuard,
}

impl fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Telemetry")
            .field("guard", &self.guard)
            .finish_non_exhaustive()
    }
}

impl Telemetry {
    /// Builds the subscriber and the providers, reading the standard
    /// environment variables (`RUST_LOG`, `KEEL_LOG_FORMAT`,
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_SDK_DISABLED`,
    /// `OTEL_TRACES_SAMPLER`, `OTEL_TRACES_SAMPLER_ARG`).
    ///
    /// # Errors
    ///
    /// [`TelemetryError::InvalidFilter`] when `RUST_LOG` or a configured
    /// filter does not parse, [`TelemetryError::InvalidSampler`] when the
    /// sampler variables do not, [`TelemetryError::Exporter`] when the OTLP
    /// exporter refuses its endpoint, [`TelemetryError::Runtime`] when the
    /// export runtime cannot start.
    pub fn build(config: TelemetryConfig) -> Result<Self> {
        Self::build_with_env(config, &|k| std::env::var(k).ok())
    }

    fn build_with_env(
        mut config: TelemetryConfig,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self> {
        let format = config.resolved_log_format(env);
        let endpoint = config.resolved_otlp_endpoint(env);

        let log_directives = env(LOG_FILTER_ENV)
            .filter(|v| !v.trim().is_empty())
            .unwrap_or_else(|| config.default_log_filter.clone());
        let log_filter = parse_filter(&log_directives)?;
        let mut trace_directives = config.trace_filter.clone();
        for target in EXPORT_MACHINERY {
            trace_directives.push_str(&format!(",{target}=off"));
        }
        let trace_filter = parse_filter(&trace_directives)?;

        let mut attributes = vec![KeyValue::new(
            "deployment.environment.name",
            config.environment.clone(),
        )];
        if let Some(version) = &config.version {
            attributes.push(KeyValue::new("service.version", version.clone()));
        }
        let resource = Resource::builder()
            .with_service_name(config.service_name.clone())
            .with_attributes(attributes)
            .build();

        let sampler = sampler(config.resolved_sampling(env)?);
        let mut tracer_builder = SdkTracerProvider::builder()
            .with_sampler(sampler)
            .with_resource(resource.clone());
        let mut meter_builder = SdkMeterProvider::builder().with_resource(resource);

        let export = match &endpoint {
            Some(endpoint) => {
                let mut export = otlp::Export::start(endpoint, &config)?;
                tracer_builder = export.add_traces(tracer_builder);
                meter_builder = export.add_metrics(meter_builder);
                Some(export)
            }
            None => None,
        };
        if let Some(hook) = config.tracer_hook.take() {
            tracer_builder = hook(tracer_builder);
        }
        if let Some(hook) = config.meter_hook.take() {
            meter_builder = hook(meter_builder);
        }
        let tracer_provider = tracer_builder.build();
        let meter_provider = meter_builder.build();

        let (writer, default_writer) = match config.writer.take() {
            Some(w) => (w, false),
            None => (BoxMakeWriter::new(std::io::stdout), true),
        };
        let dispatch_slot = Arc::new(OnceLock::new());
        let fmt_layer = match format {
            LogFormat::Json => tracing_subscriber::fmt::layer()
                .fmt_fields(JsonFields::new())
                .event_format(JsonLines::new(Arc::clone(&dispatch_slot)))
                .with_writer(writer)
                .with_filter(log_filter)
                .boxed(),
            LogFormat::Gcp => tracing_subscriber::fmt::layer()
                .fmt_fields(JsonFields::new())
                .event_format(GcpLines::new(
                    Arc::clone(&dispatch_slot),
                    config.gcp_project.clone(),
                ))
                .with_writer(writer)
                .with_filter(log_filter)
                .boxed(),
            _ => tracing_subscriber::fmt::layer()
                .with_ansi(default_writer && std::io::stdout().is_terminal())
                .with_writer(writer)
                .with_filter(log_filter)
                .boxed(),
        };
        let otel_layer = tracing_opentelemetry::layer()
            .with_tracer(tracer_provider.tracer(INSTRUMENTATION_SCOPE))
            .with_threads(false)
            .with_filter(trace_filter)
            .boxed();
        let subscriber = Registry::default().with(vec![otel_layer, fmt_layer]);

        let metrics = KeelMetrics::new(&opentelemetry::metrics::MeterProvider::meter(
            &meter_provider,
            INSTRUMENTATION_SCOPE,
        ));
        let dispatch = Dispatch::new(subscriber);
        let _ = dispatch_slot.set(dispatch.downgrade());
        Ok(Self {
            dispatch,
            guard: TelemetryGuard {
                tracer_provider,
                meter_provider,
                metrics,
                export,
                endpoint,
                format,
                closed: false,
            },
        })
    }

    /// The subscriber, to install for a scope.
    #[must_use]
    pub fn dispatch(&self) -> &Dispatch {
        &self.dispatch
    }

    /// The guard (providers and metrics) without installing anything.
    #[must_use]
    pub fn guard(&self) -> &TelemetryGuard {
        &self.guard
    }

    /// Splits into the subscriber and the guard, installing nothing.
    #[must_use]
    pub fn into_parts(self) -> (Dispatch, TelemetryGuard) {
        (self.dispatch, self.guard)
    }

    /// Installs the subscriber, the providers and the W3C propagator
    /// globally.
    ///
    /// # Errors
    ///
    /// [`TelemetryError::AlreadyInitialized`] when a global subscriber is
    /// already set; nothing global is changed then.
    pub fn install(self) -> Result<TelemetryGuard> {
        self.dispatch
            .try_init()
            .map_err(|e| TelemetryError::AlreadyInitialized(Box::new(e)))?;
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        opentelemetry::global::set_tracer_provider(self.guard.tracer_provider.clone());
        opentelemetry::global::set_meter_provider(self.guard.meter_provider.clone());
        Ok(self.guard)
    }
}

fn sampler(sampling: Sampling) -> Sampler {
    let root = if sampling.ratio >= 1.0 {
        Sampler::AlwaysOn
    } else if sampling.ratio <= 0.0 {
        Sampler::AlwaysOff
    } else {
        Sampler::TraceIdRatioBased(sampling.ratio)
    };
    if sampling.parent_based {
        Sampler::ParentBased(Box::new(root))
    } else {
        root
    }
}

/// Checks that `directives` parse as a log or trace filter
/// ([`EnvFilter`] syntax, e.g. `info,sqlx=warn`), as
/// [`Telemetry::build`] will parse them.
///
/// # Errors
///
/// [`TelemetryError::InvalidFilter`] when they do not.
pub fn check_filter(directives: &str) -> Result<()> {
    parse_filter(directives).map(drop)
}

fn parse_filter(directives: &str) -> Result<EnvFilter> {
    EnvFilter::builder()
        .parse(directives)
        .map_err(|source| TelemetryError::InvalidFilter {
            filter: directives.to_owned(),
            source,
        })
}

/// Keeps telemetry running; flushes and shuts it down when dropped.
///
/// Dropping it exports the spans and metrics still buffered (bounded by
/// the OTLP timeout) and stops the export runtime. Call
/// [`shutdown`](Self::shutdown) instead to see whether that worked.
pub struct TelemetryGuard {
    tracer_provider: SdkTracerProvider,
    meter_provider: SdkMeterProvider,
    metrics: KeelMetrics,
    export: Option<otlp::Export>,
    endpoint: Option<String>,
    format: LogFormat,
    closed: bool,
}

impl fmt::Debug for TelemetryGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TelemetryGuard")
            .field("otlp_endpoint", &self.endpoint)
            .field("log_format", &self.format)
            .field("closed", &self.closed)
            .finish_non_exhaustive()
    }
}

impl TelemetryGuard {
    /// The OTLP endpoint in use, or `None` when export is off.
    #[must_use]
    pub fn otlp_endpoint(&self) -> Option<&str> {
        self.endpoint.as_deref()
    }

    /// Whether spans and metrics are exported over OTLP.
    #[must_use]
    pub fn is_exporting(&self) -> bool {
        self.export.is_some()
    }

    /// The log format chosen.
    #[must_use]
    pub fn log_format(&self) -> LogFormat {
        self.format
    }

    /// The tracer provider (cheap to clone).
    #[must_use]
    pub fn tracer_provider(&self) -> &SdkTracerProvider {
        &self.tracer_provider
    }

    /// The meter provider (cheap to clone).
    #[must_use]
    pub fn meter_provider(&self) -> &SdkMeterProvider {
        &self.meter_provider
    }

    /// Keel's standard instruments, recorded through this guard's meter
    /// provider.
    #[must_use]
    pub fn metrics(&self) -> &KeelMetrics {
        &self.metrics
    }

    /// Exports whatever is buffered now, without shutting down.
    ///
    /// # Errors
    ///
    /// [`TelemetryError::Shutdown`] with the providers' reasons.
    pub fn flush(&self) -> Result<()> {
        let traces = self.tracer_provider.force_flush();
        let metrics = self.meter_provider.force_flush();
        combine(traces, metrics)
    }

    /// Flushes and shuts telemetry down, reporting failures.
    ///
    /// # Errors
    ///
    /// [`TelemetryError::Shutdown`] with the providers' reasons.
    pub fn shutdown(mut self) -> Result<()> {
        self.close()
    }

    fn close(&mut self) -> Result<()> {
        if self.closed {
            return Ok(());
        }
        self.closed = true;
        let traces = self.tracer_provider.shutdown();
        let metrics = self.meter_provider.shutdown();
        if let Some(export) = self.export.take() {
            export.stop();
        }
        combine(traces, metrics)
    }
}

fn combine(
    traces: opentelemetry_sdk::error::OTelSdkResult,
    metrics: opentelemetry_sdk::error::OTelSdkResult,
) -> Result<()> {
    match (traces, metrics) {
        (Ok(()), Ok(())) => Ok(()),
        (Err(t), Ok(())) => Err(TelemetryError::Shutdown(format!("traces: {t}"))),
        (Ok(()), Err(m)) => Err(TelemetryError::Shutdown(format!("metrics: {m}"))),
        (Err(t), Err(m)) => Err(TelemetryError::Shutdown(format!(
            "traces: {t}; metrics: {m}"
        ))),
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        // Failures were already reported by the SDK's diagnostics; a drop
        // has nobody left to tell.
        let _ = self.close();
    }
}

#[cfg(feature = "otlp")]
mod otlp {
    use opentelemetry_otlp::{WithExportConfig, WithTonicConfig};
    use opentelemetry_sdk::metrics::{MeterProviderBuilder, PeriodicReader};
    use opentelemetry_sdk::trace::TracerProviderBuilder;

    use crate::config::TelemetryConfig;
    use crate::error::{Result, TelemetryError};

    /// OTLP exporters and the runtime their gRPC channels live on.
    pub(super) struct Export {
        runtime: tokio::runtime::Runtime,
        spans: Option<opentelemetry_otlp::SpanExporter>,
        metrics: Option<opentelemetry_otlp::MetricExporter>,
        interval: std::time::Duration,
    }

    impl Export {
        pub(super) fn start(endpoint: &str, config: &TelemetryConfig) -> Result<Self> {
            // tonic channels are bound to the runtime they are created in and
            // the SDK exports from its own threads; a dedicated runtime works
            // whether or not the caller has one, and never competes with the
            // service's own tasks.
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("keel-otlp")
                .enable_all()
                .build()
                .map_err(TelemetryError::Runtime)?;
            let _entered = runtime.enter();
            let tls = endpoint.starts_with("https://").then(|| {
                opentelemetry_otlp::tonic_types::transport::ClientTlsConfig::new()
                    .with_enabled_roots()
            });

            let mut span_builder = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint)
                .with_timeout(config.otlp_timeout);
            if let Some(tls) = tls.clone() {
                span_builder = span_builder.with_tls_config(tls);
            }
            let spans = span_builder.build().map_err(|e| TelemetryError::Exporter {
                signal: "traces",
                endpoint: endpoint.to_owned(),
                source: Box::new(e),
            })?;

            let mut metric_builder = opentelemetry_otlp::MetricExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint)
                .with_timeout(config.otlp_timeout);
            if let Some(tls) = tls {
                metric_builder = metric_builder.with_tls_config(tls);
            }
            let metrics = metric_builder
                .build()
                .map_err(|e| TelemetryError::Exporter {
                    signal: "metrics",
                    endpoint: endpoint.to_owned(),
                    source: Box::new(e),
                })?;
            drop(_entered);
            Ok(Self {
                runtime,
                spans: Some(spans),
                metrics: Some(metrics),
                interval: config.metrics_interval,
            })
        }

        pub(super) fn add_traces(
            &mut self,
            builder: TracerProviderBuilder,
        ) -> TracerProviderBuilder {
            match self.spans.take() {
                Some(spans) => builder.with_batch_exporter(spans),
                None => builder,
            }
        }

        pub(super) fn add_metrics(
            &mut self,
            builder: MeterProviderBuilder,
        ) -> MeterProviderBuilder {
            match self.metrics.take() {
                Some(metrics) => builder.with_reader(
                    PeriodicReader::builder(metrics)
                        .with_interval(self.interval)
                        .build(),
                ),
                None => builder,
            }
        }

        pub(super) fn stop(self) {
            // May run inside the caller's runtime: a blocking shutdown would
            // panic there.
            self.runtime.shutdown_background();
        }
    }
}

#[cfg(not(feature = "otlp"))]
mod otlp {
    use opentelemetry_sdk::metrics::MeterProviderBuilder;
    use opentelemetry_sdk::trace::TracerProviderBuilder;

    use crate::config::TelemetryConfig;
    use crate::error::{Result, TelemetryError};

    /// Without the `otlp` feature there is nothing to export to.
    pub(super) enum Export {}

    impl Export {
        pub(super) fn start(endpoint: &str, _config: &TelemetryConfig) -> Result<Self> {
            Err(TelemetryError::Exporter {
                signal: "traces",
                endpoint: endpoint.to_owned(),
                source: "keel-telemetry was built without the `otlp` feature".into(),
            })
        }

        pub(super) fn add_traces(
            &mut self,
            _builder: TracerProviderBuilder,
        ) -> TracerProviderBuilder {
            match *self {}
        }

        pub(super) fn add_metrics(
            &mut self,
            _builder: MeterProviderBuilder,
        ) -> MeterProviderBuilder {
            match *self {}
        }

        pub(super) fn stop(self) {
            match self {}
        }
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry_sdk::trace::InMemorySpanExporter;

    use super::*;
    use crate::config::{TRACES_SAMPLER_ARG_ENV, TRACES_SAMPLER_ENV};

    /// How many of two root spans reach the exporter, with these variables.
    fn spans_recorded(vars: &[(&str, &str)], config: TelemetryConfig) -> usize {
        let exporter = InMemorySpanExporter::default();
        let sink = exporter.clone();
        let env = |k: &str| {
            vars.iter()
                .find(|(name, _)| *name == k)
                .map(|(_, v)| (*v).to_owned())
        };
        let telemetry = Telemetry::build_with_env(
            config
                .without_otlp()
                .log_writer(std::io::sink)
                .configure_tracer_provider(move |b| b.with_simple_exporter(sink)),
            &env,
        )
        .expect("telemetry builds");
        tracing::dispatcher::with_default(telemetry.dispatch(), || {
            tracing::info_span!("first").in_scope(|| {});
            tracing::info_span!("second").in_scope(|| {});
        });
        telemetry.guard().flush().unwrap();
        exporter.get_finished_spans().unwrap().len()
    }

    #[test]
    fn the_sampler_variables_reach_the_tracer_provider() {
        let config = || TelemetryConfig::new("orders");
        assert_eq!(spans_recorded(&[], config()), 2);
        assert_eq!(
            spans_recorded(&[(TRACES_SAMPLER_ENV, "always_off")], config()),
            0
        );
        let none = [
            (TRACES_SAMPLER_ENV, "parentbased_traceidratio"),
            (TRACES_SAMPLER_ARG_ENV, "0"),
        ];
        assert_eq!(spans_recorded(&none, config()), 0);
        let all = [
            (TRACES_SAMPLER_ENV, "traceidratio"),
            (TRACES_SAMPLER_ARG_ENV, "1"),
        ];
        assert_eq!(spans_recorded(&all, config()), 2);
        // A ratio set in code wins over the variables.
        assert_eq!(
            spans_recorded(
                &[(TRACES_SAMPLER_ENV, "always_off")],
                config().sample_ratio(1.0)
            ),
            2
        );
    }

    #[test]
    fn a_bad_sampler_variable_is_an_error_from_build() {
        let env = |k: &str| (k == TRACES_SAMPLER_ENV).then(|| "xray".to_owned());
        let err = Telemetry::build_with_env(TelemetryConfig::new("orders").without_otlp(), &env)
            .unwrap_err();
        assert!(
            matches!(err, TelemetryError::InvalidSampler { variable, .. } if variable == TRACES_SAMPLER_ENV),
            "{err}"
        );
        assert!(err.to_string().contains("xray"), "{err}");
    }
}
