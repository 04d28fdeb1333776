//! `lab up` / `lab down`: the persistent lab with the fixed prefix `lab`.

use anyhow::{Context, Result};
use egress_lab::{Lab, LabSpec, exec_in, spec};

pub const PREFIX: &str = "lab";

/// Tears down a previous lab, builds a new one, starts its agents and an
/// iperf3 server, and writes `target/lab/topology.json`. The returned `Lab`
/// removes everything if dropped before [`Lab::persist`].
pub fn up() -> Result<Lab> {
    down()?;
    let mut lab = Lab::build(LabSpec {
        prefix: Some(PREFIX.into()),
        ..LabSpec::default()
    })
    .context("building the lab")?;
    lab.start_agents().context("starting the agents")?;
    let addr = spec::SERVER_ADDR.to_string();
    let port = spec::SERVER_IPERF_PORT.to_string();
    exec_in(
        &lab.server_ns(),
        "iperf3",
        &["-s", "-D", "-B", &addr, "-p", &port],
    )
    .context("starting iperf3 in the server namespace")?;
    let path = egress_lab::topology_json_path();
    lab.write_topology(&path)?;
    println!("lab `{PREFIX}` is up: {}", path.display());
    for ns in lab.namespaces() {
        println!("  {ns}");
    }
    println!("agents' configs and logs: {}", lab.dir().display());
    println!("remove it with `cargo xtask lab down`");
    Ok(lab)
}

pub fn down() -> Result<()> {
    let removed = egress_lab::cleanup_prefix(PREFIX)?;
    if !removed.is_empty() {
        println!("removed {} namespaces of lab `{PREFIX}`", removed.len());
    }
    let _ = std::fs::remove_file(egress_lab::topology_json_path());
    let _ = std::fs::remove_dir_all(egress_lab::workspace_root().join("target/lab").join(PREFIX));
    Ok(())
}

/// Removes another prefix's leftovers: namespaces, processes, pins, files.
pub fn down_prefix(prefix: &str) -> Result<()> {
    let removed = egress_lab::cleanup_prefix(prefix)?;
    println!("removed {} namespaces of prefix `{prefix}`", removed.len());
    let _ = std::fs::remove_dir_all(egress_lab::workspace_root().join("target/lab").join(prefix));
    Ok(())
}
