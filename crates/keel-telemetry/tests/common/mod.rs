//! Shared test plumbing: captured log output, in-memory span and metric
//! exporters wired through the real `Telemetry::build`.
#![allow(dead_code, unreachable_pub)] // each test binary uses a different subset

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex};

use keel_telemetry::{KeelMetrics, Telemetry, TelemetryConfig, TelemetryGuard};
use opentelemetry::metrics::MeterProvider as _;
use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData};
use opentelemetry_sdk::metrics::{InMemoryMetricExporter, PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SpanData};
use tracing::Dispatch;
use tracing_subscriber::fmt::MakeWriter;

/// A log sink that keeps everything written to it.
#[derive(Clone, Default)]
pub struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    pub fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

impl io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// Telemetry built by the real builder, with spans going to memory and
/// logs to a buffer; nothing installed globally.
pub struct Traced {
    pub dispatch: Dispatch,
    pub guard: TelemetryGuard,
    pub spans: InMemorySpanExporter,
    pub logs: Captured,
}

pub fn traced(config: TelemetryConfig) -> Traced {
    let spans = InMemorySpanExporter::default();
    let logs = Captured::default();
    let exporter = spans.clone();
    let (dispatch, guard) = Telemetry::build(
        config
            .without_otlp()
            .log_writer(logs.clone())
            .configure_tracer_provider(move |b| b.with_simple_exporter(exporter)),
    )
    .expect("telemetry builds")
    .into_parts();
    Traced {
        dispatch,
        guard,
        spans,
        logs,
    }
}

impl Traced {
    pub fn finished(&self) -> Vec<SpanData> {
        self.guard.flush().unwrap();
        self.spans.get_finished_spans().unwrap()
    }

    pub fn span(&self, name: &str) -> SpanData {
        let spans = self.finished();
        spans
            .iter()
            .find(|s| s.name == name)
            .cloned()
            .unwrap_or_else(|| {
                panic!(
                    "no span {name:?} among {:?}",
                    spans.iter().map(|s| s.name.clone()).collect::<Vec<_>>()
                )
            })
    }
}

pub fn attr(span: &SpanData, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.to_string())
}

/// One exported data point, flattened.
#[derive(Clone, Debug, PartialEq)]
pub struct Point {
    pub name: String,
    pub unit: String,
    pub attrs: BTreeMap<String, String>,
    /// Sum value, gauge value, or histogram count.
    pub value: f64,
    /// Histogram sum (0 otherwise).
    pub sum: f64,
    /// Histogram bucket bounds (empty otherwise).
    pub bounds: Vec<f64>,
}

/// KeelMetrics on a meter provider whose only reader exports to memory.
pub struct MetricsProbe {
    pub metrics: KeelMetrics,
    provider: SdkMeterProvider,
    exporter: InMemoryMetricExporter,
}

impl MetricsProbe {
    pub fn new() -> Self {
        let exporter = InMemoryMetricExporter::default();
        let provider = SdkMeterProvider::builder()
            .with_reader(PeriodicReader::builder(exporter.clone()).build())
            .build();
        let metrics = KeelMetrics::new(&provider.meter("keel"));
        Self {
            metrics,
            provider,
            exporter,
        }
    }

    /// The cumulative state of every instrument now.
    pub fn points(&self) -> Vec<Point> {
        self.provider.force_flush().unwrap();
        let all = self.exporter.get_finished_metrics().unwrap();
        let latest = all.last().expect("one collection");
        let mut out = Vec::new();
        for scope in latest.scope_metrics() {
            for metric in scope.metrics() {
                let base = |attrs: &mut dyn Iterator<Item = &opentelemetry::KeyValue>| {
                    attrs
                        .map(|kv| (kv.key.to_string(), kv.value.to_string()))
                        .collect::<BTreeMap<_, _>>()
                };
                let mut push =
                    |attrs: BTreeMap<String, String>, value: f64, sum: f64, bounds: Vec<f64>| {
                        out.push(Point {
                            name: metric.name().to_owned(),
                            unit: metric.unit().to_owned(),
                            attrs,
                            value,
                            sum,
                            bounds,
                        });
                    };
                match metric.data() {
                    AggregatedMetrics::U64(MetricData::Sum(s)) => {
                        for p in s.data_points() {
                            push(base(&mut p.attributes()), p.value() as f64, 0.0, Vec::new());
                        }
                    }
                    AggregatedMetrics::U64(MetricData::Gauge(g)) => {
                        for p in g.data_points() {
                            push(base(&mut p.attributes()), p.value() as f64, 0.0, Vec::new());
                        }
                    }
                    AggregatedMetrics::F64(MetricData::Gauge(g)) => {
                        for p in g.data_points() {
                            push(base(&mut p.attributes()), p.value(), 0.0, Vec::new());
                        }
                    }
                    AggregatedMetrics::F64(MetricData::Histogram(h)) => {
                        for p in h.data_points() {
                            push(
                                base(&mut p.attributes()),
                                p.count() as f64,
                                p.sum(),
                                p.bounds().collect(),
                            );
                        }
                    }
                    other => panic!("unexpected data for {}: {other:?}", metric.name()),
                }
            }
        }
        out
    }

    /// The one point named `name` whose attributes include `attrs`.
    pub fn point(&self, name: &str, attrs: &[(&str, &str)]) -> Point {
        let points = self.points();
        let matching: Vec<_> = points
            .iter()
            .filter(|p| p.name == name)
            .filter(|p| {
                attrs
                    .iter()
                    .all(|(k, v)| p.attrs.get(*k).map(String::as_str) == Some(*v))
            })
            .cloned()
            .collect();
        assert_eq!(
            matching.len(),
            1,
            "expected one {name} point with {attrs:?}, got {matching:?} among {points:#?}"
        );
        matching.into_iter().next().unwrap()
    }

    pub fn has(&self, name: &str) -> bool {
        self.points().iter().any(|p| p.name == name)
    }
}

/// Parses one JSON log line like [`serde_json::from_str`], but refuses an
/// object that repeats a key: most parsers keep one of the two values
/// silently, so a line with a repeated key loses data downstream.
pub fn strict_json(line: &str) -> Result<serde_json::Value, serde_json::Error> {
    use serde::Deserialize as _;
    let mut de = serde_json::Deserializer::from_str(line);
    let Strict(value) = Strict::deserialize(&mut de)?;
    de.end()?;
    Ok(value)
}

struct Strict(serde_json::Value);

impl<'de> serde::Deserialize<'de> for Strict {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> serde::de::Visitor<'de> for StrictVisitor {
    type Value = serde_json::Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value without repeated keys")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(serde_json::Value::Null)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut items = Vec::new();
        while let Some(Strict(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(items.into())
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut object = serde_json::Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if object.contains_key(&key) {
                return Err(serde::de::Error::custom(format!("repeated key {key:?}")));
            }
            let Strict(value) = map.next_value()?;
            object.insert(key, value);
        }
        Ok(object.into())
    }
}
