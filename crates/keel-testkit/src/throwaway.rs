//! A private PostgreSQL cluster that a test may stop, start and restart.

use std::ffi::OsStr;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use sqlx::postgres::PgConnectOptions;

use crate::error::{Error, Result};
use crate::pg::{self, Auth, PgBin};
use crate::services::{Service, state_root};
use crate::sys;

/// A PostgreSQL cluster of its own, for fault-injection tests: stop it,
/// start it again (same port, same data), restart it, or kill it as a crash
/// would, without disturbing any other test.
///
/// The cluster is created with `initdb` in a fresh directory under the test
/// kit's state directory (see [`services`](crate::services)), listens on a free port of
/// `127.0.0.1`, and requires a password (scram-sha-256) for the `postgres`
/// role over TCP, so a wrong-password test fails for real. When the tests run
/// as root, the cluster runs as the `postgres` user, because PostgreSQL
/// refuses to run as root.
///
/// Dropping the value stops the cluster and deletes its files. A watchdog
/// process does the same if the test process dies without dropping it (a
/// panic with `panic = "abort"`, a `SIGKILL`).
///
/// Its methods take `&self`, so a test can share it (in an `Arc`) with a
/// workload that runs while the test restarts the server.
///
/// ```no_run
/// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
/// use keel_testkit::ThrowawayPostgres;
///
/// let pg = ThrowawayPostgres::new().await?;
/// let pool = sqlx::PgPool::connect(&pg.url()).await?;
/// sqlx::query("SELECT 1").execute(&pool).await?;
///
/// pg.restart().await?; // connections die; the pool has to recover
/// sqlx::query("SELECT 1").execute(&pool).await?;
///
/// let wrong = sqlx::PgPool::connect(&pg.url_with_password("nope")).await;
/// assert!(wrong.is_err());
/// # Ok(()) }
/// ```
pub struct ThrowawayPostgres {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) bin: PgBin,
    pub(crate) dir: PathBuf,
    pub(crate) data: PathBuf,
    pub(crate) log: PathBuf,
    pub(crate) port: u16,
    pub(crate) password: String,
    /// Whether the server is running; the lock also serializes start/stop.
    running: Mutex<bool>,
}

impl fmt::Debug for ThrowawayPostgres {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ThrowawayPostgres")
            .field("port", &self.inner.port)
            .field("dir", &self.inner.dir)
            .field("running", &self.is_running())
            .finish_non_exhaustive()
    }
}

/// The role the cluster is created with; it is a superuser.
pub(crate) const USER: &str = "postgres";

// Runs detached: waits until the owning test process is gone (or the
// directory was removed by `Drop`), then stops the server and deletes it.
const WATCHDOG: &str = r#"
owner=$1; dir=$2; data=$3; shift 3
while [ -d "/proc/$owner" ] && [ -d "$dir" ]; do sleep 1; done
if [ -d "$dir" ]; then
  "$@" stop -D "$data" -m immediate -s >/dev/null 2>&1
  rm -rf "$dir"
fi
"#;

impl ThrowawayPostgres {
    /// Creates and starts a new cluster. Takes about a second.
    ///
    /// Fails with [`Error::ServiceUnavailable`] when PostgreSQL's server
    /// binaries are not installed, and [`Error::StartFailed`] (with the
    /// server's log) when the server does not come up.
    pub async fn new() -> Result<Self> {
        let inner = blocking(|| Inner::create(false)).await?;
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    /// Creates and starts a new cluster that archives its write-ahead log,
    /// for backup and point-in-time-recovery tests: `wal_level = replica`,
    /// `archive_mode = on`, and an `archive_command` that copies every
    /// finished WAL segment into [`wal_archive`](Self::wal_archive).
    ///
    /// Durability settings are those of a real server here (`fsync`,
    /// `full_page_writes` on), since recovery replays this WAL.
    pub async fn with_wal_archive() -> Result<Self> {
        let inner = blocking(|| Inner::create(true)).await?;
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    pub(crate) fn from_inner(inner: Inner) -> Self {
        Self {
            inner: Arc::new(inner),
        }
    }

    pub(crate) fn inner(&self) -> &Arc<Inner> {
        &self.inner
    }

    /// The URL to connect as the `postgres` role to the `postgres` database,
    /// password included.
    pub fn url(&self) -> String {
        self.url_with_password(&self.inner.password)
    }

    /// The same URL with another password, for tests of bad credentials.
    pub fn url_with_password(&self, password: &str) -> String {
        let password: String = password
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        format!(
            "postgres://{USER}:{password}@127.0.0.1:{}/postgres",
            self.inner.port
        )
    }

    /// Connection options equivalent to [`url`](Self::url).
    pub fn connect_options(&self) -> PgConnectOptions {
        PgConnectOptions::new()
            .host("127.0.0.1")
            .port(self.inner.port)
            .username(USER)
            .password(&self.inner.password)
            .database("postgres")
    }

    /// The TCP port, on 127.0.0.1; it stays the same across restarts.
    pub fn port(&self) -> u16 {
        self.inner.port
    }

    /// The superuser role's name (`postgres`).
    pub fn user(&self) -> &str {
        USER
    }

    /// The superuser role's password (random per cluster).
    pub fn password(&self) -> &str {
        &self.inner.password
    }

    /// The server's log file, handy in a failing test's message.
    pub fn log_file(&self) -> &Path {
        &self.inner.log
    }

    /// Whether the server is running (as far as this value knows).
    pub fn is_running(&self) -> bool {
        *self
            .inner
            .running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Stops the server the polite way (`pg_ctl stop -m fast`): open
    /// connections are terminated, nothing committed is lost. Doing nothing
    /// if it is already stopped.
    pub async fn stop(&self) -> Result<()> {
        let inner = Arc::clone(&self.inner);
        blocking(move || inner.stop("fast")).await
    }

    /// Stops the server as a crash would (`pg_ctl stop -m immediate`): no
    /// shutdown checkpoint, recovery runs at the next start.
    pub async fn kill(&self) -> Result<()> {
        let inner = Arc::clone(&self.inner);
        blocking(move || inner.stop("immediate")).await
    }

    /// Starts the server again on the same port with the same data. Does
    /// nothing if it is running.
    pub async fn start(&self) -> Result<()> {
        let inner = Arc::clone(&self.inner);
        blocking(move || inner.start()).await
    }

    /// [`stop`](Self::stop) then [`start`](Self::start).
    pub async fn restart(&self) -> Result<()> {
        let inner = Arc::clone(&self.inner);
        blocking(move || {
            inner.stop("fast")?;
            inner.start()
        })
        .await
    }
}

impl Inner {
    fn create(archive: bool) -> Result<Self> {
        let bin = PgBin::find()?;
        let dir = new_cluster_dir();
        let password = format!("tp-{}", uuid::Uuid::new_v4().simple());
        let port = sys::free_port()?;
        let created = pg::init_cluster(&bin, &dir, port, &Auth::Password(password.clone()), 100)
            .and_then(|data| {
                if archive {
                    crate::backup::enable_wal_archive(&dir, &data)?;
                }
                Ok(data)
            });
        let data = match created {
            Ok(data) => data,
            Err(e) => {
                let _ = sys::remove_dir(&dir);
                return Err(e);
            }
        };
        Self::launch(bin, dir, data, port, password)
    }

    /// Wraps an initialised data directory `data` below `dir`: starts its
    /// watchdog, then the server. On failure the directory is removed.
    pub(crate) fn launch(
        bin: PgBin,
        dir: PathBuf,
        data: PathBuf,
        port: u16,
        password: String,
    ) -> Result<Self> {
        let inner = Self {
            log: dir.join("postgres.log"),
            bin,
            dir,
            data,
            port,
            password,
            running: Mutex::new(false),
        };
        // From here on, dropping `inner` does not clean up (it is not a
        // `ThrowawayPostgres` yet): do it by hand on failure.
        let started = inner.spawn_watchdog().and_then(|()| inner.start());
        if let Err(e) = started {
            let _ = inner.stop("immediate");
            let _ = sys::remove_dir(&inner.dir);
            return Err(e);
        }
        Ok(inner)
    }

    fn spawn_watchdog(&self) -> Result<()> {
        let owner = std::process::id().to_string();
        let pg_ctl = self.bin.path("pg_ctl");
        let mut args: Vec<&OsStr> = vec![
            OsStr::new(&owner),
            self.dir.as_os_str(),
            self.data.as_os_str(),
        ];
        if sys::is_root() {
            args.extend(["runuser", "-u", sys::POSTGRES_USER, "--"].map(OsStr::new));
        }
        args.push(pg_ctl.as_os_str());
        sys::spawn_detached(WATCHDOG, &args, &self.dir.join("watchdog.log"))
    }

    pub(crate) fn start(&self) -> Result<()> {
        let mut running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
        if *running {
            return Ok(());
        }
        pg::pg_ctl_start(&self.bin, &self.dir, &self.data, &self.log)?;
        *running = true;
        Ok(())
    }

    pub(crate) fn stop(&self, mode: &str) -> Result<()> {
        let mut running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
        if !*running {
            return Ok(());
        }
        pg::pg_ctl_stop(&self.bin, &self.dir, &self.data, mode)?;
        *running = false;
        Ok(())
    }
}

impl Drop for ThrowawayPostgres {
    fn drop(&mut self) {
        if self.is_running() {
            let _ = self.inner.stop("immediate");
        }
        // Removing the directory also tells the watchdog to exit.
        let _ = sys::remove_dir(&self.inner.dir);
    }
}

/// A fresh directory for one cluster below the test kit's state directory.
pub(crate) fn new_cluster_dir() -> PathBuf {
    state_root()
        .join("throwaway")
        .join(uuid::Uuid::new_v4().simple().to_string())
}

/// Runs blocking process work off the async worker threads.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    match tokio::task::spawn_blocking(f).await {
        Ok(result) => result,
        Err(e) => Err(Error::StartFailed {
            service: Service::Postgres,
            reason: format!("the start-up task failed: {e}"),
            log: PathBuf::new(),
            log_tail: String::new(),
        }),
    }
}
