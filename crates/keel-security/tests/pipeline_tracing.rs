//! The command span through the whole security stack: the authentication
//! layer names the caller on it (`enduser.id`), refusals show as its
//! outcome, and `keel.command.duration` counts each outcome. A test binary
//! of its own: it records spans and metrics into in-memory exporters.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{EncodingKey, Header};
use keel_core::command::{Command, CommandEnvelope, CommandHandler, Handled, HandlerService};
use keel_core::{AggregateRef, BearerToken, PipelineError};
use keel_security::pipeline::{
    AuditLayer, AuthenticationLayer, AuthorizationLayer, CommandPipeline,
};
use keel_security::{
    Algorithm, InMemoryAuditLog, JwtConfig, JwtVerifier, KeySource, PolicyEngine, Secret,
    VerificationKey,
};
use keel_telemetry::metrics::names;
use keel_telemetry::testing::MetricsProbe;
use keel_telemetry::{CommandTracingLayer, Telemetry, TelemetryConfig};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SpanData};
use tower::ServiceExt;
use tracing::instrument::WithSubscriber as _;

const SECRET: &[u8] = b"a test-only HMAC secret, 32 bytes or more";

struct Close {
    cart: String,
}

impl Command for Close {
    fn command_type(&self) -> &'static str {
        "cart.close"
    }
    fn target(&self) -> Option<AggregateRef> {
        Some(AggregateRef::new("Cart", &self.cart))
    }
}

struct Closer;

#[async_trait::async_trait]
impl CommandHandler<Close> for Closer {
    type Output = ();
    async fn handle(&self, _: CommandEnvelope<Close>) -> Result<Handled<()>, PipelineError> {
        tracing::info_span!("close_cart").in_scope(|| {});
        Ok(Handled::new(()).with_events(["cart.closed"]))
    }
}

fn token(subject: &str, role: &str) -> BearerToken {
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    BearerToken::new(
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &serde_json::json!({"iss": "https://idp.test", "aud": "carts-api",
                                "sub": subject, "roles": [role], "exp": exp}),
            &EncodingKey::from_secret(SECRET),
        )
        .unwrap(),
    )
}

fn attr(span: &SpanData, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.to_string())
}

#[tokio::test]
async fn the_command_span_names_the_caller_and_the_outcome() {
    let spans = InMemorySpanExporter::default();
    let exporter = spans.clone();
    let (dispatch, guard) = Telemetry::build(
        TelemetryConfig::new("carts")
            .without_otlp()
            .log_writer(std::io::sink)
            .configure_tracer_provider(move |b| b.with_simple_exporter(exporter)),
    )
    .unwrap()
    .into_parts();
    let probe = MetricsProbe::new();

    let verifier = JwtVerifier::new(
        JwtConfig::new("https://idp.test", "carts-api", [Algorithm::HS256]),
        KeySource::fixed([VerificationKey::hmac(None, &Secret::new(SECRET.to_vec())).unwrap()]),
    )
    .unwrap();
    let service = CommandPipeline::new(
        AuditLayer::new(Arc::new(InMemoryAuditLog::new())),
        AuthenticationLayer::new(verifier),
        AuthorizationLayer::new(Arc::new(PolicyEngine::new().grant("owner", ["cart.*"]))),
    )
    .outer(CommandTracingLayer::new(probe.metrics()))
    .service(HandlerService::new(Closer));
    let close = || CommandEnvelope::new(Close { cart: "c-9".into() });

    async {
        service
            .clone()
            .oneshot(close().with_bearer_token(token("alice", "owner")))
            .await
            .unwrap();
        service.clone().oneshot(close()).await.unwrap_err();
        service
            .clone()
            .oneshot(close().with_bearer_token(token("bob", "viewer")))
            .await
            .unwrap_err();
    }
    .with_subscriber(dispatch)
    .await;

    guard.flush().unwrap();
    let finished = spans.get_finished_spans().unwrap();
    let commands: Vec<_> = finished
        .iter()
        .filter(|s| s.name == "command cart.close")
        .collect();
    let seen: Vec<_> = commands
        .iter()
        .map(|s| (attr(s, "keel.outcome"), attr(s, "enduser.id")))
        .collect();
    assert_eq!(
        seen,
        [
            (Some("accepted".to_owned()), Some("alice".to_owned())),
            (Some("unauthorized".to_owned()), None),
            (Some("forbidden".to_owned()), Some("bob".to_owned())),
        ]
    );
    assert_eq!(
        attr(commands[2], "error.type").as_deref(),
        Some("keel.forbidden")
    );
    // Only the allowed command reached the handler, inside the command span.
    let handler_spans: Vec<_> = finished.iter().filter(|s| s.name == "close_cart").collect();
    assert_eq!(handler_spans.len(), 1);
    assert_eq!(
        handler_spans[0].parent_span_id,
        commands[0].span_context.span_id()
    );

    for outcome in ["accepted", "unauthorized", "forbidden"] {
        assert_eq!(
            probe.value(
                names::COMMAND_DURATION,
                &[
                    (names::ATTR_COMMAND_TYPE, "cart.close"),
                    (names::ATTR_OUTCOME, outcome)
                ],
            ),
            1.0,
            "{outcome}"
        );
    }
}
