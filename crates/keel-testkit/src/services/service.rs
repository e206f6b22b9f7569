//! The services the test kit knows: their variables, images, default
//! addresses, and how to tell that one answers.

use std::fmt;

use crate::sys;

/// A service the test kit can find or start.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Service {
    /// PostgreSQL (15 or newer).
    Postgres,
    /// Redis (7 or newer).
    Redis,
    /// The Google Cloud Pub/Sub emulator.
    PubSubEmulator,
    /// Meilisearch (v1.x).
    Meilisearch,
}

impl Service {
    /// Every service, in a stable order.
    pub const ALL: [Service; 4] = [
        Service::Postgres,
        Service::Redis,
        Service::PubSubEmulator,
        Service::Meilisearch,
    ];

    /// The environment variable that, when set, names the instance to use.
    pub fn env_var(self) -> &'static str {
        match self {
            Service::Postgres => "DATABASE_URL",
            Service::Redis => "REDIS_URL",
            Service::PubSubEmulator => "PUBSUB_EMULATOR_HOST",
            Service::Meilisearch => "MEILISEARCH_URL",
        }
    }

    /// The container image (name, tag) the kit starts for this service
    /// when it uses testcontainers (feature `testcontainers`).
    ///
    /// Every tag names one exact release, so a run a year from now pulls
    /// the same server as today: PostgreSQL 15.20 and Redis 7.0.15 (the
    /// versions the suite runs against on Keel's CI machines), the Cloud
    /// SDK's emulator image of release 573.0.0, Meilisearch v1.30.1 (the
    /// release keel-search's contract suite passed on). Google deletes
    /// Cloud SDK images a year after their release: bump that tag at least
    /// once a year. `docker-compose.yml` and `docs/testing.md` name the
    /// same images; a test (`tests/images.rs`) fails when they disagree.
    pub fn container_image(self) -> (&'static str, &'static str) {
        match self {
            Service::Postgres => ("postgres", "15.20-alpine"),
            Service::Redis => ("redis", "7.0.15-alpine"),
            Service::PubSubEmulator => (
                "gcr.io/google.com/cloudsdktool/google-cloud-cli",
                "573.0.0-emulators",
            ),
            Service::Meilisearch => ("getmeili/meilisearch", "v1.30.1"),
        }
    }

    /// Where the service listens on a developer machine by default.
    pub fn default_address(self) -> &'static str {
        match self {
            Service::Postgres => "127.0.0.1:5432",
            Service::Redis => "127.0.0.1:6379",
            Service::PubSubEmulator => "127.0.0.1:8085",
            Service::Meilisearch => "127.0.0.1:7700",
        }
    }

    /// A short lowercase name, used for directories.
    pub fn slug(self) -> &'static str {
        match self {
            Service::Postgres => "postgres",
            Service::Redis => "redis",
            Service::PubSubEmulator => "pubsub-emulator",
            Service::Meilisearch => "meilisearch",
        }
    }

    /// The connection string tests use for an instance at `host:port`: a
    /// URL for PostgreSQL, Redis and Meilisearch, `host:port` for the
    /// emulator (the form `PUBSUB_EMULATOR_HOST` takes).
    pub fn connection_string(self, address: &str) -> String {
        match self {
            Service::Postgres => format!("postgres://postgres@{address}/postgres"),
            Service::Redis => format!("redis://{address}"),
            Service::PubSubEmulator => address.to_owned(),
            Service::Meilisearch => format!("http://{address}"),
        }
    }

    /// Whether an instance at `address` (`ip:port`) answers as this service
    /// would: a session start-up for PostgreSQL, `PONG` for Redis, `200` for the
    /// emulator and for Meilisearch's `/health`.
    pub(super) fn ready(self, address: &str) -> bool {
        match self {
            Service::Postgres => sys::postgres_accepts(address),
            Service::Redis => sys::redis_answers(address),
            Service::PubSubEmulator => sys::http_ok(address),
            Service::Meilisearch => sys::http_ok_at(address, "/health"),
        }
    }

    /// [`ready`](Self::ready), with the reason when it is not. PostgreSQL is
    /// probed with a real login as the kit would log in.
    pub(super) fn probe(self, address: &str) -> std::result::Result<(), String> {
        match self {
            Service::Postgres => sys::postgres_login(address),
            _ if self.ready(address) => Ok(()),
            _ => Err("nothing answers there".to_owned()),
        }
    }

    pub(super) fn hint(self) -> &'static str {
        match self {
            Service::Postgres => {
                "set DATABASE_URL (e.g. postgres://postgres@127.0.0.1:5432/postgres), start \
                 PostgreSQL on 127.0.0.1:5432, install PostgreSQL's server binaries \
                 (`apt-get install postgresql`) so the test kit can start one, or run \
                 `docker compose up -d postgres`"
            }
            Service::Redis => {
                "set REDIS_URL (e.g. redis://127.0.0.1:6379), start Redis on 127.0.0.1:6379, \
                 install `redis-server` (`apt-get install redis-server`) so the test kit can \
                 start one, or run `docker compose up -d redis`"
            }
            Service::PubSubEmulator => {
                "set PUBSUB_EMULATOR_HOST (e.g. 127.0.0.1:8085), start the emulator with \
                 `gcloud beta emulators pubsub start --host-port=127.0.0.1:8085`, install the \
                 Google Cloud SDK's pubsub-emulator component and a Java runtime so the test \
                 kit can start one, or run `docker compose up -d pubsub`"
            }
            Service::Meilisearch => {
                "set MEILISEARCH_URL (and MEILISEARCH_KEY) to a Meilisearch v1.x server, start \
                 one on 127.0.0.1:7700, set MEILISEARCH_BIN to a meilisearch binary so the \
                 test kit can start one, or run `docker compose up -d meilisearch`"
            }
        }
    }
}

impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Service::Postgres => "PostgreSQL",
            Service::Redis => "Redis",
            Service::PubSubEmulator => "the Pub/Sub emulator",
            Service::Meilisearch => "Meilisearch",
        })
    }
}
