//! What a packet may claim to be.
//!
//! - A pod speaks only through its own host-side interface: `classify`
//!   compares the interface a selected pod's source arrives on with the one
//!   `pod_policy_v4` records (the same lookup, no extra one).
//! - Pods never reach a node's tunnel port: only the datapaths of the nodes
//!   themselves send VXLAN to each other (as Calico drops workload VXLAN).
//! - A steered arrival's inner source must be a pod that the sending node
//!   hosts and that the VNI's policy (or another policy of its EgressIP)
//!   selects.
//!
//! What stays trusted: the nodes themselves. A process in a node's own
//! network namespace can still send VXLAN with that node's address.

use aya_ebpf::{maps::lpm_trie::Key, programs::TcContext};
use egress_common::{DatapathConfig, DropReason, PodCidrKeyV4, policy_flags, proto};

use crate::{
    classify::{self, Selected},
    maps::{NODES_V4, POD_CIDRS_V4, REMOTE_PODS_V4},
    parse::{Ipv4, ptr_at},
};

/// A pod's packet to the tunnel port of a cluster node: `TunnelFromPod`.
/// Later fragments carry no port and cannot be judged; without their first
/// fragment (which is) they never reassemble.
#[inline(always)]
pub fn not_to_tunnel(ctx: &TcContext, ip: &Ipv4, cfg: &DatapathConfig) -> Result<(), DropReason> {
    if ip.proto != proto::UDP || ip.later_fragment || cfg.tunnel_port == 0 {
        return Ok(());
    }
    // A header too short to hold the port is not ours to judge here.
    let Some(dport) = ptr_at::<[u8; 2]>(ctx, ip.l4_off + 2) else {
        return Ok(());
    };
    // SAFETY: bounds checked by ptr_at.
    if u16::from_be_bytes(unsafe { *dport }) != cfg.tunnel_port {
        return Ok(());
    }
    if NODES_V4.get_ptr(ip.dst).is_some() {
        return Err(DropReason::TunnelFromPod);
    }
    Ok(())
}

/// Whether a steered arrival from node `remote` with inner source `src`
/// belongs to `sel`, the policy its VNI names: the pod must live on
/// `remote` and be selected by `sel` or by another policy of the same
/// EgressIP (a flow keeps the egress IP it started on while the pod's
/// current choice moved to a sibling). Policies whose pods are chosen by
/// mark or extra VNI on their own node are checked against that node's pod
/// CIDR instead.
#[inline(always)]
pub fn steered_from(sel: &Selected, src: [u8; 4], remote: [u8; 4]) -> Result<(), DropReason> {
    if sel.policy.flags & policy_flags::SELECTED_BY_NODE != 0 {
        let key = Key::new(32, PodCidrKeyV4 { addr: src });
        return match POD_CIDRS_V4.get(&key) {
            Some(node) if *node == remote => Ok(()),
            _ => Err(DropReason::PodNotSelected),
        };
    }
    let Some(pod) = REMOTE_PODS_V4.get_ptr(src) else {
        return Err(DropReason::PodNotSelected);
    };
    // SAFETY: pointer from a successful lookup; the value is plain data.
    let pod = unsafe { *pod };
    if pod.node_addr != remote {
        return Err(DropReason::PodNotSelected);
    }
    if pod.policy_id == sel.id || classify::same_group(pod.policy_id, sel) {
        return Ok(());
    }
    Err(DropReason::PodNotSelected)
}
