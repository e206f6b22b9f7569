//! Reading Keel's metrics back in tests (feature `testing`).
//!
//! [`MetricsProbe`] is a meter provider whose only reader exports to the
//! SDK's in-memory exporter. Hand its [`KeelMetrics`] to an adapter (most
//! take one through a `metrics` builder method), or install it as the global
//! provider before building the adapter, then read back what was recorded:
//!
//! ```
//! use keel_telemetry::metrics::{CacheTier, names};
//! use keel_telemetry::testing::MetricsProbe;
//!
//! let probe = MetricsProbe::new();
//! probe.metrics().cache("products").hit(CacheTier::Local);
//! assert_eq!(
//!     probe.value(names::CACHE_HITS, &[(names::ATTR_CACHE, "products")]),
//!     1.0
//! );
//! assert_eq!(probe.value(names::CACHE_MISSES, &[]), 0.0);
//! ```

use std::collections::BTreeMap;
use std::fmt;

use opentelemetry::metrics::MeterProvider as _;
use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData};
use opentelemetry_sdk::metrics::{InMemoryMetricExporter, PeriodicReader, SdkMeterProvider};

use crate::metrics::{INSTRUMENTATION_SCOPE, KeelMetrics};

/// One exported data point, flattened.
#[derive(Clone, Debug, PartialEq)]
pub struct Point {
    /// The instrument's name.
    pub name: String,
    /// The instrument's unit.
    pub unit: String,
    /// The point's attributes, as strings.
    pub attrs: BTreeMap<String, String>,
    /// A counter's sum, a gauge's value, or a histogram's count.
    pub value: f64,
    /// A histogram's sum (zero for other instruments).
    pub sum: f64,
}

/// A meter provider that keeps everything recorded in memory; see the
/// [module docs](self).
pub struct MetricsProbe {
    metrics: KeelMetrics,
    provider: SdkMeterProvider,
    exporter: InMemoryMetricExporter,
}

impl fmt::Debug for MetricsProbe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MetricsProbe").finish_non_exhaustive()
    }
}

impl Default for MetricsProbe {
    fn default() -> Self {
        Self::new()
    }
}

impl MetricsProbe {
    /// A fresh provider and Keel's instruments on it.
    #[must_use]
    pub fn new() -> Self {
        let exporter = InMemoryMetricExporter::default();
        let provider = SdkMeterProvider::builder()
            .with_reader(PeriodicReader::builder(exporter.clone()).build())
            .build();
        let metrics = KeelMetrics::new(&provider.meter(INSTRUMENTATION_SCOPE));
        Self {
            metrics,
            provider,
            exporter,
        }
    }

    /// Keel's instruments on this probe's provider.
    #[must_use]
    pub fn metrics(&self) -> KeelMetrics {
        self.metrics.clone()
    }

    /// Makes this probe's provider the process's global meter provider, so
    /// [`KeelMetrics::global`] (what adapters use by default) records into
    /// it. Global for the whole test binary: give such a test a binary of
    /// its own.
    pub fn install_global(&self) {
        opentelemetry::global::set_meter_provider(self.provider.clone());
    }

    /// The cumulative state of every instrument now.
    ///
    /// # Panics
    ///
    /// If the provider cannot be flushed or the exporter read.
    #[must_use]
    pub fn points(&self) -> Vec<Point> {
        self.provider
            .force_flush()
            .expect("flush the meter provider");
        let all = self
            .exporter
            .get_finished_metrics()
            .expect("read the in-memory exporter");
        let Some(latest) = all.last() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for scope in latest.scope_metrics() {
            for metric in scope.metrics() {
                let mut push = |attrs: &mut dyn Iterator<Item = &opentelemetry::KeyValue>,
                                value: f64,
                                sum: f64| {
                    out.push(Point {
                        name: metric.name().to_owned(),
                        unit: metric.unit().to_owned(),
                        attrs: attrs
                            .map(|kv| (kv.key.to_string(), kv.value.to_string()))
                            .collect(),
                        value,
                        sum,
                    });
                };
                #[allow(clippy::cast_precision_loss)] // test counts stay far below 2^53
                match metric.data() {
                    AggregatedMetrics::U64(MetricData::Sum(s)) => {
                        for p in s.data_points() {
                            push(&mut p.attributes(), p.value() as f64, 0.0);
                        }
                    }
                    AggregatedMetrics::U64(MetricData::Gauge(g)) => {
                        for p in g.data_points() {
                            push(&mut p.attributes(), p.value() as f64, 0.0);
                        }
                    }
                    AggregatedMetrics::F64(MetricData::Gauge(g)) => {
                        for p in g.data_points() {
                            push(&mut p.attributes(), p.value(), 0.0);
                        }
                    }
                    AggregatedMetrics::F64(MetricData::Histogram(h)) => {
                        for p in h.data_points() {
                            push(&mut p.attributes(), p.count() as f64, p.sum());
                        }
                    }
                    // Keel records no other kinds.
                    _ => {}
                }
            }
        }
        out
    }

    /// The points named `name` whose attributes include every pair of
    /// `attrs`.
    #[must_use]
    pub fn matching(&self, name: &str, attrs: &[(&str, &str)]) -> Vec<Point> {
        self.points()
            .into_iter()
            .filter(|p| p.name == name)
            .filter(|p| {
                attrs
                    .iter()
                    .all(|(k, v)| p.attrs.get(*k).map(String::as_str) == Some(*v))
            })
            .collect()
    }

    /// The total [`value`](Point::value) of the matching points: a
    /// counter's sum or a histogram's count over those attributes; zero when
    /// nothing matched.
    #[must_use]
    pub fn value(&self, name: &str, attrs: &[(&str, &str)]) -> f64 {
        self.matching(name, attrs).iter().map(|p| p.value).sum()
    }
}
