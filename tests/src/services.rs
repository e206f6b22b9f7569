//! A harness that runs the example services (`ordering-service` and
//! `shipping-service` of `keel-examples`) as real child processes on real
//! PostgreSQL, Redis and the Pub/Sub emulator, for tests and benchmarks.
//!
//! ```no_run
//! # async fn example() -> Result<(), keel_tests::services::Error> {
//! use keel_tests::services::{ServiceStack, StackOptions};
//!
//! let mut stack = ServiceStack::start(StackOptions::default()).await?;
//! let mut ordering = stack.ordering_client()?;   // token with orders:read + orders:write
//! let mut shipping = stack.shipping_client()?;   // token with shipments:read
//! // ... calls ...
//! stack.shipping.kill().await;                    // SIGKILL
//! stack.shipping.set_env("KEEL_SHIPPING__ACCEPT_SCHEMA_V2", "true");
//! stack.shipping.restart().await?;                // same environment (plus the change), waits for SERVING
//! stack.terminate().await?;                       // SIGTERM both, each must exit 0
//! # Ok(()) }
//! ```
//!
//! What [`ServiceStack::start`] does:
//!
//! 1. Uses the two binaries that `cargo test --workspace` builds beside
//!    the test executables, when they are newer than every source file of
//!    the workspace. Otherwise (e.g. `cargo test -p keel-tests` alone) it
//!    builds them once per process with
//!    `cargo build -p keel-examples --bins --target-dir <target>/keel-services`
//!    (`<target>` is the test executable's cargo target dir): the first
//!    such build takes minutes, later ones are a no-op of a second or two.
//!    `KEEL_SERVICES_BUILD=always` always takes that route,
//!    `KEEL_SERVICES_BUILD=never` skips the build, and
//!    `KEEL_SERVICES_BIN_DIR=<dir>` uses binaries from elsewhere.
//! 2. Finds or starts PostgreSQL, Redis and the emulator through
//!    keel-testkit, and gives each service its own fresh database
//!    ([`TestDatabase`], already migrated with the crates' migrations).
//! 3. Picks a unique prefix for topics, subscriptions, cache keys and the
//!    search index ([`ServiceStack::prefix`]), a free port per service, and a
//!    random HS256 key; mints tokens with it ([`ServiceStack::token`]).
//! 4. Starts Shipping first (its subscription must exist before Ordering
//!    publishes), then Ordering, each with stdout and stderr in files under
//!    `$TMPDIR/keel-services/<prefix>/`, and waits until each answers gRPC
//!    health `SERVING` (60 s by default), failing with the log's tail.
//!
//! Children are killed when their [`ServiceProcess`] is dropped, so a
//! failing test leaves nothing running; the databases are dropped after
//! the processes.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_core::{AuditLog, AuditQuery, AuditRecord};
use keel_examples::service::{TokenRequest, mint_token};
use keel_grpc::client::{ChannelConfig, ChannelFactory, KeelChannel, StaticToken, Target};
use keel_grpc::health_proto::HealthCheckRequest;
use keel_grpc::health_proto::health_check_response::ServingStatus;
use keel_grpc::health_proto::health_client::HealthClient;
use keel_grpc::proto::examples::ordering::v1::ordering_service_client::OrderingServiceClient;
use keel_grpc::proto::examples::shipping::v1::shipping_service_client::ShippingServiceClient;
use keel_security::PgAuditLog;
use keel_security::audit::{AuditKey, AuditKeys};
use keel_testkit::TestDatabase;
use tokio::process::{Child, Command};
use tokio::sync::OnceCell;

/// What the harness returns on failure: a message that says what failed,
/// with the service's log paths and tail when a service was involved.
pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// The issuer of the harness's tokens.
pub const ISSUER: &str = "keel-tests";
/// The audience both services are configured with.
pub const AUDIENCE: &str = keel_examples::service::DEFAULT_AUDIENCE;
/// The Pub/Sub project the services use on the emulator.
pub const PUBSUB_PROJECT: &str = "keel-tests";
/// A client of the Ordering service.
pub type OrderingClient = OrderingServiceClient<KeelChannel>;
/// A client of the Shipping service.
pub type ShippingClient = ShippingServiceClient<KeelChannel>;

/// How a stack is started.
#[derive(Clone, Debug)]
pub struct StackOptions {
    /// Extra variables for Ordering (override the harness's).
    pub ordering_env: BTreeMap<String, String>,
    /// Extra variables for Shipping (override the harness's).
    pub shipping_env: BTreeMap<String, String>,
    /// How long a start may take until health says `SERVING`.
    pub ready_timeout: Duration,
}

impl Default for StackOptions {
    fn default() -> Self {
        Self {
            ordering_env: BTreeMap::new(),
            shipping_env: BTreeMap::new(),
            ready_timeout: Duration::from_secs(60),
        }
    }
}

impl StackOptions {
    /// Sets a variable for Ordering.
    #[must_use]
    pub fn ordering_env(mut self, key: &str, value: &str) -> Self {
        self.ordering_env.insert(key.to_owned(), value.to_owned());
        self
    }

    /// Sets a variable for Shipping.
    #[must_use]
    pub fn shipping_env(mut self, key: &str, value: &str) -> Self {
        self.shipping_env.insert(key.to_owned(), value.to_owned());
        self
    }
}

/// Both services, running, with their databases.
///
/// Fields drop in order: the processes are killed before their databases
/// are dropped.
#[derive(Debug)]
pub struct ServiceStack {
    /// The Ordering process.
    pub ordering: ServiceProcess,
    /// The Shipping process.
    pub shipping: ServiceProcess,
    /// Ordering's own database (event store, audit log, ...).
    pub ordering_db: TestDatabase,
    /// Shipping's own database (shipments, inbox, outbox, audit log).
    pub shipping_db: TestDatabase,
    prefix: String,
    key: String,
    pubsub_host: String,
    redis_url: String,
}

impl ServiceStack {
    /// Starts both services; see the module docs for what it sets up.
    ///
    /// # Errors
    ///
    /// A service kit that cannot find or start a backend, a build that
    /// fails, or a service that does not become ready in time (with its
    /// log's tail).
    pub async fn start(options: StackOptions) -> Result<Self, Error> {
        let bin_dir = binaries().await?;
        let redis_url = keel_testkit::services::redis_url().await?;
        let pubsub_host = keel_testkit::services::pubsub_emulator_host().await?;
        let ordering_db = TestDatabase::create(&[
            &keel_eventstore::MIGRATIONS,
            &keel_outbox::MIGRATIONS,
            &keel_security::MIGRATIONS,
        ])
        .await?;
        let shipping_db =
            TestDatabase::create(&[&keel_outbox::MIGRATIONS, &keel_security::MIGRATIONS]).await?;
        let id = uuid::Uuid::now_v7().simple().to_string();
        let prefix = format!("svc-{}-", &id[id.len() - 10..]);
        let key =
            uuid::Uuid::new_v4().simple().to_string() + &uuid::Uuid::new_v4().simple().to_string();
        let log_dir = std::env::temp_dir()
            .join("keel-services")
            .join(prefix.trim_end_matches('-'));
        std::fs::create_dir_all(&log_dir)?;

        let common = |db: &TestDatabase| -> BTreeMap<String, String> {
            [
                ("KEEL_ENV", "test".to_owned()),
                ("DATABASE_URL", db.url()),
                ("KEEL_DATABASE__MAX_CONNECTIONS", "20".to_owned()),
                ("PUBSUB_EMULATOR_HOST", pubsub_host.clone()),
                ("GOOGLE_CLOUD_PROJECT", PUBSUB_PROJECT.to_owned()),
                ("KEEL_EVENTBUS__NAME_PREFIX", prefix.clone()),
                (
                    "KEEL_EVENTBUS__SUBSCRIPTION__MIN_BACKOFF",
                    "100ms".to_owned(),
                ),
                ("KEEL_EVENTBUS__SUBSCRIPTION__MAX_BACKOFF", "1s".to_owned()),
                (
                    "KEEL_EVENTBUS__SUBSCRIPTION__SHUTDOWN_TIMEOUT",
                    "10s".to_owned(),
                ),
                ("REDIS_URL", redis_url.clone()),
                ("KEEL_CACHE__KEY_PREFIX", format!("{prefix}cache:")),
                ("KEEL_SECURITY__JWT__ISSUERS", format!("[{ISSUER}]")),
                ("KEEL_SECURITY__JWT__AUDIENCES", format!("[{AUDIENCE}]")),
                ("KEEL_AUTH__HS256_KEY", key.clone()),
                ("KEEL_SECURITY__AUDIT__KEY", format!("audit-{key}")),
                ("KEEL_REPOSITORY__CURSOR_KEY", format!("cursor-{key}")),
                ("KEEL_LOG_FORMAT", "text".to_owned()),
                ("RUST_LOG", "info".to_owned()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect()
        };
        let mut shipping_env = common(&shipping_db);
        shipping_env.extend(options.shipping_env);
        let mut ordering_env = common(&ordering_db);
        ordering_env.extend(options.ordering_env);

        let mut shipping = ServiceProcess::new(
            "shipping-service",
            bin_dir.join("shipping-service"),
            shipping_env,
            &log_dir,
            options.ready_timeout,
        )?;
        shipping.start().await?;
        let mut ordering = ServiceProcess::new(
            "ordering-service",
            bin_dir.join("ordering-service"),
            ordering_env,
            &log_dir,
            options.ready_timeout,
        )?;
        ordering.start().await?;
        Ok(Self {
            ordering,
            shipping,
            ordering_db,
            shipping_db,
            prefix,
            key,
            pubsub_host,
            redis_url,
        })
    }

    /// The prefix of this stack's topics and subscriptions (Pub/Sub names
    /// are `<prefix><topic>`), cache keys and search index.
    #[must_use]
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The Pub/Sub emulator's `host:port`.
    #[must_use]
    pub fn pubsub_host(&self) -> &str {
        &self.pubsub_host
    }

    /// A Pub/Sub bus on the emulator with this stack's naming: the topics
    /// and subscriptions the services use (`ordering.orders` with
    /// Shipping's consumer `shipping`, `shipping.shipments` with
    /// Ordering's consumer `ordering`), so a test can publish to them, list
    /// dead letters and replay them. Close it when done.
    ///
    /// # Errors
    ///
    /// When the emulator does not answer.
    pub async fn pubsub_bus(&self) -> Result<keel_eventbus::PubSubBus, Error> {
        let config = keel_eventbus::PubSubConfig::emulator(PUBSUB_PROJECT, &self.pubsub_host)?
            .with_naming(keel_eventbus::Naming::with_prefix(self.prefix.clone())?);
        Ok(keel_eventbus::PubSubBus::connect(config).await?)
    }

    /// The Redis URL.
    #[must_use]
    pub fn redis_url(&self) -> &str {
        &self.redis_url
    }

    /// The HS256 key both services verify tokens with.
    #[must_use]
    pub fn signing_key(&self) -> &str {
        &self.key
    }

    /// A token for `subject` with `scopes`, valid for an hour.
    ///
    /// # Errors
    ///
    /// When signing fails.
    pub fn token(&self, subject: &str, scopes: &[&str]) -> Result<String, Error> {
        mint_token(
            self.key.as_bytes(),
            &TokenRequest::new(ISSUER, AUDIENCE, subject).scopes(scopes.iter().copied()),
        )
        .map_err(|e| e.to_string().into())
    }

    /// A channel to `service` that sends `token` (none when `None`).
    ///
    /// # Errors
    ///
    /// An unusable address.
    pub fn channel(service: &ServiceProcess, token: Option<String>) -> Result<KeelChannel, Error> {
        let mut factory = ChannelFactory::new(
            ChannelConfig::new().with_request_timeout(Some(Duration::from_secs(30))),
        )?;
        if let Some(token) = token {
            factory = factory.with_token_source(Arc::new(StaticToken::new(token)));
        }
        Ok(factory.channel(&Target::new(service.endpoint())?)?)
    }

    /// An Ordering client with `orders:read orders:write`.
    ///
    /// # Errors
    ///
    /// See [`channel`](Self::channel).
    pub fn ordering_client(&self) -> Result<OrderingClient, Error> {
        let token = self.token("user:tests", &["orders:read", "orders:write"])?;
        Ok(OrderingServiceClient::new(Self::channel(
            &self.ordering,
            Some(token),
        )?))
    }

    /// A Shipping client with `shipments:read`.
    ///
    /// # Errors
    ///
    /// See [`channel`](Self::channel).
    pub fn shipping_client(&self) -> Result<ShippingClient, Error> {
        let token = self.token("user:tests", &["shipments:read"])?;
        Ok(ShippingServiceClient::new(Self::channel(
            &self.shipping,
            Some(token),
        )?))
    }

    /// Every audit record in `db` (one of this stack's databases), oldest
    /// first, read with the services' audit key.
    ///
    /// # Errors
    ///
    /// When the query fails.
    pub async fn audit_records(&self, db: &TestDatabase) -> Result<Vec<AuditRecord>, Error> {
        let key = AuditKey::new(
            "k1",
            keel_security::Secret::new(format!("audit-{}", self.key).into_bytes()),
        )?;
        let log = PgAuditLog::new(db.pool().clone()).with_keys(AuditKeys::single(key));
        let mut records = Vec::new();
        let mut query = AuditQuery::new().limit(AuditQuery::MAX_LIMIT);
        loop {
            let page = log.query(&query).await?;
            records.extend(page.records);
            match page.next_after {
                Some(after) => query = AuditQuery::new().limit(AuditQuery::MAX_LIMIT).after(after),
                None => return Ok(records),
            }
        }
    }

    /// Stops both with SIGTERM (Ordering first), each of which must exit
    /// with status 0.
    ///
    /// # Errors
    ///
    /// A service that does not exit in time or exits otherwise.
    pub async fn terminate(&mut self) -> Result<(), Error> {
        self.ordering.terminate().await?;
        self.shipping.terminate().await?;
        Ok(())
    }
}

/// One service as a child process, restartable with the same environment.
#[derive(Debug)]
pub struct ServiceProcess {
    name: String,
    binary: PathBuf,
    env: BTreeMap<String, String>,
    addr: SocketAddr,
    stdout: PathBuf,
    stderr: PathBuf,
    ready_timeout: Duration,
    child: Option<Child>,
    starts: u32,
}

impl ServiceProcess {
    /// A process of `binary`, not started, listening on a free port, with
    /// its logs under `log_dir`.
    ///
    /// # Errors
    ///
    /// No free port.
    pub fn new(
        name: &str,
        binary: PathBuf,
        mut env: BTreeMap<String, String>,
        log_dir: &Path,
        ready_timeout: Duration,
    ) -> Result<Self, Error> {
        let addr = free_port()?;
        env.entry("KEEL_GRPC__ADDRESS".to_owned())
            .or_insert_with(|| addr.to_string());
        let addr = env["KEEL_GRPC__ADDRESS"].parse()?;
        Ok(Self {
            name: name.to_owned(),
            binary,
            env,
            addr,
            stdout: log_dir.join(format!("{name}.stdout.log")),
            stderr: log_dir.join(format!("{name}.stderr.log")),
            ready_timeout,
            child: None,
            starts: 0,
        })
    }

    /// The service's name.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where it listens.
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<addr>`.
    #[must_use]
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Its environment (what the next start uses).
    #[must_use]
    pub fn env(&self) -> &BTreeMap<String, String> {
        &self.env
    }

    /// Sets a variable for the next start.
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env.insert(key.to_owned(), value.to_owned());
    }

    /// The files its stdout and stderr go to (appended across restarts).
    #[must_use]
    pub fn log_paths(&self) -> (&Path, &Path) {
        (&self.stdout, &self.stderr)
    }

    /// Its process id while running.
    #[must_use]
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// The last `lines` lines of its stdout and stderr.
    #[must_use]
    pub fn log_tail(&self, lines: usize) -> String {
        let tail = |path: &Path| {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        };
        format!(
            "--- {} ---\n{}\n--- {} ---\n{}",
            self.stdout.display(),
            tail(&self.stdout),
            self.stderr.display(),
            tail(&self.stderr)
        )
    }

    fn failure(&self, what: &str) -> Error {
        format!("{} {what}\n{}", self.name, self.log_tail(40)).into()
    }

    /// Starts it and waits until gRPC health answers `SERVING`.
    ///
    /// # Errors
    ///
    /// Already running, a spawn failure, an early exit, or no `SERVING`
    /// within the ready timeout; each with the log's tail.
    pub async fn start(&mut self) -> Result<(), Error> {
        if self.child.is_some() {
            return Err(format!("{} is already running", self.name).into());
        }
        let open = |path: &Path| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
        };
        self.starts += 1;
        let child = Command::new(&self.binary)
            .env_clear()
            .envs(
                ["PATH", "HOME", "TMPDIR"]
                    .into_iter()
                    .filter_map(|k| std::env::var(k).ok().map(|v| (k.to_owned(), v))),
            )
            .envs(&self.env)
            .stdin(Stdio::null())
            .stdout(open(&self.stdout)?)
            .stderr(open(&self.stderr)?)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.binary.display()))?;
        self.child = Some(child);
        self.wait_ready().await
    }

    /// Waits until gRPC health (the server, i.e. readiness) answers
    /// `SERVING`.
    ///
    /// # Errors
    ///
    /// The process exited, or the ready timeout passed.
    pub async fn wait_ready(&mut self) -> Result<(), Error> {
        let deadline = Instant::now() + self.ready_timeout;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                self.child = None;
                return Err(self.failure(&format!("exited during start-up ({status})")));
            }
            if self.health().await == Some(ServingStatus::Serving) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(self.failure(&format!(
                    "did not answer SERVING within {:?}",
                    self.ready_timeout
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The server's health status, `None` when it does not answer.
    pub async fn health(&self) -> Option<ServingStatus> {
        let channel = tonic::transport::Endpoint::from_shared(self.endpoint())
            .ok()?
            .connect_timeout(Duration::from_millis(500))
            .timeout(Duration::from_secs(2))
            .connect()
            .await
            .ok()?;
        let response = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .ok()?;
        ServingStatus::try_from(response.into_inner().status).ok()
    }

    /// Sends SIGTERM and waits (up to 30 s) for it to exit.
    ///
    /// # Errors
    ///
    /// Not running, no exit in time (it is then killed), or an exit status
    /// other than 0.
    pub async fn terminate(&mut self) -> Result<ExitStatus, Error> {
        let status = self
            .signal_and_wait("TERM", Duration::from_secs(30))
            .await?;
        if status.success() {
            Ok(status)
        } else {
            Err(self.failure(&format!("exited with {status} after SIGTERM")))
        }
    }

    /// Kills it with SIGKILL and waits for it to be gone.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// Starts it again with its environment (as changed by
    /// [`set_env`](Self::set_env)); stops it with SIGTERM first when it
    /// runs.
    ///
    /// # Errors
    ///
    /// See [`terminate`](Self::terminate) and [`start`](Self::start).
    pub async fn restart(&mut self) -> Result<(), Error> {
        if self.child.is_some() {
            self.terminate().await?;
        }
        self.start().await
    }

    /// How many times it was started.
    #[must_use]
    pub fn starts(&self) -> u32 {
        self.starts
    }

    async fn signal_and_wait(&mut self, signal: &str, wait: Duration) -> Result<ExitStatus, Error> {
        let Some(mut child) = self.child.take() else {
            return Err(format!("{} is not running", self.name).into());
        };
        let pid = child
            .id()
            .ok_or_else(|| format!("{} has already exited", self.name))?;
        let sent = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()
            .await?;
        if !sent.success() {
            return Err(format!("kill -{signal} {pid} failed").into());
        }
        match tokio::time::timeout(wait, child.wait()).await {
            Ok(status) => Ok(status?),
            Err(_) => {
                let _ = child.kill().await;
                Err(self.failure(&format!("did not exit within {wait:?} of SIG{signal}")))
            }
        }
    }
}

/// A port nobody listens on now (the OS's pick).
fn free_port() -> std::io::Result<SocketAddr> {
    std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()
}

/// The directory holding the service binaries, built once per process.
///
/// They are built into their own target directory (`<target>/keel-services`)
/// rather than the test's: `cargo build -p keel-examples` resolves
/// dependency features differently from `cargo test -p keel-tests`, and
/// sharing one directory would make each rebuild what the other built.
///
/// # Errors
///
/// A failing `cargo build`, or binaries still missing after it.
pub async fn binaries() -> Result<PathBuf, Error> {
    static DIR: OnceCell<PathBuf> = OnceCell::const_new();
    DIR.get_or_try_init(|| async {
        if let Some(dir) = std::env::var_os("KEEL_SERVICES_BIN_DIR") {
            return Ok(PathBuf::from(dir));
        }
        // target/<profile>/deps/<test binary>.
        let exe = std::env::current_exe()?;
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .ok_or("cannot locate the cargo target directory")?;
        let release = profile_dir.file_name().is_some_and(|n| n == "release");
        // `cargo test --workspace` builds keel-examples' binaries beside the
        // test executables (that package has integration tests): use them
        // when they are newer than every source file, and spare a second
        // build of the whole dependency tree.
        if std::env::var("KEEL_SERVICES_BUILD").as_deref() != Ok("always")
            && built_after_sources(profile_dir)
        {
            return Ok(profile_dir.to_path_buf());
        }
        let target_dir = profile_dir
            .parent()
            .ok_or("cannot locate the cargo target directory")?
            .join("keel-services");
        let bin_dir = target_dir.join(if release { "release" } else { "debug" });
        if std::env::var("KEEL_SERVICES_BUILD").as_deref() != Ok("never") {
            build(&target_dir, release).await?;
        }
        for b in ["ordering-service", "shipping-service"] {
            if !bin_dir.join(b).exists() {
                return Err(format!("{b} is not in {}", bin_dir.display()).into());
            }
        }
        Ok::<_, Error>(bin_dir)
    })
    .await
    .cloned()
}

/// Whether both service binaries in `dir` are newer than every file the
/// build reads (manifests, lock file, Rust, proto and SQL sources of the
/// workspace).
fn built_after_sources(dir: &Path) -> bool {
    let built = ["ordering-service", "shipping-service"].map(|b| {
        std::fs::metadata(dir.join(b))
            .and_then(|m| m.modified())
            .ok()
    });
    let [Some(a), Some(b)] = built else {
        return false;
    };
    let oldest = a.min(b);
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    newest_source(&root).is_some_and(|newest| newest <= oldest)
}

/// The newest modification time among the workspace's build inputs under
/// `dir`, skipping build output and version control.
fn newest_source(dir: &Path) -> Option<std::time::SystemTime> {
    let mut newest = None;
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        let found = if kind.is_dir() {
            if (name.starts_with('.') && name != ".sqlx") || name == "target" {
                continue;
            }
            newest_source(&path)
        } else if ["rs", "toml", "lock", "proto", "sql", "json"]
            .iter()
            .any(|ext| path.extension().is_some_and(|e| e == *ext))
        {
            entry.metadata().and_then(|m| m.modified()).ok()
        } else {
            None
        };
        newest = newest.max(found);
    }
    newest
}

/// `cargo build -p keel-examples --bins` into `target_dir`: a no-op of a
/// second or two when nothing changed.
async fn build(target_dir: &Path, release: bool) -> Result<(), Error> {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let mut command = Command::new(cargo);
    command
        .arg("build")
        .arg("--manifest-path")
        .arg(&manifest)
        .args(["-p", "keel-examples", "--bins"])
        .arg("--target-dir")
        .arg(target_dir)
        // What cargo set for this test run is not for the inner build.
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_MANIFEST_DIR")
        .env_remove("CARGO_PKG_NAME")
        .env_remove("CARGO_CRATE_NAME")
        .env_remove("CARGO_PRIMARY_PACKAGE");
    if release {
        command.arg("--release");
    }
    let output = command.output().await?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "cargo build -p keel-examples --bins failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        )
        .into())
    }
}
