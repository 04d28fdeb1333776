//! The benchmark's own namespace topology, identical for every system:
//!
//! ```text
//!  pod1 ──veth── node1 ──┐                 (node1 = egress node: does the NAT)
//!                        ├── br0 in srv ── server 172.18.0.1 (also the "router")
//!  pod2 ──veth── node2 ──┘                 (node2 = remote node: tunnels to node1)
//! ```
//!
//! Each "pod" namespace carries many /32 addresses on `lo`, one per selected
//! pod, so a client can spread its connections over N policies by source
//! address alone. Nodes route the pod ranges to the pod namespace's single
//! link address, so neither side needs N neighbour entries.

use std::net::Ipv4Addr;

use anyhow::Result;

use crate::sys::{host, in_ns, run, run_stdin};

pub const SERVER: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 1);
pub const NODE1: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 11);
pub const NODE2: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 12);
pub const NODE_PREFIX: u8 = 16;

/// Selected-pod addresses: `POD1_BASE + 1 + i` on node1, `POD2_BASE + 1 + i` on node2.
pub const POD1_BASE: Ipv4Addr = Ipv4Addr::new(10, 244, 64, 0);
pub const POD2_BASE: Ipv4Addr = Ipv4Addr::new(10, 244, 192, 0);
pub const POD1_CIDR: &str = "10.244.0.0/17";
pub const POD2_CIDR: &str = "10.244.128.0/17";
pub const POD1_SELECTED: &str = "10.244.64.0/18";
pub const POD2_SELECTED: &str = "10.244.192.0/18";
/// Egress IP of policy `i` is `EGRESS_BASE + 1 + i`: inside the node subnet,
/// so the agent claims it on the uplink; the server reaches the whole range
/// through node1 with one route.
pub const EGRESS_BASE: Ipv4Addr = Ipv4Addr::new(172, 18, 128, 0);
pub const EGRESS_RANGE: &str = "172.18.128.0/17";

/// The largest N the pod ranges hold (a /18 each).
pub const MAX_POLICIES: u32 = 16_000;

/// MTU inside the remote pod, so that tunnelled traffic never needs PMTU
/// discovery on any system.
pub const POD2_MTU: u32 = 1450;

pub fn pod_addr(base: Ipv4Addr, i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(base) + 1 + i)
}

pub fn egress_addr(i: u32) -> Ipv4Addr {
    pod_addr(EGRESS_BASE, i)
}

/// The namespaces of one benchmark run, removed on drop.
pub struct Topo {
    pub pod1: String,
    pub node1: String,
    pub srv: String,
    pub node2: String,
    pub pod2: String,
    created: Vec<String>,
}

/// Sysctls every namespace gets, whatever the system under test.
const COMMON_SYSCTLS: &[(&str, &str)] = &[
    ("net.ipv4.conf.all.rp_filter", "0"),
    ("net.ipv4.conf.default.rp_filter", "0"),
    ("net.ipv4.ip_local_port_range", "1024 65535"),
    ("net.ipv4.tcp_tw_reuse", "1"),
    ("net.core.somaxconn", "4096"),
    ("net.ipv4.tcp_max_syn_backlog", "8192"),
];

impl Topo {
    /// `tag` makes the names unique per run (several runs, or a leftover
    /// from a killed run, never collide).
    pub fn create(tag: &str, max_n: u32) -> Result<Self> {
        let name = |r: &str| format!("eb{tag}-{r}");
        let mut t = Self {
            pod1: name("pod1"),
            node1: name("node1"),
            srv: name("srv"),
            node2: name("node2"),
            pod2: name("pod2"),
            created: Vec::new(),
        };
        for ns in [&t.pod1, &t.node1, &t.srv, &t.node2, &t.pod2].map(|s| s.clone()) {
            run(host(&["ip", "netns", "add", &ns]))?;
            t.created.push(ns.clone());
            run(host(&["ip", "-n", &ns, "link", "set", "lo", "up"]))?;
            let mut sysctl = vec!["sysctl", "-q", "-w"];
            let kv: Vec<String> = COMMON_SYSCTLS
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            sysctl.extend(kv.iter().map(String::as_str));
            run(in_ns(&ns, &sysctl))?;
        }
        for ns in [&t.node1, &t.node2, &t.srv] {
            run(in_ns(ns, &["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]))?;
        }
        t.wire(max_n)?;
        Ok(t)
    }

    pub fn all(&self) -> [&str; 5] {
        [&self.pod1, &self.node1, &self.srv, &self.node2, &self.pod2]
    }

    fn wire(&self, max_n: u32) -> Result<()> {
        let (p1, n1, s, n2, p2) = (&self.pod1, &self.node1, &self.srv, &self.node2, &self.pod2);
        let ip = |ns: &str, cmd: &str| {
            let argv: Vec<&str> = cmd.split_whitespace().collect();
            let mut full = vec!["ip", "-n", ns];
            full.extend(argv);
            run(host(&full))
        };
        // Links are created directly in their namespaces (no rename dance).
        run(host(&[
            "ip", "link", "add", "eth0", "netns", p1, "type", "veth", "peer", "name", "vethpod1",
            "netns", n1,
        ]))?;
        run(host(&[
            "ip", "link", "add", "eth0", "netns", p2, "type", "veth", "peer", "name", "vethpod2",
            "netns", n2,
        ]))?;
        run(host(&[
            "ip", "link", "add", "eth0", "netns", n1, "type", "veth", "peer", "name", "p-node1",
            "netns", s,
        ]))?;
        run(host(&[
            "ip", "link", "add", "eth0", "netns", n2, "type", "veth", "peer", "name", "p-node2",
            "netns", s,
        ]))?;

        ip(s, "link add br0 type bridge stp_state 0 forward_delay 0")?;
        ip(s, "link set p-node1 master br0 up")?;
        ip(s, "link set p-node2 master br0 up")?;
        ip(s, &format!("addr add {SERVER}/{NODE_PREFIX} dev br0"))?;
        ip(s, "link set br0 up")?;
        // Replies of every system go back through node1: de-NAT (iptables,
        // nftables), reverse NAT (ebpf) or plain routing (none).
        for r in [POD1_CIDR, POD2_CIDR, EGRESS_RANGE] {
            ip(s, &format!("route add {r} via {NODE1}"))?;
        }

        ip(n1, &format!("addr add {NODE1}/{NODE_PREFIX} dev eth0"))?;
        ip(n1, "link set eth0 up")?;
        ip(n1, "addr add 10.244.0.1/24 dev vethpod1")?;
        ip(n1, "link set vethpod1 up")?;
        ip(n1, &format!("route add {POD1_SELECTED} via 10.244.0.2"))?;

        ip(n2, &format!("addr add {NODE2}/{NODE_PREFIX} dev eth0"))?;
        ip(n2, "link set eth0 up")?;
        ip(n2, "addr add 10.244.128.1/24 dev vethpod2")?;
        ip(n2, &format!("link set vethpod2 mtu {POD2_MTU} up"))?;
        ip(n2, &format!("route add {POD2_SELECTED} via 10.244.128.2"))?;

        ip(p1, "addr add 10.244.0.2/24 dev eth0")?;
        ip(p1, "link set eth0 up")?;
        ip(p1, "route add default via 10.244.0.1")?;
        ip(p2, "addr add 10.244.128.2/24 dev eth0")?;
        ip(p2, &format!("link set eth0 mtu {POD2_MTU} up"))?;
        ip(p2, "route add default via 10.244.128.1")?;

        for (ns, base) in [(p1, POD1_BASE), (p2, POD2_BASE)] {
            let mut batch = String::new();
            for i in 0..max_n {
                batch.push_str(&format!("address add {}/32 dev lo\n", pod_addr(base, i)));
            }
            run_stdin(host(&["ip", "-n", ns, "-batch", "-"]), &batch)?;
        }
        Ok(())
    }

    /// Veth devices whose offloads the offloads-off cells switch off.
    pub fn veths(&self) -> Vec<(&str, &str)> {
        vec![
            (self.pod1.as_str(), "eth0"),
            (self.node1.as_str(), "vethpod1"),
            (self.node1.as_str(), "eth0"),
            (self.srv.as_str(), "p-node1"),
            (self.srv.as_str(), "p-node2"),
            (self.node2.as_str(), "eth0"),
            (self.node2.as_str(), "vethpod2"),
            (self.pod2.as_str(), "eth0"),
        ]
    }

    pub fn set_offloads(&self, on: bool) -> Result<()> {
        let v = if on { "on" } else { "off" };
        for (ns, dev) in self.veths() {
            run(in_ns(
                ns,
                &["ethtool", "-K", dev, "gro", v, "gso", v, "tso", v],
            ))?;
        }
        Ok(())
    }
}

impl Drop for Topo {
    fn drop(&mut self) {
        // Deleting a namespace destroys its veths, tunnel devices, rules and
        // sockets; a peer in another namespace goes with its twin.
        for ns in self.created.drain(..).rev() {
            let _ = run(host(&["ip", "netns", "del", &ns]));
        }
    }
}
