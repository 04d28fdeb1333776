//! Per-policy, per-CPU counters.

use egress_common::{DropReason, PolicyStats};

use crate::maps::POLICY_STATS;

#[inline(always)]
fn with_stats(policy_id: u32, f: impl FnOnce(&mut PolicyStats)) {
    if let Some(stats) = POLICY_STATS.get_ptr_mut(policy_id) {
        // SAFETY: per-CPU slot; only this CPU writes it while we run.
        f(unsafe { &mut *stats });
    }
}

#[inline(always)]
pub fn count_drop(policy_id: u32, reason: DropReason) {
    with_stats(policy_id, |s| *s.drops.slot(reason) += 1);
}

#[inline(always)]
pub fn count_egress(policy_id: u32, bytes: u32) {
    with_stats(policy_id, |s| {
        s.egress_packets += 1;
        s.egress_bytes += bytes as u64;
    });
}

#[inline(always)]
pub fn count_steered(policy_id: u32, bytes: u32) {
    with_stats(policy_id, |s| {
        s.steered_packets += 1;
        s.egress_bytes += bytes as u64;
    });
}

#[inline(always)]
pub fn count_reply(policy_id: u32, bytes: u32) {
    with_stats(policy_id, |s| {
        s.reply_packets += 1;
        s.reply_bytes += bytes as u64;
    });
}

#[inline(always)]
pub fn count_new_flow(policy_id: u32) {
    with_stats(policy_id, |s| s.new_flows += 1);
}
