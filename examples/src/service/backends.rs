//! The backends a service binary runs on, chosen from its configuration,
//! with their health checks registered.

use std::sync::Arc;
use std::time::Duration;

use keel_cache::{Backend, MemoryCache, RedisCache};
use keel_config::{BusBackend, CacheBackend, KeelConfig};
use keel_database::{Database, Migrations};
use keel_eventbus::EventBus;
use keel_eventbus::{InMemoryBus, PubSubBus};
use keel_telemetry::HealthRegistry;
use keel_telemetry::health::CheckOptions;

/// The Pub/Sub project used on the emulator when none is configured.
pub const EMULATOR_PROJECT: &str = "keel-examples";

/// The backends of one service process.
pub struct Backends {
    /// PostgreSQL, migrated; `None` runs everything in memory.
    pub database: Option<Database>,
    /// The event bus port.
    pub bus: Arc<dyn EventBus>,
    /// The concrete Pub/Sub bus, to close on shutdown.
    pub pubsub: Option<Arc<PubSubBus>>,
    /// The cache backend.
    pub cache: Arc<dyn Backend>,
    /// Readiness and liveness of all of them.
    pub health: HealthRegistry,
    /// One line per backend, for the start-up log.
    pub described: Vec<String>,
}

impl std::fmt::Debug for Backends {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backends")
            .field("described", &self.described)
            .finish_non_exhaustive()
    }
}

impl Backends {
    /// Connects what `config` names and applies `migrations` to PostgreSQL.
    ///
    /// # Errors
    ///
    /// A backend that is configured but does not answer, or a failing
    /// migration: never a silent fallback to memory.
    pub async fn connect(config: &KeelConfig, migrations: &[&Migrations]) -> crate::Result<Self> {
        let health = HealthRegistry::builder().build();
        let mut described = Vec::new();

        let database = match &config.database.url {
            Some(_) => {
                let db = Database::connect(config.database.to_config()?).await?;
                db.migrate(migrations).await?;
                health.register(db.readiness_check());
                health.register(db.liveness_check());
                described.push("postgres".to_owned());
                Some(db)
            }
            None => {
                described.push("memory (no database.url)".to_owned());
                None
            }
        };

        let mut bus_settings = config.eventbus.clone();
        if bus_settings.emulator_host.is_some() {
            bus_settings.backend = BusBackend::Pubsub;
            if bus_settings.project.is_none() {
                bus_settings.project = Some(EMULATOR_PROJECT.to_owned());
            }
        }
        let (bus, pubsub): (Arc<dyn EventBus>, _) = match bus_settings.pubsub_config()? {
            Some(pubsub_config) => {
                if let Some(host) = &bus_settings.emulator_host {
                    // The client retries a refused connection for a long
                    // time; fail fast on a wrong address instead.
                    let reachable = tokio::time::timeout(
                        Duration::from_secs(3),
                        tokio::net::TcpStream::connect(host.as_str()),
                    )
                    .await;
                    if !matches!(reachable, Ok(Ok(_))) {
                        return Err(
                            format!("the Pub/Sub emulator at {host} does not answer").into()
                        );
                    }
                }
                let bus = Arc::new(PubSubBus::connect(pubsub_config).await?);
                health.register(bus.readiness_check());
                described.push(format!(
                    "pubsub ({}, prefix {:?})",
                    bus_settings
                        .emulator_host
                        .as_deref()
                        .map_or_else(|| "Google Cloud".to_owned(), |h| format!("emulator {h}")),
                    bus_settings.name_prefix.as_deref().unwrap_or("")
                ));
                (bus.clone() as Arc<dyn EventBus>, Some(bus))
            }
            None => {
                described.push("in-memory bus".to_owned());
                (Arc::new(InMemoryBus::new()) as Arc<dyn EventBus>, None)
            }
        };

        let mut cache_settings = config.cache.clone();
        if cache_settings.url.is_none()
            && let Some(url) = std::env::var("REDIS_URL")
                .ok()
                .filter(|u| !u.trim().is_empty())
        {
            cache_settings.url = Some(keel_security::Secret::new(url));
            cache_settings.backend = CacheBackend::Redis;
        }
        let cache: Arc<dyn Backend> = match cache_settings.redis_config()? {
            Some(redis_config) => {
                let redis = RedisCache::connect(redis_config)
                    .await
                    .map_err(|e| format!("Redis does not answer: {e}"))?;
                // A cache outage slows reads down; it does not stop them.
                health.register_with(redis.readiness_check(), CheckOptions::new().non_critical());
                described.push("redis cache".to_owned());
                Arc::new(redis)
            }
            None => {
                described.push("in-memory cache".to_owned());
                Arc::new(MemoryCache::new())
            }
        };

        Ok(Self {
            database,
            bus,
            pubsub,
            cache,
            health,
            described,
        })
    }

    /// Flushes pending publishes (Pub/Sub) and closes the pool.
    pub async fn close(self) {
        if let Some(bus) = self.pubsub {
            bus.close().await;
        }
        if let Some(db) = self.database {
            db.close().await;
        }
    }
}
