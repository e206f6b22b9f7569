//! Where the examples' adapters come from: in memory unless an environment
//! variable names a real service.
//!
//! This is the examples' composition root. A service built on Keel has one
//! like it: it reads configuration once at start-up, builds each adapter,
//! and hands the ports (`Arc<dyn EventStoreBackend>`, `Arc<dyn EventBus>`,
//! `Arc<dyn EntityRepository<_>>`, a cache backend) to the code that needs
//! them. Nothing below this module knows which implementation it got.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use keel_cache::{Backend, MemoryCache, RedisCache, RedisConfig};
use keel_core::uow::{MemoryTransactions, TransactionSource};
use keel_database::{Database, DatabaseConfig};
use keel_eventbus::{EventBus, InMemoryBus, Naming, PubSubBus, PubSubConfig};
use keel_eventstore::{EventStoreBackend, InMemoryEventStore, PostgresEventStore};

use crate::Result;

/// The variable naming the Redis server (`redis://host:port`), as the cache
/// guide and the test kit read it.
pub const REDIS_URL_VAR: &str = "REDIS_URL";

/// The Pub/Sub project the examples use on the emulator (any valid id works
/// there).
pub const PUBSUB_PROJECT: &str = "keel-examples";

/// The environment variables the examples read, with what each one switches
/// on. `--help` and `list` print this table.
pub const ENVIRONMENT: &[(&str, &str)] = &[
    (
        "DATABASE_URL",
        "PostgreSQL for the event store, repository, outbox and inbox (Keel's migrations are applied; use a scratch database)",
    ),
    (
        "KEEL_DB_*",
        "pool settings read by keel-database with DATABASE_URL (KEEL_DB_MAX_CONNECTIONS, KEEL_DB_PASSWORD, ...)",
    ),
    (
        REDIS_URL_VAR,
        "Redis for the cache (keys under keel-examples:<run>:)",
    ),
    (
        keel_eventbus::EMULATOR_HOST_VAR,
        "the Pub/Sub emulator (host:port) for the event bus",
    ),
    (
        "KEEL_EXAMPLE",
        "run one example by name, `all` (default) or `list`",
    ),
    (
        crate::contexts::ORDERS_VAR,
        "orders in the contexts run (default 6); thousands make a long run with a live progress line",
    ),
    (
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "export the run's traces and metrics over OTLP/gRPC (keel-telemetry)",
    ),
    (
        "RUST_LOG",
        "log filter (default info); KEEL_LOG_FORMAT=json for JSON lines",
    ),
];

/// The services the examples run on.
///
/// [`Services::in_memory`] needs nothing; [`Services::from_env`] picks real
/// services from the environment; the `with_*` methods set them in code
/// (the examples' tests do, with services found by `keel-testkit`).
#[derive(Clone)]
pub struct Services {
    database: Option<Database>,
    redis_url: Option<String>,
    pubsub_emulator: Option<String>,
    run: String,
}

impl fmt::Debug for Services {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The database URL may hold a password; show only what is used.
        f.debug_struct("Services")
            .field("postgres", &self.database.is_some())
            .field("redis", &self.redis_url.is_some())
            .field("pubsub_emulator", &self.pubsub_emulator)
            .field("run", &self.run)
            .finish()
    }
}

impl Services {
    /// Everything in memory: no server needed.
    #[must_use]
    pub fn in_memory() -> Self {
        Self {
            database: None,
            redis_url: None,
            pubsub_emulator: None,
            run: run_id(),
        }
    }

    /// Real services for the variables that are set (see [`ENVIRONMENT`]),
    /// in memory for the rest. Connects to PostgreSQL and applies Keel's
    /// migrations when `DATABASE_URL` is set.
    ///
    /// # Errors
    ///
    /// A variable that is set but unusable (a bad URL, a server that does
    /// not answer) is an error, never a silent fallback to memory.
    pub async fn from_env() -> Result<Self> {
        let mut services = Self::in_memory();
        if non_empty_var("DATABASE_URL").is_some() {
            let database = Database::connect(DatabaseConfig::from_env()?).await?;
            // Keel's tables for the crates this binary links, beside (and
            // never in the way of) a service's own migrations.
            database
                .migrate(&[&keel_eventstore::MIGRATIONS, &keel_outbox::MIGRATIONS])
                .await?;
            services = services.with_database(database);
        }
        if let Some(url) = non_empty_var(REDIS_URL_VAR) {
            services = services.with_redis(url);
        }
        if let Some(host) = non_empty_var(keel_eventbus::EMULATOR_HOST_VAR) {
            services = services.with_pubsub_emulator(host);
        }
        Ok(services)
    }

    /// Uses this PostgreSQL database (already migrated with
    /// `keel_eventstore::MIGRATIONS` and `keel_outbox::MIGRATIONS`).
    #[must_use]
    pub fn with_database(mut self, database: Database) -> Self {
        self.database = Some(database);
        self
    }

    /// Uses the Redis server at `url`.
    #[must_use]
    pub fn with_redis(mut self, url: impl Into<String>) -> Self {
        self.redis_url = Some(url.into());
        self
    }

    /// Uses the Pub/Sub emulator at `host` (`host:port`).
    #[must_use]
    pub fn with_pubsub_emulator(mut self, host: impl Into<String>) -> Self {
        self.pubsub_emulator = Some(host.into());
        self
    }

    /// One line per port saying which implementation the examples get.
    #[must_use]
    pub fn describe(&self) -> Vec<String> {
        let pick = |real: bool, yes: &str, no: &str| if real { yes } else { no }.to_owned();
        vec![
            format!(
                "event store: {}",
                pick(
                    self.database.is_some(),
                    "PostgresEventStore",
                    "InMemoryEventStore"
                )
            ),
            format!(
                "repository:  {}",
                pick(
                    self.database.is_some(),
                    "PgRepository",
                    "InMemoryRepository"
                )
            ),
            format!(
                "event bus:   {}",
                pick(
                    self.pubsub_emulator.is_some(),
                    "PubSubBus (emulator)",
                    "InMemoryBus"
                )
            ),
            format!(
                "outbox:      {}",
                pick(
                    self.database.is_some(),
                    "PgOutbox + PgInbox",
                    "InMemoryOutbox + InMemoryInbox"
                )
            ),
            format!(
                "cache:       {}",
                pick(self.redis_url.is_some(), "RedisCache", "MemoryCache")
            ),
        ]
    }

    /// Where units of work come from: the PostgreSQL database when one is
    /// configured, else in-memory transactions. Every port the examples
    /// build joins transactions of this source with `within(tx)`.
    #[must_use]
    pub fn transactions(&self) -> Arc<dyn TransactionSource> {
        match &self.database {
            Some(db) => Arc::new(db.clone()),
            None => Arc::new(MemoryTransactions::new()),
        }
    }

    /// The PostgreSQL database, when one is configured.
    #[must_use]
    pub fn database(&self) -> Option<&Database> {
        self.database.as_ref()
    }

    /// A short id unique to this run. Examples put it into stream ids, topic
    /// names and cache prefixes so that runs sharing a server never see
    /// each other's data.
    #[must_use]
    pub fn run(&self) -> &str {
        &self.run
    }

    /// `{run}.{example}`: a prefix for the ids one example creates, so that
    /// examples sharing a database (and a global log) in one run do not see
    /// each other's streams either.
    #[must_use]
    pub fn scope(&self, example: &str) -> String {
        format!("{}.{example}", self.run)
    }

    /// An event store: PostgreSQL when configured, else a fresh in-memory
    /// one (each example gets its own).
    pub(crate) fn event_store(&self) -> Arc<dyn EventStoreBackend> {
        match &self.database {
            Some(db) => Arc::new(PostgresEventStore::new(db.pool().clone())),
            None => Arc::new(InMemoryEventStore::new()),
        }
    }

    /// An event bus: the Pub/Sub emulator when configured, else a fresh
    /// in-memory bus. On Pub/Sub, topic names get the run id as prefix.
    pub(crate) async fn event_bus(&self) -> Result<Bus> {
        match &self.pubsub_emulator {
            Some(host) => {
                // The Pub/Sub client retries a refused connection for about
                // half a minute before it gives up; a composition root that
                // wants to fail fast on a wrong address checks it first.
                let reachable = tokio::time::timeout(
                    Duration::from_secs(3),
                    tokio::net::TcpStream::connect(host.as_str()),
                )
                .await;
                if !matches!(reachable, Ok(Ok(_))) {
                    return Err(format!(
                        "the Pub/Sub emulator at {host} ({}) does not answer",
                        keel_eventbus::EMULATOR_HOST_VAR
                    )
                    .into());
                }
                let config = PubSubConfig::emulator(PUBSUB_PROJECT, host)?
                    .with_naming(Naming::with_prefix(format!("keel-examples-{}", self.run))?)
                    // Answer dead-letter listings quickly: the examples list
                    // them right after they were sent.
                    .with_dead_letter_listing_waits(
                        Duration::from_secs(2),
                        Duration::from_millis(300),
                    );
                let bus = Arc::new(PubSubBus::connect(config).await?);
                Ok(Bus {
                    port: bus.clone(),
                    pubsub: Some(bus),
                })
            }
            None => Ok(Bus {
                port: Arc::new(InMemoryBus::new()),
                pubsub: None,
            }),
        }
    }

    /// A cache backend: Redis when configured (keys prefixed with the run
    /// id), else a fresh in-memory one.
    pub(crate) async fn cache_backend(&self) -> Result<Arc<dyn Backend>> {
        match &self.redis_url {
            Some(url) => {
                // The URL may hold a password: name the variable, not the URL.
                let redis = RedisCache::connect(
                    RedisConfig::new(url.clone())
                        .key_prefix(format!("keel-examples:{}:", self.run)),
                )
                .await
                .map_err(|e| format!("Redis ({REDIS_URL_VAR}) does not answer: {e}"))?;
                Ok(Arc::new(redis))
            }
            None => Ok(Arc::new(MemoryCache::new())),
        }
    }
}

/// An event bus port plus, on Pub/Sub, the concrete bus to close on exit.
#[derive(Debug)]
pub(crate) struct Bus {
    /// What the examples use.
    pub(crate) port: Arc<dyn EventBus>,
    pubsub: Option<Arc<PubSubBus>>,
}

impl Bus {
    /// Flushes pending publishes and lets go of held dead letters (Pub/Sub);
    /// nothing to do in memory.
    pub(crate) async fn close(self) {
        if let Some(bus) = self.pubsub {
            bus.close().await;
        }
    }
}

fn non_empty_var(name: &str) -> Option<String> {
    std::env::var(name)
        .ok()
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
}

/// Eight hex digits from a fresh UUID v7's random part.
fn run_id() -> String {
    let id = uuid::Uuid::now_v7().simple().to_string();
    id[id.len() - 8..].to_owned()
}
