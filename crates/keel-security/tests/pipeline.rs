//! The whole command pipeline end to end, on PostgreSQL: tracing, audit,
//! authentication, authorization and a `TransactionalService` around a
//! handler that appends events through the command's transaction. Every
//! outcome is checked in three places: what the caller got, what the
//! database holds, and what the audit log recorded. The record of an
//! accepted command is written in the command's own transaction.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use jsonwebtoken::{EncodingKey, Header};
use keel_core::command::{
    Command, CommandEnvelope, CommandHandler, Handled, HandlerService, TransactionalHandler,
    TransactionalService,
};
use keel_core::uow::{MemoryTransactions, Transaction};
use keel_core::{
    AggregateRef, AuditAppender, AuditEntry, AuditLog, AuditOutcome, AuditPage, AuditQuery,
    AuditRecord, BearerToken, ChainVerification, CommandError, DomainError, Error, ErrorKind,
    PipelineError, Principal,
};
use keel_database::{Database, DatabaseConfig, UnitOfWork};
use keel_security::audit::AuditHead;
use keel_security::pipeline::{
    AuditFailurePolicy, AuditLayer, AuthenticationLayer, AuthorizationLayer, Authorized,
    CommandPipeline, CommandService,
};
use keel_security::{
    Algorithm, Condition, InMemoryAuditLog, JwtConfig, JwtVerifier, KeySource, PgAuditLog,
    PolicyEngine, Resource, Secret, VerificationKey,
};
use keel_telemetry::CommandTracingLayer;
use keel_testkit::TestDatabase;
use serde_json::json;
use sqlx::Executor;
use tower::{Layer, Service as _, ServiceExt};

const SECRET: &[u8] = b"a test-only HMAC secret, 32 bytes or more";
const ISSUER: &str = "https://idp.test";
const AUDIENCE: &str = "carts-api";

fn verifier() -> JwtVerifier {
    JwtVerifier::new(
        JwtConfig::new(ISSUER, AUDIENCE, [Algorithm::HS256]),
        KeySource::fixed([VerificationKey::hmac(None, &Secret::new(SECRET.to_vec())).unwrap()]),
    )
    .unwrap()
}

fn token(subject: &str, roles: &[&str]) -> BearerToken {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = json!({
        "iss": ISSUER, "aud": AUDIENCE, "sub": subject, "exp": now + 600,
        "tenant": "acme", "roles": roles,
    });
    BearerToken::new(
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET),
        )
        .unwrap(),
    )
}

/// Rename a cart; the name decides how the handler answers.
struct RenameCart {
    cart: String,
    name: String,
}

impl Command for RenameCart {
    fn command_type(&self) -> &'static str {
        "cart.rename"
    }
    fn target(&self) -> Option<AggregateRef> {
        Some(AggregateRef::new("Cart", &self.cart))
    }
    fn audit_details(&self) -> serde_json::Value {
        json!({ "name": self.name })
    }
}

/// Appends a `cart.renamed` event row through the command's transaction,
/// then accepts, or (by name) rejects or fails, after writing.
#[derive(Default)]
struct Renamer {
    runs: AtomicUsize,
}

#[async_trait]
impl TransactionalHandler<RenameCart> for Renamer {
    type Output = String;

    async fn handle(
        &self,
        tx: &mut dyn Transaction,
        envelope: &CommandEnvelope<RenameCart>,
    ) -> Result<Handled<String>, PipelineError> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        // The authorization layer left its decision for the handler.
        let authorized = envelope
            .extensions
            .get::<Authorized>()
            .expect("authorized before the handler runs");
        assert_eq!(
            authorized.resource.id.as_deref(),
            Some(envelope.command.cart.as_str())
        );
        let metadata = envelope.event_metadata();
        let uow = UnitOfWork::join(tx)?;
        sqlx::query(
            "INSERT INTO cart_events (cart_id, event_type, actor, tenant, correlation_id) \
             VALUES ($1, 'cart.renamed', $2, $3, $4)",
        )
        .bind(&envelope.command.cart)
        .bind(metadata.actor.as_deref())
        .bind(metadata.tenant.as_ref().map(|t| t.as_str()))
        .bind(metadata.correlation_id.map(|c| c.to_string()))
        .execute(uow.conn())
        .await
        .map_err(keel_database::to_keel)?;
        match envelope.command.name.as_str() {
            "" => Err(CommandError::Rejected(DomainError::new(
                "cart.name_empty",
                "a cart needs a name",
            ))),
            "db-down" => Err(Error::unavailable(
                "pricing",
                "the pricing service refused the connection",
                std::io::Error::other("refused"),
            )
            .into()),
            name => Ok(Handled::new(name.to_owned()).with_events(["cart.renamed"])),
        }
    }
}

/// The PostgreSQL audit log, with a switch that makes appends fail.
struct FlakyAuditLog {
    inner: PgAuditLog,
    fail: AtomicBool,
}

fn audit_down() -> Error {
    Error::unavailable(
        "audit",
        "the audit store is down",
        std::io::Error::other("down"),
    )
}

struct FlakyAppender<'t> {
    inner: Box<dyn AuditAppender + 't>,
    fail: bool,
}

#[async_trait]
impl AuditAppender for FlakyAppender<'_> {
    async fn append(&self, entry: AuditEntry) -> keel_core::Result<()> {
        if self.fail {
            return Err(audit_down());
        }
        self.inner.append(entry).await
    }
}

#[async_trait]
impl AuditLog for FlakyAuditLog {
    async fn append(&self, entry: AuditEntry) -> keel_core::Result<AuditRecord> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(audit_down());
        }
        self.inner.append(entry).await
    }
    fn within<'t>(&'t self, tx: &'t mut dyn Transaction) -> Box<dyn AuditAppender + 't> {
        Box::new(FlakyAppender {
            inner: self.inner.within(tx),
            fail: self.fail.load(Ordering::SeqCst),
        })
    }
    async fn query(&self, query: &AuditQuery) -> keel_core::Result<AuditPage> {
        self.inner.query(query).await
    }
    async fn verify(&self) -> keel_core::Result<ChainVerification> {
        self.inner.verify().await
    }
}

struct Fixture {
    _test_db: TestDatabase,
    db: Database,
    audit: Arc<FlakyAuditLog>,
    handler: Arc<Renamer>,
    pipeline: CommandPipeline<CommandTracingLayer>,
    service: CommandService<RenameCart, String>,
}

fn policy() -> PolicyEngine {
    PolicyEngine::new()
        .grant("cart-editor", ["cart.*"])
        .require("cart.*", Condition::SameTenant)
}

async fn fixture_with(authn: AuthenticationLayer, on_failure: AuditFailurePolicy) -> Fixture {
    let test_db = TestDatabase::create(&keel_security::MIGRATIONS)
        .await
        .unwrap();
    let db = Database::connect(
        DatabaseConfig::builder()
            .connect_options(test_db.connect_options())
            .min_connections(0)
            .max_connections(4)
            .build()
            .unwrap(),
    )
    .await
    .unwrap();
    db.pool()
        .execute(
            "CREATE TABLE cart_events (seq bigserial PRIMARY KEY, cart_id text NOT NULL, \
             event_type text NOT NULL, actor text, tenant text, correlation_id text)",
        )
        .await
        .unwrap();
    let audit = Arc::new(FlakyAuditLog {
        inner: PgAuditLog::new(db.pool().clone()),
        fail: AtomicBool::new(false),
    });
    let handler = Arc::new(Renamer::default());
    let pipeline = CommandPipeline::new(
        AuditLayer::new(audit.clone()).on_failure(on_failure),
        authn,
        AuthorizationLayer::new(Arc::new(policy())),
    )
    .outer(CommandTracingLayer::without_metrics());
    let service = pipeline.service(TransactionalService::from_parts(
        Arc::new(db.clone()),
        Arc::clone(&handler),
    ));
    Fixture {
        _test_db: test_db,
        db,
        audit,
        handler,
        pipeline,
        service,
    }
}

async fn fixture() -> Fixture {
    fixture_with(
        AuthenticationLayer::new(verifier()),
        AuditFailurePolicy::Continue,
    )
    .await
}

impl Fixture {
    async fn send(
        &self,
        envelope: CommandEnvelope<RenameCart>,
    ) -> Result<Handled<String>, PipelineError> {
        self.service.clone().oneshot(envelope).await
    }

    async fn rows(&self) -> Vec<(String, Option<String>, Option<String>, Option<String>)> {
        sqlx::query_as(
            "SELECT cart_id, actor, tenant, correlation_id FROM cart_events ORDER BY seq",
        )
        .fetch_all(self.db.pool())
        .await
        .unwrap()
    }

    async fn audit_entries(&self) -> Vec<AuditEntry> {
        let page = self.audit.query(&AuditQuery::new()).await.unwrap();
        page.records.into_iter().map(|r| r.entry).collect()
    }

    async fn last_audit(&self) -> AuditEntry {
        self.audit_entries().await.pop().expect("an audit record")
    }

    fn runs(&self) -> usize {
        self.handler.runs.load(Ordering::SeqCst)
    }
}

fn rename(name: &str) -> CommandEnvelope<RenameCart> {
    CommandEnvelope::new(RenameCart {
        cart: "c-1".into(),
        name: name.into(),
    })
}

fn infrastructure_kind(err: &PipelineError) -> ErrorKind {
    err.as_infrastructure()
        .expect("an infrastructure error")
        .kind()
}

#[tokio::test]
async fn an_authorized_command_commits_and_is_audited_as_accepted() {
    let f = fixture().await;
    let envelope = rename("groceries").with_bearer_token(token("alice", &["cart-editor"]));
    let command_id = envelope.command_id;
    let correlation_id = envelope.correlation_id().unwrap();
    let received_at = envelope.received_at;

    let handled = f.send(envelope).await.unwrap();
    assert_eq!(handled.output, "groceries");

    // The handler's write committed, with actor and tenant from the token.
    assert_eq!(
        f.rows().await,
        [(
            "c-1".to_owned(),
            Some("alice".to_owned()),
            Some("acme".to_owned()),
            Some(correlation_id.to_string())
        )]
    );

    let entry = f.last_audit().await;
    assert_eq!(entry.outcome, AuditOutcome::Accepted);
    assert_eq!(entry.principal.as_deref(), Some("alice"));
    assert_eq!(entry.tenant.as_deref(), Some("acme"));
    assert_eq!(entry.command_type, "cart.rename");
    assert_eq!(entry.command_id, Some(command_id));
    assert_eq!(entry.event_types, ["cart.renamed"]);
    assert_eq!(entry.aggregate, Some(AggregateRef::new("Cart", "c-1")));
    assert_eq!(entry.correlation_id, Some(correlation_id));
    assert_eq!(
        entry.occurred_at.timestamp_micros(),
        received_at.timestamp_micros()
    );
    assert_eq!(entry.details, json!({ "name": "groceries" }));
    assert_eq!(f.audit_entries().await.len(), 1);
    assert!(f.audit.verify().await.unwrap().is_intact());
}

#[tokio::test]
async fn a_missing_or_bad_token_is_refused_audited_and_never_reaches_the_handler() {
    let f = fixture().await;

    let err = f.send(rename("groceries")).await.unwrap_err();
    assert_eq!(infrastructure_kind(&err), ErrorKind::Unauthorized);
    let entry = f.last_audit().await;
    assert_eq!(
        entry.outcome,
        AuditOutcome::Rejected {
            code: "keel.unauthorized".into(),
            reason: "no bearer token".into()
        }
    );
    assert_eq!(entry.principal, None);
    assert_eq!(entry.command_type, "cart.rename");
    assert_eq!(entry.aggregate, Some(AggregateRef::new("Cart", "c-1")));

    // A token signed with another key.
    let forged = {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &json!({"iss": ISSUER, "aud": AUDIENCE, "sub": "mallory", "exp": now + 600, "roles": ["cart-editor"]}),
            &EncodingKey::from_secret(b"another secret of at least 32 bytes!!"),
        )
        .unwrap()
    };
    let err = f
        .send(rename("groceries").with_bearer_token(BearerToken::new(forged)))
        .await
        .unwrap_err();
    assert_eq!(infrastructure_kind(&err), ErrorKind::Unauthorized);
    let entry = f.last_audit().await;
    assert_eq!(entry.outcome.as_str(), "rejected");
    assert_eq!(
        entry.principal, None,
        "an unverified subject is never recorded"
    );

    // A principal the caller set itself is not trusted by default.
    let err = f
        .send(rename("groceries").with_principal(Principal::new("alice").with_role("cart-editor")))
        .await
        .unwrap_err();
    assert_eq!(infrastructure_kind(&err), ErrorKind::Unauthorized);
    assert_eq!(f.last_audit().await.principal, None);

    assert_eq!(f.runs(), 0);
    assert!(f.rows().await.is_empty());
    assert_eq!(f.audit_entries().await.len(), 3);
}

#[tokio::test]
async fn a_caller_without_the_role_is_forbidden_audited_and_nothing_is_written() {
    let f = fixture().await;
    let err = f
        .send(rename("groceries").with_bearer_token(token("bob", &["viewer"])))
        .await
        .unwrap_err();
    let err = err.as_infrastructure().unwrap();
    assert_eq!(err.kind(), ErrorKind::Forbidden);
    assert!(
        err.to_string()
            .contains("no role of bob grants cart.rename"),
        "{err}"
    );

    let entry = f.last_audit().await;
    assert_eq!(
        entry.outcome,
        AuditOutcome::Rejected {
            code: "keel.forbidden".into(),
            reason: "no role of bob grants cart.rename".into()
        }
    );
    assert_eq!(entry.principal.as_deref(), Some("bob"));
    assert_eq!(entry.tenant.as_deref(), Some("acme"));
    assert!(entry.event_types.is_empty());
    assert_eq!(f.runs(), 0);
    assert!(f.rows().await.is_empty());
}

#[tokio::test]
async fn a_domain_rejection_rolls_back_and_is_audited_with_its_code() {
    let f = fixture().await;
    let err = f
        .send(rename("").with_bearer_token(token("alice", &["cart-editor"])))
        .await
        .unwrap_err();
    assert_eq!(err.as_rejection().unwrap().code(), "cart.name_empty");
    assert_eq!(f.runs(), 1, "the handler ran and wrote");
    assert!(f.rows().await.is_empty(), "its write was rolled back");

    let entry = f.last_audit().await;
    assert_eq!(
        entry.outcome,
        AuditOutcome::Rejected {
            code: "cart.name_empty".into(),
            reason: "a cart needs a name".into()
        }
    );
    assert_eq!(entry.principal.as_deref(), Some("alice"));
    assert!(entry.event_types.is_empty());
}

#[tokio::test]
async fn an_infrastructure_failure_rolls_back_and_is_audited_as_failed() {
    let f = fixture().await;
    let err = f
        .send(rename("db-down").with_bearer_token(token("alice", &["cart-editor"])))
        .await
        .unwrap_err();
    assert_eq!(infrastructure_kind(&err), ErrorKind::Unavailable);
    assert!(f.rows().await.is_empty());
    let entry = f.last_audit().await;
    assert_eq!(
        entry.outcome,
        AuditOutcome::Failed {
            code: "keel.unavailable".into()
        }
    );
    assert_eq!(entry.principal.as_deref(), Some("alice"));
}

#[tokio::test]
async fn an_audit_write_that_fails_in_the_transaction_rolls_the_command_back() {
    // The accepted command's record is written in its transaction: when
    // that fails, nothing of the command is stored and the caller hears
    // so, whatever the policy.
    for policy in [AuditFailurePolicy::Continue, AuditFailurePolicy::Fail] {
        let f = fixture_with(AuthenticationLayer::new(verifier()), policy).await;
        f.audit.fail.store(true, Ordering::SeqCst);
        let err = f
            .send(rename("groceries").with_bearer_token(token("alice", &["cart-editor"])))
            .await
            .unwrap_err();
        let err = err.as_infrastructure().unwrap();
        assert_eq!(err.kind(), ErrorKind::Unavailable);
        assert!(err.to_string().contains("audit"), "{err}");
        assert_eq!(f.runs(), 1);
        assert!(f.rows().await.is_empty(), "the command was rolled back");
        // The in-transaction write and the "failed" record after it.
        assert_eq!(f.pipeline.audit_layer().append_failures(), 2);
        f.audit.fail.store(false, Ordering::SeqCst);
        assert!(f.audit_entries().await.is_empty());
    }
}

#[tokio::test]
async fn a_failed_append_of_a_refusal_is_counted_and_follows_the_policy() {
    // Continue: the caller hears the refusal itself.
    let f = fixture().await;
    f.audit.fail.store(true, Ordering::SeqCst);
    let err = f.send(rename("groceries")).await.unwrap_err();
    assert_eq!(infrastructure_kind(&err), ErrorKind::Unauthorized);
    assert_eq!(f.pipeline.audit_layer().append_failures(), 1);

    // Fail: the caller hears that the audit store is down.
    let f = fixture_with(
        AuthenticationLayer::new(verifier()),
        AuditFailurePolicy::Fail,
    )
    .await;
    f.audit.fail.store(true, Ordering::SeqCst);
    let err = f.send(rename("groceries")).await.unwrap_err();
    let err = err.as_infrastructure().unwrap();
    assert_eq!(err.kind(), ErrorKind::Unavailable);
    assert!(err.to_string().contains("audit"), "{err}");
    assert_eq!(f.pipeline.audit_layer().append_failures(), 1);
    assert_eq!(f.runs(), 0);
}

#[tokio::test]
async fn an_accepted_record_is_written_in_the_commands_transaction() {
    // Written through within(tx) in the command's transaction, the record
    // is committed but not chained yet (a separate append would have
    // sealed it before returning); a query seals it and finds it.
    let f = fixture().await;
    f.send(rename("groceries").with_bearer_token(token("alice", &["cart-editor"])))
        .await
        .unwrap();
    assert_eq!(f.audit.inner.pending().await.unwrap(), 1);
    assert_eq!(f.audit_entries().await.len(), 1);
    assert_eq!(f.audit.inner.pending().await.unwrap(), 0);

    // A chainer seals the next one without anybody asking.
    let chainer = f.audit.inner.chainer();
    f.send(rename("tools").with_bearer_token(token("alice", &["cart-editor"])))
        .await
        .unwrap();
    while f.audit.inner.pending().await.unwrap() > 0 {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    chainer.shutdown().await;
    assert_eq!(
        f.audit.verify().await.unwrap(),
        ChainVerification::Intact { records: 2 }
    );
}

/// In memory, both ways: under a `TransactionalService` the record joins
/// the memory transaction; under a plain handler it is appended after.
#[tokio::test]
async fn in_memory_pipelines_record_accepted_commands_either_way() {
    struct Plain;
    #[async_trait]
    impl CommandHandler<RenameCart> for Plain {
        type Output = ();
        async fn handle(
            &self,
            _: CommandEnvelope<RenameCart>,
        ) -> Result<Handled<()>, PipelineError> {
            Ok(Handled::new(()).with_events(["cart.renamed"]))
        }
    }
    struct InTx;
    #[async_trait]
    impl TransactionalHandler<RenameCart> for InTx {
        type Output = ();
        async fn handle(
            &self,
            _: &mut dyn Transaction,
            envelope: &CommandEnvelope<RenameCart>,
        ) -> Result<Handled<()>, PipelineError> {
            if envelope.command.name.is_empty() {
                return Err(CommandError::Rejected(DomainError::new(
                    "cart.name_empty",
                    "a cart needs a name",
                )));
            }
            Ok(Handled::new(()).with_events(["cart.renamed"]))
        }
    }
    let log = Arc::new(InMemoryAuditLog::new());
    let pipeline = CommandPipeline::new(
        AuditLayer::new(log.clone()),
        AuthenticationLayer::new(verifier()),
        AuthorizationLayer::new(Arc::new(policy())),
    );
    let plain: CommandService<RenameCart, ()> = pipeline.service(HandlerService::new(Plain));
    let in_tx: CommandService<RenameCart, ()> =
        pipeline.service(TransactionalService::new(MemoryTransactions::new(), InTx));
    let alice = || token("alice", &["cart-editor"]);
    plain
        .oneshot(rename("a").with_bearer_token(alice()))
        .await
        .unwrap();
    in_tx
        .clone()
        .oneshot(rename("b").with_bearer_token(alice()))
        .await
        .unwrap();
    in_tx
        .oneshot(rename("").with_bearer_token(alice()))
        .await
        .unwrap_err();
    let page = log.query(&AuditQuery::new()).await.unwrap();
    let outcomes: Vec<_> = page
        .records
        .iter()
        .map(|r| (r.entry.outcome.as_str(), r.entry.event_types.len()))
        .collect();
    assert_eq!(
        outcomes,
        [("accepted", 1), ("accepted", 1), ("rejected", 0)]
    );
    assert!(log.verify().await.unwrap().is_intact());
}

#[tokio::test]
async fn a_command_resent_under_its_id_is_audited_as_another_attempt() {
    // A client resends a command under the id it chose (here: the answer
    // never reached it). The handler runs again, and the audit log keeps
    // both executions instead of refusing the second record.
    let f = fixture().await;
    let first = rename("groceries").with_bearer_token(token("alice", &["cart-editor"]));
    let command_id = first.command_id;
    let received_at = first.received_at;
    f.send(first).await.unwrap();
    let mut again = rename("groceries").with_bearer_token(token("alice", &["cart-editor"]));
    again.command_id = command_id;
    again.received_at = received_at + chrono::Duration::seconds(1);
    f.send(again).await.unwrap();
    assert_eq!(f.runs(), 2);
    assert_eq!(f.rows().await.len(), 2);

    let entries = f.audit_entries().await;
    assert_eq!(entries.len(), 2, "one record per execution");
    assert!(entries.iter().all(|e| e.command_id == Some(command_id)));
    assert!(entries[1].occurred_at > entries[0].occurred_at);
    assert_eq!(f.pipeline.audit_layer().append_failures(), 0);
    assert_eq!(
        f.audit.verify().await.unwrap(),
        ChainVerification::Intact { records: 2 }
    );
}

#[tokio::test]
async fn a_trusting_pipeline_accepts_a_preset_principal_and_still_checks_it() {
    let f = fixture_with(
        AuthenticationLayer::new(verifier()).trust_preset_principal(true),
        AuditFailurePolicy::Continue,
    )
    .await;
    let worker = Principal::new("svc-scheduler")
        .with_tenant("acme")
        .with_role("cart-editor");
    let handled = f
        .send(rename("nightly").with_principal(worker))
        .await
        .unwrap();
    assert_eq!(handled.output, "nightly");
    let entry = f.last_audit().await;
    assert_eq!(entry.principal.as_deref(), Some("svc-scheduler"));
    assert_eq!(entry.outcome, AuditOutcome::Accepted);
    assert_eq!(f.rows().await[0].1.as_deref(), Some("svc-scheduler"));

    // Authorization still applies to trusted callers.
    let err = f
        .send(rename("nightly").with_principal(Principal::new("svc-anon").with_role("viewer")))
        .await
        .unwrap_err();
    assert_eq!(infrastructure_kind(&err), ErrorKind::Forbidden);
    assert_eq!(f.last_audit().await.principal.as_deref(), Some("svc-anon"));
    assert_eq!(f.runs(), 1);
}

/// ABAC through a resource mapper: only the cart's owner may rename it.
#[tokio::test]
async fn a_resource_mapper_feeds_attribute_conditions() {
    struct Renamed;
    #[async_trait]
    impl CommandHandler<RenameCart> for Renamed {
        type Output = ();
        async fn handle(
            &self,
            _: CommandEnvelope<RenameCart>,
        ) -> Result<Handled<()>, PipelineError> {
            Ok(Handled::new(()))
        }
    }
    let policy = PolicyEngine::new()
        .grant("customer", ["cart.*"])
        .require("cart.*", Condition::SameTenant)
        .require("cart.*", Condition::Owner);
    // Carts named after their owner, for the test: "alice/c-1".
    let authz = AuthorizationLayer::new(Arc::new(policy)).resource_for(
        |envelope: &CommandEnvelope<RenameCart>| {
            let owner = envelope.command.cart.split('/').next().unwrap_or_default();
            Resource::new("Cart")
                .with_id(envelope.command.cart.as_str())
                .with_owner(owner)
                .with_tenant("acme")
        },
    );
    let mut service = authz.layer(HandlerService::new(Renamed));
    let customer = |subject: &str, tenant: &str| {
        Principal::new(subject)
            .with_tenant(tenant)
            .with_role("customer")
    };
    let send = |principal: Principal, cart: &str| {
        CommandEnvelope::new(RenameCart {
            cart: cart.into(),
            name: "x".into(),
        })
        .with_principal(principal)
    };

    assert!(
        tower::ServiceExt::ready(&mut service)
            .await
            .unwrap()
            .call(send(customer("alice", "acme"), "alice/c-1"))
            .await
            .is_ok()
    );
    for (principal, cart, reason) in [
        (
            customer("alice", "acme"),
            "bob/c-2",
            "condition \"owner\" failed for cart.rename",
        ),
        (
            customer("alice", "globex"),
            "alice/c-1",
            "condition \"same tenant\" failed for cart.rename",
        ),
    ] {
        let err = tower::ServiceExt::ready(&mut service)
            .await
            .unwrap()
            .call(send(principal, cart))
            .await
            .unwrap_err();
        let err = err.as_infrastructure().unwrap();
        assert_eq!(err.kind(), ErrorKind::Forbidden);
        assert_eq!(err.to_string(), format!("forbidden: {reason}"));
    }
}
