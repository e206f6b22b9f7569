//! What [`init`](crate::init) sets up: service identity, log format and
//! filters, and the OTLP endpoint.

use std::fmt;
use std::time::Duration;

use opentelemetry_sdk::metrics::MeterProviderBuilder;
use opentelemetry_sdk::trace::TracerProviderBuilder;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::fmt::writer::BoxMakeWriter;

/// The environment variable that chooses the log format (`json`, `gcp` or
/// `text`),
/// overriding the choice made from the environment name.
pub const LOG_FORMAT_ENV: &str = "KEEL_LOG_FORMAT";
/// The standard OpenTelemetry variable naming the OTLP collector endpoint.
pub const OTLP_ENDPOINT_ENV: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
/// The standard OpenTelemetry variable that turns the SDK off (`true`).
pub const SDK_DISABLED_ENV: &str = "OTEL_SDK_DISABLED";
/// The standard OpenTelemetry variable choosing the trace sampler
/// (`parentbased_traceidratio`, `always_off`, …); see
/// [`TelemetryConfig::resolved_sampling`].
pub const TRACES_SAMPLER_ENV: &str = "OTEL_TRACES_SAMPLER";
/// The standard OpenTelemetry variable carrying the sampler's argument: the
/// ratio, from 0 to 1, for the two ratio samplers.
pub const TRACES_SAMPLER_ARG_ENV: &str = "OTEL_TRACES_SAMPLER_ARG";
/// The log filter variable read by [`EnvFilter`](tracing_subscriber::EnvFilter).
pub const LOG_FILTER_ENV: &str = "RUST_LOG";

/// Environment names treated as development: logs are human-readable text.
/// Every other name (`prod`, `staging`, …) gets JSON lines.
pub const DEVELOPMENT_ENVIRONMENTS: &[&str] = &["dev", "development", "local", "test"];

/// How new traces are sampled, as resolved by
/// [`TelemetryConfig::resolved_sampling`].
#[derive(Clone, Copy, PartialEq, Debug)]
pub struct Sampling {
    /// The share of traces recorded, from 0.0 (none) to 1.0 (all); decided
    /// by trace id, so every service keeps or drops the same traces.
    pub ratio: f64,
    /// Whether a trace continued from an upstream service follows the
    /// upstream's decision (the ratio then applies to new traces only).
    pub parent_based: bool,
}

impl Default for Sampling {
    /// Every trace, and the upstream's decision for continued ones (the
    /// OpenTelemetry default, `parentbased_always_on`).
    fn default() -> Self {
        Self {
            ratio: 1.0,
            parent_based: true,
        }
    }
}

/// How log lines are written.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
#[non_exhaustive]
pub enum LogFormat {
    /// Text in development environments, JSON everywhere else; the
    /// `KEEL_LOG_FORMAT` variable (`json` or `text`) overrides.
    #[default]
    Auto,
    /// One JSON object per line, with the current span's fields.
    Json,
    /// Google Cloud Logging's structured JSON (`severity`, `message`,
    /// `logging.googleapis.com/trace`, `sourceLocation`, `httpRequest`); see
    /// [`gcplog`](crate::gcplog) and
    /// [`TelemetryConfig::gcp_project`].
    Gcp,
    /// Readable text, coloured when writing to a terminal.
    Text,
}

pub(crate) type TracerHook = Box<dyn FnOnce(TracerProviderBuilder) -> TracerProviderBuilder + Send>;
pub(crate) type MeterHook = Box<dyn FnOnce(MeterProviderBuilder) -> MeterProviderBuilder + Send>;

/// Configuration for [`init`](crate::init): who the service is and where its
/// telemetry goes.
///
/// Every setting has a production-ready default; the standard environment
/// variables are read when telemetry is built, and an explicit setting here
/// wins over them (except `RUST_LOG`, which operators use to override the
/// default filter).
///
/// ```
/// use std::time::Duration;
/// use keel_telemetry::{LogFormat, TelemetryConfig};
///
/// let config = TelemetryConfig::new("orders")
///     .environment("prod")
///     .version("1.4.2")
///     .default_log_filter("info,sqlx=warn")
///     .metrics_interval(Duration::from_secs(30));
/// assert_eq!(config.service_name(), "orders");
/// assert_eq!(config.resolved_log_format(|_| None), LogFormat::Json);
/// ```
pub struct TelemetryConfig {
    pub(crate) service_name: String,
    pub(crate) environment: String,
    pub(crate) version: Option<String>,
    pub(crate) log_format: LogFormat,
    pub(crate) default_log_filter: String,
    pub(crate) trace_filter: String,
    pub(crate) otlp_endpoint: Option<String>,
    pub(crate) otlp_disabled: bool,
    pub(crate) otlp_timeout: Duration,
    pub(crate) metrics_interval: Duration,
    /// `None` until set, so the environment may choose.
    pub(crate) sample_ratio: Option<f64>,
    pub(crate) gcp_project: Option<String>,
    pub(crate) writer: Option<BoxMakeWriter>,
    pub(crate) tracer_hook: Option<TracerHook>,
    pub(crate) meter_hook: Option<MeterHook>,
}

impl fmt::Debug for TelemetryConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TelemetryConfig")
            .field("service_name", &self.service_name)
            .field("environment", &self.environment)
            .field("version", &self.version)
            .field("log_format", &self.log_format)
            .field("default_log_filter", &self.default_log_filter)
            .field("trace_filter", &self.trace_filter)
            .field("otlp_endpoint", &self.otlp_endpoint)
            .field("otlp_disabled", &self.otlp_disabled)
            .field("otlp_timeout", &self.otlp_timeout)
            .field("metrics_interval", &self.metrics_interval)
            .field("sample_ratio", &self.sample_ratio)
            .field("gcp_project", &self.gcp_project)
            .field("custom_writer", &self.writer.is_some())
            .finish_non_exhaustive()
    }
}

impl TelemetryConfig {
    /// Configuration for the service called `service_name` (the OpenTelemetry
    /// `service.name`), in the `development` environment until
    /// [`environment`](Self::environment) says otherwise.
    pub fn new(service_name: impl Into<String>) -> Self {
        Self {
            service_name: service_name.into(),
            environment: "development".to_owned(),
            version: None,
            log_format: LogFormat::Auto,
            default_log_filter: "info".to_owned(),
            trace_filter: "info".to_owned(),
            otlp_endpoint: None,
            otlp_disabled: false,
            otlp_timeout: Duration::from_secs(10),
            metrics_interval: Duration::from_secs(60),
            sample_ratio: None,
            gcp_project: None,
            writer: None,
            tracer_hook: None,
            meter_hook: None,
        }
    }

    /// The deployment environment (`deployment.environment.name`), e.g.
    /// `prod`. Development names ([`DEVELOPMENT_ENVIRONMENTS`]) get text logs.
    #[must_use]
    pub fn environment(mut self, environment: impl Into<String>) -> Self {
        self.environment = environment.into();
        self
    }

    /// The service's version (`service.version`), e.g.
    /// `env!("CARGO_PKG_VERSION")`.
    #[must_use]
    pub fn version(mut self, version: impl Into<String>) -> Self {
        self.version = Some(version.into());
        self
    }

    /// Chooses the log format instead of deriving it from the environment.
    #[must_use]
    pub fn log_format(mut self, format: LogFormat) -> Self {
        self.log_format = format;
        self
    }

    /// The log filter used when `RUST_LOG` is not set (default `info`), in
    /// [`EnvFilter`](tracing_subscriber::EnvFilter) syntax.
    #[must_use]
    pub fn default_log_filter(mut self, directives: impl Into<String>) -> Self {
        self.default_log_filter = directives.into();
        self
    }

    /// Which spans are recorded as OpenTelemetry spans (default `info`).
    ///
    /// It is separate from the log filter on purpose: quieting logs with
    /// `RUST_LOG=warn` must not break trace propagation between services.
    #[must_use]
    pub fn trace_filter(mut self, directives: impl Into<String>) -> Self {
        self.trace_filter = directives.into();
        self
    }

    /// The OTLP/gRPC collector endpoint, e.g. `http://otel-collector:4317`.
    /// Without it, `OTEL_EXPORTER_OTLP_ENDPOINT` is used; with neither,
    /// nothing is exported and no exporter is started.
    #[must_use]
    pub fn otlp_endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.otlp_endpoint = Some(endpoint.into());
        self
    }

    /// Turns OTLP export off whatever the environment says (spans still get
    /// ids, so trace context keeps propagating through this service).
    #[must_use]
    pub fn without_otlp(mut self) -> Self {
        self.otlp_disabled = true;
        self
    }

    /// How long one OTLP export may take (default 10 s).
    #[must_use]
    pub fn otlp_timeout(mut self, timeout: Duration) -> Self {
        self.otlp_timeout = timeout;
        self
    }

    /// How often metrics are exported over OTLP (default 60 s).
    #[must_use]
    pub fn metrics_interval(mut self, interval: Duration) -> Self {
        self.metrics_interval = interval;
        self
    }

    /// The share of new traces to sample, from 0.0 to 1.0 (default 1.0,
    /// or what `OTEL_TRACES_SAMPLER` and `OTEL_TRACES_SAMPLER_ARG` say).
    /// Traces continued from an upstream service follow the upstream's
    /// sampling decision. Setting it here overrides those variables.
    #[must_use]
    pub fn sample_ratio(mut self, ratio: f64) -> Self {
        self.sample_ratio = Some(if ratio.is_nan() {
            1.0
        } else {
            ratio.clamp(0.0, 1.0)
        });
        self
    }

    /// The Google Cloud project the service's traces belong to. The `gcp`
    /// log format then links each line to its trace as
    /// `projects/<project>/traces/<trace-id>`; without it, the line carries
    /// the bare trace id.
    #[must_use]
    pub fn gcp_project(mut self, project: impl Into<String>) -> Self {
        self.gcp_project = Some(project.into());
        self
    }

    /// Where log lines go (default standard output). Useful to capture logs
    /// in tests or to write to a file appender.
    #[must_use]
    pub fn log_writer<W>(mut self, writer: W) -> Self
    where
        W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
    {
        self.writer = Some(BoxMakeWriter::new(writer));
        self
    }

    /// Adjusts the tracer provider before it is built: add a span exporter or
    /// processor, change the sampler or id generator.
    #[must_use]
    pub fn configure_tracer_provider<F>(mut self, f: F) -> Self
    where
        F: FnOnce(TracerProviderBuilder) -> TracerProviderBuilder + Send + 'static,
    {
        self.tracer_hook = Some(Box::new(f));
        self
    }

    /// Adjusts the meter provider before it is built: add a reader or views.
    #[must_use]
    pub fn configure_meter_provider<F>(mut self, f: F) -> Self
    where
        F: FnOnce(MeterProviderBuilder) -> MeterProviderBuilder + Send + 'static,
    {
        self.meter_hook = Some(Box::new(f));
        self
    }

    /// The service name.
    #[must_use]
    pub fn service_name(&self) -> &str {
        &self.service_name
    }

    /// The environment name.
    #[must_use]
    pub fn environment_name(&self) -> &str {
        &self.environment
    }

    /// The log format that will be used, given a way to read environment
    /// variables (pass `|k| std::env::var(k).ok()` for the process's own).
    pub fn resolved_log_format(&self, env: impl Fn(&str) -> Option<String>) -> LogFormat {
        match self.log_format {
            LogFormat::Auto => match env(LOG_FORMAT_ENV)
                .map(|v| v.trim().to_ascii_lowercase())
                .as_deref()
            {
                Some("json") => LogFormat::Json,
                Some("gcp") => LogFormat::Gcp,
                Some("text") => LogFormat::Text,
                _ if DEVELOPMENT_ENVIRONMENTS
                    .iter()
                    .any(|d| d.eq_ignore_ascii_case(self.environment.trim())) =>
                {
                    LogFormat::Text
                }
                _ => LogFormat::Json,
            },
            explicit => explicit,
        }
    }

    /// The sampling that will be used, given a way to read environment
    /// variables.
    ///
    /// [`sample_ratio`](Self::sample_ratio), when set, wins: that ratio,
    /// parent-based. Otherwise the standard variables decide, as the
    /// OpenTelemetry specification defines them: `OTEL_TRACES_SAMPLER` is
    /// one of `always_on`, `always_off`, `traceidratio`,
    /// `parentbased_always_on` (the default), `parentbased_always_off` or
    /// `parentbased_traceidratio`, and `OTEL_TRACES_SAMPLER_ARG` is the ratio
    /// of the two ratio samplers (1.0 when unset; the other samplers ignore
    /// it).
    ///
    /// ```
    /// use keel_telemetry::{Sampling, TelemetryConfig};
    ///
    /// let env = |k: &str| match k {
    ///     "OTEL_TRACES_SAMPLER" => Some("parentbased_traceidratio".to_owned()),
    ///     "OTEL_TRACES_SAMPLER_ARG" => Some("0.25".to_owned()),
    ///     _ => None,
    /// };
    /// let sampling = TelemetryConfig::new("orders").resolved_sampling(env).unwrap();
    /// assert_eq!(sampling, Sampling { ratio: 0.25, parent_based: true });
    /// ```
    ///
    /// # Errors
    ///
    /// [`TelemetryError::InvalidSampler`](crate::TelemetryError::InvalidSampler)
    /// for a sampler name Keel does not know (the remote samplers,
    /// `jaeger_remote` and `xray`, are not built in) or a ratio that is not
    /// a number from 0 to 1.
    pub fn resolved_sampling(
        &self,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Sampling, crate::TelemetryError> {
        if let Some(ratio) = self.sample_ratio {
            return Ok(Sampling {
                ratio,
                parent_based: true,
            });
        }
        let invalid = |variable: &'static str, value: &str, reason: &'static str| {
            crate::TelemetryError::InvalidSampler {
                variable,
                value: value.to_owned(),
                reason,
            }
        };
        let Some(sampler) = env(TRACES_SAMPLER_ENV)
            .map(|v| v.trim().to_ascii_lowercase())
            .filter(|v| !v.is_empty())
        else {
            return Ok(Sampling::default());
        };
        let ratio = || match env(TRACES_SAMPLER_ARG_ENV) {
            None => Ok(1.0),
            Some(arg) if arg.trim().is_empty() => Ok(1.0),
            Some(arg) => match arg.trim().parse::<f64>() {
                Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
                _ => Err(invalid(
                    TRACES_SAMPLER_ARG_ENV,
                    &arg,
                    "expected a ratio from 0 to 1",
                )),
            },
        };
        let (ratio, parent_based) = match sampler.as_str() {
            "always_on" => (1.0, false),
            "always_off" => (0.0, false),
            "traceidratio" => (ratio()?, false),
            "parentbased_always_on" => (1.0, true),
            "parentbased_always_off" => (0.0, true),
            "parentbased_traceidratio" => (ratio()?, true),
            _ => {
                return Err(invalid(
                    TRACES_SAMPLER_ENV,
                    &sampler,
                    "expected always_on, always_off, traceidratio, parentbased_always_on, \
                     parentbased_always_off or parentbased_traceidratio",
                ));
            }
        };
        Ok(Sampling {
            ratio,
            parent_based,
        })
    }

    /// The OTLP endpoint that will be used, if any, given a way to read
    /// environment variables. `None` means export is off.
    pub fn resolved_otlp_endpoint(&self, env: impl Fn(&str) -> Option<String>) -> Option<String> {
        if self.otlp_disabled
            || env(SDK_DISABLED_ENV).is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
        {
            return None;
        }
        self.otlp_endpoint
            .clone()
            .or_else(|| env(OTLP_ENDPOINT_ENV))
            .map(|e| e.trim().to_owned())
            .filter(|e| !e.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            pairs
                .iter()
                .find(|(name, _)| *name == k)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    #[test]
    fn log_format_follows_environment_then_override() {
        let dev = TelemetryConfig::new("svc");
        assert_eq!(dev.resolved_log_format(env(&[])), LogFormat::Text);
        let prod = TelemetryConfig::new("svc").environment("prod");
        assert_eq!(prod.resolved_log_format(env(&[])), LogFormat::Json);
        assert_eq!(
            prod.resolved_log_format(env(&[(LOG_FORMAT_ENV, "TEXT")])),
            LogFormat::Text
        );
        let local = TelemetryConfig::new("svc").environment("Local");
        assert_eq!(
            local.resolved_log_format(env(&[(LOG_FORMAT_ENV, "json")])),
            LogFormat::Json
        );
        let forced = TelemetryConfig::new("svc").log_format(LogFormat::Json);
        assert_eq!(
            forced.resolved_log_format(env(&[(LOG_FORMAT_ENV, "text")])),
            LogFormat::Json
        );
    }

    #[test]
    fn otlp_endpoint_resolution() {
        let none = TelemetryConfig::new("svc");
        assert_eq!(none.resolved_otlp_endpoint(env(&[])), None);
        assert_eq!(
            none.resolved_otlp_endpoint(env(&[(OTLP_ENDPOINT_ENV, "  ")])),
            None
        );
        assert_eq!(
            none.resolved_otlp_endpoint(env(&[(OTLP_ENDPOINT_ENV, "http://c:4317")]))
                .as_deref(),
            Some("http://c:4317")
        );
        let explicit = TelemetryConfig::new("svc").otlp_endpoint("http://mine:4317");
        assert_eq!(
            explicit
                .resolved_otlp_endpoint(env(&[(OTLP_ENDPOINT_ENV, "http://c:4317")]))
                .as_deref(),
            Some("http://mine:4317")
        );
        assert_eq!(
            explicit.resolved_otlp_endpoint(env(&[(SDK_DISABLED_ENV, "true")])),
            None
        );
        let off = TelemetryConfig::new("svc")
            .otlp_endpoint("http://mine:4317")
            .without_otlp();
        assert_eq!(off.resolved_otlp_endpoint(env(&[])), None);
    }

    #[test]
    fn sample_ratio_is_clamped() {
        let ratio = |r: f64| TelemetryConfig::new("s").sample_ratio(r).sample_ratio;
        assert_eq!(ratio(3.0), Some(1.0));
        assert_eq!(ratio(-1.0), Some(0.0));
        assert_eq!(ratio(f64::NAN), Some(1.0));
    }

    fn sampling(pairs: &[(&str, &str)]) -> Result<Sampling, crate::TelemetryError> {
        TelemetryConfig::new("s").resolved_sampling(env(pairs))
    }

    fn of(ratio: f64, parent_based: bool) -> Sampling {
        Sampling {
            ratio,
            parent_based,
        }
    }

    #[test]
    fn sampling_follows_the_standard_variables() {
        assert_eq!(sampling(&[]).unwrap(), Sampling::default());
        assert_eq!(sampling(&[]).unwrap(), of(1.0, true));
        assert_eq!(
            sampling(&[(TRACES_SAMPLER_ENV, " ")]).unwrap(),
            of(1.0, true)
        );
        let cases = [
            ("always_on", of(1.0, false)),
            ("ALWAYS_OFF", of(0.0, false)),
            ("parentbased_always_on", of(1.0, true)),
            ("parentbased_always_off", of(0.0, true)),
            ("traceidratio", of(0.1, false)),
            (" parentbased_traceidratio ", of(0.1, true)),
        ];
        for (sampler, expected) in cases {
            let vars = [
                (TRACES_SAMPLER_ENV, sampler),
                (TRACES_SAMPLER_ARG_ENV, "0.1"),
            ];
            assert_eq!(sampling(&vars).unwrap(), expected, "{sampler}");
        }
        // The ratio samplers default to 1; the argument alone changes nothing.
        assert_eq!(
            sampling(&[(TRACES_SAMPLER_ENV, "traceidratio")]).unwrap(),
            of(1.0, false)
        );
        assert_eq!(
            sampling(&[(TRACES_SAMPLER_ARG_ENV, "0.5")]).unwrap(),
            of(1.0, true)
        );
    }

    #[test]
    fn an_explicit_ratio_wins_over_the_variables() {
        let config = TelemetryConfig::new("s").sample_ratio(0.2);
        let vars = [
            (TRACES_SAMPLER_ENV, "always_off"),
            (TRACES_SAMPLER_ARG_ENV, "0.9"),
        ];
        assert_eq!(config.resolved_sampling(env(&vars)).unwrap(), of(0.2, true));
    }

    #[test]
    fn unknown_samplers_and_bad_ratios_are_errors() {
        for (vars, variable) in [
            (
                vec![(TRACES_SAMPLER_ENV, "jaeger_remote")],
                TRACES_SAMPLER_ENV,
            ),
            (
                vec![
                    (TRACES_SAMPLER_ENV, "traceidratio"),
                    (TRACES_SAMPLER_ARG_ENV, "1.5"),
                ],
                TRACES_SAMPLER_ARG_ENV,
            ),
            (
                vec![
                    (TRACES_SAMPLER_ENV, "parentbased_traceidratio"),
                    (TRACES_SAMPLER_ARG_ENV, "ten percent"),
                ],
                TRACES_SAMPLER_ARG_ENV,
            ),
        ] {
            match sampling(&vars) {
                Err(crate::TelemetryError::InvalidSampler { variable: v, .. }) => {
                    assert_eq!(v, variable, "{vars:?}");
                }
                other => panic!("{vars:?}: {other:?}"),
            }
        }
    }
}
