//! One gRPC call to Ordering starts a trace that runs through the bus into
//! Shipping: both processes export their spans over OTLP/gRPC to a small
//! collector in the test, and the spans of both services for that call
//! share one trace id.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use keel_tests::services::{Error, ServiceStack, StackOptions};

use crate::common::{ONE_STACK_AT_A_TIME, place_and_pay, wait_all_shipped, wait_for};
use crate::otlp::{CollectedSpan, Collector};

const ORDERING: &str = "ordering-service";
const SHIPPING: &str = "shipping-service";

/// Whether `span` is Ordering's handling of the `PayOrder` call.
fn is_pay_order(span: &CollectedSpan) -> bool {
    span.service == ORDERING
        && (span.name.contains("PayOrder")
            || span.name == "order.pay"
            || span
                .attributes
                .values()
                .any(|v| v.contains("PayOrder") || v == "order.pay"))
}

fn describe(spans: &[CollectedSpan]) -> String {
    let mut traces: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    for s in spans {
        traces
            .entry(&s.trace_id)
            .or_default()
            .insert(format!("{}:{}", s.service, s.name));
    }
    format!("{traces:#?}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_trace_runs_from_the_grpc_call_through_the_bus_into_shipping() -> Result<(), Error> {
    let _one = ONE_STACK_AT_A_TIME.lock().await;
    let collector = Collector::start().await;
    let otel = |options: StackOptions| {
        options
            .ordering_env("OTEL_SDK_DISABLED", "false")
            .ordering_env("OTEL_EXPORTER_OTLP_ENDPOINT", &collector.endpoint())
            .shipping_env("OTEL_SDK_DISABLED", "false")
            .shipping_env("OTEL_EXPORTER_OTLP_ENDPOINT", &collector.endpoint())
    };
    let mut stack = ServiceStack::start(otel(StackOptions::default())).await?;
    let ordering = stack.ordering_client()?;
    let order_id = place_and_pay(&ordering, "customer-trace", "Barbara Liskov").await?;
    wait_all_shipped(
        &ordering,
        std::slice::from_ref(&order_id),
        Duration::from_secs(90),
    )
    .await?;
    // A graceful stop flushes what the batch exporters still hold.
    stack.terminate().await?;

    let spans = wait_for("spans of both services", Duration::from_secs(30), || {
        let spans = collector.spans();
        async move {
            let both = spans.iter().any(|s| s.service == ORDERING)
                && spans.iter().any(|s| s.service == SHIPPING);
            Ok(both.then_some(spans))
        }
    })
    .await?;

    // The PayOrder call's trace: exactly one, and Shipping's spans in it.
    let pay_traces: BTreeSet<&str> = spans
        .iter()
        .filter(|s| is_pay_order(s))
        .map(|s| s.trace_id.as_str())
        .collect();
    assert_eq!(
        pay_traces.len(),
        1,
        "one trace for one PayOrder call:\n{}",
        describe(&spans)
    );
    let trace = *pay_traces.first().ok_or("no PayOrder span")?;
    let in_trace: Vec<&CollectedSpan> = spans.iter().filter(|s| s.trace_id == trace).collect();
    let services: BTreeSet<&str> = in_trace.iter().map(|s| s.service.as_str()).collect();
    assert!(
        services.contains(ORDERING) && services.contains(SHIPPING),
        "the PayOrder trace {trace} reaches Shipping:\n{}",
        describe(&spans)
    );
    assert_ne!(trace, "0".repeat(32), "a valid trace id");
    Ok(())
}
