//! The `gcp` log format: every field Cloud Logging reads from a JSON line.

mod common;

use common::{strict_json, traced};
use keel_telemetry::{LogFormat, TelemetryConfig};
use opentelemetry::trace::TraceContextExt as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

fn gcp(project: Option<&str>) -> common::Traced {
    let mut config = TelemetryConfig::new("orders")
        .environment("prod")
        .log_format(LogFormat::Gcp);
    if let Some(project) = project {
        config = config.gcp_project(project);
    }
    traced(config)
}

fn lines(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .map(|l| strict_json(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

#[test]
fn a_line_carries_severity_message_trace_span_and_source_location() {
    let t = gcp(Some("orders-prod"));
    let (trace_id, span_id, line_no) = tracing::dispatcher::with_default(&t.dispatch, || {
        let span = tracing::info_span!("place_order", order = 42);
        let _entered = span.enter();
        let cx = span.context();
        let sc = cx.span().span_context().clone();
        let line_no = line!() + 1;
        tracing::warn!(attempt = 2, "stock is low");
        (sc.trace_id().to_string(), sc.span_id().to_string(), line_no)
    });
    let lines = lines(&t.logs.text());
    assert_eq!(lines.len(), 1, "{lines:?}");
    let line = &lines[0];
    assert_eq!(line["severity"], "WARNING");
    assert_eq!(line["message"], "stock is low");
    assert_eq!(
        line["logging.googleapis.com/trace"],
        format!("projects/orders-prod/traces/{trace_id}")
    );
    assert_eq!(line["logging.googleapis.com/spanId"], span_id);
    assert_eq!(line["logging.googleapis.com/trace_sampled"], true);
    let location = &line["logging.googleapis.com/sourceLocation"];
    assert!(
        location["file"].as_str().unwrap().ends_with("gcp_logs.rs"),
        "{location}"
    );
    assert_eq!(location["line"], line_no.to_string());
    assert_eq!(location["function"], "gcp_logs");
    let time = line["time"].as_str().unwrap();
    assert!(chrono::DateTime::parse_from_rfc3339(time).is_ok(), "{time}");
    // Fields stay in the payload; nothing claims a special key twice.
    assert_eq!(line["attempt"], 2);
    assert_eq!(line["span"]["name"], "place_order");
    assert_eq!(line["span"]["order"], 42);
    assert!(line.get("httpRequest").is_none(), "{line}");
    assert!(line.get("level").is_none(), "{line}");
}

#[test]
fn levels_become_severities_and_the_trace_is_bare_without_a_project() {
    let t = gcp(None);
    tracing::dispatcher::with_default(&t.dispatch, || {
        let span = tracing::info_span!("job");
        span.in_scope(|| {
            tracing::error!("e");
            tracing::info!("i");
        });
        // Outside any span: no trace keys at all.
        tracing::info!(severity = "fake", message_id = 7, "no span");
    });
    let lines = lines(&t.logs.text());
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert_eq!(lines[0]["severity"], "ERROR");
    assert_eq!(lines[1]["severity"], "INFO");
    let trace = lines[0]["logging.googleapis.com/trace"].as_str().unwrap();
    assert_eq!(trace.len(), 32, "{trace}");
    assert!(trace.chars().all(|c| c.is_ascii_hexdigit()), "{trace}");
    let root = &lines[2];
    assert!(root.get("logging.googleapis.com/trace").is_none(), "{root}");
    assert!(
        root.get("logging.googleapis.com/spanId").is_none(),
        "{root}"
    );
    // An event field named like a special key does not take it.
    assert_eq!(root["severity"], "INFO");
    assert_eq!(root["field.severity"], "fake");
    assert_eq!(root["message_id"], 7);
}

#[test]
fn a_line_inside_an_http_request_span_carries_http_request() {
    let t = gcp(Some("p"));
    tracing::dispatcher::with_default(&t.dispatch, || {
        // The fields keel-http's `trace_requests` records, plus the optional
        // semantic-convention ones the format also maps.
        let request = tracing::info_span!(
            "keel.http.request",
            otel.kind = "server",
            http.request.method = "POST",
            http.route = "/orders/{id}",
            url.path = "/orders/7",
            url.query = "dry_run=true",
            user_agent.original = "curl/8.5",
            client.address = "10.0.0.9",
            network.protocol.version = "1.1",
            http.response.status_code = tracing::field::Empty,
        );
        request.in_scope(|| {
            let handler = tracing::info_span!("handle_order");
            handler.in_scope(|| tracing::info!("accepted"));
        });
        request.record("http.response.status_code", 201);
        request.in_scope(|| tracing::info!("answered"));
    });
    let lines = lines(&t.logs.text());
    assert_eq!(lines.len(), 2, "{lines:?}");
    let http = &lines[0]["httpRequest"];
    assert_eq!(http["requestMethod"], "POST");
    assert_eq!(http["requestUrl"], "/orders/7?dry_run=true");
    assert_eq!(http["userAgent"], "curl/8.5");
    assert_eq!(http["remoteIp"], "10.0.0.9");
    assert_eq!(http["protocol"], "HTTP/1.1");
    assert!(http.get("status").is_none(), "not answered yet: {http}");
    assert_eq!(lines[1]["httpRequest"]["status"], 201);
}

#[test]
fn keel_log_format_gcp_chooses_the_format() {
    let config = TelemetryConfig::new("orders").environment("prod");
    let env = |k: &str| (k == keel_telemetry::LOG_FORMAT_ENV).then(|| "GCP".to_owned());
    assert_eq!(config.resolved_log_format(env), LogFormat::Gcp);
}
