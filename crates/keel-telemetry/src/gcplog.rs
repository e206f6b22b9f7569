//! Google Cloud Logging's structured JSON: one object per line that Cloud
//! Logging (through the Ops Agent, GKE's or Cloud Run's log collection)
//! turns into a `LogEntry` without a parser.
//!
//! The special keys it reads from a JSON line:
//!
//! * `severity`: `DEBUG`, `INFO`, `WARNING`, `ERROR` (`TRACE` is `DEBUG`);
//! * `message`: the text shown in the Logs Explorer;
//! * `time`: RFC 3339 with nanoseconds;
//! * `logging.googleapis.com/trace`: `projects/<project>/traces/<trace-id>`,
//!   which links the line to its trace in Cloud Trace (just the trace id
//!   when no project is configured);
//! * `logging.googleapis.com/spanId` and `logging.googleapis.com/trace_sampled`;
//! * `logging.googleapis.com/sourceLocation`: `file`, `line`, `function`
//!   (the module path; Rust events do not know their function);
//! * `httpRequest`: `requestMethod`, `requestUrl`, `status`, `userAgent`,
//!   `remoteIp`, `protocol`, from the fields of the innermost enclosing
//!   HTTP server span (`keel-http`'s `keel.http.request` span, or any span
//!   with OpenTelemetry's `http.request.method` field).
//!
//! Everything else (the event's fields, `target`, the `span` object) stays
//! in the entry's `jsonPayload`, keys never repeated, as in the `json`
//! format.

use std::fmt;
use std::sync::{Arc, OnceLock};

use opentelemetry::trace::TraceContextExt as _;
use serde::ser::{SerializeMap as _, Serializer as _};
use serde_json::{Map, Value};
use tracing::dispatcher::WeakDispatch;
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormattedFields};
use tracing_subscriber::registry::{LookupSpan, SpanRef};

use crate::logfmt::{EventFields, Keys, LOG_RECORD_TARGET, SpanObject};

/// Cloud Logging's key for the trace resource name.
pub const TRACE_KEY: &str = "logging.googleapis.com/trace";
/// Cloud Logging's key for the span id.
pub const SPAN_ID_KEY: &str = "logging.googleapis.com/spanId";
/// Cloud Logging's key for the sampling decision.
pub const TRACE_SAMPLED_KEY: &str = "logging.googleapis.com/trace_sampled";
/// Cloud Logging's key for the source location.
pub const SOURCE_LOCATION_KEY: &str = "logging.googleapis.com/sourceLocation";

/// The keys a line writes itself; an event field never takes one of them.
const LINE_KEYS: &[&str] = &[
    "severity",
    "message",
    "time",
    TRACE_KEY,
    SPAN_ID_KEY,
    TRACE_SAMPLED_KEY,
    SOURCE_LOCATION_KEY,
    "httpRequest",
    "target",
    "span",
];

/// The event formatter of the `gcp` log format.
pub(crate) struct GcpLines {
    dispatch: Arc<OnceLock<WeakDispatch>>,
    project: Option<String>,
}

impl GcpLines {
    pub(crate) fn new(dispatch: Arc<OnceLock<WeakDispatch>>, project: Option<String>) -> Self {
        Self { dispatch, project }
    }
}

/// Cloud Logging's name for a level.
fn severity(level: &Level) -> &'static str {
    match *level {
        Level::ERROR => "ERROR",
        Level::WARN => "WARNING",
        Level::INFO => "INFO",
        _ => "DEBUG",
    }
}

impl<S> FormatEvent<S, JsonFields> for GcpLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, JsonFields>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let mut fields = EventFields::default();
        event.record(&mut fields);
        let span = ctx.parent_span();
        let trace = span.as_ref().and_then(|span| {
            let dispatch = self.dispatch.get()?.upgrade()?;
            let cx = tracing_opentelemetry::get_otel_context(&span.id(), &dispatch)?;
            let otel_span = cx.span();
            let sc = otel_span.span_context();
            sc.is_valid().then(|| {
                (
                    sc.trace_id().to_string(),
                    sc.span_id().to_string(),
                    sc.is_sampled(),
                )
            })
        });
        let http = span.as_ref().and_then(http_request);
        let time = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true);
        let target = match (meta.target(), &fields.log_target) {
            (LOG_RECORD_TARGET, Some(target)) => target.clone(),
            (target, _) => target.to_owned(),
        };
        let message = match fields.values.iter().position(|(n, _)| *n == "message") {
            Some(i) => match fields.values.remove(i).1 {
                Value::String(s) => s,
                other => other.to_string(),
            },
            None => String::new(),
        };
        let mut location = Map::new();
        if let Some(file) = meta.file() {
            location.insert("file".into(), file.into());
        }
        if let Some(line) = meta.line() {
            // LogEntrySourceLocation.line is an int64, a string in JSON.
            location.insert("line".into(), line.to_string().into());
        }
        location.insert(
            "function".into(),
            meta.module_path().unwrap_or(meta.target()).into(),
        );

        let mut line = Vec::with_capacity(384);
        let mut serializer = serde_json::Serializer::new(&mut line);
        let mut write = || -> Result<(), serde_json::Error> {
            let mut map = serializer.serialize_map(None)?;
            map.serialize_entry("severity", severity(meta.level()))?;
            map.serialize_entry("message", &message)?;
            map.serialize_entry("time", &time)?;
            if let Some((trace_id, span_id, sampled)) = &trace {
                let trace = match &self.project {
                    Some(project) => format!("projects/{project}/traces/{trace_id}"),
                    None => trace_id.clone(),
                };
                map.serialize_entry(TRACE_KEY, &trace)?;
                map.serialize_entry(SPAN_ID_KEY, span_id)?;
                map.serialize_entry(TRACE_SAMPLED_KEY, sampled)?;
            }
            map.serialize_entry(SOURCE_LOCATION_KEY, &location)?;
            if let Some(http) = &http {
                map.serialize_entry("httpRequest", http)?;
            }
            map.serialize_entry("target", &target)?;
            let mut taken = Keys::new(LINE_KEYS);
            for (name, value) in &fields.values {
                map.serialize_entry(&taken.claim(name), value)?;
            }
            if let Some(span) = &span {
                map.serialize_entry("span", &SpanObject::of(span))?;
            }
            map.end()
        };
        write().map_err(|_| fmt::Error)?;
        writer.write_str(std::str::from_utf8(&line).map_err(|_| fmt::Error)?)?;
        writeln!(writer)
    }
}

/// The recorded fields of one span, as JSON.
fn span_fields<S>(span: &SpanRef<'_, S>) -> Map<String, Value>
where
    S: for<'a> LookupSpan<'a>,
{
    let extensions = span.extensions();
    match extensions.get::<FormattedFields<JsonFields>>() {
        Some(f) if !f.fields.is_empty() => serde_json::from_str(&f.fields).unwrap_or_default(),
        _ => Map::new(),
    }
}

/// Cloud Logging's `HttpRequest` from the innermost enclosing span that
/// describes an HTTP request (OpenTelemetry's semantic-convention names).
fn http_request<S>(leaf: &SpanRef<'_, S>) -> Option<Map<String, Value>>
where
    S: for<'a> LookupSpan<'a>,
{
    for span in leaf.scope() {
        let fields = span_fields(&span);
        let Some(method) = fields.get("http.request.method") else {
            continue;
        };
        let mut http = Map::new();
        http.insert("requestMethod".into(), method.clone());
        let url = fields
            .get("url.full")
            .or_else(|| fields.get("url.path"))
            .and_then(Value::as_str);
        if let Some(url) = url {
            let url = match fields.get("url.query").and_then(Value::as_str) {
                Some(query) if !query.is_empty() => format!("{url}?{query}"),
                _ => url.to_owned(),
            };
            http.insert("requestUrl".into(), url.into());
        }
        if let Some(status) = fields
            .get("http.response.status_code")
            .and_then(|s| s.as_u64().or_else(|| s.as_str()?.parse().ok()))
        {
            http.insert("status".into(), status.into());
        }
        for (from, to) in [
            ("user_agent.original", "userAgent"),
            ("client.address", "remoteIp"),
        ] {
            if let Some(v) = fields.get(from) {
                http.insert(to.into(), v.clone());
            }
        }
        if let Some(version) = fields
            .get("network.protocol.version")
            .and_then(Value::as_str)
        {
            http.insert("protocol".into(), format!("HTTP/{version}").into());
        }
        return Some(http);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_map_onto_cloud_logging_severities() {
        assert_eq!(severity(&Level::TRACE), "DEBUG");
        assert_eq!(severity(&Level::DEBUG), "DEBUG");
        assert_eq!(severity(&Level::INFO), "INFO");
        assert_eq!(severity(&Level::WARN), "WARNING");
        assert_eq!(severity(&Level::ERROR), "ERROR");
    }
}
