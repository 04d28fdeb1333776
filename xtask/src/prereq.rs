//! Toolchain prerequisites, installed idempotently: each step checks first
//! and does nothing when it is already satisfied.

use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::run;

/// Debian packages: LLVM for bpf-linker, and the tools the lab, tests,
/// demo and benchmark call.
const PACKAGES: [&str; 12] = [
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "bpftool",
    "iperf3",
    "iproute2",
    "iptables",
    "nftables",
    "tcpdump",
    "ethtool",
    // The fencing test asks the router which MACs answer for an egress IP.
    "iputils-arping",
];

const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const BPF_LINKER_SERIES: &str = "0.13.";

pub fn ensure_all() -> Result<()> {
    ensure_packages()?;
    ensure_rust_src()?;
    ensure_bpf_linker()
}

/// `PATH` with LLVM 22's tools first and cargo's bin directory present.
pub fn path_with_llvm() -> String {
    let mut parts = vec![format!("{LLVM_PREFIX}/bin")];
    if let Some(home) = std::env::var_os("CARGO_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".cargo")))
    {
        parts.push(home.join("bin").display().to_string());
    }
    if let Ok(path) = std::env::var("PATH") {
        parts.push(path);
    }
    parts.join(":")
}

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .map(|o| {
            o.status.success()
                && String::from_utf8_lossy(&o.stdout).contains("install ok installed")
        })
        .unwrap_or(false)
}

fn ensure_packages() -> Result<()> {
    let missing: Vec<&str> = PACKAGES.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("installing missing packages: {}", missing.join(" "));
    run(Command::new("apt-get").arg("update"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn ensure_rust_src() -> Result<()> {
    let toolchains = Command::new("rustup")
        .args(["toolchain", "list"])
        .output()
        .context("cannot run rustup: the eBPF build needs rustup's nightly toolchain")?;
    let has_nightly = String::from_utf8_lossy(&toolchains.stdout)
        .lines()
        .any(|l| l.starts_with("nightly"));
    if !has_nightly {
        return run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))
        .context("the nightly toolchain is missing and could not be installed");
    }
    let components = Command::new("rustup")
        .args(["component", "list", "--toolchain", "nightly", "--installed"])
        .output()
        .context("cannot list nightly's components")?;
    if String::from_utf8_lossy(&components.stdout)
        .lines()
        .any(|l| l.starts_with("rust-src"))
    {
        return Ok(());
    }
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

fn bpf_linker_version() -> Option<String> {
    let out = Command::new("bpf-linker")
        .arg("--version")
        .env("PATH", path_with_llvm())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn ensure_bpf_linker() -> Result<()> {
    if let Some(v) = bpf_linker_version()
        && v.split_whitespace()
            .nth(1)
            .is_some_and(|n| n.starts_with(BPF_LINKER_SERIES))
    {
        return Ok(());
    }
    run(Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--version",
            "~0.13",
            "--no-default-features",
            "--features",
            "llvm-22",
        ])
        .env_remove("RUSTUP_TOOLCHAIN")
        .env("PATH", path_with_llvm())
        .env("LLVM_SYS_221_PREFIX", LLVM_PREFIX))?;
    match bpf_linker_version() {
        Some(v) if v.contains(BPF_LINKER_SERIES) => Ok(()),
        other => bail!("bpf-linker was installed but reports {other:?}, not 0.13.x"),
    }
}
