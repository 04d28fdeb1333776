//! `egress-agent reset`, the uninstall: what `run` leaves in place on exit
//! (pinned programs, links and maps, the egress IPs it added, its tunnel
//! device, its state directory) removed.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use egress_netlink::{ClaimLedger, Netlink};

use crate::{loader, maps::PinLayout};

/// Where an instance keeps what `egress-agent reset` needs besides the pins.
pub fn state_dir_of(state_dir: &Path, instance: &str) -> PathBuf {
    state_dir.join(instance)
}

/// The file naming the tunnel device the agent set up (for reset).
pub(crate) const TUNNEL_FILE: &str = "tunnel-interface";
/// The claim ledger: the egress IPs the agent added.
pub(crate) const LEDGER_FILE: &str = "claims.json";

/// `egress-agent reset`: everything `run` leaves in place, removed. Each
/// step runs even if an earlier one found nothing; the first error is
/// returned after all were tried. Returns what was removed.
pub async fn reset(instance: &str, state_dir: &Path) -> anyhow::Result<String> {
    let layout = PinLayout::for_instance(instance);
    let mut done = Vec::new();
    let mut first_error: Option<anyhow::Error> = None;
    match loader::remove_all(&layout) {
        Ok(()) => done.push(format!("removed {}", layout.root.display())),
        Err(e) => first_error = Some(e.into()),
    }
    let dir = state_dir_of(state_dir, instance);
    let netlink = Netlink::connect().context("opening rtnetlink")?;
    let ledger_path = dir.join(LEDGER_FILE);
    let released = async {
        let mut ledger = ClaimLedger::open(&ledger_path)?;
        let ips: Vec<Ipv4Addr> = ledger.entries().iter().map(|e| e.ip).collect();
        let released = netlink.release_all_tracked(&mut ledger, &ips).await?;
        anyhow::Ok(
            released
                .into_iter()
                .filter(|(_, from)| !from.is_empty())
                .map(|(ip, _)| ip)
                .collect::<Vec<_>>(),
        )
    }
    .await;
    match released {
        Ok(ips) if !ips.is_empty() => done.push(format!("released {ips:?}")),
        Ok(_) => {}
        Err(e) => {
            first_error.get_or_insert(e.context(format!(
                "releasing the addresses of {}",
                ledger_path.display()
            )));
        }
    }
    let tunnel_file = dir.join(TUNNEL_FILE);
    match std::fs::read_to_string(&tunnel_file) {
        Ok(tunnel) => match netlink.delete_link(tunnel.trim()).await {
            Ok(true) => done.push(format!("deleted {}", tunnel.trim())),
            Ok(false) => {}
            Err(e) => {
                first_error.get_or_insert(
                    anyhow::Error::from(e).context(format!("deleting {}", tunnel.trim())),
                );
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            first_error.get_or_insert(
                anyhow::Error::from(e).context(format!("reading {}", tunnel_file.display())),
            );
        }
    }
    if first_error.is_none() && dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        done.push(format!("removed {}", dir.display()));
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(done.join("; ")),
    }
}
