//! One locally started service instance per machine, shared by every test
//! process, and stopped once no test process has needed it for a while.
//!
//! Layout of a service's state directory (`<root>/<service>/`):
//!
//! * `lock`: taken (`flock`) by whoever inspects, starts or retires the
//!   instance, so exactly one process starts it;
//! * `leases/<pid>`: one file per test process that uses the instance,
//!   holding the process's start time (so a recycled pid is no lease);
//! * `state`: `port=…`, `reaper=…`, `work=…` of the running instance;
//! * `inst-<port>/`: the instance's files (data directory, logs).
//!
//! The instance runs under a watchdog ("reaper", a small `sh` loop started
//! with `setsid`, so it is no child of any test process and survives it). The
//! reaper stops the instance and deletes its files once no lease holder has
//! been alive for the idle timeout, when the instance dies, or when the state
//! directory is removed.

use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::services::Service;
use crate::sys;

/// How to run one instance, as prepared for a given port and directory.
#[derive(Debug)]
pub(crate) struct Launch {
    /// The program and its arguments; it must stay in the foreground.
    pub(crate) argv: Vec<OsString>,
    /// A shell snippet that asks the instance to stop; `$svc` is the pid of
    /// `argv`'s process and `$work` the instance directory.
    pub(crate) stop: &'static str,
    /// How long the instance may take to become ready.
    pub(crate) startup: Duration,
}

/// Stops a PostgreSQL postmaster the fast way, through its pid file (when the
/// tests run as root, `$svc` is `runuser`, which does not pass signals on).
pub(crate) const STOP_POSTGRES: &str = r#"kill -INT "$(head -n1 "$work/data/postmaster.pid" 2>/dev/null)" 2>/dev/null || kill -TERM "$svc""#;

/// Stops a process that shuts down cleanly on `SIGTERM`.
pub(crate) const STOP_TERM: &str = r#"kill -TERM "$svc""#;

const REAPER: &str = r#"
dir=$1; work=$2; idle=$3; stop=$4; shift 4
echo $$ > "$work/reaper.pid"
quit=0
trap 'quit=1' TERM INT HUP
alive() { [ -r "/proc/$1/status" ] && ! grep -q '^State:.*Z' "/proc/$1/status" 2>/dev/null; }
# A lease names a pid and holds that process's start time, so a recycled pid
# does not keep the instance alive.
holder_alive() {
  alive "$1" || return 1
  [ "$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f20)" = "$(cat "$2" 2>/dev/null)" ]
}
"$@" >>"$work/service.log" 2>&1 </dev/null &
svc=$!
echo "$svc" > "$work/service.pid"
idle_since=$(date +%s)
while [ "$quit" = 0 ]; do
  sleep 1
  [ -d "$dir" ] || break
  if ! alive "$svc"; then echo "keel-testkit: the service exited" >>"$work/service.log"; break; fi
  busy=0
  for f in "$dir"/leases/*; do
    [ -e "$f" ] || continue
    if holder_alive "${f##*/}" "$f"; then busy=1; else rm -f "$f"; fi
  done
  now=$(date +%s)
  if [ "$busy" = 1 ]; then idle_since=$now; continue; fi
  [ $((now - idle_since)) -ge "$idle" ] || continue
  # Idle for long enough: retire under the lock, so that no test process is
  # attaching to this instance at the same moment.
  exec 9>>"$dir/lock"
  flock 9
  for f in "$dir"/leases/*; do
    [ -e "$f" ] && holder_alive "${f##*/}" "$f" && busy=1
  done
  if [ "$busy" = 0 ]; then
    grep -qx "reaper=$$" "$dir/state" 2>/dev/null && rm -f "$dir/state"
    flock -u 9
    break
  fi
  flock -u 9
  exec 9>&-
  idle_since=$now
done
if [ -f "$dir/state" ] && grep -qx "reaper=$$" "$dir/state"; then rm -f "$dir/state"; fi
eval "$stop" 2>/dev/null
i=0
while alive "$svc" && [ $i -lt 150 ]; do sleep 0.1; i=$((i + 1)); done
alive "$svc" && kill -KILL "$svc" 2>/dev/null
wait "$svc" 2>/dev/null
rm -rf "$work"
"#;

/// Returns the address (`127.0.0.1:port`) of the shared instance in `dir`,
/// starting one if none is running, and records this process as a user.
pub(crate) fn ensure(
    dir: &Path,
    service: Service,
    idle: Duration,
    prepare: impl FnOnce(&Path, u16) -> Result<Launch>,
) -> Result<String> {
    sys::create_shared_dir(&dir.join("leases"))?;
    let lock_path = dir.join("lock");
    let lock = File::options()
        .create(true)
        .append(true)
        .open(&lock_path)
        .map_err(|e| Error::io(format!("opening {}", lock_path.display()), e))?;
    lock.lock()
        .map_err(|e| Error::io(format!("locking {}", lock_path.display()), e))?;

    // The lease comes first: from now on the reaper will not retire the
    // instance while this process lives.
    let lease = dir.join("leases").join(std::process::id().to_string());
    let started = sys::process_start_time(std::process::id()).unwrap_or_default();
    fs::write(&lease, started).map_err(|e| Error::io(format!("writing {}", lease.display()), e))?;

    if let Some(state) = State::read(dir) {
        let address = format!("127.0.0.1:{}", state.port);
        if sys::process_alive(state.reaper) && service.ready(&address) {
            return Ok(address);
        }
        // Stale: the reaper is gone or the service no longer answers. Ask a
        // surviving reaper to clean up after itself; a new instance gets a
        // new port and directory, so there is nothing to wait for.
        tracing::warn!(%service, port = state.port, "discarding a stale shared instance");
        if sys::process_alive(state.reaper) {
            let _ = sys::run(std::process::Command::new("kill").arg(state.reaper.to_string()));
        } else {
            // The watchdog was killed; its service may have survived it.
            stop_orphan(&state.work);
            let _ = sys::remove_dir(&state.work);
        }
        let _ = fs::remove_file(dir.join("state"));
    }

    start(dir, service, idle, prepare)
    // `lock` is released when dropped here.
}

fn start(
    dir: &Path,
    service: Service,
    idle: Duration,
    prepare: impl FnOnce(&Path, u16) -> Result<Launch>,
) -> Result<String> {
    let port = sys::free_port()?;
    let work = dir.join(format!("inst-{port}"));
    sys::remove_dir(&work)?;
    sys::create_shared_dir(&work)?;
    let launch = match prepare(&work, port) {
        Ok(launch) => launch,
        Err(e) => {
            let _ = sys::remove_dir(&work);
            return Err(e);
        }
    };
    let idle_secs = idle.as_secs().max(1).to_string();
    let mut args: Vec<&OsStr> = vec![
        dir.as_os_str(),
        work.as_os_str(),
        OsStr::new(&idle_secs),
        OsStr::new(launch.stop),
    ];
    args.extend(launch.argv.iter().map(OsString::as_os_str));
    sys::spawn_detached(REAPER, &args, &work.join("reaper.log"))?;
    tracing::info!(%service, port, dir = %work.display(), "started a shared test instance");

    let address = format!("127.0.0.1:{port}");
    let log = work.join("service.log");
    let deadline = Instant::now() + launch.startup;
    let reaper_pid = || {
        fs::read_to_string(work.join("reaper.pid"))
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok())
    };
    loop {
        if service.ready(&address) {
            break;
        }
        let failed = if Instant::now() > deadline {
            Some(format!(
                "not ready on {address} after {} s",
                launch.startup.as_secs()
            ))
        } else if !work.exists() {
            Some("the service exited during start-up".to_owned())
        } else {
            None
        };
        if let Some(reason) = failed {
            let log_tail = sys::tail(&log, 20);
            if let Some(pid) = reaper_pid() {
                let _ = sys::run(std::process::Command::new("kill").arg(pid.to_string()));
            }
            return Err(Error::StartFailed {
                service,
                reason,
                log,
                log_tail,
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    }

    let reaper = reaper_pid().unwrap_or(0);
    State {
        port,
        reaper,
        work: work.clone(),
    }
    .write(dir)?;
    Ok(address)
}

/// Stops what an instance whose watchdog died may have left running: a
/// PostgreSQL postmaster (by its pid file), or the service process.
fn stop_orphan(work: &Path) {
    let pid_in = |file: &str| {
        fs::read_to_string(work.join(file))
            .ok()
            .and_then(|s| s.lines().next()?.trim().parse::<u32>().ok())
            .filter(|pid| sys::process_alive(*pid))
    };
    if let Some(pid) = pid_in("data/postmaster.pid") {
        let _ = sys::run(std::process::Command::new("kill").args(["-INT", &pid.to_string()]));
    }
    if let Some(pid) = pid_in("service.pid") {
        let _ = sys::run(std::process::Command::new("kill").arg(pid.to_string()));
    }
}

/// What `state` records about the running instance.
#[derive(Debug)]
struct State {
    port: u16,
    reaper: u32,
    work: PathBuf,
}

impl State {
    fn read(dir: &Path) -> Option<Self> {
        let text = fs::read_to_string(dir.join("state")).ok()?;
        let field = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
                .map(str::to_owned)
        };
        Some(Self {
            port: field("port")?.parse().ok()?,
            reaper: field("reaper")?.parse().ok()?,
            work: PathBuf::from(field("work")?),
        })
    }

    fn write(&self, dir: &Path) -> Result<()> {
        let text = format!(
            "port={}\nreaper={}\nwork={}\n",
            self.port,
            self.reaper,
            self.work.display()
        );
        let tmp = dir.join("state.tmp");
        let path = dir.join("state");
        fs::write(&tmp, text)
            .and_then(|()| fs::rename(&tmp, &path))
            .map_err(|e| Error::io(format!("writing {}", path.display()), e))
    }
}
