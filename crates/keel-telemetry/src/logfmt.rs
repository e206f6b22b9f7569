//! JSON log lines: one object per line, carrying the trace and span ids of
//! the event's span (so a log line leads to its trace and back), and never
//! the same key twice.
//!
//! `tracing-subscriber`'s own JSON format writes the line's keys and the
//! event's fields side by side, and the span's name next to the span's
//! fields, so a span field called `name` (or an event field called `level`)
//! makes a line with a repeated key, which log pipelines resolve by
//! dropping one of the two values. Here the line's own keys always win,
//! and a field whose name is taken is written with a `field.` prefix.

use std::fmt;
use std::sync::{Arc, OnceLock};

use opentelemetry::trace::TraceContextExt as _;
use serde::Serialize;
use serde::ser::{SerializeMap as _, Serializer as _};
use serde_json::{Map, Value};
use tracing::dispatcher::WeakDispatch;
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormattedFields};
use tracing_subscriber::registry::{LookupSpan, SpanRef};

/// The keys a line writes itself; an event field never takes one of them.
const LINE_KEYS: &[&str] = &[
    "trace_id",
    "span_id",
    "timestamp",
    "level",
    "target",
    "span",
];
/// The keys the `span` object writes itself; a span field never takes one.
const SPAN_KEYS: &[&str] = &["name"];
/// Put before a field's name, as often as needed, when the name is taken.
const RENAMED_PREFIX: &str = "field.";
/// The target `tracing-log` gives the events it makes from `log` records;
/// their real target is in the `log.target` field.
pub(crate) const LOG_RECORD_TARGET: &str = "log";

/// The JSON event formatter of the `json` log format; span fields are
/// recorded by [`JsonFields`].
pub(crate) struct JsonLines {
    timer: SystemTime,
    /// The subscriber this formatter belongs to, set once it exists; it
    /// holds the OpenTelemetry context of each span.
    dispatch: Arc<OnceLock<WeakDispatch>>,
}

impl JsonLines {
    pub(crate) fn new(dispatch: Arc<OnceLock<WeakDispatch>>) -> Self {
        Self {
            timer: SystemTime,
            dispatch,
        }
    }
}

impl<S> FormatEvent<S, JsonFields> for JsonLines
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
        // The explicit parent when there is one, the current span for a
        // contextual event, none for an explicit root.
        let span = ctx.parent_span();
        let ids = span.as_ref().and_then(|span| {
            let dispatch = self.dispatch.get()?.upgrade()?;
            let cx = tracing_opentelemetry::get_otel_context(&span.id(), &dispatch)?;
            let otel_span = cx.span();
            let sc = otel_span.span_context();
            sc.is_valid()
                .then(|| (sc.trace_id().to_string(), sc.span_id().to_string()))
        });
        let mut timestamp = String::new();
        self.timer.format_time(&mut Writer::new(&mut timestamp))?;
        let target = match (meta.target(), &fields.log_target) {
            (LOG_RECORD_TARGET, Some(target)) => target.as_str(),
            (target, _) => target,
        };

        let mut line = Vec::with_capacity(256);
        let mut serializer = serde_json::Serializer::new(&mut line);
        let mut write = || -> Result<(), serde_json::Error> {
            let mut map = serializer.serialize_map(None)?;
            if let Some((trace_id, span_id)) = &ids {
                map.serialize_entry("trace_id", trace_id)?;
                map.serialize_entry("span_id", span_id)?;
            }
            map.serialize_entry("timestamp", &timestamp)?;
            map.serialize_entry("level", meta.level().as_str())?;
            let mut taken = Keys::new(LINE_KEYS);
            for (name, value) in &fields.values {
                map.serialize_entry(&taken.claim(name), value)?;
            }
            map.serialize_entry("target", target)?;
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

/// The names in use on one JSON object.
pub(crate) struct Keys(Vec<String>);

impl Keys {
    pub(crate) fn new(reserved: &[&str]) -> Self {
        Self(reserved.iter().map(|k| (*k).to_owned()).collect())
    }

    /// `name` if it is free, else `name` prefixed with [`RENAMED_PREFIX`]
    /// as many times as it takes to be free; marks the result as taken.
    pub(crate) fn claim(&mut self, name: &str) -> String {
        let mut key = name.to_owned();
        while self.0.contains(&key) {
            key.insert_str(0, RENAMED_PREFIX);
        }
        self.0.push(key.clone());
        key
    }
}

/// An event's fields in the order they were recorded, as JSON values.
#[derive(Default)]
pub(crate) struct EventFields {
    pub(crate) values: Vec<(&'static str, Value)>,
    /// `log.target`, set on events made from `log` records.
    pub(crate) log_target: Option<String>,
}

impl EventFields {
    fn push(&mut self, field: &Field, value: Value) {
        let name = field.name();
        // `r#type = ..` is a field called `type`.
        let name = name.strip_prefix("r#").unwrap_or(name);
        self.values.push((name, value));
    }
}

impl Visit for EventFields {
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.push(field, value.into());
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.push(field, value.into());
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.push(field, value.into());
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.push(field, value.into());
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "log.target" {
            self.log_target = Some(value.to_owned());
        }
        self.push(field, value.into());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.push(field, format!("{value:?}").into());
    }
}

/// The `span` member: the span's name, then its fields.
pub(crate) struct SpanObject {
    name: &'static str,
    fields: Result<Map<String, Value>, String>,
}

impl SpanObject {
    pub(crate) fn of<S>(span: &SpanRef<'_, S>) -> Self
    where
        S: for<'a> LookupSpan<'a>,
    {
        let extensions = span.extensions();
        let fields = match extensions.get::<FormattedFields<JsonFields>>() {
            // `JsonFields` writes nothing at all for a span without fields.
            Some(f) if f.fields.is_empty() => Ok(Map::new()),
            Some(f) => serde_json::from_str(&f.fields).map_err(|e| e.to_string()),
            None => Ok(Map::new()),
        };
        Self {
            name: span.metadata().name(),
            fields,
        }
    }
}

impl Serialize for SpanObject {
    fn serialize<Ser: serde::Serializer>(&self, serializer: Ser) -> Result<Ser::Ok, Ser::Error> {
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("name", self.name)?;
        let mut taken = Keys::new(SPAN_KEYS);
        match &self.fields {
            Ok(fields) => {
                for (name, value) in fields {
                    map.serialize_entry(&taken.claim(name), value)?;
                }
            }
            // Not expected (the fields were written by `JsonFields`); say
            // so rather than lose the line.
            Err(error) => map.serialize_entry(&taken.claim("field_error"), error)?,
        }
        map.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_free_name_is_kept_and_a_taken_one_is_prefixed_until_free() {
        let mut keys = Keys::new(&["level", "span"]);
        assert_eq!(keys.claim("order"), "order");
        assert_eq!(keys.claim("level"), "field.level");
        assert_eq!(keys.claim("field.level"), "field.field.level");
        assert_eq!(keys.claim("order"), "field.order");
        assert_eq!(keys.claim("span"), "field.span");
    }
}
