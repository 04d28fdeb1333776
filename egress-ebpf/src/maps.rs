//! The datapath's maps. Sizes here are placeholders: the agent sets the real
//! ones from its configuration at load time and pins every map under
//! `/sys/fs/bpf/<instance>/maps/` so that a restart keeps the state.

use aya_ebpf::{
    btf_maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
    macros::btf_map,
};
use egress_common::{
    DatapathConfig, ExclusionKeyV4, FlowKeyV4, NatEntryV4, NodeV4, PodCidrKeyV4, PodFlowsV4,
    PodPolicyV4, PolicyStats, PolicyV4, RemotePodV4, RevNatEntryV4, UNREPLIED_RING_SLOTS,
    flow_count,
    maps::{
        DEFAULT_MAX_FLOWS, DEFAULT_MAX_PODS, DEFAULT_MAX_POLICIES, MAX_EXCLUSIONS, MAX_HELD_IFACES,
        MAX_MARKS, MAX_NODES, MAX_UPSTREAM_INTERFACES,
    },
};

#[btf_map(name = "config")]
pub static CONFIG: Array<DatapathConfig, 1> = Array::new();

#[btf_map(name = "policies_v4")]
pub static POLICIES_V4: Array<PolicyV4, { DEFAULT_MAX_POLICIES as usize }> = Array::new();

#[btf_map(name = "pod_policy_v4")]
pub static POD_POLICY_V4: HashMap<[u8; 4], PodPolicyV4, { DEFAULT_MAX_PODS as usize }> =
    HashMap::new();

#[btf_map(name = "remote_pods_v4")]
pub static REMOTE_PODS_V4: HashMap<[u8; 4], RemotePodV4, { DEFAULT_MAX_PODS as usize }> =
    HashMap::new();

#[btf_map(name = "pod_cidrs_v4")]
pub static POD_CIDRS_V4: LpmTrie<PodCidrKeyV4, [u8; 4], { MAX_NODES as usize }> = LpmTrie::new();

#[btf_map(name = "upstream_ifaces")]
pub static UPSTREAM_IFACES: HashMap<u32, u32, { MAX_UPSTREAM_INTERFACES as usize }> =
    HashMap::new();

#[btf_map(name = "inbound_v4")]
pub static INBOUND_V4: LruHashMap<FlowKeyV4, u64, { DEFAULT_MAX_FLOWS as usize }> =
    LruHashMap::new();

#[btf_map(name = "mark_policy")]
pub static MARK_POLICY: HashMap<u32, u32, { MAX_MARKS as usize }> = HashMap::new();

#[btf_map(name = "vni_policy")]
pub static VNI_POLICY: HashMap<u32, u32, { MAX_MARKS as usize }> = HashMap::new();

#[btf_map(name = "excluded_v4")]
pub static EXCLUDED_V4: LpmTrie<ExclusionKeyV4, u32, { MAX_EXCLUSIONS as usize }> = LpmTrie::new();

#[btf_map(name = "nodes_v4")]
pub static NODES_V4: HashMap<[u8; 4], NodeV4, { MAX_NODES as usize }> = HashMap::new();

#[btf_map(name = "egress_addrs_v4")]
pub static EGRESS_ADDRS_V4: HashMap<[u8; 4], u32, { DEFAULT_MAX_POLICIES as usize }> =
    HashMap::new();

#[btf_map(name = "nat_fwd_v4")]
pub static NAT_FWD_V4: LruHashMap<FlowKeyV4, NatEntryV4, { DEFAULT_MAX_FLOWS as usize }> =
    LruHashMap::new();

#[btf_map(name = "nat_rev_v4")]
pub static NAT_REV_V4: LruHashMap<FlowKeyV4, RevNatEntryV4, { DEFAULT_MAX_FLOWS as usize }> =
    LruHashMap::new();

#[btf_map(name = "flow_count")]
pub static FLOW_COUNT: Array<u64, { flow_count::SLOTS as usize }> = Array::new();

#[btf_map(name = "pod_flows_v4")]
pub static POD_FLOWS_V4: HashMap<[u8; 4], PodFlowsV4, { DEFAULT_MAX_PODS as usize }> =
    HashMap::new();

#[btf_map(name = "pod_released_v4")]
pub static POD_RELEASED_V4: HashMap<[u8; 4], u64, { DEFAULT_MAX_PODS as usize }> = HashMap::new();

#[btf_map(name = "unreplied_ring")]
pub static UNREPLIED_RING: Array<FlowKeyV4, { UNREPLIED_RING_SLOTS as usize }> = Array::new();

#[btf_map(name = "held_ifaces")]
pub static HELD_IFACES: HashMap<u32, u64, { MAX_HELD_IFACES as usize }> = HashMap::new();

#[btf_map(name = "local_pods_v4")]
pub static LOCAL_PODS_V4: HashMap<[u8; 4], u32, { DEFAULT_MAX_PODS as usize }> = HashMap::new();

/// Where an ICMP error is built (`icmp::into_error`): per CPU, not pinned,
/// never read outside one program run.
#[btf_map(name = "icmp_scratch")]
pub static ICMP_SCRATCH: PerCpuArray<[u8; crate::icmp::ERROR_FRAME_LEN], 1> = PerCpuArray::new();

#[btf_map(name = "policy_stats")]
pub static POLICY_STATS: PerCpuArray<PolicyStats, { DEFAULT_MAX_POLICIES as usize }> =
    PerCpuArray::new();

/// The run-time settings; an all-zero default until the agent writes them.
#[inline(always)]
pub fn config() -> Option<&'static DatapathConfig> {
    CONFIG.get(0)
}
