//! The error type of `keel-telemetry`.

/// `Result` with [`TelemetryError`] as the default error type.
pub type Result<T, E = TelemetryError> = std::result::Result<T, E>;

/// Why telemetry could not be set up.
///
/// Telemetry never fails at run time: once [`init`](crate::init) returned,
/// export problems are reported through the OpenTelemetry SDK's own
/// diagnostics and never reach the code being observed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TelemetryError {
    /// A global `tracing` subscriber was already installed (by an earlier
    /// call to [`init`](crate::init) or by another library).
    #[error("a global tracing subscriber is already installed")]
    AlreadyInitialized(#[source] Box<dyn std::error::Error + Send + Sync>),

    /// `RUST_LOG` or the configured filter is not a valid filter directive.
    #[error("invalid log filter {filter:?}")]
    InvalidFilter {
        /// The directive string that was refused.
        filter: String,
        /// What was wrong with it.
        #[source]
        source: tracing_subscriber::filter::ParseError,
    },

    /// `OTEL_TRACES_SAMPLER` names a sampler Keel does not build, or
    /// `OTEL_TRACES_SAMPLER_ARG` is not a ratio from 0 to 1.
    #[error("invalid {variable} {value:?}: {reason}")]
    InvalidSampler {
        /// The variable that was refused.
        variable: &'static str,
        /// Its value.
        value: String,
        /// What was expected instead.
        reason: &'static str,
    },

    /// The OTLP exporter could not be built (for example, the endpoint is not
    /// a valid URI).
    #[error("cannot build the OTLP {signal} exporter for {endpoint}")]
    Exporter {
        /// `traces` or `metrics`.
        signal: &'static str,
        /// The endpoint that was configured.
        endpoint: String,
        /// The exporter's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    /// The background runtime that drives OTLP export could not be started.
    #[error("cannot start the OTLP export runtime")]
    Runtime(#[source] std::io::Error),

    /// Flushing or shutting down a provider failed while the guard was
    /// closed explicitly.
    #[error("telemetry shutdown failed: {0}")]
    Shutdown(String),
}
