//! The shape of JSON log lines: one object per line, no key written twice,
//! whatever the spans and events call their fields.

mod common;

use common::{strict_json, traced};
use keel_telemetry::TelemetryConfig;

fn json_lines(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .map(|l| strict_json(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

#[test]
fn the_strict_parser_refuses_repeated_keys() {
    assert!(strict_json(r#"{"a":1,"b":{"a":2}}"#).is_ok());
    let err = strict_json(r#"{"span":{"name":"x","name":"y"}}"#).unwrap_err();
    assert!(err.to_string().contains("repeated key \"name\""), "{err}");
}

#[test]
fn a_span_field_called_name_does_not_repeat_the_span_name_key() {
    let t = traced(TelemetryConfig::new("orders").environment("prod"));
    tracing::dispatcher::with_default(&t.dispatch, || {
        let span = tracing::info_span!("load_customer", name = "Ada", id = 7);
        span.in_scope(|| tracing::info!("loaded"));
    });
    let lines = json_lines(&t.logs.text());
    assert_eq!(lines.len(), 1, "{lines:?}");
    let span = &lines[0]["span"];
    assert_eq!(span["name"], "load_customer", "{span}");
    assert_eq!(span["field.name"], "Ada", "{span}");
    assert_eq!(span["id"], 7, "{span}");
}

#[test]
fn event_fields_named_like_the_line_keys_are_renamed_not_repeated() {
    let t = traced(TelemetryConfig::new("orders").environment("prod"));
    tracing::dispatcher::with_default(&t.dispatch, || {
        let span = tracing::info_span!("job");
        span.in_scope(|| {
            tracing::warn!(
                level = 3,
                target = "eu-west",
                timestamp = 12,
                span = "s",
                trace_id = "t",
                span_id = "i",
                "field.level" = "taken",
                "collisions"
            );
        });
    });
    let lines = json_lines(&t.logs.text());
    assert_eq!(lines.len(), 1, "{lines:?}");
    let line = &lines[0];
    assert_eq!(line["level"], "WARN");
    assert_eq!(line["target"], "json_logs");
    assert_eq!(line["span"]["name"], "job");
    assert!(line["timestamp"].as_str().unwrap().ends_with('Z'), "{line}");
    assert_eq!(line["message"], "collisions");
    assert_eq!(line["field.level"], 3, "{line}");
    assert_eq!(line["field.target"], "eu-west");
    assert_eq!(line["field.timestamp"], 12);
    assert_eq!(line["field.span"], "s");
    assert_eq!(line["field.trace_id"], "t");
    assert_eq!(line["field.span_id"], "i");
    // Already taken by the renamed `level`: renamed again.
    assert_eq!(line["field.field.level"], "taken", "{line}");
    // The real ids are still the trace's.
    assert_eq!(line["trace_id"].as_str().unwrap().len(), 32, "{line}");
}

#[test]
fn values_keep_their_json_types() {
    let t = traced(TelemetryConfig::new("orders").environment("prod"));
    tracing::dispatcher::with_default(&t.dispatch, || {
        let error = std::io::Error::other("disk full");
        let err: &(dyn std::error::Error + 'static) = &error;
        tracing::info!(
            count = 3_u64,
            delta = -2_i64,
            ratio = 0.5_f64,
            ok = true,
            who = %"ada",
            list = ?vec![1, 2],
            r#type = "raw",
            error = err,
            "typed"
        );
    });
    let lines = json_lines(&t.logs.text());
    let line = &lines[0];
    assert_eq!(line["count"], 3);
    assert_eq!(line["delta"], -2);
    assert_eq!(line["ratio"], 0.5);
    assert_eq!(line["ok"], true);
    assert_eq!(line["who"], "ada");
    assert_eq!(line["list"], "[1, 2]");
    assert_eq!(line["type"], "raw", "{line}");
    assert_eq!(line["error"], "disk full");
    assert!(line.get("span").is_none(), "no span, no span key: {line}");
    assert!(line.get("trace_id").is_none());
}

#[test]
fn an_explicit_parent_is_the_span_of_the_line() {
    let t = traced(TelemetryConfig::new("orders").environment("prod"));
    tracing::dispatcher::with_default(&t.dispatch, || {
        let parent = tracing::info_span!("parent_work", step = 1);
        let current = tracing::info_span!("current_work");
        current.in_scope(|| {
            tracing::info!(parent: &parent, "for the parent");
            tracing::info!(parent: None, "for no span");
        });
    });
    let parent = t.span("parent_work");
    let lines = json_lines(&t.logs.text());
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(lines[0]["span"]["name"], "parent_work");
    assert_eq!(lines[0]["span"]["step"], 1);
    assert_eq!(
        lines[0]["span_id"],
        parent.span_context.span_id().to_string().as_str()
    );
    assert!(lines[1].get("span").is_none(), "{}", lines[1]);
    assert!(lines[1].get("span_id").is_none(), "{}", lines[1]);
}

#[test]
fn fields_recorded_later_join_the_span() {
    let t = traced(TelemetryConfig::new("orders").environment("prod"));
    tracing::dispatcher::with_default(&t.dispatch, || {
        let span = tracing::info_span!(
            "request",
            name = tracing::field::Empty,
            status = tracing::field::Empty
        );
        span.record("status", 200);
        span.record("name", "checkout");
        span.in_scope(|| tracing::info!("done"));
    });
    let lines = json_lines(&t.logs.text());
    let span = &lines[0]["span"];
    assert_eq!(span["name"], "request", "{span}");
    assert_eq!(span["field.name"], "checkout", "{span}");
    assert_eq!(span["status"], 200, "{span}");
}
