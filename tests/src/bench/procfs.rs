//! What the benchmark reads of a proxy's processes in /proc: CPU time (utime + stime) and
//! resident memory (VmRSS, and its peak VmHWM), summed over a process and its descendants
//! (nginx's master and workers).

use std::{collections::HashMap, fs};

/// Clock ticks per second of `/proc/<pid>/stat` times (USER_HZ).
pub fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// The fields of `/proc/<pid>/stat` after the command name (field 3 onwards).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces.
    let rest = &text[text.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// utime + stime of one process (all its threads), in clock ticks.
pub fn cpu_ticks(pid: u32) -> u64 {
    stat_fields(pid)
        .map(|f| {
            // Fields 14 and 15 of the file: indexes 11 and 12 after the name.
            let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            n(11) + n(12)
        })
        .unwrap_or(0)
}

/// A `Vm*` figure of `/proc/<pid>/status`, in KiB.
fn status_kib(pid: u32, field: &str) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// A process and all its descendants, found by their parent ids.
pub fn tree(root: u32) -> Vec<u32> {
    let mut parent_of = HashMap::new();
    if let Ok(dir) = fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if let Some(ppid) = stat_fields(pid).and_then(|f| f.get(1)?.parse::<u32>().ok()) {
                parent_of.insert(pid, ppid);
            }
        }
    }
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        let mut kids: Vec<u32> = parent_of
            .iter()
            .filter(|&(_, &pp)| pp == p)
            .map(|(&c, _)| c)
            .collect();
        kids.sort_unstable();
        out.extend(kids);
        i += 1;
    }
    out
}

/// CPU ticks summed over `pids`.
pub fn cpu_ticks_of(pids: &[u32]) -> u64 {
    pids.iter().map(|&p| cpu_ticks(p)).sum()
}

/// VmRSS summed over `pids`, KiB.
pub fn rss_kib(pids: &[u32]) -> u64 {
    pids.iter().map(|&p| status_kib(p, "VmRSS:")).sum()
}

/// VmHWM (peak resident set) summed over `pids`, KiB.
pub fn hwm_kib(pids: &[u32]) -> u64 {
    pids.iter().map(|&p| status_kib(p, "VmHWM:")).sum()
}

/// Time on a CPU of one process, nanoseconds: the first field of `/proc/<pid>/task/*/schedstat`
/// summed over its threads. Exact (the scheduler's own clock), where utime + stime are sampled
/// at timer ticks, which skews short bursts on a mostly idle CPU.
pub fn sched_ns(pid: u32) -> u64 {
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    dir.flatten()
        .filter_map(|t| fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// [`sched_ns`] summed over `pids`.
pub fn sched_ns_of(pids: &[u32]) -> u64 {
    pids.iter().map(|&p| sched_ns(p)).sum()
}

/// `write(2)`/`writev(2)` calls of one process (`syscw` of `/proc/<pid>/io`, all its threads).
/// The kernel counts only the file-style calls here: `send(2)`/`sendmsg(2)` are not in it.
pub fn write_calls(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/io"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("syscw:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// [`write_calls`] summed over `pids`.
pub fn write_calls_of(pids: &[u32]) -> u64 {
    pids.iter().map(|&p| write_calls(p)).sum()
}
