//! The network namespace a harness runs its packets in: the node's uplink,
//! one veth per local pod, the external VXLAN device, and the routes and
//! permanent neighbours that make `bpf_fib_lookup` answer with complete
//! next hops. `BPF_PROG_TEST_RUN` runs in the caller's namespace, so the
//! harness's thread enters this one and leaves it when dropped.

use std::{
    fs::File,
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context, Result};
use nix::sched::{CloneFlags, setns};

use crate::world::{self, NODE_PREFIX, PODS, TUNNEL, TUNNEL_PORT, UPLINK};

/// Names start with this, so that a killed run's leftovers are easy to find
/// (`ip netns list | grep egtr`).
pub const PREFIX: &str = "egtr";

fn mac(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A namespace of this process, entered by the thread that made it.
pub struct TestNetns {
    pub name: String,
    /// The namespace the thread was in before, restored on drop.
    previous: File,
}

impl TestNetns {
    /// Creates the namespace, builds the node's interfaces in it and enters it.
    pub fn create() -> Result<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "{PREFIX}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        egress_lab::exec::exec("ip", &["netns", "add", &name])
            .with_context(|| format!("creating network namespace {name}"))?;
        let previous = File::open("/proc/thread-self/ns/net").context("opening our namespace")?;
        // From here on, Drop removes the namespace whatever fails next.
        let ns = Self { name, previous };
        ns.build()?;
        let handle = File::open(egress_lab::netns::netns_path(&ns.name))
            .with_context(|| format!("opening namespace {}", ns.name))?;
        setns(&handle, CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("entering namespace {}", ns.name))?;
        Ok(ns)
    }

    fn build(&self) -> Result<()> {
        let mut lines = vec![
            "link set lo up".to_string(),
            format!(
                "link add {UPLINK} address {} mtu {} type veth peer name {UPLINK}p",
                mac(world::UPLINK_MAC),
                world::UPLINK_MTU
            ),
            format!("link set {UPLINK} up"),
            format!("link set {UPLINK}p up"),
            format!("addr add {}/{NODE_PREFIX} dev {UPLINK}", world::NODE),
            // The egress IP held here, as the agent claims it.
            format!(
                "addr add {}/{NODE_PREFIX} dev {UPLINK}",
                world::LOCAL_EGRESS
            ),
            format!("route add default via {} dev {UPLINK}", world::ROUTER),
            format!(
                "neigh replace {} lladdr {} dev {UPLINK} nud permanent",
                world::ROUTER,
                mac(world::ROUTER_MAC)
            ),
            format!(
                "neigh replace {} lladdr {} dev {UPLINK} nud permanent",
                world::NODE2,
                mac(world::NODE2_MAC)
            ),
            format!("link add {TUNNEL} type vxlan external dstport {TUNNEL_PORT}"),
            format!("link set {TUNNEL} up"),
        ];
        for pod in PODS {
            let host = pod.interface;
            lines.extend([
                format!(
                    "link add {host} address {} type veth peer name {host}p address {}",
                    mac(pod.host_mac),
                    mac(pod.mac)
                ),
                format!("link set {host} up"),
                format!("link set {host}p up"),
                format!("route add {}/32 dev {host} scope link", pod.ip),
                format!(
                    "neigh replace {} lladdr {} dev {host} nud permanent",
                    pod.ip,
                    mac(pod.mac)
                ),
            ]);
        }
        egress_lab::exec::ip_batch(Some(&self.name), &lines)
            .with_context(|| format!("building the interfaces of {}", self.name))?;
        egress_lab::netns::sysctls(&self.name, &[("net.ipv4.conf.all.forwarding", "1")])
            .with_context(|| format!("enabling forwarding in {}", self.name))?;
        Ok(())
    }

    /// The index of `interface` in this namespace.
    pub fn ifindex(&self, interface: &str) -> Result<u32> {
        let out = egress_lab::exec::exec(
            "ip",
            &["-n", &self.name, "-o", "link", "show", "dev", interface],
        )?;
        out.stdout
            .split(':')
            .next()
            .and_then(|i| i.trim().parse().ok())
            .with_context(|| format!("no ifindex for {interface} in {:?}", out.stdout))
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = setns(&self.previous, CloneFlags::CLONE_NEWNET);
        if let Err(e) = egress_lab::exec::exec("ip", &["netns", "del", &self.name]) {
            eprintln!("removing network namespace {}: {e}", self.name);
        }
    }
}
