//! Builds the eBPF programs (egress-ebpf's binaries, for the bpf target with
//! nightly and bpf-linker) into OUT_DIR so that the agent embeds them.
//! `cargo xtask build-ebpf` installs the toolchain this needs.

use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    // Read when the script runs, not when it is compiled (`env!`): a build
    // script binary reused from another checkout's target directory would
    // otherwise build that checkout's programs.
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let root = std::path::Path::new(&manifest_dir)
        .parent()
        .ok_or_else(|| anyhow!("egress-agent has no parent directory"))?
        .join("egress-ebpf");
    let root = root.to_str().context("egress-ebpf path is not UTF-8")?;
    aya_build::build_ebpf(
        [Package {
            name: "egress-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        Toolchain::default(),
    )
    .context(
        "building the eBPF programs failed; run `cargo xtask build-ebpf` to install the toolchain",
    )
}
