//! Finding, or starting, the services tests need: PostgreSQL, Redis, the
//! Google Cloud Pub/Sub emulator and Meilisearch.
//!
//! # Where a service comes from
//!
//! [`Discovery::find`] (and the shortcuts [`postgres_url`], [`redis_url`] and
//! [`pubsub_emulator_host`]) tries these sources in order and takes the
//! first that works:
//!
//! 1. **The environment variable** ([`Service::env_var`]: `DATABASE_URL`,
//!    `REDIS_URL`, `PUBSUB_EMULATOR_HOST`, `MEILISEARCH_URL`), taken as is
//!    when set and not empty.
//! 2. **The default local service**, if it answers: `127.0.0.1:5432`,
//!    `127.0.0.1:6379`, `127.0.0.1:8085`, `127.0.0.1:7700`. PostgreSQL is probed with a real
//!    login as user `postgres` without a password (trust authentication);
//!    a server that asks for a password (a stock Ubuntu or Homebrew
//!    install) or refuses the role is passed over, and the kit prints why
//!    on standard error when it starts its own instead.
//! 3. **A container** via testcontainers, when the `testcontainers` feature
//!    is on and a Docker engine is reachable.
//! 4. **Local binaries** started on a free port: PostgreSQL from
//!    `/usr/lib/postgresql/*/bin` (`initdb`, then `postgres`, run as the
//!    `postgres` user when the tests run as root), `redis-server`, and
//!    the emulator from `/usr/lib/google-cloud-sdk` or next to `gcloud`,
//!    and Meilisearch from the binary `MEILISEARCH_BIN` names (or
//!    `meilisearch` on `PATH`; there is no system package for it: build it
//!    from Meilisearch's public source or download a release). A started
//!    Meilisearch uses the master key [`MEILISEARCH_TEST_KEY`].
//! 5. Otherwise an [`Error::ServiceUnavailable`] that lists what was tried
//!    and how to provide the service.
//!
//! # One started instance per test run
//!
//! `cargo test` runs every test binary as its own process, and nextest every
//! test. A service the test kit starts is therefore shared across processes:
//! its state lives in `<state dir>/<service>/` (state dir:
//! `KEEL_TESTKIT_DIR`, default `$TMPDIR/keel-testkit`, usually
//! `/tmp/keel-testkit`). The first process that needs the service takes a
//! lock file, starts the service detached (in its own session) under a small
//! watchdog, and records its port in a state file; later processes find the
//! state file and reuse the instance. Each process leaves a lease (a file
//! named after its pid). The watchdog stops the service and deletes its
//! files once no lease holder has been alive for the idle timeout
//! (`KEEL_TESTKIT_IDLE_SECS`, default 30 s), so nothing outlives the test run
//! for long. A lease records its process's start time as well, so a recycled
//! pid keeps nothing alive. A state file whose watchdog died (its orphaned
//! service is stopped) or whose service no longer answers is discarded and a
//! fresh instance started on a new port.
//!
//! The Pub/Sub emulator takes a few seconds to start, PostgreSQL about one
//! (a fresh `initdb` with `fsync=off`), Redis a few milliseconds.
//!
//! # Settings (environment variables)
//!
//! | variable | effect |
//! |---|---|
//! | `DATABASE_URL`, `REDIS_URL`, `PUBSUB_EMULATOR_HOST`, `MEILISEARCH_URL` | use this service |
//! | `MEILISEARCH_KEY` | the API key for `MEILISEARCH_URL` (see [`meilisearch`]) |
//! | `MEILISEARCH_BIN` | the Meilisearch binary to start |
//! | `KEEL_TESTKIT_IGNORE_DEFAULTS=1` | skip the default local ports |
//! | `KEEL_TESTKIT_NO_CONTAINERS=1` | never use testcontainers |
//! | `KEEL_TESTKIT_NO_START=1` | never start local binaries |
//! | `KEEL_TESTKIT_DIR` | state directory of started services |
//! | `KEEL_TESTKIT_IDLE_SECS` | idle time before a started service stops |
//! | `KEEL_TESTKIT_PG_BIN` | directory with `initdb`, `postgres`, `pg_ctl` |
//! | `KEEL_TESTKIT_REDIS_SERVER`, `KEEL_TESTKIT_PUBSUB_EMULATOR` | paths of those programs |
//!
//! Starting services when the tests run as root needs a `postgres` system
//! user (PostgreSQL refuses to run as root) and the `runuser`, `setsid` and
//! `flock` programs of util-linux.

#[cfg(feature = "testcontainers")]
mod containers;
mod local;
mod service;
mod shared;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use sqlx::postgres::PgConnectOptions;

use crate::error::{Error, Result};
use crate::pg::{self, Auth, PgBin};
use crate::sys;

pub use service::Service;

/// The master key of a Meilisearch the test kit starts (a test-only value;
/// never use it for a real server).
pub const MEILISEARCH_TEST_KEY: &str = "keel-testkit-meilisearch-master-key";

/// Where a discovered service came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Source {
    /// Its environment variable.
    Environment,
    /// The default local port.
    DefaultLocal,
    /// A container started through testcontainers.
    Container,
    /// A local binary the test kit started (shared by the test run).
    Started,
}

/// A service instance tests can use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    service: Service,
    connection: String,
    source: Source,
}

impl Endpoint {
    /// Which service this is.
    pub fn service(&self) -> Service {
        self.service
    }

    /// The connection string: a URL for PostgreSQL and Redis, `host:port`
    /// for the Pub/Sub emulator.
    pub fn connection_string(&self) -> &str {
        &self.connection
    }

    /// Where it came from.
    pub fn source(&self) -> Source {
        self.source
    }
}

/// Settings for finding services; [`Discovery::from_env`] reads them from
/// the environment, the builder methods override them (handy in tests of
/// the discovery itself).
///
/// ```no_run
/// # async fn example() -> keel_testkit::Result<()> {
/// use keel_testkit::services::{Discovery, Service, Source};
///
/// let redis = Discovery::from_env().find(Service::Redis).await?;
/// println!("{} from {:?}", redis.connection_string(), redis.source());
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct Discovery {
    overrides: BTreeMap<Service, String>,
    defaults: BTreeMap<Service, String>,
    ignore_defaults: bool,
    containers: bool,
    start_local: bool,
    state_dir: PathBuf,
    idle_timeout: Duration,
    programs: BTreeMap<Service, PathBuf>,
}

fn flag(value: Option<&String>) -> bool {
    matches!(
        value.map(|v| v.trim()),
        Some("1" | "true" | "yes" | "on" | "TRUE" | "YES")
    )
}

/// The directory under which started services and throwaway clusters keep
/// their files.
pub(crate) fn state_root() -> PathBuf {
    std::env::var_os("KEEL_TESTKIT_DIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("keel-testkit"))
}

impl Discovery {
    /// Settings from the process environment (see the [module
    /// docs](self) for the variables).
    pub fn from_env() -> Self {
        Self::from_vars(std::env::vars())
    }

    /// Settings from the given variables instead of the process
    /// environment; variables not given count as unset.
    pub fn from_vars<K, V>(vars: impl IntoIterator<Item = (K, V)>) -> Self
    where
        K: Into<String>,
        V: Into<String>,
    {
        let vars: HashMap<String, String> = vars
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .filter(|(_, v)| !v.trim().is_empty())
            .collect();
        let get = |k: &str| vars.get(k).cloned();
        let is_set = |k: &str| flag(vars.get(k));
        let overrides = Service::ALL
            .into_iter()
            .filter_map(|s| Some((s, get(s.env_var())?)))
            .collect();
        let programs = [
            (Service::Redis, "KEEL_TESTKIT_REDIS_SERVER"),
            (Service::PubSubEmulator, "KEEL_TESTKIT_PUBSUB_EMULATOR"),
            (Service::Meilisearch, "MEILISEARCH_BIN"),
        ]
        .into_iter()
        .filter_map(|(s, k)| Some((s, PathBuf::from(get(k)?))))
        .collect();
        Self {
            overrides,
            defaults: Service::ALL
                .into_iter()
                .map(|s| (s, s.default_address().to_owned()))
                .collect(),
            ignore_defaults: is_set("KEEL_TESTKIT_IGNORE_DEFAULTS"),
            containers: !is_set("KEEL_TESTKIT_NO_CONTAINERS"),
            start_local: !is_set("KEEL_TESTKIT_NO_START"),
            state_dir: get("KEEL_TESTKIT_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| std::env::temp_dir().join("keel-testkit")),
            idle_timeout: get("KEEL_TESTKIT_IDLE_SECS")
                .and_then(|s| s.trim().parse().ok())
                .map_or(Duration::from_secs(30), Duration::from_secs),
            programs,
        }
    }

    /// Skips (or not) the default local ports.
    #[must_use]
    pub fn ignore_defaults(mut self, ignore: bool) -> Self {
        self.ignore_defaults = ignore;
        self
    }

    /// Looks for `service`'s default instance at `address` instead of its
    /// usual port.
    #[must_use]
    pub fn default_address(mut self, service: Service, address: impl Into<String>) -> Self {
        self.defaults.insert(service, address.into());
        self
    }

    /// Allows (or forbids) testcontainers (only with the `testcontainers`
    /// feature).
    #[must_use]
    pub fn containers(mut self, allow: bool) -> Self {
        self.containers = allow;
        self
    }

    /// Allows (or forbids) starting local binaries.
    #[must_use]
    pub fn start_local(mut self, allow: bool) -> Self {
        self.start_local = allow;
        self
    }

    /// Where started services keep their shared state; processes that use
    /// the same directory share instances.
    #[must_use]
    pub fn state_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.state_dir = dir.into();
        self
    }

    /// How long a started service stays up once no test process uses it.
    #[must_use]
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.idle_timeout = timeout;
        self
    }

    /// Uses this program to start `service` (`redis-server`, the
    /// emulator's `cloud-pubsub-emulator` script, or `meilisearch`).
    #[must_use]
    pub fn program(mut self, service: Service, path: impl Into<PathBuf>) -> Self {
        self.programs.insert(service, path.into());
        self
    }

    /// The directory holding a started `service`'s state.
    pub fn service_dir(&self, service: Service) -> PathBuf {
        self.state_dir.join(service.slug())
    }

    /// Finds or starts `service`, in the order the [module docs](self)
    /// describe.
    pub async fn find(&self, service: Service) -> Result<Endpoint> {
        let this = self.clone();
        match tokio::task::spawn_blocking(move || this.find_blocking(service)).await {
            Ok(found) => found,
            Err(e) => Err(Error::StartFailed {
                service,
                reason: format!("the discovery task failed: {e}"),
                log: PathBuf::new(),
                log_tail: String::new(),
            }),
        }
    }

    /// The same as [`find`](Self::find), blocking the calling thread; for
    /// code outside an async runtime.
    pub fn find_blocking(&self, service: Service) -> Result<Endpoint> {
        if let Some(value) = self.overrides.get(&service) {
            check_override(service, value)?;
            return Ok(Endpoint {
                service,
                connection: value.clone(),
                source: Source::Environment,
            });
        }
        let mut tried = vec![format!("  - {}: not set", service.env_var())];

        let default = &self.defaults[&service];
        if self.ignore_defaults {
            tried.push(format!(
                "  - {default}: skipped (KEEL_TESTKIT_IGNORE_DEFAULTS)"
            ));
        } else {
            match service.probe(default) {
                Ok(()) => {
                    return Ok(Endpoint {
                        service,
                        connection: service.connection_string(default),
                        source: Source::DefaultLocal,
                    });
                }
                Err(why) => tried.push(format!("  - {default}: {why}")),
            }
        }

        // Started instances are shared by the whole process. One slot per
        // service and state directory: its lock keeps two threads from
        // starting the same service, without making a test that needs Redis
        // wait while another starts the emulator.
        type Slot = Arc<Mutex<Option<Endpoint>>>;
        static STARTED: Mutex<BTreeMap<(Service, PathBuf), Slot>> = Mutex::new(BTreeMap::new());
        let slot = Arc::clone(
            STARTED
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .entry((service, self.state_dir.clone()))
                .or_default(),
        );
        let mut started = slot.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(found) = started.as_ref() {
            if found.source == Source::Container || service.ready(address_of(found)) {
                return Ok(found.clone());
            }
            *started = None;
        }

        match self.try_container(service) {
            Ok(Some(found)) => {
                *started = Some(found.clone());
                return Ok(found);
            }
            Ok(None) => {}
            Err(reason) => tried.push(format!("  - testcontainers: {reason}")),
        }

        if self.start_local {
            match self.start(service) {
                Ok(found) => {
                    announce_start(service, &found, &tried);
                    *started = Some(found.clone());
                    return Ok(found);
                }
                Err(Error::ServiceUnavailable { tried: why, .. }) => tried.push(why),
                Err(other) => return Err(other),
            }
        } else {
            tried.push("  - local binaries: not started (KEEL_TESTKIT_NO_START)".to_owned());
        }

        Err(Error::ServiceUnavailable {
            service,
            tried: tried.join("\n"),
            hint: service.hint(),
        })
    }

    /// `Ok(None)` means "not applicable here, go on silently"; an error
    /// string says why containers could not be used.
    #[cfg(feature = "testcontainers")]
    fn try_container(&self, service: Service) -> std::result::Result<Option<Endpoint>, String> {
        if !self.containers {
            return Err("disabled (KEEL_TESTKIT_NO_CONTAINERS)".to_owned());
        }
        containers::start(service).map(|connection| {
            Some(Endpoint {
                service,
                connection,
                source: Source::Container,
            })
        })
    }

    #[cfg(not(feature = "testcontainers"))]
    fn try_container(&self, _service: Service) -> std::result::Result<Option<Endpoint>, String> {
        if !self.containers {
            return Err("disabled (KEEL_TESTKIT_NO_CONTAINERS)".to_owned());
        }
        Err("not compiled in (enable keel-testkit's `testcontainers` feature)".to_owned())
    }
}

/// Says once per process, on standard error (shown in the test output),
/// why the kit runs its own instance instead of the default one.
fn announce_start(service: Service, found: &Endpoint, tried: &[String]) {
    static SAID: Mutex<Vec<Service>> = Mutex::new(Vec::new());
    let mut said = SAID.lock().unwrap_or_else(PoisonError::into_inner);
    if said.contains(&service) {
        return;
    }
    said.push(service);
    eprintln!(
        "keel-testkit: using its own {service} at {} because:\n{}",
        address_of(found),
        tried.join("\n")
    );
}

fn existing(path: impl Into<PathBuf>) -> Option<PathBuf> {
    let path = path.into();
    path.is_file().then_some(path)
}

/// The `ip:port` part of an endpoint found by this module.
fn address_of(endpoint: &Endpoint) -> &str {
    let s = endpoint.connection.as_str();
    let s = s.split_once("://").map_or(s, |(_, rest)| rest);
    let s = s.rsplit_once('@').map_or(s, |(_, rest)| rest);
    s.split('/').next().unwrap_or(s)
}

fn check_override(service: Service, value: &str) -> Result<()> {
    let invalid = |reason: String| Error::InvalidUrl {
        variable: service.env_var(),
        value: redact(value),
        reason,
    };
    match service {
        Service::Postgres => PgConnectOptions::from_str(value)
            .map(drop)
            .map_err(|e| invalid(e.to_string())),
        Service::Redis => {
            if value.starts_with("redis://")
                || value.starts_with("rediss://")
                || value.starts_with("redis+unix://")
                || value.starts_with("unix://")
            {
                Ok(())
            } else {
                Err(invalid("expected redis://host:port".to_owned()))
            }
        }
        Service::Meilisearch => {
            if value.starts_with("http://") || value.starts_with("https://") {
                Ok(())
            } else {
                Err(invalid("expected http://host:port".to_owned()))
            }
        }
        Service::PubSubEmulator => match value.rsplit_once(':') {
            Some((host, port))
                if !host.is_empty() && !host.contains('/') && port.parse::<u16>().is_ok() =>
            {
                Ok(())
            }
            _ => Err(invalid(
                "expected host:port, without a scheme (e.g. 127.0.0.1:8085)".to_owned(),
            )),
        },
    }
}

/// Replaces the password of a URL (`scheme://user:password@host`) by `***`.
fn redact(value: &str) -> String {
    let Some((scheme, rest)) = value.split_once("://") else {
        return value.to_owned();
    };
    match rest.split_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
            None => value.to_owned(),
        },
        None => value.to_owned(),
    }
}

/// A PostgreSQL server URL (connect to any database; tests create their
/// own), found as [`Discovery::from_env`] would.
pub async fn postgres_url() -> Result<String> {
    Ok(Discovery::from_env()
        .find(Service::Postgres)
        .await?
        .connection)
}

/// A Redis URL, found as [`Discovery::from_env`] would. Give each test its
/// own key prefix: the server is shared.
pub async fn redis_url() -> Result<String> {
    Ok(Discovery::from_env().find(Service::Redis).await?.connection)
}

/// The Pub/Sub emulator's `host:port`, found as [`Discovery::from_env`]
/// would. Give each test its own topic and subscription names: the emulator
/// is shared.
pub async fn pubsub_emulator_host() -> Result<String> {
    Ok(Discovery::from_env()
        .find(Service::PubSubEmulator)
        .await?
        .connection)
}

/// A Meilisearch server for tests, as [`meilisearch`] finds it.
#[derive(Clone, PartialEq, Eq)]
pub struct MeilisearchEndpoint {
    /// The server's URL, e.g. `http://127.0.0.1:7700`.
    pub url: String,
    /// The API key to use (`MEILISEARCH_KEY`, or [`MEILISEARCH_TEST_KEY`]
    /// for an instance the kit started; `None` for a server without keys).
    pub key: Option<String>,
    /// Where it came from.
    pub source: Source,
}

impl fmt::Debug for MeilisearchEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MeilisearchEndpoint")
            .field("url", &self.url)
            .field("key", &self.key.as_ref().map(|_| "***"))
            .field("source", &self.source)
            .finish()
    }
}

/// Meilisearch, found as [`Discovery::from_env`] would: `MEILISEARCH_URL`
/// (with `MEILISEARCH_KEY`), a server answering on `127.0.0.1:7700` (with
/// `MEILISEARCH_KEY`), or one started from `MEILISEARCH_BIN` (with
/// [`MEILISEARCH_TEST_KEY`]). Give each test its own index names: the
/// server is shared. The error says what was tried, for a test to print
/// when it skips.
pub async fn meilisearch() -> Result<MeilisearchEndpoint> {
    let found = Discovery::from_env().find(Service::Meilisearch).await?;
    let key = match found.source {
        Source::Started => Some(MEILISEARCH_TEST_KEY.to_owned()),
        Source::Container => Some(MEILISEARCH_TEST_KEY.to_owned()),
        Source::Environment | Source::DefaultLocal => std::env::var("MEILISEARCH_KEY")
            .ok()
            .filter(|k| !k.trim().is_empty()),
    };
    Ok(MeilisearchEndpoint {
        url: found.connection,
        key,
        source: found.source,
    })
}
