//! Which policy a packet belongs to, and whether its destination is exempt.

use aya_ebpf::{maps::lpm_trie::Key, programs::TcContext};
use egress_common::{ExclusionKeyV4, PolicyV4, policy_flags};

use crate::maps::{EXCLUDED_V4, MARK_POLICY, POD_POLICY_V4, POLICIES_V4, VNI_POLICY};

/// A policy found for a packet.
#[derive(Clone, Copy)]
pub struct Selected {
    pub id: u32,
    pub policy: PolicyV4,
}

#[inline(always)]
fn active(id: u32) -> Option<Selected> {
    let policy = *POLICIES_V4.get(id)?;
    (policy.flags & policy_flags::ACTIVE != 0).then_some(Selected { id, policy })
}

/// A packet from a pod (or from an upstream device that marks packets):
/// by source pod IP first, then by `skb->mark`.
#[inline(always)]
pub fn by_source(ctx: &TcContext, src: [u8; 4]) -> Option<Selected> {
    if let Some(pod) = POD_POLICY_V4.get_ptr(src) {
        // SAFETY: the pointer comes from a successful lookup; the value is plain data.
        return active(unsafe { (*pod).policy_id });
    }
    // SAFETY: reading a field of the context the kernel handed us.
    let mark = unsafe { (*ctx.skb.skb).mark };
    if mark == 0 {
        return None;
    }
    let id = MARK_POLICY.get_ptr(mark)?;
    // SAFETY: as above.
    active(unsafe { *id })
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
    let full = ExclusionKeyV4::POLICY_ID_BITS + 32;
    let global = Key::new(full, ExclusionKeyV4::new(0, dst));
    if EXCLUDED_V4.get(&global).is_some() {
        return true;
    }
    let own = Key::new(full, ExclusionKeyV4::new(policy_id, dst));
    EXCLUDED_V4.get(&own).is_some()
}
