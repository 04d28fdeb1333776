//! Accounting of the flow table: the global and per-pod caps on live flows,
//! early drop of unreplied flows when the table is full, and the counters
//! that the agent's collector reconciles against the entries that exist.
//!
//! Usage, for every path that puts a new flow into `nat_fwd_v4` (local SNAT,
//! tunnel arrivals, and steered flows on the pod's node): `admit` before
//! creating the entries, `created` once the forward entry is in the table,
//! nothing when creation failed. Counting only after the insert is what
//! keeps the collector's reconciliation from ever under-counting: an entry
//! is in the table before it is in `CREATED`.
//!
//! The caps are checked against counters that other CPUs update
//! concurrently, so a burst of first packets on several CPUs at once may
//! overshoot a cap by at most one flow per CPU.

use core::ptr;

use egress_common::{
    DatapathConfig, DropReason, FlowKeyV4, PodFlowsV4, RECLAIM_PROBES, UNREPLIED_RING_SLOTS,
    ct_flags, flow_count,
};

use aya_ebpf::bindings::BPF_NOEXIST;

use crate::maps::{
    FLOW_COUNT, NAT_FWD_V4, NAT_REV_V4, POD_FLOWS_V4, POD_RELEASED_V4, UNREPLIED_RING,
};

/// Adds `delta` to the u64 at `ptr` with a BPF atomic add (the bpf target
/// has no compare-and-swap, so core's `AtomicU64` offers no RMW).
#[inline(always)]
fn atomic_add(ptr: *mut u64, delta: u64) {
    // SAFETY: callers pass aligned u64s inside map values, which stay valid
    // for the program run.
    #[cfg(target_arch = "bpf")]
    unsafe {
        core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
            ptr, delta,
        )
    };
    // The host build only type-checks the library; it never runs it.
    // SAFETY: as above.
    #[cfg(not(target_arch = "bpf"))]
    unsafe { core::sync::atomic::AtomicU64::from_ptr(ptr) }
        .fetch_add(delta, core::sync::atomic::Ordering::Relaxed);
}

/// A plain load of an aligned u64 is atomic on BPF; volatile keeps the
/// compiler from caching it (the generic target has no atomic load).
#[inline(always)]
fn read(ptr: *const u64) -> u64 {
    // SAFETY: as in `atomic_add`.
    unsafe { ptr::read_volatile(ptr) }
}

#[inline(always)]
fn count_add(slot: u32, delta: u64) {
    if let Some(ptr) = FLOW_COUNT.get_ptr_mut(slot) {
        atomic_add(ptr, delta);
    }
}

#[inline(always)]
fn count_get(slot: u32) -> u64 {
    match FLOW_COUNT.get_ptr(slot) {
        Some(ptr) => read(ptr),
        None => u64::MAX,
    }
}

/// Permission to create one flow, from `admit`.
#[derive(Clone, Copy)]
pub struct Admitted {
    /// The pod's counters when a per-pod cap is configured.
    pod: Option<*mut PodFlowsV4>,
    /// `CREATED` as read by `admit`: the flow's ring slot.
    seq: u64,
}

/// Live flows of `pod` (its counters exist when the cap is on), or the
/// counters could not be created.
#[inline(always)]
fn pod_counters(pod: [u8; 4]) -> Option<*mut PodFlowsV4> {
    if let Some(ptr) = POD_FLOWS_V4.get_ptr_mut(pod) {
        return Some(ptr);
    }
    // A concurrent insert by another CPU makes ours fail: use theirs.
    let _ = POD_FLOWS_V4.insert(pod, PodFlowsV4::default(), BPF_NOEXIST as u64);
    POD_FLOWS_V4.get_ptr_mut(pod)
}

/// Whether `pod` may create one more flow: refused with `pod_flow_limit`
/// at `max_flows_per_pod` (0: no cap), and at `max_flows` unless an
/// unreplied flow can be reclaimed (early drop), else `flow_table_full`.
#[inline(always)]
pub fn admit(pod: [u8; 4], cfg: &DatapathConfig) -> Result<Admitted, DropReason> {
    let mut counters = None;
    if cfg.max_flows_per_pod != 0 {
        // No room for one more pod's counters: the table of pods is full.
        let ptr = pod_counters(pod).ok_or(DropReason::FlowTableFull)?;
        // SAFETY: pointer from a successful lookup, fields are aligned u64s.
        let (created, reclaimed) = unsafe {
            (
                read(&raw const (*ptr).created),
                read(&raw const (*ptr).reclaimed),
            )
        };
        let released = match POD_RELEASED_V4.get_ptr(pod) {
            Some(r) => read(r),
            None => 0,
        };
        let live = created.wrapping_sub(reclaimed).wrapping_sub(released);
        if live >= u64::from(cfg.max_flows_per_pod) {
            return Err(DropReason::PodFlowLimit);
        }
        counters = Some(ptr);
    }
    let seq = count_get(flow_count::CREATED);
    let live = seq
        .wrapping_sub(count_get(flow_count::RECLAIMED))
        .wrapping_sub(count_get(flow_count::RELEASED));
    if live >= cfg.max_flows && !reclaim_unreplied(seq, cfg) {
        return Err(DropReason::FlowTableFull);
    }
    Ok(Admitted { pod: counters, seq })
}

/// Counts a flow whose forward entry `key` is now in the table, and
/// remembers it as a candidate for early drop.
#[inline(always)]
pub fn created(key: &FlowKeyV4, admitted: &Admitted) {
    count_add(flow_count::CREATED, 1);
    if let Some(pod) = admitted.pod {
        // SAFETY: pointer from `admit`'s lookup in this program run.
        atomic_add(unsafe { &raw mut (*pod).created }, 1);
    }
    let slot = (admitted.seq % u64::from(UNREPLIED_RING_SLOTS)) as u32;
    if let Some(ptr) = UNREPLIED_RING.get_ptr_mut(slot) {
        // Two CPUs may write one slot at once; a torn key matches no flow,
        // or one that `reclaim_unreplied` checks before deleting it.
        // SAFETY: array slots are stable for the program's lifetime.
        unsafe { *ptr = *key };
    }
}

/// Linux's early drop: deletes one flow that has never seen a reply, among
/// the `RECLAIM_PROBES` oldest of the recently created ones, so that a new
/// flow can take its place. True when one was reclaimed.
#[inline(always)]
fn reclaim_unreplied(seq: u64, cfg: &DatapathConfig) -> bool {
    // Once the ring has wrapped, the slot `seq` (written next) holds its
    // oldest key; before that, slot 0 does.
    let slots = u64::from(UNREPLIED_RING_SLOTS);
    let oldest = if seq >= slots { seq } else { 0 };
    for i in 0..u64::from(RECLAIM_PROBES) {
        let slot = ((oldest + i) % slots) as u32;
        let Some(key) = UNREPLIED_RING.get(slot) else {
            continue;
        };
        let key = *key;
        let Some(entry) = NAT_FWD_V4.get_ptr(key) else {
            continue;
        };
        // SAFETY: pointer from a successful lookup; plain data.
        let entry = unsafe { *entry };
        if entry.flags & ct_flags::SEEN_REPLY != 0 {
            continue;
        }
        // Only the CPU whose delete succeeds owns the reclaim.
        if NAT_FWD_V4.remove(key).is_err() {
            continue;
        }
        let reply = key.reply_after_nat(entry.nat_addr, entry.nat_port);
        // The reverse half, if it is this flow's (steered flows have none).
        if let Some(rev) = NAT_REV_V4.get_ptr(reply) {
            // SAFETY: as above.
            let rev = unsafe { *rev };
            if rev.orig_addr == key.src_addr && rev.orig_port == key.src_port {
                let _ = NAT_REV_V4.remove(reply);
            }
        }
        count_add(flow_count::RECLAIMED, 1);
        if cfg.max_flows_per_pod != 0
            && let Some(pod) = POD_FLOWS_V4.get_ptr_mut(key.src_addr)
        {
            // SAFETY: pointer from a successful lookup.
            atomic_add(unsafe { &raw mut (*pod).reclaimed }, 1);
        }
        return true;
    }
    false
}
