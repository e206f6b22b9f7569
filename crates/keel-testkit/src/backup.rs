//! Backups of a [`ThrowawayPostgres`] with PostgreSQL's own tools: WAL
//! archiving, `pg_basebackup`, point-in-time recovery into a new cluster,
//! and logical dumps (`pg_dump` / `pg_restore`).

use std::fmt;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use sqlx::Connection;

use crate::error::{Error, Result};
use crate::pg::PgBin;
use crate::services::Service;
use crate::sys;
use crate::throwaway::{Inner, ThrowawayPostgres, blocking, new_cluster_dir};

/// How long recovery may take before the test kit gives up.
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(120);

/// Where a point-in-time recovery stops replaying the archived WAL.
///
/// Recovery stops, then the restored cluster is promoted to a primary: it
/// accepts writes, on a new timeline.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RecoveryTarget {
    /// `recovery_target_time`: every transaction that committed at or
    /// before this time is kept, every later one is not. The text is any
    /// timestamp PostgreSQL parses, with its time zone (for example what
    /// `SELECT clock_timestamp()::text` returns).
    Time(String),
    /// `recovery_target_name`: up to a restore point made with
    /// `SELECT pg_create_restore_point('name')`.
    Name(String),
    /// `recovery_target = 'immediate'`: as soon as the base backup is
    /// consistent, none of the archived WAL after it.
    Immediate,
    /// No target: replay every archived segment.
    EndOfArchive,
}

impl RecoveryTarget {
    fn settings(&self) -> String {
        match self {
            Self::Time(t) => format!("recovery_target_time = {}\n", quote(t)),
            Self::Name(n) => format!("recovery_target_name = {}\n", quote(n)),
            Self::Immediate => "recovery_target = 'immediate'\n".to_owned(),
            Self::EndOfArchive => String::new(),
        }
    }
}

/// A configuration-file string literal.
fn quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// A base backup of a [`ThrowawayPostgres`], taken with `pg_basebackup`: a
/// copy of its data directory that
/// [`ThrowawayPostgres::recover`] starts a new cluster from.
///
/// The files live inside the source cluster's directory; dropping the
/// value deletes them.
pub struct BaseBackup {
    dir: PathBuf,
}

impl fmt::Debug for BaseBackup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BaseBackup")
            .field("dir", &self.dir)
            .finish()
    }
}

impl BaseBackup {
    /// The directory holding the backup (a complete data directory).
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for BaseBackup {
    fn drop(&mut self) {
        let _ = sys::remove_dir(&self.dir);
    }
}

/// Adds WAL archiving to a freshly initialised cluster's configuration.
pub(crate) fn enable_wal_archive(dir: &Path, data: &Path) -> Result<()> {
    let archive = dir.join("wal-archive");
    sys::create_shared_dir(&archive)?;
    sys::give_to_postgres(&archive)?;
    let archive = archive.display().to_string();
    // Later lines win over the fast-but-fragile settings `init_cluster`
    // wrote: recovery replays this WAL, so it has to be complete.
    let settings = format!(
        "\n# keel-testkit: WAL archiving for backup tests\n\
         wal_level = replica\n\
         fsync = on\n\
         full_page_writes = on\n\
         max_wal_senders = 4\n\
         archive_mode = on\n\
         archive_command = {}\n",
        quote(&format!(
            "test ! -f \"{archive}/%f\" && cp \"%p\" \"{archive}/%f\""
        )),
    );
    append(&data.join("postgresql.conf"), &settings)
}

fn append(path: &Path, text: &str) -> Result<()> {
    fs::OpenOptions::new()
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|e| Error::io(format!("writing {}", path.display()), e))
}

impl ThrowawayPostgres {
    /// The directory the cluster archives finished WAL segments into, when
    /// it was made by [`with_wal_archive`](Self::with_wal_archive).
    pub fn wal_archive(&self) -> Option<PathBuf> {
        let archive = self.inner().dir.join("wal-archive");
        archive.is_dir().then_some(archive)
    }

    /// Takes a base backup with `pg_basebackup` (fast checkpoint, the WAL
    /// needed for consistency included).
    pub async fn base_backup(&self) -> Result<BaseBackup> {
        let inner = self.inner().clone();
        blocking(move || {
            let backups = inner.dir.join("backups");
            sys::create_shared_dir(&backups)?;
            sys::give_to_postgres(&backups)?;
            let target = backups.join(uuid::Uuid::new_v4().simple().to_string());
            let mut cmd = sys::postgres_command(&inner.bin.path("pg_basebackup"));
            cmd.current_dir(&inner.dir)
                .arg("-h")
                .arg(&inner.data)
                .arg("-p")
                .arg(inner.port.to_string())
                .args([
                    "-U",
                    crate::throwaway::USER,
                    "--checkpoint=fast",
                    "-X",
                    "stream",
                ])
                .arg("-D")
                .arg(&target);
            sys::run(&mut cmd)?;
            Ok(BaseBackup { dir: target })
        })
        .await
    }

    /// Closes the current WAL segment (`pg_switch_wal()`) and waits until
    /// the archiver has copied it, so that everything committed before the
    /// call can be recovered from the archive.
    pub async fn archive_current_wal(&self) -> Result<()> {
        let mut conn = sqlx::PgConnection::connect_with(&self.connect_options()).await?;
        // A WAL record of our own, so the switch always closes a segment
        // (with nothing written since the last switch it would not).
        sqlx::query("SELECT pg_logical_emit_message(false, 'keel-testkit', 'archive')")
            .execute(&mut conn)
            .await?;
        let segment: String = sqlx::query_scalar("SELECT pg_walfile_name(pg_switch_wal())")
            .fetch_one(&mut conn)
            .await?;
        let deadline = tokio::time::Instant::now() + RECOVERY_TIMEOUT;
        loop {
            let (archived, failed): (Option<String>, Option<String>) =
                sqlx::query_as("SELECT last_archived_wal, last_failed_wal FROM pg_stat_archiver")
                    .fetch_one(&mut conn)
                    .await?;
            // Segment names of one timeline sort in WAL order.
            if archived.as_deref().is_some_and(|a| a >= segment.as_str()) {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::Command {
                    command: "archive_command".to_owned(),
                    detail: format!(
                        "WAL segment {segment} was not archived within {RECOVERY_TIMEOUT:?} \
                         (last archived {archived:?}, last failed {failed:?})"
                    ),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        conn.close().await?;
        Ok(())
    }

    /// Point-in-time recovery: starts a new cluster (new directory, new
    /// port) from `backup`, replays this cluster's WAL archive up to
    /// `target` (`restore_command`, `recovery.signal`), promotes it and
    /// returns it once it accepts writes.
    ///
    /// The new cluster keeps the source's roles and password, and does not
    /// archive its own WAL. Fails with [`Error::StartFailed`] (and the
    /// server's log) when recovery does not reach the target, for example
    /// because the WAL it needs was never archived.
    pub async fn recover(
        &self,
        backup: &BaseBackup,
        target: RecoveryTarget,
    ) -> Result<ThrowawayPostgres> {
        let archive = self.wal_archive().ok_or_else(|| Error::Command {
            command: "recover".to_owned(),
            detail: "this cluster archives no WAL: create it with \
                     ThrowawayPostgres::with_wal_archive()"
                .to_owned(),
        })?;
        let source = self.inner().clone();
        let from = backup.dir.clone();
        let inner = blocking(move || prepare_recovery(&source, &from, &archive, &target)).await?;
        let restored = ThrowawayPostgres::from_inner(inner);
        restored.wait_for_promotion().await?;
        Ok(restored)
    }

    async fn wait_for_promotion(&self) -> Result<()> {
        let deadline = tokio::time::Instant::now() + RECOVERY_TIMEOUT;
        loop {
            let last = match self.in_recovery().await {
                Ok(false) => return Ok(()),
                Ok(true) => "still replaying WAL".to_owned(),
                Err(e) => e.to_string(),
            };
            // A server that gave up (a target the archive never reaches)
            // has exited: no need to wait for the deadline.
            let exited = !self.inner().data.join("postmaster.pid").exists();
            if exited || tokio::time::Instant::now() >= deadline {
                let reason = if exited {
                    format!("the server stopped during recovery: {last}")
                } else {
                    format!("recovery did not end within {RECOVERY_TIMEOUT:?}: {last}")
                };
                let log = self.log_file().to_path_buf();
                return Err(Error::StartFailed {
                    service: Service::Postgres,
                    reason,
                    log_tail: sys::tail(&log, 30),
                    log,
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn in_recovery(&self) -> Result<bool> {
        let mut conn = sqlx::PgConnection::connect_with(&self.connect_options()).await?;
        let recovering: bool = sqlx::query_scalar("SELECT pg_is_in_recovery()")
            .fetch_one(&mut conn)
            .await?;
        conn.close().await?;
        Ok(recovering)
    }

    /// Writes a logical dump of `database` to `file` with `pg_dump`, in the
    /// custom format (`-Fc`) that [`restore_dump`](Self::restore_dump)
    /// reads.
    pub async fn dump(&self, database: &str, file: &Path) -> Result<()> {
        let mut cmd = self.client_command("pg_dump");
        cmd.args(["--format=custom", "--no-password"])
            .arg(format!("--file={}", file.display()))
            .arg(format!("--dbname={database}"));
        blocking(move || sys::run(&mut cmd)).await
    }

    /// Creates `database` in this cluster and restores a dump made by
    /// [`dump`](Self::dump) into it with `pg_restore` (stopping at the first
    /// error, in one transaction).
    pub async fn restore_dump(&self, file: &Path, database: &str) -> Result<()> {
        let mut conn = sqlx::PgConnection::connect_with(&self.connect_options()).await?;
        sqlx::query(&format!(
            "CREATE DATABASE \"{}\"",
            database.replace('"', "\"\"")
        ))
        .execute(&mut conn)
        .await?;
        conn.close().await?;
        let mut cmd = self.client_command("pg_restore");
        cmd.args(["--exit-on-error", "--single-transaction", "--no-password"])
            .arg(format!("--dbname={database}"))
            .arg(file);
        blocking(move || sys::run(&mut cmd)).await
    }

    /// A PostgreSQL client program (`pg_dump`, `pg_restore`) pointed at this
    /// cluster over TCP with its password.
    fn client_command(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.inner().bin.path(program));
        cmd.args(["--host=127.0.0.1", "--username", crate::throwaway::USER])
            .arg(format!("--port={}", self.port()))
            .env("PGPASSWORD", self.password());
        cmd
    }
}

/// Copies the backup into a new cluster directory, configures recovery and
/// starts the server; promotion is awaited by the caller.
fn prepare_recovery(
    source: &Inner,
    backup: &Path,
    archive: &Path,
    target: &RecoveryTarget,
) -> Result<Inner> {
    let bin: PgBin = source.bin.clone();
    let dir = new_cluster_dir();
    let port = sys::free_port()?;
    let result = (|| {
        sys::create_shared_dir(&dir)?;
        sys::give_to_postgres(&dir)?;
        let data = dir.join("data");
        let mut copy = sys::postgres_command(Path::new("cp"));
        copy.arg("-a").arg(backup).arg(&data);
        sys::run(&mut copy)?;
        let settings = format!(
            "\n# keel-testkit: point-in-time recovery\n\
             port = {port}\n\
             unix_socket_directories = {socket}\n\
             archive_mode = off\n\
             restore_command = {restore}\n\
             recovery_target_action = 'promote'\n\
             {target}",
            socket = quote(&data.display().to_string()),
            restore = quote(&format!("cp \"{}/%f\" \"%p\"", archive.display())),
            target = target.settings(),
        );
        append(&data.join("postgresql.conf"), &settings)?;
        fs::write(data.join("recovery.signal"), "")
            .map_err(|e| Error::io("writing recovery.signal", e))?;
        sys::give_to_postgres(&dir)?;
        Ok(data)
    })();
    match result {
        Ok(data) => Inner::launch(bin, dir, data, port, source.password.clone()),
        Err(e) => {
            let _ = sys::remove_dir(&dir);
            Err(e)
        }
    }
}
