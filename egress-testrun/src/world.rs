//! The one node every scenario and the fuzz target run on: its addresses,
//! interfaces, pods, servers and policies, and the desired `NodeState` the
//! harness programs from them (as the agent would from a static file).
//!
//! Addresses follow the lab's (egress-lab `spec`): node1 172.18.0.11 holds
//! policy 1's egress IP; node2 172.18.0.12 holds policy 2's.

use std::net::Ipv4Addr;

use egress_model::{FailurePolicy, NodeState, PolicyState, RemotePod};

pub const NODE: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 11);
pub const NODE2: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 12);
/// Not a cluster node: its tunnel packets are spoofed.
pub const STRANGER: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 99);
pub const ROUTER: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 1);
pub const NODE_PREFIX: u8 = 24;

pub const SERVER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
pub const SERVER2: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 11);
/// In policy 1's own exclusions.
pub const EXCLUDED_SERVER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
/// In the global (cluster) exclusions: a pod of another node.
pub const CLUSTER_PEER: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 50);
/// In the global (service network) exclusions.
pub const SERVICE: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

/// Policy 1: egress IP held here, fail-closed.
pub const LOCAL_POLICY: u32 = 1;
pub const LOCAL_EGRESS: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 100);
/// Policy 2: egress IP held by node2; local pods are steered there.
pub const STEERED_POLICY: u32 = 2;
pub const STEERED_EGRESS: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 101);
/// Policy 3: no node holds its egress IP, fail-closed.
pub const ORPHAN_CLOSED_POLICY: u32 = 3;
pub const ORPHAN_CLOSED_EGRESS: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 102);
/// Policy 4: no node holds its egress IP, fail-open.
pub const ORPHAN_OPEN_POLICY: u32 = 4;
pub const ORPHAN_OPEN_EGRESS: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 103);

/// A pod on this node, with the host side of its veth.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pod {
    pub ip: Ipv4Addr,
    /// Host-side interface, where pod_ingress runs.
    pub interface: &'static str,
    /// The pod's own MAC (the veth peer inside the pod).
    pub mac: [u8; 6],
    /// The host side's MAC.
    pub host_mac: [u8; 6],
    pub policy: Option<u32>,
}

const fn pod(last: u8, interface: &'static str, policy: Option<u32>) -> Pod {
    Pod {
        ip: Ipv4Addr::new(10, 244, 1, last),
        interface,
        mac: [0x02, 0, 0x0a, 0xf4, 0x01, last],
        host_mac: [0x02, 0xee, 0x0a, 0xf4, 0x01, last],
        policy,
    }
}

pub const POD_LOCAL: Pod = pod(11, "pod11", Some(LOCAL_POLICY));
pub const POD_UNSELECTED: Pod = pod(12, "pod12", None);
pub const POD_STEERED: Pod = pod(13, "pod13", Some(STEERED_POLICY));
pub const POD_ORPHAN_CLOSED: Pod = pod(14, "pod14", Some(ORPHAN_CLOSED_POLICY));
pub const POD_ORPHAN_OPEN: Pod = pod(15, "pod15", Some(ORPHAN_OPEN_POLICY));
pub const PODS: [Pod; 5] = [
    POD_LOCAL,
    POD_UNSELECTED,
    POD_STEERED,
    POD_ORPHAN_CLOSED,
    POD_ORPHAN_OPEN,
];

/// A pod of node2 selected by policy 1: it reaches us through the tunnel.
pub const REMOTE_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 11);
/// A pod of node2 that no policy selects.
pub const REMOTE_UNSELECTED: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 12);
/// This node's pod CIDR and node2's.
pub const POD_CIDR: &str = "10.244.1.0/24";
pub const NODE2_POD_CIDR: &str = "10.244.2.0/24";
/// Every address of this node (netns.rs puts them on the uplink): the
/// agent keeps them in the global exclusions.
pub const LOCAL_ADDRS: [Ipv4Addr; 2] = [NODE, LOCAL_EGRESS];

pub const UPLINK: &str = "up0";
pub const UPLINK_MAC: [u8; 6] = [0x02, 0xee, 0, 0, 0, 0x11];
pub const ROUTER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const NODE2_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x12];
pub const TUNNEL: &str = "vx0";
pub const TUNNEL_PORT: u16 = 4789;
/// The underlay MTU; the tunnel MSS follows from it as the agent computes it.
pub const UPLINK_MTU: u16 = 1500;
pub const TUNNEL_MSS: u16 = UPLINK_MTU - egress_common::VXLAN_OVERHEAD - 40;

pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
pub const SERVICE_CIDR: &str = "10.96.0.0/12";
pub const LOCAL_POLICY_EXCLUDED: &str = "192.0.2.0/24";

/// The node's desired state, as a static configuration would give it.
pub fn node_state() -> NodeState {
    let mut s = NodeState {
        node_addr: Some(NODE),
        nodes: [NODE, NODE2].into(),
        ..Default::default()
    };
    let policy = |name: &str, ip, node: Option<Ipv4Addr>, failure_policy| PolicyState {
        name: name.into(),
        egress_ip: ip,
        egress_node: node,
        failure_policy,
        excluded: Default::default(),
    };
    let mut local = policy("local", LOCAL_EGRESS, Some(NODE), FailurePolicy::FailClosed);
    local
        .excluded
        .insert(LOCAL_POLICY_EXCLUDED.parse().expect("a CIDR"));
    s.policies.insert(LOCAL_POLICY, local);
    s.policies.insert(
        STEERED_POLICY,
        policy(
            "steered",
            STEERED_EGRESS,
            Some(NODE2),
            FailurePolicy::FailClosed,
        ),
    );
    s.policies.insert(
        ORPHAN_CLOSED_POLICY,
        policy(
            "orphan-closed",
            ORPHAN_CLOSED_EGRESS,
            None,
            FailurePolicy::FailClosed,
        ),
    );
    s.policies.insert(
        ORPHAN_OPEN_POLICY,
        policy(
            "orphan-open",
            ORPHAN_OPEN_EGRESS,
            None,
            FailurePolicy::FailOpen,
        ),
    );
    for pod in PODS {
        if let Some(id) = pod.policy {
            s.pods.insert(pod.ip, id);
        }
    }
    s.remote_pods.insert(
        REMOTE_POD,
        RemotePod {
            policy: LOCAL_POLICY,
            node: NODE2,
        },
    );
    s.pod_cidrs.insert(POD_CIDR.parse().expect("a CIDR"), NODE);
    s.pod_cidrs
        .insert(NODE2_POD_CIDR.parse().expect("a CIDR"), NODE2);
    s.global_excluded
        .insert(CLUSTER_CIDR.parse().expect("a CIDR"));
    s.global_excluded
        .insert(SERVICE_CIDR.parse().expect("a CIDR"));
    s
}

/// [`node_state`], built once: the fuzz target's invariants consult it per packet.
pub fn shared_node_state() -> &'static NodeState {
    static STATE: std::sync::OnceLock<NodeState> = std::sync::OnceLock::new();
    STATE.get_or_init(node_state)
}

/// The local pod with this address.
pub fn pod_by_ip(ip: Ipv4Addr) -> Option<Pod> {
    PODS.into_iter().find(|p| p.ip == ip)
}
