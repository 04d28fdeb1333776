//! Names of the datapath's maps: the eBPF statics' export names, the files
//! under `/sys/fs/bpf/<instance>/maps/`, and what the agent looks up.

/// `Array<DatapathConfig>`, one entry.
pub const CONFIG: &str = "config";
/// `Array<PolicyV4>` indexed by policy id.
pub const POLICIES_V4: &str = "policies_v4";
/// `HashMap<[u8; 4], PodPolicyV4>`: local selected pod IP -> policy and host-side interface.
pub const POD_POLICY_V4: &str = "pod_policy_v4";
/// `HashMap<[u8; 4], RemotePodV4>`: selected pod IP of another node -> policy and node.
pub const REMOTE_PODS_V4: &str = "remote_pods_v4";
/// `LpmTrie<PodCidrKeyV4, [u8; 4]>`: a node's pod CIDR -> the node's address.
pub const POD_CIDRS_V4: &str = "pod_cidrs_v4";
/// `HashMap<u32, u32>`: ifindex of an upstream device (e.g. OVS `tun0`), whose
/// packets carry many pods' sources and are exempt from the interface check.
pub const UPSTREAM_IFACES: &str = "upstream_ifaces";
/// `LruHashMap<FlowKeyV4, u64>`: connections that a client outside the
/// cluster opened to a selected pod, keyed by the pod's side of the tuple
/// (`pod -> client`), with when they were last seen. Their packets are not
/// translated.
pub const INBOUND_V4: &str = "inbound_v4";
/// `HashMap<u32, u32>`: `skb->mark` -> policy id.
pub const MARK_POLICY: &str = "mark_policy";
/// `HashMap<u32, u32>`: tunnel VNI -> policy id.
pub const VNI_POLICY: &str = "vni_policy";
/// `LpmTrie<ExclusionKeyV4, u32>`: destinations never translated.
pub const EXCLUDED_V4: &str = "excluded_v4";
/// `HashMap<[u8; 4], NodeV4>`: cluster nodes allowed to send tunnel traffic.
pub const NODES_V4: &str = "nodes_v4";
/// `HashMap<[u8; 4], u32>`: egress IPs held by this node -> policy id.
pub const EGRESS_ADDRS_V4: &str = "egress_addrs_v4";
/// `LruHashMap<FlowKeyV4, NatEntryV4>`: pod tuple -> translation and state.
pub const NAT_FWD_V4: &str = "nat_fwd_v4";
/// `LruHashMap<FlowKeyV4, RevNatEntryV4>`: reply tuple -> pod.
pub const NAT_REV_V4: &str = "nat_rev_v4";
/// `Array<u64>` with `flow_count::SLOTS` entries.
pub const FLOW_COUNT: &str = "flow_count";
/// `HashMap<[u8; 4], PodFlowsV4>`: pod address -> its flow counters (datapath-written).
pub const POD_FLOWS_V4: &str = "pod_flows_v4";
/// `HashMap<[u8; 4], u64>`: pod address -> flows released (collector-written).
pub const POD_RELEASED_V4: &str = "pod_released_v4";
/// `Array<FlowKeyV4>` with `UNREPLIED_RING_SLOTS` entries: recently created flows.
pub const UNREPLIED_RING: &str = "unreplied_ring";
/// `PerCpuArray<PolicyStats>` indexed by policy id.
pub const POLICY_STATS: &str = "policy_stats";
/// `HashMap<u32, u64>`: new pod interface (ifindex) -> until when (coarse
/// CLOCK_MONOTONIC ns) its unknown sources reach only excluded destinations.
pub const HELD_IFACES: &str = "held_ifaces";
/// `HashMap<[u8; 4], u32>`: every pod of this node the agent knows (value 1),
/// selected or not: what a held interface lets out.
pub const LOCAL_PODS_V4: &str = "local_pods_v4";

/// Every map, for pinning and inspection.
pub const ALL: [&str; 21] = [
    CONFIG,
    POLICIES_V4,
    POD_POLICY_V4,
    REMOTE_PODS_V4,
    POD_CIDRS_V4,
    UPSTREAM_IFACES,
    INBOUND_V4,
    MARK_POLICY,
    VNI_POLICY,
    EXCLUDED_V4,
    NODES_V4,
    EGRESS_ADDRS_V4,
    NAT_FWD_V4,
    NAT_REV_V4,
    FLOW_COUNT,
    POD_FLOWS_V4,
    POD_RELEASED_V4,
    UNREPLIED_RING,
    POLICY_STATS,
    HELD_IFACES,
    LOCAL_PODS_V4,
];

/// Compile-time sizes of the maps the agent resizes at load time from its
/// configuration. The eBPF statics use these; they are placeholders.
pub const DEFAULT_MAX_POLICIES: u32 = 4096;
pub const DEFAULT_MAX_PODS: u32 = 65536;
pub const DEFAULT_MAX_FLOWS: u32 = 262_144;
pub const MAX_EXCLUSIONS: u32 = 16384;
pub const MAX_NODES: u32 = 16384;
pub const MAX_MARKS: u32 = 65536;
pub const MAX_UPSTREAM_INTERFACES: u32 = 256;
/// New pod interfaces held at once.
pub const MAX_HELD_IFACES: u32 = 4096;

/// Program names, as the kernel and `bpftool prog` show them.
pub mod programs {
    /// TC ingress of host-side pod interfaces (and upstream devices such as `tun0`).
    pub const POD_INGRESS: &str = "pod_ingress";
    /// TC egress of the same interfaces: records connections opened from outside.
    pub const POD_EGRESS: &str = "pod_egress";
    /// TC ingress of our external-mode VXLAN device.
    pub const TUNNEL_INGRESS: &str = "tunnel_ingress";
    /// TC ingress of the node's uplink: reverse NAT of replies.
    pub const UPLINK_INGRESS: &str = "uplink_ingress";
}
