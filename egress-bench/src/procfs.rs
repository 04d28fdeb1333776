//! What the benchmark reads from /proc around its cells: machine-wide CPU
//! time, per-namespace conntrack statistics, one-line files.

use anyhow::{Context, Result};

/// Busy and steal jiffies of all CPUs together, from /proc/stat.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuTimes {
    pub busy: u64,
    pub steal: u64,
}

pub fn cpu_times() -> Result<CpuTimes> {
    let s = std::fs::read_to_string("/proc/stat")?;
    let line = s.lines().next().context("empty /proc/stat")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal guest guest_nice; guest
    // time is already inside user.
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    Ok(CpuTimes {
        busy: total - idle,
        steal: v.get(7).copied().unwrap_or(0),
    })
}

pub fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// Per-netns conntrack statistics from /proc/net/stat/nf_conntrack (what
/// `conntrack -S` prints), summed over CPUs, by column name.
pub fn conntrack_stats(ns: &str) -> Result<Vec<(String, u64)>> {
    let text = match egress_lab::exec_in(ns, "cat", &["/proc/net/stat/nf_conntrack"]) {
        Ok(out) => out.stdout,
        // Conntrack is built in here; if it is not, there is nothing to count.
        Err(_) => return Ok(Vec::new()),
    };
    let mut lines = text.lines();
    let names: Vec<String> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_string)
        .collect();
    let mut sums = vec![0u64; names.len()];
    for l in lines {
        for (i, f) in l.split_whitespace().enumerate() {
            if i < sums.len() {
                sums[i] += u64::from_str_radix(f, 16).unwrap_or(0);
            }
        }
    }
    Ok(names.into_iter().zip(sums).collect())
}

pub fn read_trim(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}
