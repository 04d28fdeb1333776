//! Which policy a packet belongs to, and whether its destination is exempt.

use aya_ebpf::{maps::lpm_trie::Key, programs::TcContext};
use egress_common::{DropReason, ExclusionKeyV4, PolicyV4, policy_flags};

use crate::maps::{
    EXCLUDED_V4, MARK_POLICY, POD_POLICY_V4, POLICIES_V4, UPSTREAM_IFACES, VNI_POLICY,
};

/// A policy found for a packet.
#[derive(Clone, Copy)]
pub struct Selected {
    pub id: u32,
    pub policy: PolicyV4,
}

/// Policy `id` when it is programmed.
#[inline(always)]
pub fn active(id: u32) -> Option<Selected> {
    let policy = *POLICIES_V4.get(id)?;
    (policy.flags & policy_flags::ACTIVE != 0).then_some(Selected { id, policy })
}

/// A packet from a pod (or from an upstream device that marks packets):
/// by source pod IP first, then by `skb->mark`.
///
/// A selected pod's source must arrive on the pod's own host-side
/// interface, which the same lookup returns; elsewhere it is a neighbour
/// borrowing the address (`InvalidSource`), except on upstream devices,
/// which carry every local pod's packets. A pod whose interface the agent
/// could not resolve (0) is refused everywhere but there.
#[inline(always)]
pub fn by_source(ctx: &TcContext, src: [u8; 4]) -> Result<Option<Selected>, DropReason> {
    if let Some(pod) = POD_POLICY_V4.get_ptr(src) {
        // SAFETY: the pointer comes from a successful lookup; the value is plain data.
        let pod = unsafe { *pod };
        // SAFETY: reading a field of the context the kernel handed us.
        let ifindex = unsafe { (*ctx.skb.skb).ifindex };
        if pod.ifindex != ifindex && UPSTREAM_IFACES.get_ptr(ifindex).is_none() {
            return Err(DropReason::InvalidSource);
        }
        return Ok(active(pod.policy_id));
    }
    // SAFETY: reading a field of the context the kernel handed us.
    let mark = unsafe { (*ctx.skb.skb).mark };
    if mark == 0 {
        return Ok(None);
    }
    let Some(id) = MARK_POLICY.get_ptr(mark) else {
        return Ok(None);
    };
    // SAFETY: as above.
    Ok(active(unsafe { *id }))
}

/// Whether policy `id` is in force and shares `sel`'s EgressIP.
#[inline(always)]
pub fn same_group(id: u32, sel: &Selected) -> bool {
    match active(id) {
        Some(other) => other.policy.group == sel.policy.group,
        None => false,
    }
}

/// Policy `id` when it is in force on this node: active and holding its
/// egress IP here.
#[inline(always)]
pub fn local(id: u32) -> Option<Selected> {
    active(id).filter(|s| s.policy.flags & policy_flags::LOCAL != 0)
}

/// A packet that arrived through the tunnel with this VNI.
#[inline(always)]
pub fn by_vni(vni: u32) -> Option<Selected> {
    let id = VNI_POLICY.get_ptr(vni)?;
    // SAFETY: the pointer comes from a successful lookup.
    active(unsafe { *id })
}

/// Whether `dst` is in the global exclusions or in the policy's own.
#[inline(always)]
pub fn is_excluded(policy_id: u32, dst: [u8; 4]) -> bool {
    is_globally_excluded(dst) || excluded_under(policy_id, dst)
}

/// Whether `dst` is in the global exclusions (cluster, service and node
/// networks), which hold for traffic of every policy and of none.
#[inline(always)]
pub fn is_globally_excluded(dst: [u8; 4]) -> bool {
    excluded_under(0, dst)
}

/// Whether the exclusions stored under `policy_id` (0: the global ones)
/// cover `dst`.
#[inline(always)]
fn excluded_under(policy_id: u32, dst: [u8; 4]) -> bool {
    let full = ExclusionKeyV4::POLICY_ID_BITS + 32;
    EXCLUDED_V4
        .get(&Key::new(full, ExclusionKeyV4::new(policy_id, dst)))
        .is_some()
}
