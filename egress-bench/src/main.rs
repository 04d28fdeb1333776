//! Benchmark of the egress datapath against iptables, nftables and plain
//! routing on one machine (issue 4). `run` drives everything; the other
//! subcommands are the traffic generators and probes it starts inside the
//! benchmark namespaces.

mod loadgen;
mod probe;
mod procfs;
mod report;
mod results;
mod run;
mod systems;

use anyhow::Result;
// The benchmark's modules name it `crate::bpf`.
use clap::{Parser, Subcommand};
use egress_bpf as bpf;

#[derive(Parser)]
#[command(about = "egress SNAT benchmark: ebpf vs iptables vs nftables vs none")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The whole benchmark: topology, systems, workloads, report.
    Run(run::RunArgs),
    /// Installs the Debian packages the benchmark needs, if missing.
    Prereqs,
    /// TCP server for the connection-rate and RR workloads.
    Serve(loadgen::ServeArgs),
    /// Connection-rate client: connect, request, response, close.
    Crr(loadgen::CrrArgs),
    /// One transaction; prints the source address the server saw.
    Whoami(loadgen::WhoamiArgs),
    /// Request/response latency on persistent connections.
    Rr(loadgen::RrArgs),
    /// Small-packet UDP sender over many flows.
    UdpSend(loadgen::UdpSendArgs),
    /// UDP receiver that counts packets.
    UdpSink(loadgen::UdpSinkArgs),
    /// BPF_PROG_TEST_RUN of the agent's pinned programs (run inside the egress node's namespace).
    ProgTest(probe::ProgTestArgs),
}

fn print_json<T: serde::Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string(v)?);
    Ok(())
}

fn main() -> Result<()> {
    // `run` is the default subcommand, so that `cargo xtask bench --quick`
    // (which passes its arguments through) means `run --quick`.
    let mut argv: Vec<String> = std::env::args().collect();
    if argv.len() == 1
        || (argv[1].starts_with('-') && !["-h", "--help"].contains(&argv[1].as_str()))
    {
        argv.insert(1, "run".into());
    }
    match Cli::parse_from(argv).cmd {
        Cmd::Run(a) => {
            if !run::run_bench(&a)? {
                // Non-zero so that CI notices a system that stopped carrying traffic.
                anyhow::bail!("some cells failed; see summary.md");
            }
            Ok(())
        }
        Cmd::Prereqs => run::prerequisites(true),
        Cmd::ProgTest(a) => print_json(&probe::prog_test(&a)?),
        Cmd::Serve(a) => loadgen::serve(&a),
        Cmd::Crr(a) => print_json(&loadgen::crr(&a)?),
        Cmd::Whoami(a) => print_json(&loadgen::whoami(&a)?),
        Cmd::Rr(a) => print_json(&loadgen::rr(&a)?),
        Cmd::UdpSend(a) => print_json(&loadgen::udp_send(&a)?),
        Cmd::UdpSink(a) => print_json(&loadgen::udp_sink(&a)?),
    }
}
