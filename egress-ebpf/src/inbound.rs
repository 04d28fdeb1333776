//! Connections that a client outside the cluster opens to a selected pod
//! (a NodePort or hostPort with the client address preserved): the pod's
//! answers must leave as the kernel's DNAT reverses them, from the address
//! the client used, never translated to the egress IP.
//!
//! `pod_egress` (TC egress of the pod's host-side interface) records each
//! one in `inbound_v4`, keyed by the pod's side of the tuple, and
//! `pod_ingress` consults that map only when a selected pod's packet would
//! start a new flow. A TCP SYN-ACK is inbound only when its SYN was
//! recorded: a selected pod must not get untranslated packets out (with its
//! own or, masqueraded, the node's address) just by setting SYN and ACK on
//! them.
//!
//! Replies that the datapath itself delivers to a pod (reverse-translated
//! on the uplink, or arriving through the tunnel) pass the same egress
//! hook: they carry `DELIVERED` in `skb->tc_index`, which nothing else on
//! this path uses (the tcindex classifier and dsmark are gone from the
//! kernel), and are never recorded.

use aya_ebpf::programs::TcContext;
use egress_common::{FlowKeyV4, LAST_SEEN_GRANULARITY_NS, proto};

use crate::{
    classify, conntrack,
    maps::{INBOUND_V4, POD_POLICY_V4},
    parse::{self, L4, tcp_flags},
};

/// `skb->tc_index` of a packet the datapath delivers to a pod.
const DELIVERED: u32 = 0xe9e5;

/// Marks a packet this program is about to redirect to a local pod.
#[inline(always)]
pub fn mark_delivered(ctx: &TcContext) {
    // SAFETY: tc_index is one of the __sk_buff fields TC programs may write.
    unsafe { (*ctx.skb.skb).tc_index = DELIVERED };
}

/// The key of a selected pod's packet in `inbound_v4`: its forward tuple,
/// and for an echo reply the identifier on the reply side (`0, id`), so
/// that it never meets the key of an echo request the pod sends itself.
#[inline(always)]
pub fn key(ip: &parse::Ipv4, l4: &L4) -> Option<FlowKeyV4> {
    // The same shape as the key of a reply to an egress IP.
    crate::nat::reply_key(ip, l4)
}

/// Whether a selected pod's packet that would start a new flow belongs to
/// a connection opened from outside: a recorded tuple.
#[inline(always)]
pub fn started_outside(ip: &parse::Ipv4, l4: &L4) -> bool {
    match key(ip, l4) {
        Some(k) => INBOUND_V4.get_ptr(k).is_some(),
        None => false,
    }
}

/// `pod_egress`: records a packet from outside the cluster to a selected
/// pod, unless the datapath delivered it. TCP connections are recorded on
/// their SYN only, so that the replies of a flow the pod started itself
/// (before it was selected, say) never make it look inbound.
#[inline(always)]
pub fn record(ctx: &TcContext) {
    // SAFETY: reading a field of the context the kernel handed us.
    if unsafe { (*ctx.skb.skb).tc_index } == DELIVERED {
        return;
    }
    let Ok(Some(ip)) = parse::ipv4(ctx) else {
        return;
    };
    if ip.fragment {
        return;
    }
    let Some(pod) = POD_POLICY_V4.get_ptr(ip.dst) else {
        return;
    };
    // SAFETY: pointer from a successful lookup; the value is plain data.
    let policy_id = unsafe { (*pod).policy_id };
    let Ok(l4) = parse::l4(ctx, &ip) else {
        return;
    };
    // The pod's side of the tuple, as `key` computes it for the pod's answer.
    let (key, opens) = match l4 {
        L4::Ports {
            sport,
            dport,
            tcp_flags: flags,
        } => (
            FlowKeyV4::new(ip.dst, ip.src, dport, sport, ip.proto),
            ip.proto != proto::TCP || flags & (tcp_flags::SYN | tcp_flags::ACK) == tcp_flags::SYN,
        ),
        L4::Echo { request: true, id } => (FlowKeyV4::new(ip.dst, ip.src, 0, id, ip.proto), true),
        _ => return,
    };
    // Cluster sources (pods, nodes, services) are excluded destinations
    // for the pod's answers anyway.
    if classify::is_excluded(policy_id, ip.src) {
        return;
    }
    let now = conntrack::now();
    if let Some(seen) = INBOUND_V4.get_ptr_mut(key) {
        // SAFETY: pointer from a successful lookup, valid for this run; a
        // racing writer stores a time just as good.
        unsafe {
            if now.wrapping_sub(*seen) > LAST_SEEN_GRANULARITY_NS {
                *seen = now;
            }
        }
        return;
    }
    if opens {
        // A full table evicts the least recently used record (LRU).
        let _ = INBOUND_V4.insert(key, now, 0);
    }
}
