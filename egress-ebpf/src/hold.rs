//! New pod interfaces, held until the agent knows who speaks behind them.
//!
//! In Kubernetes mode a pod's interface appears (and pod_ingress is attached
//! to it) some 100-300 ms before its Pod object, with the pod's IP, reaches
//! the agent. Until then nothing says whether an EgressIP selects the pod,
//! and letting its traffic out as the node would lend the node's address to
//! a pod that may be selected. So the agent holds every new pod interface
//! for a bounded time: there, a source the agent does not know yet reaches
//! only excluded (cluster, service, node) destinations.

use aya_ebpf::programs::TcContext;
use egress_common::DropReason;

use crate::{
    classify, conntrack,
    maps::{HELD_IFACES, LOCAL_PODS_V4},
    parse::Ipv4,
};

/// For a packet whose source no policy selects: `PodPending` when it came in
/// on a held interface, from a source the agent does not know yet, towards
/// a destination that is not excluded.
#[inline(always)]
pub fn unknown_source(ctx: &TcContext, ip: &Ipv4) -> Result<(), DropReason> {
    // SAFETY: reading a field of the context the kernel handed us.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let Some(until) = HELD_IFACES.get_ptr(ifindex) else {
        return Ok(());
    };
    // SAFETY: pointer from a successful lookup; the value is plain data.
    if conntrack::now() >= unsafe { *until } {
        return Ok(());
    }
    if LOCAL_PODS_V4.get_ptr(ip.src).is_some() || classify::is_globally_excluded(ip.dst) {
        return Ok(());
    }
    Err(DropReason::PodPending)
}
