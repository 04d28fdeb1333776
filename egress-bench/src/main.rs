//! Benchmark of the egress datapath against iptables, nftables and plain
//! routing on one machine (issue 4). `run` drives everything; the other
//! subcommands are the traffic generators and probes it starts inside the
//! benchmark namespaces.

mod loadgen;
mod sys;
mod topo;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "egress SNAT benchmark: ebpf vs iptables vs nftables vs none")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// TCP server for the connection-rate and RR workloads.
    Serve(loadgen::ServeArgs),
    /// Connection-rate client: connect, request, response, close.
    Crr(loadgen::CrrArgs),
    /// Request/response latency on persistent connections.
    Rr(loadgen::RrArgs),
    /// Small-packet UDP sender over many flows.
    UdpSend(loadgen::UdpSendArgs),
    /// UDP receiver that counts packets.
    UdpSink(loadgen::UdpSinkArgs),
}

fn print_json<T: serde::Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string(v)?);
    Ok(())
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Serve(a) => loadgen::serve(&a),
        Cmd::Crr(a) => print_json(&loadgen::crr(&a)?),
        Cmd::Rr(a) => print_json(&loadgen::rr(&a)?),
        Cmd::UdpSend(a) => print_json(&loadgen::udp_send(&a)?),
        Cmd::UdpSink(a) => print_json(&loadgen::udp_sink(&a)?),
    }
}
