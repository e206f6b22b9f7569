//! What the command pipeline costs per command, measured in one run against
//! its own baselines:
//!
//! * on PostgreSQL: a handler inserting one row in its transaction, called
//!   directly (a `TransactionalService` only), through the pipeline without
//!   the audit layer (tracing, authentication, authorization), and through
//!   the full pipeline with the PostgreSQL audit log (the record written in
//!   the command's transaction, a chainer sealing in the background); then
//!   throughput with 8 concurrent clients, without and with audit;
//! * in memory: a handler doing nothing, called directly, through the
//!   pipeline without audit, and with the in-memory audit log: the layers'
//!   own overhead, free of database noise.
//!
//! The variants run in rotating rounds (each round runs every variant once,
//! in a shifted order) so that load from other processes on the machine
//! falls on all of them alike; the report gives the median over rounds of
//! each variant's mean latency, and ratios against the baselines.
//!
//! Run: `cargo bench -p keel-security --bench pipeline` (needs PostgreSQL,
//! found by keel-testkit). `PIPELINE_BENCH_ROUNDS` and
//! `PIPELINE_BENCH_COMMANDS` override the defaults (15 rounds; 200 commands
//! per variant and round on PostgreSQL, 20 times as many in memory);
//! `PIPELINE_BENCH_CHAINER=off` seals only at the end, and
//! `PIPELINE_BENCH_SYNCHRONOUS_COMMIT=off` takes the WAL flush out of every
//! commit (both to tell where the time goes).

#![allow(clippy::print_stdout, reason = "a benchmark reports on stdout")]
#![allow(missing_docs, reason = "a benchmark binary")]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use jsonwebtoken::{EncodingKey, Header};
use keel_core::command::{
    Command, CommandEnvelope, CommandHandler, Handled, HandlerService, TransactionalHandler,
    TransactionalService,
};
use keel_core::uow::Transaction;
use keel_core::{AggregateRef, AuditLog, BearerToken, PipelineError};
use keel_database::{Database, DatabaseConfig, UnitOfWork};
use keel_security::pipeline::{
    AuditLayer, AuthenticationLayer, AuthorizationLayer, CommandPipeline, CommandService,
};
use keel_security::{
    Algorithm, Condition, InMemoryAuditLog, JwtConfig, JwtVerifier, KeySource, PgAuditLog,
    PolicyEngine, Secret, VerificationKey,
};
use keel_telemetry::{CommandTracingLayer, KeelMetrics};
use keel_testkit::TestDatabase;
use sqlx::Executor;
use tower::util::BoxCloneSyncService;
use tower::{Layer, ServiceExt};

const SECRET: &[u8] = b"a benchmark-only HMAC secret of 32+ bytes";

struct AddItem {
    id: String,
}

impl Command for AddItem {
    fn command_type(&self) -> &'static str {
        "item.add"
    }
    fn target(&self) -> Option<AggregateRef> {
        Some(AggregateRef::new("Item", &self.id))
    }
}

/// Inserts one row through the command's transaction.
struct Insert;

#[async_trait]
impl TransactionalHandler<AddItem> for Insert {
    type Output = ();
    async fn handle(
        &self,
        tx: &mut dyn Transaction,
        envelope: &CommandEnvelope<AddItem>,
    ) -> Result<Handled<()>, PipelineError> {
        let uow = UnitOfWork::join(tx)?;
        sqlx::query("INSERT INTO items (id, actor) VALUES ($1, $2)")
            .bind(&envelope.command.id)
            .bind(envelope.metadata.actor.as_deref())
            .execute(uow.conn())
            .await
            .map_err(keel_database::to_keel)?;
        Ok(Handled::new(()).with_events(["item.added"]))
    }
}

/// Inserts the same row, then a narrow row of its own: what one more
/// statement in the command's transaction costs, whatever it writes (the
/// audit layer's record is one more statement too).
struct InsertTwice;

#[async_trait]
impl TransactionalHandler<AddItem> for InsertTwice {
    type Output = ();
    async fn handle(
        &self,
        tx: &mut dyn Transaction,
        envelope: &CommandEnvelope<AddItem>,
    ) -> Result<Handled<()>, PipelineError> {
        let uow = UnitOfWork::join(tx)?;
        sqlx::query("INSERT INTO items (id, actor) VALUES ($1, $2)")
            .bind(&envelope.command.id)
            .bind(envelope.metadata.actor.as_deref())
            .execute(uow.conn())
            .await
            .map_err(keel_database::to_keel)?;
        sqlx::query("INSERT INTO extra (id) VALUES ($1)")
            .bind(&envelope.command.id)
            .execute(uow.conn())
            .await
            .map_err(keel_database::to_keel)?;
        Ok(Handled::new(()).with_events(["item.added"]))
    }
}

/// Does nothing: the layers' own cost.
struct Noop;

#[async_trait]
impl CommandHandler<AddItem> for Noop {
    type Output = ();
    async fn handle(&self, _: CommandEnvelope<AddItem>) -> Result<Handled<()>, PipelineError> {
        Ok(Handled::new(()).with_events(["item.added"]))
    }
}

fn verifier() -> JwtVerifier {
    JwtVerifier::new(
        JwtConfig::new("https://idp.bench", "items", [Algorithm::HS256]),
        KeySource::fixed([VerificationKey::hmac(None, &Secret::new(SECRET.to_vec())).unwrap()]),
    )
    .unwrap()
}

fn token() -> BearerToken {
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let claims = serde_json::json!({
        "iss": "https://idp.bench", "aud": "items", "sub": "bench-user",
        "tenant": "acme", "roles": ["clerk"], "exp": exp,
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

fn authn() -> AuthenticationLayer {
    AuthenticationLayer::new(verifier())
}

fn authz() -> AuthorizationLayer {
    AuthorizationLayer::new(Arc::new(
        PolicyEngine::new()
            .grant("clerk", ["item.*"])
            .require("item.*", Condition::SameTenant),
    ))
}

/// Security layers without audit, in the pipeline's order.
fn without_audit<S>(inner: S) -> CommandService<AddItem, ()>
where
    S: tower::Service<CommandEnvelope<AddItem>, Response = Handled<()>, Error = PipelineError>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    BoxCloneSyncService::new(
        CommandTracingLayer::new(KeelMetrics::global()).layer(authn().layer(authz().layer(inner))),
    )
}

fn with_audit<S>(log: Arc<dyn AuditLog>, inner: S) -> CommandService<AddItem, ()>
where
    S: tower::Service<CommandEnvelope<AddItem>, Response = Handled<()>, Error = PipelineError>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    CommandPipeline::new(AuditLayer::new(log), authn(), authz())
        .outer(CommandTracingLayer::new(KeelMetrics::global()))
        .service(inner)
}

struct Variant {
    name: &'static str,
    service: CommandService<AddItem, ()>,
    commands: usize,
    /// Mean latency per command, one sample per round.
    samples: Vec<Duration>,
    /// Every command's own latency, all rounds: its median shrugs off the
    /// few commands that wait for a slow WAL flush on a loaded machine,
    /// which drag a round's mean up.
    latencies: Vec<Duration>,
}

impl Variant {
    fn new(name: &'static str, service: CommandService<AddItem, ()>, commands: usize) -> Self {
        Self {
            name,
            service,
            commands,
            samples: Vec::new(),
            latencies: Vec::new(),
        }
    }

    async fn round(&mut self, token: &BearerToken, next_id: &mut u64) {
        let started = Instant::now();
        for _ in 0..self.commands {
            *next_id += 1;
            let envelope = CommandEnvelope::new(AddItem {
                id: format!("i-{next_id}"),
            })
            .with_bearer_token(token.clone());
            let one = Instant::now();
            self.service.clone().oneshot(envelope).await.unwrap();
            self.latencies.push(one.elapsed());
        }
        self.samples
            .push(started.elapsed() / u32::try_from(self.commands).unwrap());
    }

    fn median(&self) -> Duration {
        let mut sorted = self.samples.clone();
        sorted.sort();
        sorted[sorted.len() / 2]
    }

    /// The `q` quantile (0..=1) of the single commands' latencies.
    fn quantile(&self, q: f64) -> Duration {
        let mut sorted = self.latencies.clone();
        sorted.sort();
        let at = ((sorted.len() - 1) as f64 * q).round() as usize;
        sorted[at]
    }
}

/// Commands per second with `clients` tasks each sending `per_client`
/// commands at once through `service`.
async fn throughput(
    service: CommandService<AddItem, ()>,
    clients: usize,
    per_client: usize,
    round: usize,
) -> f64 {
    let token = token();
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let service = service.clone();
            let token = token.clone();
            tokio::spawn(async move {
                for i in 0..per_client {
                    let envelope = CommandEnvelope::new(AddItem {
                        id: format!("t{round}-{c}-{i}-{}", NEXT.fetch_add(1, Ordering::Relaxed)),
                    })
                    .with_bearer_token(token.clone());
                    service.clone().oneshot(envelope).await.unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    (clients * per_client) as f64 / started.elapsed().as_secs_f64()
}

/// Makes throughput ids unique across runs.
static NEXT: AtomicU64 = AtomicU64::new(0);

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn run(rounds: usize, variants: &mut [Variant]) {
    let token = token();
    let mut next_id = 0;
    // One warm-up round, not recorded.
    for v in variants.iter_mut() {
        v.round(&token, &mut next_id).await;
        v.samples.clear();
        v.latencies.clear();
    }
    for round in 0..rounds {
        let n = variants.len();
        for k in 0..n {
            variants[(round + k) % n].round(&token, &mut next_id).await;
        }
    }
}

fn report(title: &str, variants: &[Variant], pairs: &[(usize, usize, &str)]) {
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!("\n{title}");
    println!(
        "| variant | commands/round | median of round means µs | min µs | max µs \
         | per-command p50 µs | p90 µs |"
    );
    println!("|---|---|---|---|---|---|---|");
    for v in variants {
        let min = v.samples.iter().min().unwrap();
        let max = v.samples.iter().max().unwrap();
        println!(
            "| {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
            v.name,
            v.commands,
            us(v.median()),
            us(*min),
            us(*max),
            us(v.quantile(0.5)),
            us(v.quantile(0.9)),
        );
    }
    for (a, b, label) in pairs {
        let (a, b) = (&variants[*a], &variants[*b]);
        // Each round runs both variants close together in time: the ratio
        // within a round is less exposed to the machine's load swings.
        let mut per_round: Vec<f64> = a
            .samples
            .iter()
            .zip(&b.samples)
            .map(|(x, y)| x.as_secs_f64() / y.as_secs_f64())
            .collect();
        per_round.sort_by(f64::total_cmp);
        println!(
            "{label}: {} / {} = {:.2}x (+{:.1} µs/command) on round means; \
             per-command p50 {:.2}x (+{:.1} µs); per-round ratios min {:.2}x, \
             median {:.2}x, max {:.2}x",
            a.name,
            b.name,
            a.median().as_secs_f64() / b.median().as_secs_f64(),
            us(a.median()) - us(b.median()),
            a.quantile(0.5).as_secs_f64() / b.quantile(0.5).as_secs_f64(),
            us(a.quantile(0.5)) - us(b.quantile(0.5)),
            per_round[0],
            per_round[per_round.len() / 2],
            per_round[per_round.len() - 1],
        );
    }
}

fn main() {
    let rounds = env_usize("PIPELINE_BENCH_ROUNDS", 15);
    let commands = env_usize("PIPELINE_BENCH_COMMANDS", 200);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let test_db = TestDatabase::create(&keel_security::MIGRATIONS)
            .await
            .unwrap();
        // `PIPELINE_BENCH_SYNCHRONOUS_COMMIT=off` lets commits return before
        // their WAL flush: what is left is CPU and round trips, without the
        // flush stalls that dominate (and swing) every figure on a machine
        // whose disk is shared with other busy processes.
        let sync =
            std::env::var("PIPELINE_BENCH_SYNCHRONOUS_COMMIT").unwrap_or_else(|_| "on".to_owned());
        println!("synchronous_commit: {sync}");
        let db = Database::connect(
            DatabaseConfig::builder()
                .connect_options(
                    test_db
                        .connect_options()
                        .options([("synchronous_commit", sync.as_str())]),
                )
                .min_connections(2)
                .max_connections(12)
                .build()
                .unwrap(),
        )
        .await
        .unwrap();
        db.pool()
            .execute("CREATE TABLE items (id text PRIMARY KEY, actor text)")
            .await
            .unwrap();
        db.pool()
            .execute("CREATE TABLE extra (id text PRIMARY KEY)")
            .await
            .unwrap();
        let pg_log = PgAuditLog::new(db.pool().clone());
        // `PIPELINE_BENCH_CHAINER=off` leaves the records unsealed until the
        // end (then seals them all), to tell what sealing in the background
        // takes from the commands.
        let chainer_on = std::env::var("PIPELINE_BENCH_CHAINER").map_or(true, |v| v != "off");
        println!(
            "chainer during the measurements: {}",
            if chainer_on { "on" } else { "off" }
        );
        let chainer = chainer_on.then(|| pg_log.chainer());
        let pg_audit: Arc<dyn AuditLog> = Arc::new(pg_log.clone());
        let handler = || TransactionalService::new(db.clone(), Insert);

        // The direct call still needs a principal's actor for its insert to
        // match the others; it gets none, which costs nothing.
        let mut pg = [
            Variant::new(
                "direct (transactional service + handler)",
                BoxCloneSyncService::new(handler()),
                commands,
            ),
            Variant::new("pipeline without audit", without_audit(handler()), commands),
            Variant::new(
                "pipeline with PostgreSQL audit",
                with_audit(pg_audit.clone(), handler()),
                commands,
            ),
            Variant::new(
                "pipeline without audit, handler with a second INSERT",
                without_audit(TransactionalService::new(db.clone(), InsertTwice)),
                commands,
            ),
        ];
        run(rounds, &mut pg).await;
        report(
            "PostgreSQL: one INSERT per command in its own transaction",
            &pg,
            &[
                (1, 0, "tracing + authn + authz"),
                (2, 1, "audit layer (PostgreSQL)"),
                (3, 1, "one more plain INSERT in the transaction"),
                (2, 0, "whole pipeline"),
            ],
        );
        let clients = 8;
        let per_client = commands.max(8) * 2;
        for round in 0..3 {
            for (name, service) in [
                ("pipeline without audit", without_audit(handler())),
                (
                    "pipeline with PostgreSQL audit",
                    with_audit(pg_audit.clone(), handler()),
                ),
            ] {
                let rate = throughput(service, clients, per_client, round).await;
                println!(
                    "throughput, {clients} clients, round {round}: {name}: {rate:.0} commands/s"
                );
            }
        }
        match chainer {
            Some(chainer) => chainer.shutdown().await,
            None => {
                // Everything waited: one sealing pass over all of it tells
                // what sealing costs per record, wall time on an otherwise
                // idle client (the chainer's own work, client and server).
                let started = Instant::now();
                let sealed = pg_log.seal().await.unwrap();
                let took = started.elapsed();
                println!(
                    "sealing afterwards: {sealed} records in {:.1} ms ({:.1} µs per record)",
                    took.as_secs_f64() * 1e3,
                    took.as_secs_f64() * 1e6 / sealed.max(1) as f64
                );
            }
        }
        let audited: i64 = sqlx::query_scalar("SELECT count(*) FROM keel.audit_log")
            .fetch_one(db.pool())
            .await
            .unwrap();
        // A sealing transaction gives all its rows one recorded_at.
        let batches: i64 =
            sqlx::query_scalar("SELECT count(DISTINCT recorded_at) FROM keel.audit_log")
                .fetch_one(db.pool())
                .await
                .unwrap();
        let intact = pg_audit.verify().await.unwrap().is_intact();
        println!(
            "audit records written: {audited} in {batches} sealing transactions \
             ({:.1} per transaction), chain intact: {intact}",
            audited as f64 / batches.max(1) as f64
        );

        let memory_commands = commands * 20;
        let mut mem = [
            Variant::new(
                "direct (handler only)",
                BoxCloneSyncService::new(HandlerService::new(Noop)),
                memory_commands,
            ),
            Variant::new(
                "pipeline without audit",
                without_audit(HandlerService::new(Noop)),
                memory_commands,
            ),
            Variant::new(
                "pipeline with in-memory audit",
                with_audit(Arc::new(InMemoryAuditLog::new()), HandlerService::new(Noop)),
                memory_commands,
            ),
        ];
        run(rounds, &mut mem).await;
        report(
            "In memory: a handler that does nothing",
            &mem,
            &[
                (1, 0, "tracing + authn + authz"),
                (2, 1, "audit layer (in memory)"),
            ],
        );
    });
}
