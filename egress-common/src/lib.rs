//! Map keys and values shared by the egress eBPF programs and the agent,
//! and the contract both sides derive from them: how a forward key and its
//! reverse entry's key map onto each other ([`FlowKeyV4::reply_after_nat`],
//! [`FlowKeyV4::forward_before_nat`]), the flag bits, drop reasons and
//! counter slots.
//!
//! Every type is `#[repr(C)]` with explicit padding so that the kernel, the
//! eBPF side and userspace agree on the layout, and so that `bpftool map dump`
//! prints named fields. Addresses are network-order byte arrays (bpftool shows
//! them as `[10,244,1,2]`); ports and identifiers are host-order integers.
//!
//! IPv4 types carry a `V4` suffix. IPv6 twins follow the same shapes with
//! 16-byte addresses, in maps of their own.
#![no_std]

pub mod maps;

/// IP protocol numbers the datapath translates.
pub mod proto {
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
}

/// A connection as seen on the wire in one direction.
///
/// For ICMP echo the identifier stands in for a port: a request from a pod is
/// keyed `src_port = id, dst_port = 0`, and its reply `src_port = 0,
/// dst_port = id`, so the reply key is always the request key reversed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKeyV4 {
    pub src_addr: [u8; 4],
    pub dst_addr: [u8; 4],
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

impl FlowKeyV4 {
    #[inline(always)]
    pub const fn new(
        src_addr: [u8; 4],
        dst_addr: [u8; 4],
        src_port: u16,
        dst_port: u16,
        proto: u8,
    ) -> Self {
        Self {
            src_addr,
            dst_addr,
            src_port,
            dst_port,
            proto,
            _pad: [0; 3],
        }
    }

    /// The key of the opposite direction.
    #[inline(always)]
    pub const fn reversed(&self) -> Self {
        Self::new(
            self.dst_addr,
            self.src_addr,
            self.dst_port,
            self.src_port,
            self.proto,
        )
    }

    /// The reply tuple (`server -> nat_addr:nat_port`) of this forward key
    /// (`pod -> server`) once its source is translated to
    /// `nat_addr:nat_port`: the key of the flow's `RevNatEntryV4`.
    #[inline(always)]
    pub const fn reply_after_nat(&self, nat_addr: [u8; 4], nat_port: u16) -> Self {
        Self::new(self.dst_addr, nat_addr, self.dst_port, nat_port, self.proto)
    }

    /// The forward key (`pod -> server`) of the flow whose reverse entry
    /// `rev` is keyed by this reply tuple: the inverse of
    /// [`Self::reply_after_nat`].
    #[inline(always)]
    pub const fn forward_before_nat(&self, rev: &RevNatEntryV4) -> Self {
        Self::new(
            rev.orig_addr,
            self.src_addr,
            rev.orig_port,
            self.src_port,
            self.proto,
        )
    }
}

/// Connection-tracking state of a translated flow.
///
/// TCP flows move through the states from packet flags seen in either
/// direction; UDP and ICMP flows stay `Open`. The agent expires entries with a
/// timeout chosen by state, and by whether a reply was seen
/// (`ct_flags::SEEN_REPLY`): a flow that has had no reply never outlives the
/// short unreplied timeout, whatever its state.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CtState {
    /// Non-TCP flow.
    Open = 0,
    /// TCP: SYN from the pod, no answer yet.
    SynSent = 1,
    /// TCP: the server answered.
    Established = 2,
    /// TCP: one side sent FIN.
    Closing = 3,
    /// TCP: both sides sent FIN.
    Closed = 4,
    /// TCP: a RST was seen.
    Reset = 5,
    /// TCP: picked up mid-stream (the first packet was not a SYN) and no
    /// reply seen yet. Becomes `Established` when the server answers.
    Unreplied = 6,
}

impl CtState {
    pub const fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::SynSent,
            2 => Self::Established,
            3 => Self::Closing,
            4 => Self::Closed,
            5 => Self::Reset,
            6 => Self::Unreplied,
            _ => Self::Open,
        }
    }
}

/// `NatEntryV4::flags` bits.
pub mod ct_flags {
    /// A packet of the reply direction has been seen. Flows without it are
    /// the first the datapath reclaims when the table is full (early drop),
    /// and expire after the short unreplied timeout.
    pub const SEEN_REPLY: u8 = 1 << 0;
    /// FIN from the pod side.
    pub const FIN_ORIGINAL: u8 = 1 << 1;
    /// FIN from the server side.
    pub const FIN_REPLY: u8 = 1 << 2;
    /// The pod reached us through the tunnel: replies go back to `origin_node`.
    pub const REMOTE_ORIGIN: u8 = 1 << 3;
    /// A local pod's flow that this node steers to the egress node
    /// `origin_node` names. Its replies are accepted from that node's tunnel
    /// only; it has no reverse entry here (the egress node translates).
    pub const STEERED: u8 = 1 << 4;
}

/// Forward NAT and conntrack entry, keyed by the pod's original tuple
/// (`pod -> server`). Holds the flow's single copy of conntrack state; the
/// reply path updates it through `RevNatEntryV4`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatEntryV4 {
    /// Source address after translation: the egress IP.
    pub nat_addr: [u8; 4],
    /// The other node of a flow that crosses the tunnel: the pod's node on
    /// the egress node (`REMOTE_ORIGIN`), the egress node on the pod's node
    /// (`STEERED`); zero for a flow translated where its pod lives.
    pub origin_node: [u8; 4],
    /// Source port (or ICMP identifier) after translation.
    pub nat_port: u16,
    /// `CtState` as u8.
    pub state: u8,
    /// `ct_flags` bits.
    pub flags: u8,
    pub policy_id: u32,
    /// `bpf_ktime_get_coarse_ns()` at creation (CLOCK_MONOTONIC, tick resolution).
    pub created_ns: u64,
    /// Last packet in either direction, at most ~1 s stale (see `LAST_SEEN_GRANULARITY_NS`).
    pub last_seen_ns: u64,
    /// Where this node forwards the flow's translated packets (the datapath's cache).
    pub hop: NextHopV4,
}

/// A FIB answer cached in a flow entry, so that a flow's packets skip
/// `bpf_fib_lookup` (the most expensive step of the established path).
/// Valid for `NEXT_HOP_TTL_NS` after the lookup, and only for packets that
/// fit `mtu` without GSO; the datapath then looks up again. Only complete
/// answers (neighbour resolved) are cached. The bound is what a change of
/// route, neighbour MAC, MTU or link state can take to reach a live flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NextHopV4 {
    /// Destination then source MAC.
    pub macs: [u8; 12],
    /// MTU of `ifindex` at lookup time.
    pub mtu: u16,
    pub _pad: u16,
    /// Egress device.
    pub ifindex: u32,
    /// Coarse monotonic time of the lookup in units of `2^NEXT_HOP_STAMP_SHIFT`
    /// ns, bit 0 set; 0: nothing cached.
    pub stamp: u32,
}

/// How long a cached next hop is used before the FIB is asked again.
pub const NEXT_HOP_TTL_NS: u64 = 1_000_000_000;
/// `NextHopV4::stamp` is nanoseconds shifted right by this (~1 ms units).
pub const NEXT_HOP_STAMP_SHIFT: u32 = 20;

/// Reverse NAT entry, keyed by the reply tuple (`server -> egress IP`).
/// The atomic `BPF_NOEXIST` insert of this entry is what claims a NAT port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RevNatEntryV4 {
    /// The pod address the reply is restored to.
    pub orig_addr: [u8; 4],
    /// Node the pod lives on when steered through the tunnel; zero for a local pod.
    pub origin_node: [u8; 4],
    /// The pod's port (or ICMP identifier).
    pub orig_port: u16,
    pub _pad: u16,
    pub policy_id: u32,
    /// Where this node delivers the replies (to a local pod; unused for steered ones).
    pub hop: NextHopV4,
}

/// `PolicyV4::flags` bits.
pub mod policy_flags {
    /// The policy is programmed; an all-zero slot is an unused id.
    pub const ACTIVE: u32 = 1 << 0;
    /// This node holds the egress IP and translates locally.
    pub const LOCAL: u32 = 1 << 1;
    /// No live node holds the egress IP: send selected traffic out with the
    /// node IP instead of dropping it (fail-open). Without it, fail-closed.
    pub const FAIL_OPEN: u32 = 1 << 2;
    /// Clamp the MSS of SYNs steered through the tunnel to `DatapathConfig::tunnel_mss`.
    pub const CLAMP_MSS: u32 = 1 << 3;
    /// The policy's pods are chosen on their own node by `skb->mark` or by
    /// an extra VNI, which the egress node cannot see: a tunnel arrival is
    /// accepted when its inner source is in the pod CIDR of the node that
    /// sent it (`pod_cidrs_v4`) rather than in `remote_pods_v4`.
    pub const SELECTED_BY_NODE: u32 = 1 << 4;
}

/// An egress policy, in the `policies_v4` array at index `policy_id`.
/// The policy id doubles as the VNI that steers traffic to the egress node.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyV4 {
    pub egress_addr: [u8; 4],
    /// Node address that holds `egress_addr`; zero while no live node does.
    pub egress_node: [u8; 4],
    /// `policy_flags` bits.
    pub flags: u32,
    /// The lowest policy id of the same EgressIP (several egress IPs of one
    /// resource share it; a policy of its own has its own id). A flow stays
    /// on the policy it started with while that policy is in force and in
    /// the same group as the pod's current one.
    pub group: u32,
}

/// Value of `pod_policy_v4`: which policy a local pod belongs to, and the
/// host-side interface its packets must arrive on (as Cilium's endpoint
/// map records it).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodPolicyV4 {
    pub policy_id: u32,
    /// The pod's host-side interface; 0 while the agent cannot resolve it,
    /// and then every packet with the pod's source is dropped
    /// (`invalid_source`): fail-closed, never silently unselected.
    pub ifindex: u32,
}

/// Value of `remote_pods_v4`: a selected pod of another node.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RemotePodV4 {
    pub policy_id: u32,
    /// The address of the node that hosts the pod: the only outer source
    /// its steered packets may arrive from.
    pub node_addr: [u8; 4],
}

/// LPM key data of `pod_cidrs_v4`: a node's pod CIDR (value: the node's address).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodCidrKeyV4 {
    pub addr: [u8; 4],
}

/// LPM key data of `excluded_v4`: destinations a policy never translates.
///
/// The policy id leads (big-endian) so that one trie holds every policy's
/// exclusions: the prefix length is `32 + cidr_len`. Id 0 holds the global
/// exclusions (cluster and service networks).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExclusionKeyV4 {
    pub policy_id_be: [u8; 4],
    pub addr: [u8; 4],
}

impl ExclusionKeyV4 {
    pub const POLICY_ID_BITS: u32 = 32;

    #[inline(always)]
    pub const fn new(policy_id: u32, addr: [u8; 4]) -> Self {
        Self {
            policy_id_be: policy_id.to_be_bytes(),
            addr,
        }
    }
}

/// Value of `nodes_v4`: a cluster node that may send us tunnel traffic.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeV4 {
    /// Non-zero when this is the local node.
    pub is_self: u32,
    pub _reserved: u32,
}

/// The datapath's run-time settings, the single entry of the `config` array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DatapathConfig {
    /// This node's address on the node network (outer source of the tunnel).
    pub node_addr: [u8; 4],
    /// Our external-mode VXLAN device.
    pub tunnel_ifindex: u32,
    /// Lowest and highest NAT port handed out when the original one is taken.
    pub nat_port_min: u16,
    pub nat_port_max: u16,
    /// MSS written into SYNs steered through the tunnel (0 disables clamping).
    pub tunnel_mss: u16,
    /// UDP port of the tunnel: pods may not send to it on a cluster node.
    pub tunnel_port: u16,
    /// New flows are refused once this many are live.
    pub max_flows: u64,
    /// New flows of one pod are refused once it has this many live (0: no cap).
    pub max_flows_per_pod: u32,
    /// `config_flags` bits.
    pub flags: u32,
    /// Policies held here (`policy_flags::LOCAL`) translate only while the
    /// coarse monotonic clock is below this: the node's claim on its egress
    /// IPs lapses by itself when the agent stops renewing it. `u64::MAX`
    /// when the egress IPs are not leased (static configuration).
    pub claims_valid_until_ns: u64,
}

/// `DatapathConfig::flags` bits.
pub mod config_flags {
    /// Let packets to an egress IP that match no flow through to the host.
    /// Without it they are dropped and counted (`no_flow`): the host must not
    /// answer on an address that firewalls trust.
    pub const PASS_UNMATCHED_TO_EGRESS_IPS: u32 = 1 << 0;
    /// Let ICMP echo requests to an egress IP through, so that the host
    /// answers pings on it. Without it they are dropped (`no_flow`) unless
    /// `PASS_UNMATCHED_TO_EGRESS_IPS` lets everything through.
    pub const ANSWER_PING_ON_EGRESS_IPS: u32 = 1 << 1;
}

/// Indexes of the `flow_count` array. Kept apart so that each has one
/// writer: the datapath adds to `CREATED` (after a flow's entries are in the
/// table) and to `RECLAIMED` (after it deleted an unreplied flow to make
/// room) atomically; the agent's collector sets `RELEASED` so that
/// live = created - reclaimed - released equals the entries it found.
pub mod flow_count {
    pub const CREATED: u32 = 0;
    pub const RELEASED: u32 = 1;
    pub const RECLAIMED: u32 = 2;
    pub const SLOTS: u32 = 3;
}

/// Value of `pod_flows_v4`: one pod's flow counters, written only by the
/// datapath (atomic adds). The agent's collector owns the third term,
/// `pod_released_v4`; live flows of the pod = created - reclaimed - released
/// (wrapping: the collector may set released "below zero" for a pod whose
/// counters it has not seen yet).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodFlowsV4 {
    pub created: u64,
    pub reclaimed: u64,
}

/// Slots of `unreplied_ring`: the keys of the most recently created flows,
/// where the datapath looks for an unreplied flow to reclaim when the table
/// is full.
pub const UNREPLIED_RING_SLOTS: u32 = 4096;
/// Ring slots examined (oldest first) for an unreplied flow before a new
/// flow is refused with `flow_table_full`: early drop stays O(1).
pub const RECLAIM_PROBES: u32 = 8;

/// Why the datapath dropped a packet. Each has a counter in `DropCounters`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// Fail-closed: the pod's policy has no live egress node.
    NoEgressNode = 0,
    /// VXLAN packet from an address that is not a cluster node, or not
    /// addressed to this node's own address.
    UnknownTunnelPeer = 1,
    /// VXLAN packet whose VNI names no policy held here.
    UnknownVni = 2,
    /// The flow table is at `max_flows`: new flow refused.
    FlowTableFull = 3,
    /// Every probed NAT port was taken.
    NatPortsExhausted = 4,
    /// No route or neighbour for the translated packet.
    FibLookupFailed = 5,
    /// The translated packet exceeds the egress device's MTU.
    MtuExceeded = 6,
    /// A protocol the datapath cannot translate (not TCP, UDP or ICMP echo/error).
    UnsupportedProtocol = 7,
    /// IP fragments of selected traffic cannot be translated.
    Fragment = 8,
    /// Truncated or malformed headers.
    Malformed = 9,
    /// A packet rewrite helper failed.
    RewriteFailed = 10,
    /// A packet to an egress IP (or a tunnel reply to a pod) that matches no flow.
    NoFlow = 11,
    /// A packet on a pod's interface whose source address is not that pod's.
    InvalidSource = 12,
    /// A pod's packet to the tunnel port of a cluster node.
    TunnelFromPod = 13,
    /// A tunnel arrival whose inner source is not a pod of the sending node
    /// that the VNI's policy selects.
    PodNotSelected = 14,
    /// A tunnel reply from a node that is not the flow's egress node.
    WrongTunnelPeer = 15,
    /// The pod is at `max_flows_per_pod`: new flow refused.
    PodFlowLimit = 16,
    /// The node's claim on the egress IP has lapsed (not renewed in time).
    ClaimExpired = 17,
    /// TTL exhausted (an ICMP time exceeded is sent back).
    TtlExceeded = 18,
    /// The IP total length disagrees with the frame.
    BadLength = 19,
    /// A source the agent does not know yet, on a pod interface it still
    /// holds: a new pod whose Pod object has not reached the agent.
    PodPending = 20,
}

impl DropReason {
    pub const COUNT: usize = 21;
    pub const ALL: [Self; Self::COUNT] = [
        Self::NoEgressNode,
        Self::UnknownTunnelPeer,
        Self::UnknownVni,
        Self::FlowTableFull,
        Self::NatPortsExhausted,
        Self::FibLookupFailed,
        Self::MtuExceeded,
        Self::UnsupportedProtocol,
        Self::Fragment,
        Self::Malformed,
        Self::RewriteFailed,
        Self::NoFlow,
        Self::InvalidSource,
        Self::TunnelFromPod,
        Self::PodNotSelected,
        Self::WrongTunnelPeer,
        Self::PodFlowLimit,
        Self::ClaimExpired,
        Self::TtlExceeded,
        Self::BadLength,
        Self::PodPending,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Self::NoEgressNode => "no_egress_node",
            Self::UnknownTunnelPeer => "unknown_tunnel_peer",
            Self::UnknownVni => "unknown_vni",
            Self::FlowTableFull => "flow_table_full",
            Self::NatPortsExhausted => "nat_ports_exhausted",
            Self::FibLookupFailed => "fib_lookup_failed",
            Self::MtuExceeded => "mtu_exceeded",
            Self::UnsupportedProtocol => "unsupported_protocol",
            Self::Fragment => "fragment",
            Self::Malformed => "malformed",
            Self::RewriteFailed => "rewrite_failed",
            Self::NoFlow => "no_flow",
            Self::InvalidSource => "invalid_source",
            Self::TunnelFromPod => "tunnel_from_pod",
            Self::PodNotSelected => "pod_not_selected",
            Self::WrongTunnelPeer => "wrong_tunnel_peer",
            Self::PodFlowLimit => "pod_flow_limit",
            Self::ClaimExpired => "claim_expired",
            Self::TtlExceeded => "ttl_exceeded",
            Self::BadLength => "bad_length",
            Self::PodPending => "pod_pending",
        }
    }
}

/// Drops by reason, with named fields so that bpftool prints them by name.
/// Field order matches `DropReason`'s discriminants.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DropCounters {
    pub no_egress_node: u64,
    pub unknown_tunnel_peer: u64,
    pub unknown_vni: u64,
    pub flow_table_full: u64,
    pub nat_ports_exhausted: u64,
    pub fib_lookup_failed: u64,
    pub mtu_exceeded: u64,
    pub unsupported_protocol: u64,
    pub fragment: u64,
    pub malformed: u64,
    pub rewrite_failed: u64,
    pub no_flow: u64,
    pub invalid_source: u64,
    pub tunnel_from_pod: u64,
    pub pod_not_selected: u64,
    pub wrong_tunnel_peer: u64,
    pub pod_flow_limit: u64,
    pub claim_expired: u64,
    pub ttl_exceeded: u64,
    pub bad_length: u64,
    pub pod_pending: u64,
}

impl DropCounters {
    #[inline(always)]
    pub fn slot(&mut self, reason: DropReason) -> &mut u64 {
        match reason {
            DropReason::NoEgressNode => &mut self.no_egress_node,
            DropReason::UnknownTunnelPeer => &mut self.unknown_tunnel_peer,
            DropReason::UnknownVni => &mut self.unknown_vni,
            DropReason::FlowTableFull => &mut self.flow_table_full,
            DropReason::NatPortsExhausted => &mut self.nat_ports_exhausted,
            DropReason::FibLookupFailed => &mut self.fib_lookup_failed,
            DropReason::MtuExceeded => &mut self.mtu_exceeded,
            DropReason::UnsupportedProtocol => &mut self.unsupported_protocol,
            DropReason::Fragment => &mut self.fragment,
            DropReason::Malformed => &mut self.malformed,
            DropReason::RewriteFailed => &mut self.rewrite_failed,
            DropReason::NoFlow => &mut self.no_flow,
            DropReason::InvalidSource => &mut self.invalid_source,
            DropReason::TunnelFromPod => &mut self.tunnel_from_pod,
            DropReason::PodNotSelected => &mut self.pod_not_selected,
            DropReason::WrongTunnelPeer => &mut self.wrong_tunnel_peer,
            DropReason::PodFlowLimit => &mut self.pod_flow_limit,
            DropReason::ClaimExpired => &mut self.claim_expired,
            DropReason::TtlExceeded => &mut self.ttl_exceeded,
            DropReason::BadLength => &mut self.bad_length,
            DropReason::PodPending => &mut self.pod_pending,
        }
    }

    pub fn get(&self, reason: DropReason) -> u64 {
        let mut copy = *self;
        *copy.slot(reason)
    }

    pub fn total(&self) -> u64 {
        DropReason::ALL.iter().map(|r| self.get(*r)).sum()
    }
}

/// Per-policy, per-CPU counters in `policy_stats` at index `policy_id`.
/// Index 0 collects what no policy can be blamed for (spoofed tunnel packets).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyStats {
    /// Translated (or steered) packets and bytes towards the outside.
    pub egress_packets: u64,
    pub egress_bytes: u64,
    /// Reverse-translated reply packets and bytes.
    pub reply_packets: u64,
    pub reply_bytes: u64,
    /// Packets steered through the tunnel to the egress node.
    pub steered_packets: u64,
    /// Flows created by this node.
    pub new_flows: u64,
    pub drops: DropCounters,
}

impl PolicyStats {
    /// Adds another CPU's counters to these.
    pub fn accumulate(&mut self, other: &Self) {
        self.egress_packets += other.egress_packets;
        self.egress_bytes += other.egress_bytes;
        self.reply_packets += other.reply_packets;
        self.reply_bytes += other.reply_bytes;
        self.steered_packets += other.steered_packets;
        self.new_flows += other.new_flows;
        for reason in DropReason::ALL {
            *self.drops.slot(reason) += other.drops.get(reason);
        }
    }
}

/// How stale `NatEntryV4::last_seen_ns` may get before a packet refreshes it:
/// writing the shared entry on every packet would bounce its cache line
/// between CPUs for no benefit to second-granularity timeouts.
pub const LAST_SEEN_GRANULARITY_NS: u64 = 1_000_000_000;

/// Ports probed for a free NAT port before the flow is refused.
pub const NAT_PORT_PROBES: u32 = 32;

/// VXLAN (outer IPv4 + UDP + VXLAN + inner Ethernet) overhead in bytes.
pub const VXLAN_OVERHEAD: u16 = 50;

#[cfg(feature = "user")]
mod user {
    use super::*;

    // SAFETY: all of these are `#[repr(C)]`, `Copy`, made of integers and
    // byte arrays with explicit padding fields, so every bit pattern is valid
    // and there are no implicit padding bytes.
    unsafe impl aya::Pod for FlowKeyV4 {}
    unsafe impl aya::Pod for NatEntryV4 {}
    unsafe impl aya::Pod for RevNatEntryV4 {}
    unsafe impl aya::Pod for NextHopV4 {}
    unsafe impl aya::Pod for PolicyV4 {}
    unsafe impl aya::Pod for PodPolicyV4 {}
    unsafe impl aya::Pod for RemotePodV4 {}
    unsafe impl aya::Pod for PodCidrKeyV4 {}
    unsafe impl aya::Pod for ExclusionKeyV4 {}
    unsafe impl aya::Pod for NodeV4 {}
    unsafe impl aya::Pod for DatapathConfig {}
    unsafe impl aya::Pod for DropCounters {}
    unsafe impl aya::Pod for PolicyStats {}
    unsafe impl aya::Pod for PodFlowsV4 {}
}

#[cfg(test)]
mod tests {
    use core::mem::{align_of, size_of};

    use super::*;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<FlowKeyV4>(), 16);
        assert_eq!(size_of::<NatEntryV4>(), 56);
        assert_eq!(size_of::<NextHopV4>(), 24);
        assert_eq!(size_of::<RevNatEntryV4>(), 40);
        assert_eq!(size_of::<PolicyV4>(), 16);
        assert_eq!(size_of::<PodPolicyV4>(), 8);
        assert_eq!(size_of::<RemotePodV4>(), 8);
        assert_eq!(size_of::<PodCidrKeyV4>(), 4);
        assert_eq!(size_of::<ExclusionKeyV4>(), 8);
        assert_eq!(size_of::<NodeV4>(), 8);
        assert_eq!(size_of::<DatapathConfig>(), 40);
        assert_eq!(size_of::<PodFlowsV4>(), 16);
        assert_eq!(size_of::<DropCounters>(), 8 * DropReason::COUNT);
        assert_eq!(size_of::<PolicyStats>(), 8 * (6 + DropReason::COUNT));
        assert!(align_of::<NatEntryV4>() <= 8);
    }

    #[test]
    fn reversed_swaps_both_ends() {
        let k = FlowKeyV4::new([10, 0, 0, 1], [192, 0, 2, 1], 40000, 443, proto::TCP);
        let r = k.reversed();
        assert_eq!(r.src_addr, [192, 0, 2, 1]);
        assert_eq!(r.dst_port, 40000);
        assert_eq!(r.reversed(), k);
    }

    #[test]
    fn reply_and_forward_keys_are_inverse() {
        let fwd = FlowKeyV4::new([10, 244, 1, 2], [198, 51, 100, 10], 40000, 80, proto::TCP);
        let reply = fwd.reply_after_nat([172, 18, 0, 100], 1234);
        assert_eq!(
            reply,
            FlowKeyV4::new([198, 51, 100, 10], [172, 18, 0, 100], 80, 1234, proto::TCP)
        );
        // The reverse entry the datapath writes for that translation.
        let rev = RevNatEntryV4 {
            orig_addr: fwd.src_addr,
            orig_port: fwd.src_port,
            ..Default::default()
        };
        assert_eq!(reply.forward_before_nat(&rev), fwd);
    }

    #[test]
    fn an_echo_reply_carries_the_nat_identifier_as_its_destination_port() {
        // A request is keyed `src_port = id, dst_port = 0`; its reply
        // arrives `src_port = 0, dst_port = id'` (id' the NAT identifier).
        let request = FlowKeyV4::new([10, 244, 1, 2], [198, 51, 100, 10], 7, 0, proto::ICMP);
        let reply = request.reply_after_nat([172, 18, 0, 100], 9);
        assert_eq!(
            reply,
            FlowKeyV4::new([198, 51, 100, 10], [172, 18, 0, 100], 0, 9, proto::ICMP)
        );
        let rev = RevNatEntryV4 {
            orig_addr: request.src_addr,
            orig_port: 7,
            ..Default::default()
        };
        assert_eq!(reply.forward_before_nat(&rev), request);
    }

    #[test]
    fn drop_counter_slots_follow_discriminants() {
        let mut c = DropCounters::default();
        for (i, reason) in DropReason::ALL.iter().enumerate() {
            assert_eq!(*reason as usize, i);
            *c.slot(*reason) += i as u64 + 1;
        }
        // SAFETY: DropCounters is repr(C) of COUNT u64s.
        let raw: [u64; DropReason::COUNT] = unsafe { core::mem::transmute(c) };
        for (i, v) in raw.iter().enumerate() {
            assert_eq!(*v, i as u64 + 1);
        }
        assert_eq!(c.total(), (1..=DropReason::COUNT as u64).sum::<u64>());
    }

    #[test]
    fn exclusion_key_leads_with_big_endian_policy() {
        let k = ExclusionKeyV4::new(0x0102_0304, [10, 0, 0, 0]);
        assert_eq!(k.policy_id_be, [1, 2, 3, 4]);
    }
}
