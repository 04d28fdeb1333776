//! Running commands inside namespaces, background processes that die with
//! their guard, and a few /proc readers.

use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// A command line for `nsenter --net`: only the network namespace changes,
/// so bpffs pins made by the agent stay visible to us (`ip netns exec` would
/// give every process a private mount namespace and a fresh /sys).
pub fn in_ns(ns: &str, argv: &[&str]) -> Command {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net=/run/netns/{ns}")).arg("--").args(argv);
    c
}

pub fn host(argv: &[&str]) -> Command {
    let mut c = Command::new(argv[0]);
    c.args(&argv[1..]);
    c
}

fn describe(c: &Command) -> String {
    let mut s = c.get_program().to_string_lossy().into_owned();
    for a in c.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs to completion; a non-zero exit is an error carrying stderr.
pub fn run(mut c: Command) -> Result<String> {
    let what = describe(&c);
    let out = c
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("spawn {what}"))?;
    if !out.status.success() {
        bail!(
            "`{what}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs with `input` on stdin (for `ip -batch -`, `iptables-restore`, `nft -f -`).
pub fn run_stdin(mut c: Command, input: &str) -> Result<String> {
    let what = describe(&c);
    let mut child = c
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawn {what}"))?;
    child
        .stdin
        .take()
        .expect("stdin was piped")
        .write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "`{what}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Wall-clock time of one command, for control-plane figures where process
/// start-up is part of what an operator (or openshift-sdn) pays.
pub fn timed(c: Command) -> Result<Duration> {
    let t = Instant::now();
    run(c)?;
    Ok(t.elapsed())
}

/// A background process killed and reaped when dropped, so a panic or an
/// early return never leaves servers or agents behind.
pub struct Bg {
    name: String,
    child: Option<Child>,
}

impl Bg {
    pub fn spawn(name: &str, mut c: Command, log: &Path) -> Result<Self> {
        let f = std::fs::File::create(log)?;
        let child = c
            .stdin(Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f)
            .spawn()
            .with_context(|| format!("spawn {name}: {}", describe(&c)))?;
        Ok(Self {
            name: name.to_string(),
            child: Some(child),
        })
    }

    /// Fails if the process already exited: a server that died on start-up
    /// must not turn into a benchmark of connection refusals.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(c) = self.child.as_mut()
            && let Some(status) = c.try_wait()?
        {
            bail!("{} exited early: {status}", self.name);
        }
        Ok(())
    }

    /// Sends SIGTERM and waits up to `grace` for a clean exit (the agent
    /// detaches and unpins on SIGTERM), then SIGKILL.
    pub fn stop(&mut self, grace: Duration) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        if let Ok(pid) = i32::try_from(c.id()) {
            // SAFETY: plain kill(2) on our own child's pid.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let t = Instant::now();
        while t.elapsed() < grace {
            if let Ok(Some(_)) = c.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
    }

    pub fn wait_output(mut self, log: &Path, limit: Duration) -> Result<String> {
        let mut c = self.child.take().expect("not yet waited");
        let t = Instant::now();
        loop {
            if let Some(status) = c.try_wait()? {
                let out = std::fs::read_to_string(log).unwrap_or_default();
                if !status.success() {
                    bail!("{} failed ({status}): {}", self.name, out.trim());
                }
                return Ok(out);
            }
            if t.elapsed() > limit {
                let _ = c.kill();
                let _ = c.wait();
                bail!("{} did not finish within {limit:?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Bg {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Busy and total jiffies of all CPUs from /proc/stat, and steal.
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
    let text = match run(in_ns(ns, &["cat", "/proc/net/stat/nf_conntrack"])) {
        Ok(t) => t,
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
