//! Creating and driving local PostgreSQL clusters for tests.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::services::Service;
use crate::sys;

/// The binaries of one PostgreSQL installation.
#[derive(Debug, Clone)]
pub(crate) struct PgBin {
    dir: PathBuf,
}

impl PgBin {
    pub(crate) fn find() -> Result<Self> {
        let dir = sys::postgres_bin_dir().ok_or_else(|| Error::ServiceUnavailable {
            service: Service::Postgres,
            tried: "  - PostgreSQL server binaries: none in /usr/lib/postgresql/*/bin, \
                    KEEL_TESTKIT_PG_BIN or PATH"
                .to_owned(),
            hint: "install PostgreSQL (e.g. `apt-get install postgresql`) or set \
                   KEEL_TESTKIT_PG_BIN to the directory holding initdb and pg_ctl",
        })?;
        if sys::is_root() && !user_exists(sys::POSTGRES_USER) {
            return Err(Error::ServiceUnavailable {
                service: Service::Postgres,
                tried: "  - local binaries: tests run as root, PostgreSQL refuses to run as \
                        root, and there is no `postgres` user to run it as"
                    .to_owned(),
                hint: "create a `postgres` system user, run the tests as another user, or set \
                       DATABASE_URL",
            });
        }
        Ok(Self { dir })
    }

    pub(crate) fn path(&self, program: &str) -> PathBuf {
        self.dir.join(program)
    }
}

fn user_exists(name: &str) -> bool {
    fs::read_to_string("/etc/passwd")
        .map(|p| p.lines().any(|l| l.split(':').next() == Some(name)))
        .unwrap_or(false)
}

/// How clients authenticate to a cluster.
#[derive(Debug, Clone)]
pub(crate) enum Auth {
    /// Anyone on 127.0.0.1 may connect as any role.
    Trust,
    /// TCP clients must give this password (scram-sha-256).
    Password(String),
}

/// Runs `initdb` into `dir/data` (replacing anything there) and configures
/// the cluster for fast, disposable use on `127.0.0.1:port`.
///
/// `dir` is handed to the `postgres` user when we are root.
pub(crate) fn init_cluster(
    bin: &PgBin,
    dir: &Path,
    port: u16,
    auth: &Auth,
    max_connections: u32,
) -> Result<PathBuf> {
    sys::create_shared_dir(dir)?;
    let data = dir.join("data");
    sys::remove_dir(&data)?;
    let mut initdb = sys::postgres_command(&bin.path("initdb"));
    initdb.current_dir(dir).arg("-D").arg(&data).args([
        "-U",
        "postgres",
        "-E",
        "UTF8",
        "--locale=C",
        "--no-sync",
        "--no-instructions",
    ]);
    let pwfile = dir.join("pwfile");
    match auth {
        Auth::Trust => {
            initdb.arg("--auth=trust");
        }
        Auth::Password(password) => {
            write_file(&pwfile, password)?;
            initdb
                .args(["--auth-local=trust", "--auth-host=scram-sha-256"])
                .arg(format!("--pwfile={}", pwfile.display()));
        }
    }
    sys::give_to_postgres(dir)?;
    let result = sys::run(&mut initdb);
    let _ = fs::remove_file(&pwfile);
    result?;

    // Durability is worthless for a test cluster; start-up and commit speed
    // are not. A crash of the machine loses a test cluster, which is fine.
    let settings = format!(
        "\n# keel-testkit: a disposable test cluster\n\
         listen_addresses = '127.0.0.1'\n\
         port = {port}\n\
         unix_socket_directories = '{data}'\n\
         max_connections = {max_connections}\n\
         fsync = off\n\
         synchronous_commit = off\n\
         full_page_writes = off\n\
         wal_level = minimal\n\
         max_wal_senders = 0\n\
         checkpoint_timeout = 30min\n\
         shared_buffers = 64MB\n\
         log_min_messages = warning\n\
         log_checkpoints = off\n",
        data = data.display(),
    );
    let conf = data.join("postgresql.conf");
    fs::OpenOptions::new()
        .append(true)
        .open(&conf)
        .and_then(|mut f| f.write_all(settings.as_bytes()))
        .map_err(|e| Error::io(format!("configuring {}", conf.display()), e))?;
    Ok(data)
}

fn write_file(path: &Path, contents: &str) -> Result<()> {
    fs::write(path, contents).map_err(|e| Error::io(format!("writing {}", path.display()), e))
}

/// `pg_ctl start`, waiting until the server accepts connections.
pub(crate) fn pg_ctl_start(bin: &PgBin, dir: &Path, data: &Path, log: &Path) -> Result<()> {
    let mut cmd = sys::postgres_command(&bin.path("pg_ctl"));
    cmd.current_dir(dir)
        .arg("start")
        .arg("-D")
        .arg(data)
        .arg("-l")
        .arg(log)
        .args(["-w", "-t", "60", "-s"]);
    sys::run(&mut cmd).map_err(|e| match e {
        Error::Command { detail, .. } => Error::StartFailed {
            service: Service::Postgres,
            reason: format!("pg_ctl start: {detail}"),
            log: log.to_path_buf(),
            log_tail: sys::tail(log, 20),
        },
        other => other,
    })
}

/// `pg_ctl stop` in the given mode (`fast`, `immediate`), waiting until the
/// server is gone.
pub(crate) fn pg_ctl_stop(bin: &PgBin, dir: &Path, data: &Path, mode: &str) -> Result<()> {
    let mut cmd = sys::postgres_command(&bin.path("pg_ctl"));
    cmd.current_dir(dir)
        .arg("stop")
        .arg("-D")
        .arg(data)
        .args(["-m", mode, "-w", "-t", "60", "-s"]);
    sys::run(&mut cmd)
}
