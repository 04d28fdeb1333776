//! `cargo xtask …`: the project's build, test and lab entry points.

mod demo;
mod lab;
mod measure;
mod prereq;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Build, test and lab tooling of the egress dataplane")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install the eBPF toolchain if needed, then build the eBPF objects.
    BuildEbpf,
    /// build-ebpf, then build the whole workspace.
    Build,
    /// build, a benchmark smoke run, then every unit and integration test.
    Test {
        /// Skip the benchmark smoke run.
        #[arg(long)]
        no_bench: bool,
        /// Extra arguments for the test binaries (after `--`).
        #[arg(last = true)]
        test_args: Vec<String>,
    },
    /// The namespace cluster with one agent per node.
    Lab {
        #[command(subcommand)]
        cmd: LabCmd,
    },
    /// Bring the lab up, send traffic from selected and unselected pods and
    /// show what the server saw, then the egress node's NAT table.
    Demo {
        /// Use the binaries already built.
        #[arg(long)]
        no_build: bool,
    },
    /// Measure failover in a three-node Kubernetes-mode lab: cut the egress
    /// node's link, kill its agent, time the first packet through the new
    /// holder (also written to target/lab/failover.json, or
    /// failover-holder-is-leader.json).
    Failover {
        /// Use the binaries already built.
        #[arg(long)]
        no_build: bool,
        /// Cut this long after the holder's last claim renewal: 0 gives the
        /// longest failover, `claim_renew_ms` (300) the shortest.
        #[arg(long, default_value_t = 0)]
        after_renewal_ms: u64,
        /// The holder is the elected assigner: a standby must take the
        /// leader Lease as well (by default the holder is another node).
        #[arg(long)]
        holder_is_leader: bool,
    },
    /// Measure the new-pod window: a selected pod's interface is created
    /// while the pod already sends a datagram every millisecond; prints when
    /// its first datagram reached the server with the egress IP and how
    /// many left with another address before (target/lab/new-pod-window-*.json).
    NewPodWindow {
        /// Use the binaries already built.
        #[arg(long)]
        no_build: bool,
        /// Kubernetes mode: the Pod object (with its IP) is created right
        /// after the interface, as the kubelet reports it.
        #[arg(long)]
        kubernetes: bool,
        #[arg(long, default_value_t = 5)]
        runs: u32,
    },
    /// Measure claim-renewal jitter: the intervals between node1's claim
    /// renewals as the lab's API server sees them, with node1's NAT map
    /// filled through its pin (target/lab/renewal-jitter.json). The agent
    /// is EGRESS_AGENT_BIN or the debug build.
    RenewalJitter {
        /// Use the binaries already built.
        #[arg(long)]
        no_build: bool,
        /// Flows to put in the NAT map (default: its max_flows).
        #[arg(long)]
        flows: Option<u64>,
        #[arg(long, default_value_t = 20)]
        seconds: u64,
    },
    /// Run the datapath fuzz target (egress-testrun, release build): mutated
    /// packets through pod_ingress and uplink_ingress with invariants checked
    /// after each; prints packets, verdicts, drops and violations with reproducers.
    Fuzz {
        /// Seconds to run.
        #[arg(long, default_value_t = 60)]
        duration: u64,
        /// The generator's seed (default: from the clock; printed).
        #[arg(long)]
        seed: Option<u64>,
        /// Stop after this many packets instead (replays a finding).
        #[arg(long)]
        packets: Option<u64>,
    },
    /// Measure the assigner's pod store at N realistic pods served by
    /// egress-fake-api: retained heap and RSS with full Pod objects (as
    /// before) and with the slim PodInfo store (egress-k8s/src/pods.rs).
    AssignerMemory {
        #[arg(long, default_value_t = 20_000)]
        pods: usize,
    },
    /// Run the benchmark (egress-bench, release build); arguments pass through.
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

#[derive(Subcommand)]
enum LabCmd {
    /// Tear down any previous lab, then build it and start the agents.
    Up {
        /// Use the binaries already built.
        #[arg(long)]
        no_build: bool,
    },
    /// Remove the lab's namespaces, processes and pinned maps.
    Down {
        /// Remove the namespaces of this prefix instead (e.g. those a killed
        /// test run left behind: `eg` and four hex digits).
        #[arg(long)]
        prefix: Option<String>,
    },
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().cmd {
        Cmd::BuildEbpf => build_ebpf(),
        Cmd::Build => build(),
        Cmd::Test {
            no_bench,
            test_args,
        } => test(no_bench, &test_args),
        Cmd::Lab {
            cmd: LabCmd::Up { no_build },
        } => {
            if !no_build {
                build_agent()?;
            }
            lab::up().map(egress_lab::Lab::persist)
        }
        Cmd::Lab {
            cmd: LabCmd::Down { prefix: None },
        } => lab::down(),
        Cmd::Lab {
            cmd: LabCmd::Down {
                prefix: Some(prefix),
            },
        } => lab::down_prefix(&prefix),
        Cmd::Demo { no_build } => {
            if !no_build {
                build_agent()?;
            }
            demo::run()
        }
        Cmd::Failover {
            no_build,
            after_renewal_ms,
            holder_is_leader,
        } => {
            if !no_build {
                build_agent()?;
            }
            let holder = if holder_is_leader {
                egress_lab::failover::Holder::Leader
            } else {
                egress_lab::failover::Holder::NotLeader
            };
            failover(std::time::Duration::from_millis(after_renewal_ms), holder)
        }
        Cmd::NewPodWindow {
            no_build,
            kubernetes,
            runs,
        } => {
            if !no_build {
                build_agent()?;
            }
            measure::new_pod_window(kubernetes, runs)
        }
        Cmd::RenewalJitter {
            no_build,
            flows,
            seconds,
        } => {
            if !no_build {
                build_agent()?;
            }
            measure::renewal_jitter(flows, seconds)
        }
        Cmd::Bench { args } => bench(&args),
        Cmd::Fuzz {
            duration,
            seed,
            packets,
        } => fuzz(duration, seed, packets),
        Cmd::AssignerMemory { pods } => run(cargo().args([
            "run",
            "--release",
            "-p",
            "egress-k8s",
            "--example",
            "assigner_memory",
            "--",
            "--pods",
            &pods.to_string(),
        ])),
    }
}

/// A lab of its own (unique prefix, removed afterwards) for one failover.
fn failover(
    after_renewal: std::time::Duration,
    holder: egress_lab::failover::Holder,
) -> Result<()> {
    let mut lab = egress_lab::Lab::build(egress_lab::LabSpec {
        policies: Vec::new(),
        ..egress_lab::LabSpec::kubernetes()
    })?;
    lab.start_agents()?;
    let report = egress_lab::failover::measure_failover_of(&mut lab, after_renewal, holder)?;
    let path = root().join(match holder {
        egress_lab::failover::Holder::NotLeader => "target/lab/failover.json",
        egress_lab::failover::Holder::Leader => "target/lab/failover-holder-is-leader.json",
    });
    report.write_json(&path)?;
    println!("{}", report.summary());
    println!("(details in {})", path.display());
    Ok(())
}

pub fn root() -> PathBuf {
    egress_lab::workspace_root()
}

/// Runs `cmd` with inherited stdio and fails on a non-zero exit.
pub fn run(cmd: &mut Command) -> Result<()> {
    let desc = egress_lab::exec::describe(cmd);
    eprintln!("+ {desc}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot start `{desc}`"))?;
    if !status.success() {
        bail!("`{desc}` failed: {status}");
    }
    Ok(())
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root());
    cmd
}

const EBPF_BINS: [&str; 3] = ["pod_ingress", "tunnel_ingress", "uplink_ingress"];

fn ebpf_dir() -> PathBuf {
    root().join("egress-ebpf")
}

/// Where `build-ebpf` puts the objects (kept apart from the workspace's
/// target directory so nightly and stable builds do not contend for it).
pub fn ebpf_object(bin: &str) -> PathBuf {
    ebpf_dir()
        .join("target/bpfel-unknown-none/release")
        .join(bin)
}

fn build_ebpf() -> Result<()> {
    prereq::ensure_all()?;
    let dir = ebpf_dir();
    if !dir.join("Cargo.toml").is_file() {
        bail!(
            "{} has no Cargo.toml: the eBPF crate is missing",
            dir.display()
        );
    }
    let mut cmd = Command::new("cargo");
    cmd.current_dir(&dir)
        .args([
            "+nightly",
            "build",
            "--release",
            "-p",
            "egress-ebpf",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--target-dir",
        ])
        .arg(dir.join("target"))
        // The stable toolchain's cargo sets these for xtask itself; they must
        // not leak into the nightly build.
        .env_remove("RUSTC")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("CARGO")
        .env_remove("RUSTUP_TOOLCHAIN")
        .env("RUSTFLAGS", "-C debuginfo=2 -C link-arg=--btf")
        .env("PATH", prereq::path_with_llvm());
    run(&mut cmd)?;
    for bin in EBPF_BINS {
        let obj = ebpf_object(bin);
        if !obj.is_file() {
            bail!("the eBPF build succeeded but {} is missing", obj.display());
        }
        eprintln!("eBPF object: {}", obj.display());
    }
    Ok(())
}

fn build() -> Result<()> {
    build_ebpf()?;
    run(cargo()
        .args(["build", "--workspace"])
        .env("PATH", prereq::path_with_llvm()))
}

/// What `lab up` and `demo` need: the toolchain and the agent binary.
fn build_agent() -> Result<()> {
    prereq::ensure_all()?;
    run(cargo()
        .args(["build", "-p", "egress-agent"])
        .env("PATH", prereq::path_with_llvm()))
}

fn test(no_bench: bool, test_args: &[String]) -> Result<()> {
    build()?;
    // The smoke goes first so that the test summary closes the output.
    let bench = if no_bench { Ok(()) } else { bench_smoke() };
    if let Err(e) = &bench {
        eprintln!("benchmark smoke run failed: {e:#}");
    }
    let mut cmd = cargo();
    cmd.args(["test", "--workspace", "--no-fail-fast", "--"])
        .env("PATH", prereq::path_with_llvm());
    if !test_args.iter().any(|a| a.starts_with("--test-threads")) {
        // Each integration test builds a whole cluster and runs three
        // agents; two at a time is what two cores carry.
        cmd.arg("--test-threads=2");
    }
    cmd.args(test_args);
    let tests = run_counting_tests(&mut cmd);
    tests?;
    bench
}

/// Runs `cargo test`, passing its output through, and closes with the
/// totals over every test binary (`total: N passed, M failed`).
fn run_counting_tests(cmd: &mut Command) -> Result<()> {
    use std::io::{BufRead as _, BufReader};
    let desc = egress_lab::exec::describe(cmd);
    eprintln!("+ {desc}");
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start `{desc}`"))?;
    let (mut passed, mut failed) = (0u64, 0u64);
    let stdout = child.stdout.take().context("cargo test's stdout")?;
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading cargo test's output")?;
        println!("{line}");
        if let Some((p, f)) = parse_test_result(&line) {
            passed += p;
            failed += f;
        }
    }
    let status = child
        .wait()
        .with_context(|| format!("waiting for `{desc}`"))?;
    println!("total: {passed} passed, {failed} failed");
    if !status.success() {
        bail!("`{desc}` failed: {status}");
    }
    Ok(())
}

/// The counts of a libtest summary line
/// (`test result: ok. 8 passed; 0 failed; 0 ignored; ...`).
fn parse_test_result(line: &str) -> Option<(u64, u64)> {
    let rest = line.strip_prefix("test result: ")?;
    let count = |word: &str| -> Option<u64> {
        rest.split(';')
            .find_map(|part| part.trim().strip_suffix(word).map(str::trim))
            .and_then(|n| n.rsplit(' ').next()?.parse().ok())
    };
    Some((count("passed")?, count("failed")?))
}

/// The benchmark's quick mode, which CI runs so that the harness keeps working.
fn bench_smoke() -> Result<()> {
    run(cargo().args(["run", "-p", "egress-bench", "--", "run", "--quick"]))
}

fn fuzz(duration: u64, seed: Option<u64>, packets: Option<u64>) -> Result<()> {
    prereq::ensure_all()?;
    let mut cmd = cargo();
    cmd.args([
        "run",
        "--release",
        "-p",
        "egress-testrun",
        "--bin",
        "egress-fuzz",
        "--",
    ])
    .args(["--duration", &duration.to_string()])
    .env("PATH", prereq::path_with_llvm());
    if let Some(seed) = seed {
        cmd.args(["--seed", &seed.to_string()]);
    }
    if let Some(packets) = packets {
        cmd.args(["--packets", &packets.to_string()]);
    }
    run(&mut cmd)
}

fn bench(args: &[String]) -> Result<()> {
    build()?;
    // The benchmark runs the agent found next to its own (release) binary.
    run(cargo()
        .args(["build", "--release", "-p", "egress-agent"])
        .env("PATH", prereq::path_with_llvm()))?;
    let args: Vec<String> = if args.is_empty() {
        vec!["run".into()]
    } else {
        args.to_vec()
    };
    run(cargo()
        .args(["run", "--release", "-p", "egress-bench", "--"])
        .args(&args))
}

pub fn display(p: &Path) -> String {
    p.display().to_string()
}

#[cfg(test)]
mod tests {
    use super::parse_test_result;

    #[test]
    fn libtest_summaries_are_counted() {
        assert_eq!(
            parse_test_result(
                "test result: ok. 8 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 2.32s"
            ),
            Some((8, 0))
        );
        assert_eq!(
            parse_test_result("test result: FAILED. 15 passed; 1 failed; 0 ignored; 0 measured"),
            Some((15, 1))
        );
        assert_eq!(parse_test_result("running 3 tests"), None);
    }
}
