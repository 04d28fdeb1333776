//! The benchmark's topology (egress-bench), identical for every system it
//! compares:
//!
//! ```text
//!  pod1 ──veth── node1 ──┐                 (node1 = egress node: does the NAT)
//!                        ├── br0 in srv ── server 172.18.0.1 (also the "router")
//!  pod2 ──veth── node2 ──┘                 (node2 = remote node: tunnels to node1)
//! ```
//!
//! Unlike the lab's [`crate::Lab`], a "pod" here is an address pool: each pod
//! namespace carries many /32 addresses on `lo`, one per selected pod, so a
//! client can spread its connections over N policies by source address
//! alone. Nodes route the pod ranges to the pod namespace's single link
//! address, so neither side needs N neighbour entries. Nodes run no agent
//! and no masquerade: the benchmark sets up each system under test itself.

use std::{net::Ipv4Addr, time::Duration};

use crate::{error::Result, exec, namespaces::Namespaces, netns};

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

/// Deadline of a set-up command whose work grows with N (one address, rule
/// or map element per policy): a guard against a hung command, generous
/// because two cores are shared with everything else.
pub fn setup_timeout(n: u32) -> Duration {
    exec::DEFAULT_TIMEOUT + Duration::from_millis(40) * n
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

/// The namespaces of one benchmark run, deleted (with whatever runs in
/// them) on drop.
pub struct BenchTopology {
    pub pod1: String,
    pub node1: String,
    pub srv: String,
    pub node2: String,
    pub pod2: String,
    _namespaces: Namespaces,
}

impl BenchTopology {
    /// `tag` makes the names unique per run (`eb<tag>-<role>`: several runs,
    /// or a leftover from a killed run, never collide); `max_n` is the
    /// number of selected-pod addresses each pod namespace gets.
    pub fn create(tag: &str, max_n: u32) -> Result<Self> {
        let name = |role: &str| format!("eb{tag}-{role}");
        let (pod1, node1, srv, node2, pod2) = (
            name("pod1"),
            name("node1"),
            name("srv"),
            name("node2"),
            name("pod2"),
        );
        let namespaces = Namespaces::create(&[
            pod1.clone(),
            node1.clone(),
            srv.clone(),
            node2.clone(),
            pod2.clone(),
        ])?;
        let t = Self {
            pod1,
            node1,
            srv,
            node2,
            pod2,
            _namespaces: namespaces,
        };
        // Sysctls first: `default` values apply to interfaces created later.
        for ns in t.all() {
            netns::sysctls(ns, COMMON_SYSCTLS)?;
        }
        for ns in [&t.node1, &t.node2, &t.srv] {
            netns::sysctls(ns, &[("net.ipv4.ip_forward", "1")])?;
        }
        t.wire(max_n)?;
        Ok(t)
    }

    pub fn all(&self) -> [&str; 5] {
        [&self.pod1, &self.node1, &self.srv, &self.node2, &self.pod2]
    }

    fn wire(&self, max_n: u32) -> Result<()> {
        let (p1, n1, s, n2, p2) = (&self.pod1, &self.node1, &self.srv, &self.node2, &self.pod2);
        // Links are created directly in their namespaces (no rename dance).
        exec::ip_batch(
            None,
            &[
                veth(p1, "eth0", n1, "vethpod1"),
                veth(p2, "eth0", n2, "vethpod2"),
                veth(n1, "eth0", s, "p-node1"),
                veth(n2, "eth0", s, "p-node2"),
            ],
        )?;
        let mut server = vec![
            "link add br0 type bridge stp_state 0 forward_delay 0".to_owned(),
            "link set p-node1 master br0 up".to_owned(),
            "link set p-node2 master br0 up".to_owned(),
            format!("addr add {SERVER}/{NODE_PREFIX} dev br0"),
            "link set br0 up".to_owned(),
        ];
        // Replies of every system go back through node1: de-NAT (iptables,
        // nftables), reverse NAT (ebpf) or plain routing (none).
        for r in [POD1_CIDR, POD2_CIDR, EGRESS_RANGE] {
            server.push(format!("route add {r} via {NODE1}"));
        }
        exec::ip_batch(Some(s), &server)?;
        exec::ip_batch(
            Some(n1),
            &[
                format!("addr add {NODE1}/{NODE_PREFIX} dev eth0"),
                "link set eth0 up".to_owned(),
                "addr add 10.244.0.1/24 dev vethpod1".to_owned(),
                "link set vethpod1 up".to_owned(),
                format!("route add {POD1_SELECTED} via 10.244.0.2"),
            ],
        )?;
        exec::ip_batch(
            Some(n2),
            &[
                format!("addr add {NODE2}/{NODE_PREFIX} dev eth0"),
                "link set eth0 up".to_owned(),
                "addr add 10.244.128.1/24 dev vethpod2".to_owned(),
                format!("link set vethpod2 mtu {POD2_MTU} up"),
                format!("route add {POD2_SELECTED} via 10.244.128.2"),
            ],
        )?;
        exec::ip_batch(
            Some(p1),
            &[
                "addr add 10.244.0.2/24 dev eth0".to_owned(),
                "link set eth0 up".to_owned(),
                "route add default via 10.244.0.1".to_owned(),
            ],
        )?;
        exec::ip_batch(
            Some(p2),
            &[
                "addr add 10.244.128.2/24 dev eth0".to_owned(),
                format!("link set eth0 mtu {POD2_MTU} up"),
                "route add default via 10.244.128.1".to_owned(),
            ],
        )?;
        for (ns, base) in [(p1, POD1_BASE), (p2, POD2_BASE)] {
            let pool: Vec<String> = (0..max_n)
                .map(|i| format!("address add {}/32 dev lo", pod_addr(base, i)))
                .collect();
            exec::ip_batch_timeout(Some(ns), &pool, setup_timeout(max_n))?;
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

    /// Switches GRO, GSO and TSO of every veth on or off.
    pub fn set_offloads(&self, on: bool) -> Result<()> {
        let v = if on { "on" } else { "off" };
        for (ns, dev) in self.veths() {
            exec::exec_in(ns, "ethtool", &["-K", dev, "gro", v, "gso", v, "tso", v])?;
        }
        Ok(())
    }
}

/// The `ip -batch` line creating a veth pair with `name` in `ns` and `peer`
/// in `peer_ns`.
fn veth(ns: &str, name: &str, peer_ns: &str, peer: &str) -> String {
    format!("link add {name} netns {ns} type veth peer name {peer} netns {peer_ns}")
}
