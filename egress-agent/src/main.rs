//! egress-agent: loads the egress datapath, programs it, and inspects it.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use egress_agent::{inspect, reset, run};

#[derive(Parser)]
#[command(
    version,
    about = "Egress-IP datapath agent: TC eBPF SNAT to fixed egress IPs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load and attach the datapath and program it from a static configuration file.
    Run {
        #[arg(long, short)]
        config: PathBuf,
        /// Created once the datapath is loaded, attached and programmed.
        /// On exit (SIGTERM, SIGINT, crash) the agent keeps programs
        /// attached, maps pinned and egress IPs claimed, so that the next
        /// agent takes over without a gap or a broken connection; `reset`
        /// removes them.
        #[arg(long)]
        ready_file: Option<PathBuf>,
        /// Where the agent records the addresses it added (to release only
        /// those) and the tunnel device it set up; `reset` reads it.
        #[arg(long, default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        /// Take policies and nodes from EgressIP resources and Nodes in the
        /// Kubernetes API; the file then holds only this node's interfaces,
        /// the datapath settings and the [kubernetes] section.
        #[arg(long)]
        kubernetes: bool,
        /// Kubernetes mode: this node's name (overrides node.name).
        #[arg(long, env = "NODE_NAME")]
        node_name: Option<String>,
        /// Kubernetes mode: this node's address (overrides node.address).
        #[arg(long, env = "NODE_IP")]
        node_address: Option<std::net::Ipv4Addr>,
    },
    /// Show an instance's programs, links, policies and flow counts.
    Status {
        #[arg(long, default_value = "egress")]
        instance: String,
        #[arg(long)]
        json: bool,
    },
    /// Per-policy packet, byte, flow and drop counters (summed over CPUs).
    Stats {
        #[arg(long, default_value = "egress")]
        instance: String,
        #[arg(long)]
        json: bool,
    },
    /// Conntrack and NAT entries.
    Nat {
        #[command(subcommand)]
        command: NatCommand,
    },
    /// Validate a configuration file without touching the system.
    Check {
        #[arg(long, short)]
        config: PathBuf,
        /// Validate it as a Kubernetes-mode file.
        #[arg(long)]
        kubernetes: bool,
    },
    /// Uninstall an instance from this node: detach its programs, remove
    /// its pinned state, release the egress IPs it added and delete its
    /// tunnel device. Connections through it end.
    Reset {
        #[arg(long)]
        instance: String,
        /// The `run --state-dir` of the instance.
        #[arg(long, default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
}

const DEFAULT_STATE_DIR: &str = "/run/egress-agent";

#[derive(Subcommand)]
enum NatCommand {
    /// List translated flows.
    List {
        #[arg(long, default_value = "egress")]
        instance: String,
        #[arg(long)]
        json: bool,
    },
}

fn main() -> anyhow::Result<()> {
    // Inspection output is often piped into `head` or `grep -q`: end quietly
    // on a closed pipe like other command-line tools instead of panicking.
    // SAFETY: restoring the default disposition of a signal, before any thread exists.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Run {
            config,
            ready_file,
            state_dir,
            kubernetes,
            node_name,
            node_address,
        } => {
            let kubernetes = kubernetes.then_some(run::KubeOptions {
                node_name,
                node_address,
            });
            runtime()?.block_on(run::run(run::Options {
                config,
                ready_file,
                state_dir,
                kubernetes,
            }))
        }
        Command::Status { instance, json } => inspect::status(&instance, json),
        Command::Stats { instance, json } => inspect::stats(&instance, json),
        Command::Nat {
            command: NatCommand::List { instance, json },
        } => inspect::nat_list(&instance, json),
        Command::Check { config, kubernetes } => {
            let mode = if kubernetes {
                egress_config::Mode::Kubernetes
            } else {
                egress_config::Mode::Static
            };
            let c = egress_config::AgentConfig::load_for(&config, mode)?;
            println!(
                "{}: valid ({} policies)",
                config.display(),
                c.policies.len()
            );
            Ok(())
        }
        Command::Reset {
            instance,
            state_dir,
        } => {
            let removed = runtime()?.block_on(reset::reset(&instance, &state_dir))?;
            println!("{removed}");
            Ok(())
        }
    }
}

/// Two workers: the Kubernetes controller's claim renewals run on one
/// while the agent's own work (reconciling, netlink) occupies the other,
/// and blocking map work leaves its worker (`block_in_place`; the
/// conntrack collector has a thread of its own).
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("egress-agent")
        .enable_all()
        .build()
}
