use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{Check, Section};
use crate::duration;

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum LogFormatSetting {
    /// Text in development and test, JSON elsewhere (the default).
    #[default]
    Auto,
    /// One JSON object per line (`trace_id`, `span_id`, `level`, fields).
    Json,
    /// Google Cloud Logging's structured JSON (`severity`, `message`,
    /// `logging.googleapis.com/trace`, `sourceLocation`, `httpRequest`).
    Gcp,
    /// Readable text.
    Text,
}

/// `telemetry`: logs, traces and metrics (`keel-telemetry`).
///
/// `RUST_LOG`, `OTEL_SDK_DISABLED`, `OTEL_TRACES_SAMPLER(_ARG)` and
/// `OTEL_EXPORTER_OTLP_HEADERS` keep working as `keel-telemetry` reads them
/// when telemetry starts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct TelemetrySettings {
    /// `service.name` of traces and metrics (default: `service.name`).
    pub service_name: Option<String>,
    /// `auto` (default), `json`, `gcp` or `text`.
    pub log_format: LogFormatSetting,
    /// The log filter when `RUST_LOG` is unset (default `info`).
    pub log_filter: String,
    /// Which spans become OpenTelemetry spans (default `info`).
    pub trace_filter: String,
    /// The OTLP/gRPC collector, e.g. `http://otel-collector:4317`; unset
    /// means nothing is exported.
    pub otlp_endpoint: Option<String>,
    /// How long one export may take (default 10s).
    #[serde(with = "duration::required")]
    pub otlp_timeout: Duration,
    /// How often metrics are exported (default 60s).
    #[serde(with = "duration::required")]
    pub metrics_interval: Duration,
    /// The share of new traces sampled, 0 to 1 (default: all, or what
    /// `OTEL_TRACES_SAMPLER` says).
    pub sample_ratio: Option<f64>,
    /// The Google Cloud project that traces belong to, for the `gcp` log
    /// format's `logging.googleapis.com/trace` (`projects/<id>/traces/<trace>`).
    pub gcp_project: Option<String>,
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        Self {
            service_name: None,
            log_format: LogFormatSetting::Auto,
            log_filter: "info".to_owned(),
            trace_filter: "info".to_owned(),
            otlp_endpoint: None,
            otlp_timeout: Duration::from_secs(10),
            metrics_interval: Duration::from_secs(60),
            sample_ratio: None,
            gcp_project: None,
        }
    }
}

impl Section for TelemetrySettings {
    const KEY: &'static str = "telemetry";

    fn validate(&self, check: &mut Check<'_>) {
        if let Some(ratio) = self.sample_ratio
            && !(0.0..=1.0).contains(&ratio)
        {
            check.fail("sample_ratio", "must be between 0 and 1");
        }
        if let Some(endpoint) = &self.otlp_endpoint
            && !(endpoint.starts_with("http://") || endpoint.starts_with("https://"))
        {
            check.fail("otlp_endpoint", "expected an http:// or https:// URL");
        }
        for (key, d) in [
            ("otlp_timeout", self.otlp_timeout),
            ("metrics_interval", self.metrics_interval),
        ] {
            if d.is_zero() {
                check.fail(key, "must be greater than zero");
            }
        }
        #[cfg(feature = "telemetry")]
        for (key, filter) in [
            ("log_filter", &self.log_filter),
            ("trace_filter", &self.trace_filter),
        ] {
            if keel_telemetry::check_filter(filter).is_err() {
                check.fail(
                    key,
                    "not a valid filter (EnvFilter syntax, e.g. info,sqlx=warn)",
                );
            }
        }
    }
}

#[cfg(feature = "telemetry")]
impl TelemetrySettings {
    /// The configuration [`keel_telemetry::init`] takes, for the service
    /// `service` in `environment`.
    #[must_use]
    pub fn to_config(
        &self,
        service: &super::ServiceSettings,
        environment: crate::Environment,
    ) -> keel_telemetry::TelemetryConfig {
        use keel_telemetry::LogFormat;
        let name = self
            .service_name
            .clone()
            .unwrap_or_else(|| service.name.clone());
        let mut config = keel_telemetry::TelemetryConfig::new(name)
            .environment(environment.as_str())
            .log_format(match self.log_format {
                LogFormatSetting::Auto => LogFormat::Auto,
                LogFormatSetting::Json => LogFormat::Json,
                LogFormatSetting::Gcp => LogFormat::Gcp,
                LogFormatSetting::Text => LogFormat::Text,
            })
            .default_log_filter(self.log_filter.clone())
            .trace_filter(self.trace_filter.clone())
            .otlp_timeout(self.otlp_timeout)
            .metrics_interval(self.metrics_interval);
        if let Some(version) = &service.version {
            config = config.version(version.clone());
        }
        if let Some(endpoint) = &self.otlp_endpoint {
            config = config.otlp_endpoint(endpoint.clone());
        }
        if let Some(ratio) = self.sample_ratio {
            config = config.sample_ratio(ratio);
        }
        if let Some(project) = &self.gcp_project {
            config = config.gcp_project(project.clone());
        }
        config
    }
}
