//! `cargo xtask fuzz`: the datapath fuzz target, run for a while.

use std::time::Duration;

use clap::Parser;
use egress_testrun::fuzz;

#[derive(Parser)]
#[command(
    about = "Feed mutated packets through pod_ingress and uplink_ingress and check invariants"
)]
struct Args {
    /// Seconds to run (ignored with --packets alone).
    #[arg(long, default_value_t = 60)]
    duration: u64,
    /// The generator's seed (default: from the clock, printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Stop after this many packets (replays a finding: same seed, its packet number).
    #[arg(long)]
    packets: Option<u64>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    let limits = fuzz::Limits {
        duration: (args.packets.is_none()).then(|| Duration::from_secs(args.duration)),
        packets: args.packets,
    };
    let summary = fuzz::run(seed, limits)?;
    print!("{}", summary.render());
    if summary.failures() > 0 {
        anyhow::bail!("{} invariant violations", summary.failures());
    }
    Ok(())
}
