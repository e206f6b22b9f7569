//! Small operating-system helpers: processes, users, ports, files.

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::error::{Error, Result};

/// Whether a process with this pid exists and is not a zombie.
pub(crate) fn process_alive(pid: u32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state letter follows the command name, which is in parentheses and
    // may itself contain spaces or parentheses.
    match stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().next())
    {
        Some(state) => state != "Z" && state != "X",
        None => false,
    }
}

/// A process's start time (field 22 of `/proc/<pid>/stat`, in clock ticks
/// since boot): with the pid, it identifies the process.
pub(crate) fn process_start_time(pid: u32) -> Option<String> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_name = &stat[stat.rfind(')')? + 2..];
    after_name.split(' ').nth(19).map(str::to_owned)
}

/// Whether this process runs as root (PostgreSQL then needs another user).
pub(crate) fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|rest| rest.split_whitespace().next().map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// A TCP port on 127.0.0.1 that nothing listens on right now.
pub(crate) fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .map_err(|e| Error::io("looking for a free port on 127.0.0.1", e))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| Error::io("looking for a free port on 127.0.0.1", e))
}

fn connect(addr: &str, timeout: Duration) -> Option<TcpStream> {
    let addr: SocketAddr = addr.to_socket_addrs().ok()?.next()?;
    let stream = TcpStream::connect_timeout(&addr, timeout).ok()?;
    stream.set_read_timeout(Some(timeout)).ok()?;
    stream.set_write_timeout(Some(timeout)).ok()?;
    Some(stream)
}

/// Whether a Redis server at `addr` answers `PING`.
pub(crate) fn redis_answers(addr: &str) -> bool {
    let Some(mut stream) = connect(addr, Duration::from_millis(500)) else {
        return false;
    };
    if stream.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0_u8; 64];
    matches!(stream.read(&mut buf), Ok(n) if buf[..n].starts_with(b"+PONG"))
}

/// Whether an HTTP server at `addr` answers `GET /` with status 200 (the
/// Pub/Sub emulator answers `Ok` once it is ready).
pub(crate) fn http_ok(addr: &str) -> bool {
    http_ok_at(addr, "/")
}

/// Whether `GET path` on `addr` answers `200`.
pub(crate) fn http_ok_at(addr: &str, path: &str) -> bool {
    let Some(mut stream) = connect(addr, Duration::from_millis(1000)) else {
        return false;
    };
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut buf = [0_u8; 64];
    matches!(stream.read(&mut buf), Ok(n) if buf[..n].starts_with(b"HTTP/1.1 200"))
}

/// Finds an executable on `PATH`.
pub(crate) fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

/// The directory holding PostgreSQL's server binaries (`initdb`, `postgres`,
/// `pg_ctl`): `KEEL_TESTKIT_PG_BIN`, else the newest
/// `/usr/lib/postgresql/*/bin`, else wherever `initdb` is on `PATH`.
pub(crate) fn postgres_bin_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("KEEL_TESTKIT_PG_BIN").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let major: u32 = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").is_file().then_some((major, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Some(bin);
    }
    which("initdb").and_then(|p| p.parent().map(Path::to_path_buf))
}

/// The user PostgreSQL runs as when the tests run as root.
pub(crate) const POSTGRES_USER: &str = "postgres";

/// A command that runs `program` as the `postgres` user when this process is
/// root (PostgreSQL refuses to run as root), or as ourselves otherwise.
pub(crate) fn postgres_command(program: &Path) -> Command {
    if is_root() {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", POSTGRES_USER, "--"]).arg(program);
        cmd
    } else {
        Command::new(program)
    }
}

/// Gives `path` (recursively) to the `postgres` user when we are root.
pub(crate) fn give_to_postgres(path: &Path) -> Result<()> {
    if !is_root() {
        return Ok(());
    }
    let mut cmd = Command::new("chown");
    cmd.arg("-R")
        .arg(format!("{POSTGRES_USER}:{POSTGRES_USER}"))
        .arg(path);
    run(&mut cmd)
}

/// Runs a command to completion; a non-zero exit becomes [`Error::Command`]
/// carrying its output.
pub(crate) fn run(cmd: &mut Command) -> Result<()> {
    let line = describe(cmd);
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Error::Command {
            command: line.clone(),
            detail: format!("could not run it: {e}"),
        })?;
    if output.status.success() {
        return Ok(());
    }
    let mut detail = format!("{}", output.status);
    for stream in [&output.stdout, &output.stderr] {
        let text = String::from_utf8_lossy(stream);
        let text = text.trim();
        if !text.is_empty() {
            detail.push('\n');
            detail.push_str(text);
        }
    }
    Err(Error::Command {
        command: line,
        detail,
    })
}

fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The last `lines` lines of a log file, or an empty string.
pub(crate) fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Creates a directory (and parents) that other local users may enter, so
/// the `postgres` user can reach a data directory below it.
pub(crate) fn create_shared_dir(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::create_dir_all(path).map_err(|e| Error::io(format!("creating {}", path.display()), e))?;
    let mode = fs::metadata(path)
        .map_err(|e| Error::io(format!("reading {}", path.display()), e))?
        .permissions()
        .mode();
    if mode & 0o755 != 0o755 {
        fs::set_permissions(path, fs::Permissions::from_mode(mode | 0o755))
            .map_err(|e| Error::io(format!("setting permissions of {}", path.display()), e))?;
    }
    Ok(())
}

/// Removes a directory tree, ignoring one that is already gone.
pub(crate) fn remove_dir(path: &Path) -> Result<()> {
    match fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(format!("removing {}", path.display()), e)),
    }
}

/// Spawns `sh -c script` in a new session (`setsid --fork`), detached from
/// this process: it keeps running when the test process exits, and has no
/// handle on our standard streams.
pub(crate) fn spawn_detached(script: &str, args: &[&std::ffi::OsStr], log: &Path) -> Result<()> {
    let log_file = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| Error::io(format!("opening {}", log.display()), e))?;
    let log_err = log_file
        .try_clone()
        .map_err(|e| Error::io(format!("opening {}", log.display()), e))?;
    let mut cmd = Command::new("setsid");
    cmd.args(["--fork", "sh", "-c", script, "keel-testkit-watchdog"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(log_file)
        .stderr(log_err);
    // `setsid --fork` returns at once; waiting for it leaves no zombie.
    let status = cmd.status().map_err(|e| Error::Command {
        command: "setsid --fork sh -c …".to_owned(),
        detail: format!("could not run it: {e}"),
    })?;
    if !status.success() {
        return Err(Error::Command {
            command: "setsid --fork sh -c …".to_owned(),
            detail: status.to_string(),
        });
    }
    Ok(())
}

/// Whether a PostgreSQL server at `addr` lets the test kit log in.
pub(crate) fn postgres_accepts(addr: &str) -> bool {
    postgres_login(addr).is_ok()
}

/// Logs in to the PostgreSQL server at `addr` as user `postgres`, database
/// `postgres`, without a password (what the kit's default connection string
/// does), and says why when that fails: nothing listens, the server asks for
/// a password, refuses the role, is starting up, …
///
/// A server that merely answers is not enough: a stock installation asks
/// for a password over TCP, and tests against it would all fail with
/// `28P01`.
pub(crate) fn postgres_login(addr: &str) -> std::result::Result<(), String> {
    let Some(mut stream) = connect(addr, Duration::from_millis(1000)) else {
        return Err("nothing answers there".to_owned());
    };
    let mut body = Vec::new();
    body.extend_from_slice(&196_608_u32.to_be_bytes()); // protocol 3.0
    for part in ["user", "postgres", "database", "postgres"] {
        body.extend_from_slice(part.as_bytes());
        body.push(0);
    }
    body.push(0);
    let len = u32::try_from(body.len() + 4).unwrap_or(u32::MAX);
    let mut message = len.to_be_bytes().to_vec();
    message.extend_from_slice(&body);
    if stream.write_all(&message).is_err() {
        return Err("the connection closed before the login".to_owned());
    }
    let result = read_login(&mut stream);
    // Terminate, so the server does not log an unexpected EOF.
    let _ = stream.write_all(b"X\0\0\0\x04");
    result
}

/// Reads the server's answers to a startup message until it is ready for
/// queries (logged in) or refuses.
fn read_login(stream: &mut TcpStream) -> std::result::Result<(), String> {
    let not_postgres = || "something answers there, but not as PostgreSQL would".to_owned();
    loop {
        let mut header = [0_u8; 5];
        stream
            .read_exact(&mut header)
            .map_err(|_| "the server closed the connection during the login".to_owned())?;
        let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
        if !(4..=1 << 20).contains(&len) {
            return Err(not_postgres());
        }
        let mut payload = vec![0_u8; len - 4];
        stream
            .read_exact(&mut payload)
            .map_err(|_| "the server closed the connection during the login".to_owned())?;
        match header[0] {
            b'R' => {
                let method = payload
                    .get(..4)
                    .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
                    .ok_or_else(not_postgres)?;
                let name = match method {
                    0 => continue, // AuthenticationOk
                    3 => "a clear-text password",
                    5 => "an MD5 password",
                    10 => "a SCRAM password",
                    7 | 9 => "Kerberos/GSSAPI or SSPI",
                    _ => "an authentication method the kit cannot answer",
                };
                return Err(format!(
                    "the server asks user \"postgres\" for {name} (the kit logs in without one)"
                ));
            }
            b'E' => {
                let field = |tag: u8| {
                    payload
                        .split(|b| *b == 0)
                        .find(|f| f.first() == Some(&tag))
                        .map(|f| String::from_utf8_lossy(&f[1..]).into_owned())
                        .unwrap_or_default()
                };
                return Err(format!(
                    "the login was refused: {} (SQLSTATE {})",
                    field(b'M'),
                    field(b'C')
                ));
            }
            b'Z' => return Ok(()),
            // ParameterStatus, BackendKeyData, notices: read on.
            b'S' | b'K' | b'N' | b'v' => {}
            _ => return Err(not_postgres()),
        }
    }
}
