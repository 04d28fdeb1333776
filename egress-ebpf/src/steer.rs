//! Flows of local pods that this node steers through the tunnel to their
//! policy's egress node. Each is an entry of the flow table (`nat_fwd_v4`,
//! keyed by the pod's tuple) flagged `STEERED`, naming the egress node in
//! `origin_node`; it is created by the flow's first packet within the flow
//! caps (`flows::admit`), refreshed like any flow, and expired by the
//! agent's collector (it has no reverse entry: the egress node translates).
//!
//! What the entries give:
//! - a reply (or an ICMP error about the flow) arriving through the tunnel
//!   is delivered to the pod only when it matches a live steered flow of
//!   that pod and comes from that flow's egress node (`reply`);
//! - a flow keeps steering to the policy it started with while that policy
//!   still steers and belongs to the pod's current EgressIP, when the pod's
//!   choice among the EgressIP's IPs moves;
//! - a connection opened from outside (`inbound`) is recognised on its
//!   first packet only.

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    programs::TcContext,
};
use egress_common::{
    DatapathConfig, DropReason, FlowKeyV4, NatEntryV4, NextHopV4, ct_flags, policy_flags, proto,
};

use crate::{
    classify::{self, Selected},
    conntrack::{self, Direction},
    flows, icmp, inbound,
    maps::{NAT_FWD_V4, NAT_REV_V4},
    mss, nat,
    parse::{Ipv4, L4, tcp_flags},
    stats, tunnel,
};

/// What to do with a local pod's packet whose current policy steers.
#[derive(Clone, Copy)]
pub enum Way {
    /// Through the tunnel, with this policy's VNI to its egress node.
    Steer(Selected),
    /// Translate here: the flow started on a policy this node holds.
    Translate(Selected),
    /// Untouched: a connection opened from outside.
    Pass,
    /// The policy has no egress node: its failure policy decides.
    Unheld,
}

/// The policy a steered flow keeps going to instead of the pod's current
/// `sel`: its own, while it is active, steers to a node, and shares `sel`'s
/// EgressIP.
#[inline(always)]
pub fn still_steered(entry: &NatEntryV4, sel: &Selected) -> Option<Selected> {
    let then = classify::active(entry.policy_id)?;
    (then.policy.group == sel.policy.group
        && then.policy.flags & policy_flags::LOCAL == 0
        && then.policy.egress_node != [0; 4])
        .then_some(then)
}

/// Finds or creates the flow of a local pod's packet whose current policy
/// `sel` is held by another node (or by none).
#[inline(always)]
pub fn flow(
    ip: &Ipv4,
    l4: &L4,
    sel: &Selected,
    cfg: &DatapathConfig,
    now: u64,
) -> Result<Way, DropReason> {
    let unheld = sel.policy.egress_node == [0; 4];
    let Some(key) = nat::forward_key(ip, l4) else {
        // No flow is kept for it: an echo reply or an ICMP error the pod sends.
        if inbound::started_outside(ip, l4) {
            return Ok(Way::Pass);
        }
        return Ok(if unheld {
            Way::Unheld
        } else {
            Way::Steer(*sel)
        });
    };
    let tcp = nat::tcp_flags(l4);
    let mut stale: Option<NatEntryV4> = None;
    if let Some(entry) = NAT_FWD_V4.get_ptr_mut(key) {
        // SAFETY: pointer from a successful lookup, valid for this program
        // run; concurrent writers store whole fields (see conntrack::update).
        let entry = unsafe { &mut *entry };
        let current = *entry;
        if current.flags & ct_flags::STEERED != 0 {
            let via = if current.policy_id == sel.id && !unheld {
                Some(*sel)
            } else {
                still_steered(&current, sel)
            };
            if let Some(via) = via {
                conntrack::update(entry, key.proto, Direction::Original, tcp, now);
                // The policy's egress node moved (failover): replies now
                // come from the new one.
                if current.origin_node != via.policy.egress_node {
                    entry.origin_node = via.policy.egress_node;
                }
                return Ok(Way::Steer(via));
            }
        } else if nat::still_held(&current, sel, cfg, now)
            && let Some(then) = classify::local(current.policy_id)
        {
            return Ok(Way::Translate(then));
        }
        stale = Some(current);
    }
    if unheld {
        return Ok(Way::Unheld);
    }
    if stale.is_none() && inbound::started_outside(ip, l4) {
        return Ok(Way::Pass);
    }
    let admitted = match stale {
        None => Some(flows::admit(key.src_addr, cfg)?),
        Some(_) => None,
    };
    let entry = NatEntryV4 {
        nat_addr: sel.policy.egress_addr,
        origin_node: sel.policy.egress_node,
        nat_port: 0,
        state: conntrack::initial_state(key.proto, tcp) as u8,
        flags: ct_flags::STEERED,
        policy_id: sel.id,
        created_ns: now,
        last_seen_ns: now,
        hop: NextHopV4::default(),
    };
    if let Some(old) = stale {
        // The flow's IP is no longer held where it was: it moves, in place
        // (the flow count is unchanged).
        if old.flags & ct_flags::STEERED == 0 {
            let _ = NAT_REV_V4.remove(key.reply_after_nat(old.nat_addr, old.nat_port));
        }
        NAT_FWD_V4
            .insert(key, entry, BPF_ANY as u64)
            .map_err(|_| DropReason::RewriteFailed)?;
    } else if NAT_FWD_V4.insert(key, entry, BPF_NOEXIST as u64).is_err() {
        // Another CPU created this flow first; it steers the same way.
        return Ok(Way::Steer(*sel));
    }
    if let Some(admitted) = admitted {
        flows::created(&key, &admitted);
    }
    Ok(Way::Steer(*sel))
}

/// Sends a local pod's packet through the tunnel with `via`'s VNI to its
/// egress node, its MSS clamped to fit the tunnel.
#[inline(always)]
pub fn send(
    ctx: &TcContext,
    ip: &Ipv4,
    l4: &L4,
    via: &Selected,
    cfg: &DatapathConfig,
) -> Result<i32, DropReason> {
    if via.policy.flags & policy_flags::CLAMP_MSS != 0
        && cfg.tunnel_mss != 0
        && nat::tcp_flags(l4) & tcp_flags::SYN != 0
    {
        mss::clamp(ctx, ip.l4_off, cfg.tunnel_mss)?;
    }
    stats::count_steered(via.id, ctx.len());
    tunnel::redirect(ctx, via.policy.egress_node, via.id, cfg.tunnel_ifindex)
}

/// Whether a packet arriving through the tunnel from `remote` for a local
/// pod may be delivered: it must answer a live steered flow of that pod (a
/// reply, or an ICMP error quoting the pod's packet) whose egress node is
/// `remote`. Records the reply in the flow's conntrack state.
#[inline(always)]
pub fn reply(ctx: &TcContext, ip: &Ipv4, remote: [u8; 4], now: u64) -> Result<(), DropReason> {
    if ip.fragment {
        return Err(DropReason::Fragment);
    }
    let l4 = crate::parse::l4(ctx, ip)?;
    let (key, tcp, error) = match l4 {
        L4::Ports {
            sport,
            dport,
            tcp_flags,
        } => (
            FlowKeyV4::new(ip.dst, ip.src, dport, sport, ip.proto),
            tcp_flags,
            false,
        ),
        L4::Echo { request: false, id } => {
            (FlowKeyV4::new(ip.dst, ip.src, id, 0, proto::ICMP), 0, false)
        }
        L4::Echo { request: true, .. } => return Err(DropReason::NoFlow),
        L4::IcmpError => match icmp::quoted_forward_key(ctx, ip)? {
            Some(key) => (key, 0, true),
            None => return Err(DropReason::NoFlow),
        },
    };
    let Some(entry) = NAT_FWD_V4.get_ptr_mut(key) else {
        return Err(DropReason::NoFlow);
    };
    // SAFETY: as in `flow`.
    let entry = unsafe { &mut *entry };
    if entry.flags & ct_flags::STEERED == 0 {
        return Err(DropReason::NoFlow);
    }
    if entry.origin_node != remote {
        return Err(DropReason::WrongTunnelPeer);
    }
    if !error {
        conntrack::update(entry, key.proto, Direction::Reply, tcp, now);
    }
    Ok(())
}
