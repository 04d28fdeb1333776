//! Creating and deleting sets of network namespaces, with whatever runs in
//! them: the life cycle shared by the lab's cluster and the benchmark's
//! topology.

use std::{
    thread,
    time::{Duration, Instant},
};

use crate::{
    error::{LabError, Result},
    exec, netns,
};

/// Network namespaces created together and deleted together when dropped
/// (see [`delete_all`]).
pub struct Namespaces {
    names: Vec<String>,
}

impl Namespaces {
    /// Creates every namespace of `names` with `lo` up. Fails, creating
    /// nothing, if one of them exists already (another user's, or left over
    /// by a killed run); a failure half-way deletes what was created.
    pub fn create(names: &[String]) -> Result<Self> {
        if let Some(taken) = names.iter().find(|ns| netns::netns_path(ns).exists()) {
            return Err(LabError::Netns {
                ns: taken.clone(),
                reason: "already exists".into(),
            });
        }
        // Recorded before creation so that a failure half-way still cleans up.
        let set = Self {
            names: names.to_vec(),
        };
        exec::ip_batch(
            None,
            &names
                .iter()
                .map(|ns| format!("netns add {ns}"))
                .collect::<Vec<_>>(),
        )?;
        for ns in names {
            exec::ip_batch(Some(ns), &["link set lo up".to_owned()])?;
        }
        Ok(set)
    }

    pub fn names(&self) -> &[String] {
        &self.names
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        delete_all(&self.names);
    }
}

/// Deletes `namespaces` after ending whatever still runs in them (see
/// [`kill_processes_in`]); a namespace that does not exist is skipped.
/// Deleting a namespace destroys its links, tunnel devices, rules and
/// sockets; a veth's peer in another namespace goes with its twin. Best
/// effort, because it runs from `Drop`: failures are logged.
pub fn delete_all(namespaces: &[String]) {
    for ns in namespaces {
        if !netns::netns_path(ns).exists() {
            continue;
        }
        kill_processes_in(ns);
        if let Err(e) = exec::exec("ip", &["netns", "del", ns]) {
            tracing::warn!(%ns, error = %e, "cannot delete namespace");
        }
    }
}

/// Ends the processes started in `ns` (agents, iperf3, servers): SIGTERM,
/// then SIGKILL for what is left after a grace period.
pub fn kill_processes_in(ns: &str) {
    use nix::{
        sys::signal::{Signal, kill},
        unistd::Pid,
    };
    let pids = |ns: &str| -> Vec<i32> {
        exec::exec("ip", &["netns", "pids", ns])
            .map(|o| {
                o.stdout
                    .split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    };
    let first = pids(ns);
    if first.is_empty() {
        return;
    }
    for pid in &first {
        let _ = kill(Pid::from_raw(*pid), Signal::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline && !pids(ns).is_empty() {
        thread::sleep(Duration::from_millis(50));
    }
    for pid in pids(ns) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
}
