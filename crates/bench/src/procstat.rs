//! CPU time and resident memory of a process, read from `/proc/<pid>` (Linux only; elsewhere
//! every sample is `None`).

use std::time::Instant;

/// Linux reports CPU times in clock ticks of `USER_HZ`, which is 100 on every architecture
/// user space sees (the kernel scales to it whatever its own `HZ`).
const TICKS_PER_SEC: f64 = 100.0;

/// One reading of a process.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// When it was read.
    pub at: Instant,
    /// User plus system CPU time, seconds.
    pub cpu_secs: f64,
    /// Resident set size, KiB.
    pub rss_kib: u64,
}

/// CPU time a process's live threads have run, in seconds, summed from
/// `/proc/<pid>/task/*/schedstat` (nanoseconds, where `/proc/<pid>/stat` counts 10 ms
/// ticks: too coarse for a connect phase of a fifth of a second). Threads that already
/// ended are not counted.
pub fn cpu_secs_precise(p: Proc) -> Option<f64> {
    let dir = format!("{}/task", p.dir());
    let mut ns: u64 = 0;
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let Ok(text) = std::fs::read_to_string(entry.path().join("schedstat")) else {
            // The thread ended between listing and reading.
            continue;
        };
        ns = ns.saturating_add(parse_schedstat_ns(&text)?);
    }
    Some(ns as f64 / 1e9)
}

/// The first field of a `schedstat` line: nanoseconds spent on a CPU.
fn parse_schedstat_ns(text: &str) -> Option<u64> {
    text.split_whitespace().next()?.parse().ok()
}

/// Which process to read: a pid, or this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proc {
    /// This process (`/proc/self`).
    Current,
    /// Another process.
    Pid(u32),
}

impl Proc {
    fn dir(self) -> String {
        match self {
            Proc::Current => "/proc/self".to_string(),
            Proc::Pid(pid) => format!("/proc/{pid}"),
        }
    }

    /// Reads CPU time and RSS now; `None` if the process is gone or `/proc` is not there.
    pub fn sample(self) -> Option<Sample> {
        let dir = self.dir();
        let stat = std::fs::read_to_string(format!("{dir}/stat")).ok()?;
        let status = std::fs::read_to_string(format!("{dir}/status")).ok()?;
        Some(Sample {
            at: Instant::now(),
            cpu_secs: parse_cpu_ticks(&stat)? as f64 / TICKS_PER_SEC,
            rss_kib: parse_rss_kib(&status)?,
        })
    }
}

/// utime + stime from the text of `/proc/<pid>/stat`.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) is in parentheses and may contain spaces: count from the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // After ')': state is field 3; utime and stime are fields 14 and 15.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// VmRSS from the text of `/proc/<pid>/status`.
fn parse_rss_kib(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// CPU use between two samples, in percent of one core.
pub fn cpu_percent(from: &Sample, to: &Sample) -> f64 {
    let wall = to.at.duration_since(from.at).as_secs_f64();
    if wall <= 0.0 {
        return 0.0;
    }
    100.0 * (to.cpu_secs - from.cpu_secs) / wall
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_spaces_in_name() {
        let stat = "4242 (my (odd) proc) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 1 0";
        assert_eq!(parse_cpu_ticks(stat), Some(300));
        assert_eq!(parse_cpu_ticks("garbage"), None);
    }

    #[test]
    fn parses_schedstat() {
        assert_eq!(parse_schedstat_ns("123456789 2000 7\n"), Some(123_456_789));
        assert_eq!(parse_schedstat_ns(""), None);
        if cfg!(target_os = "linux") {
            assert!(cpu_secs_precise(Proc::Current).is_some_and(|s| s > 0.0));
        }
    }

    #[test]
    fn parses_rss() {
        let status = "Name:\tx\nVmPeak:\t  9000 kB\nVmRSS:\t    1234 kB\nThreads:\t1\n";
        assert_eq!(parse_rss_kib(status), Some(1234));
    }

    #[test]
    fn samples_this_process() {
        if cfg!(target_os = "linux") {
            let s = Proc::Current
                .sample()
                .expect("/proc/self is readable on Linux");
            assert!(s.rss_kib > 0);
        }
    }
}
