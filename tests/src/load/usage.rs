//! Resource use of processes, read from `/proc` (Linux).
//!
//! CPU time comes from `/proc/<pid>/stat` (user and system time, which
//! include the process's threads that already exited), memory from
//! `/proc/<pid>/status` (`VmRSS`, and `VmHWM`, the peak resident set).
//! A [`UsageTracker`] samples groups of processes repeatedly, so that a
//! process that exits during the run (a PostgreSQL backend whose
//! connection closed) still counts with its last sample.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

/// One reading of a process's resource use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcessUsage {
    /// The process id.
    pub pid: u32,
    /// When the process started, in clock ticks after boot: together with
    /// the pid it names one process even when pids are reused.
    pub start_ticks: u64,
    /// CPU time in user mode, all threads.
    pub user: Duration,
    /// CPU time in kernel mode, all threads.
    pub system: Duration,
    /// Resident set now, in bytes.
    pub rss_bytes: u64,
    /// Peak resident set over the process's life, in bytes.
    pub peak_rss_bytes: u64,
}

impl ProcessUsage {
    /// Reads the usage of process `pid`.
    ///
    /// # Errors
    ///
    /// The process does not exist (any more), or `/proc` is not readable
    /// or not in the expected format.
    pub fn read(pid: u32) -> io::Result<Self> {
        Self::read_from(Path::new("/proc"), pid)
    }

    fn read_from(proc: &Path, pid: u32) -> io::Result<Self> {
        let dir = proc.join(pid.to_string());
        let stat = std::fs::read_to_string(dir.join("stat"))?;
        let status = std::fs::read_to_string(dir.join("status"))?;
        let (user_ticks, system_ticks, start_ticks) = parse_stat(&stat)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "unreadable stat"))?;
        Ok(Self {
            pid,
            start_ticks,
            user: ticks(user_ticks),
            system: ticks(system_ticks),
            rss_bytes: status_kib(&status, "VmRSS:").unwrap_or(0) * 1024,
            peak_rss_bytes: status_kib(&status, "VmHWM:").unwrap_or(0) * 1024,
        })
    }

    /// User plus system time.
    #[must_use]
    pub fn cpu(&self) -> Duration {
        self.user + self.system
    }
}

/// `(utime, stime, starttime)` in clock ticks from a `/proc/<pid>/stat`
/// line. The command name (field 2) may hold spaces and parentheses, so
/// the fields are counted from the last `)`.
fn parse_stat(stat: &str) -> Option<(u64, u64, u64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // Field 3 (state) is the first after the name: field n is at n - 3.
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    Some((field(14)?, field(15)?, field(22)?))
}

fn status_kib(status: &str, key: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 on every Linux this
/// runs on, used when `getconf` is missing).
fn ticks_per_second() -> u64 {
    static TICKS: OnceLock<u64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .filter(|&t| t > 0)
            .unwrap_or(100)
    })
}

fn ticks(n: u64) -> Duration {
    let per_second = ticks_per_second();
    Duration::from_secs(n / per_second)
        + Duration::from_nanos((n % per_second) * 1_000_000_000 / per_second)
}

/// The pids of running processes whose command line (arguments joined by
/// spaces) satisfies `matches`. Processes that vanish while being listed
/// are skipped.
#[must_use]
pub fn find_processes(matches: impl Fn(&str) -> bool) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|raw| {
                let line = String::from_utf8_lossy(&raw).replace('\0', " ");
                matches(line.trim_end())
            })
        })
        .collect();
    pids.sort_unstable();
    pids
}

/// The whole machine's CPU time so far, busy and total, from the first
/// line of `/proc/stat`: how loaded the machine was during a run
/// (busy ÷ total over an interval, times the core count, is the load).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MachineCpu {
    /// Time spent on anything but idle and I/O wait, all cores.
    pub busy: Duration,
    /// All time, all cores.
    pub total: Duration,
}

impl MachineCpu {
    /// Reads `/proc/stat`.
    ///
    /// # Errors
    ///
    /// `/proc/stat` is missing or not in the expected format.
    pub fn read() -> io::Result<Self> {
        let stat = std::fs::read_to_string("/proc/stat")?;
        Self::parse(&stat)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "unreadable /proc/stat"))
    }

    fn parse(stat: &str) -> Option<Self> {
        let line = stat.lines().next()?.strip_prefix("cpu ")?;
        let values: Vec<u64> = line
            .split_whitespace()
            .map(str::parse)
            .collect::<Result<_, _>>()
            .ok()?;
        // user nice system idle iowait irq softirq steal [guest guest_nice];
        // guest time is already counted in user.
        let total: u64 = values.iter().take(8).sum();
        let idle = values.get(3)? + values.get(4).copied().unwrap_or(0);
        Some(Self {
            busy: ticks(total - idle),
            total: ticks(total),
        })
    }

    /// The share of all cores that was busy between `earlier` and `self`
    /// (0.0 to 1.0).
    #[must_use]
    pub fn busy_share_since(&self, earlier: &Self) -> f64 {
        let total = self.total.saturating_sub(earlier.total).as_secs_f64();
        if total == 0.0 {
            return 0.0;
        }
        self.busy.saturating_sub(earlier.busy).as_secs_f64() / total
    }
}

/// The one-minute load average from `/proc/loadavg`, if readable.
#[must_use]
pub fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// CPU and memory of named groups of processes over a run.
///
/// Call [`observe`](Self::observe) for each group every so often (with
/// the group's current pids), [`mark_start`](Self::mark_start) when the
/// measured part begins, and read [`cpu`](Self::cpu) and
/// [`peak_rss`](Self::peak_rss) at the end. A process's CPU counts from
/// its reading at the start mark (or from zero if it started later) to
/// its last reading, so a process that exits between readings loses at
/// most one sampling interval.
#[derive(Debug, Default)]
pub struct UsageTracker {
    groups: BTreeMap<String, Group>,
}

#[derive(Debug, Default)]
struct Group {
    /// CPU at the start mark, by (pid, start ticks).
    base: HashMap<(u32, u64), Duration>,
    /// CPU at the latest reading.
    last: HashMap<(u32, u64), Duration>,
    peak_rss_bytes: u64,
    peak_processes: usize,
}

impl UsageTracker {
    /// An empty tracker.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads every process in `pids` as part of `group`; pids that no
    /// longer exist are skipped. Returns how many were read.
    pub fn observe(&mut self, group: &str, pids: &[u32]) -> usize {
        let entry = self.groups.entry(group.to_owned()).or_default();
        let mut read = 0;
        for &pid in pids {
            if let Ok(usage) = ProcessUsage::read(pid) {
                entry.last.insert((pid, usage.start_ticks), usage.cpu());
                entry.peak_rss_bytes = entry.peak_rss_bytes.max(usage.peak_rss_bytes);
                read += 1;
            }
        }
        entry.peak_processes = entry.peak_processes.max(read);
        read
    }

    /// Starts the measured part: CPU used before this mark does not count.
    pub fn mark_start(&mut self) {
        for group in self.groups.values_mut() {
            group.base = group.last.clone();
        }
    }

    /// CPU time (user + system) `group` used since the start mark.
    #[must_use]
    pub fn cpu(&self, group: &str) -> Duration {
        self.groups.get(group).map_or(Duration::ZERO, |g| {
            g.last
                .iter()
                .map(|(key, &now)| now.saturating_sub(g.base.get(key).copied().unwrap_or_default()))
                .sum()
        })
    }

    /// The largest peak resident set of one process of `group` (a sum
    /// over processes would count shared memory many times).
    #[must_use]
    pub fn peak_rss(&self, group: &str) -> u64 {
        self.groups.get(group).map_or(0, |g| g.peak_rss_bytes)
    }

    /// The most processes of `group` seen in one reading.
    #[must_use]
    pub fn peak_processes(&self, group: &str) -> usize {
        self.groups.get(group).map_or(0, |g| g.peak_processes)
    }

    /// The groups observed so far, in name order.
    pub fn groups(&self) -> impl Iterator<Item = &str> {
        self.groups.keys().map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_command_name() {
        // A command name with a space and a parenthesis, as a thread may have.
        let line = "4242 (tokio (rt) 1) S 1 4242 4242 0 -1 4194560 100 0 0 0 \
                    250 75 0 0 20 0 9 0 123456 1000000 500 18446744073709551615";
        assert_eq!(parse_stat(line), Some((250, 75, 123_456)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn this_process_uses_cpu_and_memory() {
        let me = ProcessUsage::read(std::process::id()).unwrap();
        let mut spin = 0_u64;
        let start = std::time::Instant::now();
        while start.elapsed() < Duration::from_millis(200) {
            spin = spin.wrapping_add(1);
        }
        let later = ProcessUsage::read(std::process::id()).unwrap();
        assert!(spin > 0);
        assert!(later.cpu() > me.cpu(), "{later:?} after {me:?}");
        assert!(later.rss_bytes > 0 && later.peak_rss_bytes >= later.rss_bytes);
        assert_eq!(later.start_ticks, me.start_ticks);
        assert!(ProcessUsage::read(u32::MAX).is_err());
    }

    #[test]
    fn the_tracker_counts_from_the_start_mark() {
        let pid = std::process::id();
        let mut tracker = UsageTracker::new();
        assert_eq!(tracker.observe("me", &[pid, u32::MAX]), 1);
        let before = ProcessUsage::read(pid).unwrap().cpu();
        tracker.mark_start();
        let start = std::time::Instant::now();
        while start.elapsed() < Duration::from_millis(200) {
            std::hint::black_box(start.elapsed());
        }
        tracker.observe("me", &[pid]);
        let after = ProcessUsage::read(pid).unwrap().cpu();
        let counted = tracker.cpu("me");
        assert!(counted > Duration::ZERO);
        assert!(counted <= after - before + Duration::from_millis(20));
        assert!(tracker.peak_rss("me") > 0);
        assert_eq!(tracker.peak_processes("me"), 1);
        assert_eq!(tracker.cpu("nobody"), Duration::ZERO);
        assert_eq!(tracker.groups().collect::<Vec<_>>(), ["me"]);
    }

    #[test]
    fn this_process_is_found_by_its_command_line() {
        let me = std::process::id();
        let exe = std::env::current_exe().unwrap();
        let name = exe.file_name().unwrap().to_str().unwrap().to_owned();
        assert!(find_processes(|line| line.contains(&name)).contains(&me));
        assert!(find_processes(|_| false).is_empty());
    }

    #[test]
    fn machine_cpu_parses_and_moves_forward() {
        let sample = "cpu  100 5 50 800 20 1 2 3 0 0\ncpu0 1 2 3 4\n";
        let cpu = MachineCpu::parse(sample).unwrap();
        assert_eq!(cpu.total, ticks(981));
        assert_eq!(cpu.busy, ticks(161));
        let a = MachineCpu::read().unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let b = MachineCpu::read().unwrap();
        assert!(b.total >= a.total);
        assert!((0.0..=1.0).contains(&b.busy_share_since(&a)));
        assert!(load_average().is_some());
    }
}
