//! Source NAT to the egress IP: the flow table, port allocation and the
//! packet rewrites of both directions.

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::{bpf_get_prandom_u32, bpf_redirect},
    programs::TcContext,
};
use egress_common::{
    DatapathConfig, DropReason, FlowKeyV4, NAT_PORT_PROBES, NatEntryV4, NextHopV4, RevNatEntryV4,
    ct_flags,
};

use crate::{
    classify::{self, Selected},
    conntrack::{self, Direction},
    csum::{self, HeaderEdit},
    fib::{self, HopCache, NoHop},
    flows, icmp, inbound,
    maps::{NAT_FWD_V4, NAT_REV_V4},
    parse::{ICMP_ID, IP_DST, IP_SRC, Ipv4, L4},
    stats, steer, tunnel,
};

/// The key of a pod's packet, if its transport can be translated.
#[inline(always)]
pub fn forward_key(ip: &Ipv4, l4: &L4) -> Option<FlowKeyV4> {
    match *l4 {
        L4::Ports { sport, dport, .. } => {
            Some(FlowKeyV4::new(ip.src, ip.dst, sport, dport, ip.proto))
        }
        L4::Echo { request: true, id } => Some(FlowKeyV4::new(ip.src, ip.dst, id, 0, ip.proto)),
        _ => None,
    }
}

/// The key of a reply arriving for an egress IP.
#[inline(always)]
pub fn reply_key(ip: &Ipv4, l4: &L4) -> Option<FlowKeyV4> {
    match *l4 {
        L4::Ports { sport, dport, .. } => {
            Some(FlowKeyV4::new(ip.src, ip.dst, sport, dport, ip.proto))
        }
        L4::Echo { request: false, id } => Some(FlowKeyV4::new(ip.src, ip.dst, 0, id, ip.proto)),
        _ => None,
    }
}

#[inline(always)]
pub fn tcp_flags(l4: &L4) -> u8 {
    match *l4 {
        L4::Ports { tcp_flags, .. } => tcp_flags,
        _ => 0,
    }
}

/// Finds the flow's translation, creating it on the first packet (within
/// the flow caps, see `flows::admit`).
///
/// A flow keeps the egress IP it started with while that IP is held here:
/// an entry made for another policy of the same EgressIP that is still in
/// force on this node is used as it is (the pod's choice among the
/// resource's IPs moved, its established flows do not). An entry whose
/// policy no longer holds its IP here is replaced in place, so the flow
/// count is unchanged.
///
/// `local` (the pod is on this node): a new flow to an excluded
/// destination, or one that a client outside opened (`inbound`), gets
/// `Flow::Pass`; established flows skip those lookups, they passed them
/// when created; a flow this node steers keeps steering to its policy
/// while that still steers within the pod's EgressIP (`Flow::Steer`).
/// Steered arrivals were judged by their own node.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn translation(
    key: &FlowKeyV4,
    ip: &Ipv4,
    l4: &L4,
    sel: &Selected,
    origin_node: [u8; 4],
    cfg: &DatapathConfig,
    local: bool,
    now: u64,
) -> Result<Flow, DropReason> {
    let tcp = tcp_flags(l4);
    let mut stale: Option<NatEntryV4> = None;
    if let Some(entry) = NAT_FWD_V4.get_ptr_mut(key) {
        // SAFETY: pointer from a successful lookup; the entry stays valid for
        // this program run (see conntrack::update for concurrent writers).
        let entry = unsafe { &mut *entry };
        let current = *entry;
        if current.flags & ct_flags::STEERED != 0 {
            if local && let Some(via) = steer::still_steered(&current, sel) {
                conntrack::update(entry, key.proto, Direction::Original, tcp, now);
                return Ok(Flow::Steer(via));
            }
        } else {
            let same = current.nat_addr == sel.policy.egress_addr && current.policy_id == sel.id;
            if same || still_held(&current, sel, cfg, now) {
                conntrack::update(entry, key.proto, Direction::Original, tcp, now);
                return Ok(Flow::Translate(Translation {
                    entry: current,
                    hop: Some(HopCache {
                        slot: &raw mut entry.hop,
                        now_ns: now,
                    }),
                }));
            }
        }
        stale = Some(current);
    }
    if local
        && (classify::is_excluded(sel.id, key.dst_addr)
            || (stale.is_none() && inbound::started_outside(ip, l4)))
    {
        return Ok(Flow::Pass);
    }
    let admitted = match stale {
        None => Some(flows::admit(key.src_addr, cfg)?),
        Some(_) => None,
    };
    let rev = RevNatEntryV4 {
        orig_addr: key.src_addr,
        origin_node,
        orig_port: key.src_port,
        _pad: 0,
        policy_id: sel.id,
        hop: NextHopV4::default(),
    };
    let nat_port = claim_port(key, sel.policy.egress_addr, &rev, cfg)?;
    let mut flags = 0;
    if origin_node != [0; 4] {
        flags |= ct_flags::REMOTE_ORIGIN;
    }
    let entry = NatEntryV4 {
        nat_addr: sel.policy.egress_addr,
        origin_node,
        nat_port,
        state: conntrack::initial_state(key.proto, tcp) as u8,
        flags,
        policy_id: sel.id,
        created_ns: now,
        last_seen_ns: now,
        hop: NextHopV4::default(),
    };
    let reply = key.reply_after_nat(sel.policy.egress_addr, nat_port);
    if let Some(old) = stale {
        // A steered flow has no reverse entry here.
        if old.flags & ct_flags::STEERED == 0 {
            let _ = NAT_REV_V4.remove(key.reply_after_nat(old.nat_addr, old.nat_port));
        }
        NAT_FWD_V4
            .insert(key, entry, BPF_ANY as u64)
            .map_err(|_| DropReason::RewriteFailed)?;
    } else if NAT_FWD_V4.insert(key, entry, BPF_NOEXIST as u64).is_err() {
        // Another CPU created this flow first: hand our port back, use theirs.
        let _ = NAT_REV_V4.remove(reply);
        let theirs = NAT_FWD_V4.get_ptr(key).ok_or(DropReason::RewriteFailed)?;
        // SAFETY: pointer from a successful lookup.
        return Ok(Flow::Translate(Translation {
            entry: unsafe { *theirs },
            hop: None,
        }));
    }
    if let Some(admitted) = admitted {
        flows::created(key, &admitted);
    }
    stats::count_new_flow(sel.id);
    Ok(Flow::Translate(Translation { entry, hop: None }))
}

/// What `translation` found for a packet.
#[derive(Clone, Copy)]
pub enum Flow {
    Translate(Translation),
    /// Leave it alone (excluded destination, connection opened from outside).
    Pass,
    /// A flow this node steers, still going to this policy's egress node.
    Steer(Selected),
}

/// Whether a flow made for another policy stays on it: that policy is still
/// in force here (active, local, same egress IP, the node's claim valid)
/// and belongs to the same EgressIP as the pod's current one.
#[inline(always)]
pub fn still_held(entry: &NatEntryV4, sel: &Selected, cfg: &DatapathConfig, now: u64) -> bool {
    if entry.policy_id == sel.id || now >= cfg.claims_valid_until_ns {
        return false;
    }
    match classify::local(entry.policy_id) {
        Some(then) => {
            then.policy.egress_addr == entry.nat_addr && then.policy.group == sel.policy.group
        }
        None => false,
    }
}

/// A flow's translation, and its entry's next-hop cache when the entry was
/// found rather than made by this packet.
#[derive(Clone, Copy)]
pub struct Translation {
    pub entry: NatEntryV4,
    pub hop: Option<HopCache>,
}

/// Claims a NAT port with an atomic insert-if-absent of the reply tuple:
/// the pod's own port when free, else up to `NAT_PORT_PROBES` ports from a
/// random start in the configured range.
#[inline(always)]
fn claim_port(
    key: &FlowKeyV4,
    egress: [u8; 4],
    rev: &RevNatEntryV4,
    cfg: &DatapathConfig,
) -> Result<u16, DropReason> {
    let mut reply = key.reply_after_nat(egress, key.src_port);
    if NAT_REV_V4.insert(reply, rev, BPF_NOEXIST as u64).is_ok() {
        return Ok(key.src_port);
    }
    let (min, max) = (cfg.nat_port_min, cfg.nat_port_max);
    if max < min {
        return Err(DropReason::NatPortsExhausted);
    }
    let span = (max - min) as u32 + 1;
    // SAFETY: helper without preconditions.
    let mut port = min + (unsafe { bpf_get_prandom_u32() } % span) as u16;
    for _ in 0..NAT_PORT_PROBES {
        reply.dst_port = port;
        if NAT_REV_V4.insert(reply, rev, BPF_NOEXIST as u64).is_ok() {
            return Ok(port);
        }
        port = if port >= max { min } else { port + 1 };
    }
    Err(DropReason::NatPortsExhausted)
}

/// The header changes that make a pod's packet leave from the egress IP,
/// forwarded by this node.
#[inline(always)]
pub fn source_edit(ip: &Ipv4, l4: &L4, nat: &NatEntryV4) -> HeaderEdit {
    let (port_off, old_port, new_port) = match *l4 {
        L4::Ports { sport, .. } => (0, sport, nat.nat_port),
        L4::Echo { id, .. } => (ICMP_ID, id, nat.nat_port),
        L4::IcmpError => (0, 0, 0),
    };
    HeaderEdit {
        addr_field: IP_SRC,
        old_addr: ip.src,
        new_addr: nat.nat_addr,
        port_off,
        old_port,
        new_port,
        decrement_ttl: true,
        macs: None,
    }
}

/// The header changes that restore a reply's destination to the pod.
#[inline(always)]
pub fn destination_edit(ip: &Ipv4, l4: &L4, rev: &RevNatEntryV4) -> HeaderEdit {
    let (port_off, old_port, new_port) = match *l4 {
        L4::Ports { dport, .. } => (2, dport, rev.orig_port),
        L4::Echo { id, .. } => (ICMP_ID, id, rev.orig_port),
        L4::IcmpError => (0, 0, 0),
    };
    HeaderEdit {
        addr_field: IP_DST,
        old_addr: ip.dst,
        new_addr: rev.orig_addr,
        port_off,
        old_port,
        new_port,
        decrement_ttl: false,
        macs: None,
    }
}

/// Looks up a reply's translation and records the packet in the flow's conntrack state.
#[inline(always)]
pub fn reverse(key: &FlowKeyV4, tcp: u8, now: u64) -> Option<(RevNatEntryV4, HopCache)> {
    let ptr = NAT_REV_V4.get_ptr_mut(key)?;
    // SAFETY: pointer from a successful lookup; valid for this program run.
    let (rev, hop) = unsafe {
        (
            *ptr,
            HopCache {
                slot: &raw mut (*ptr).hop,
                now_ns: now,
            },
        )
    };
    if let Some(entry) = NAT_FWD_V4.get_ptr_mut(key.forward_before_nat(&rev)) {
        // SAFETY: as in `translation`.
        conntrack::update(
            unsafe { &mut *entry },
            key.proto,
            Direction::Reply,
            tcp,
            now,
        );
    }
    Some((rev, hop))
}

/// Translates a selected packet's source to its policy's egress IP and
/// forwards it out of this (egress) node. Shared by `pod_ingress` (local
/// pods, `origin_node` zero) and `tunnel_ingress` (pods steered here from
/// `origin_node`). With `honour_exclusions` (local pods), a new flow to an
/// excluded destination or one opened from outside gets `Ok(None)`: the
/// caller lets it pass untouched.
///
/// A packet too big for the egress device is not forwarded: with DF set the
/// pod gets "fragmentation needed" back (see `bounce`); without, it is
/// dropped (`mtu_exceeded`): the redirect bypasses the stack's
/// fragmentation, BPF has no helper to fragment, and handing the packet to
/// the stack instead would send it out through the node's masquerade with
/// the node address.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn snat_and_forward(
    ctx: &TcContext,
    ip: &Ipv4,
    l4: &L4,
    sel: &Selected,
    origin_node: [u8; 4],
    cfg: &DatapathConfig,
    honour_exclusions: bool,
    now: u64,
) -> Result<Option<i32>, DropReason> {
    let Some(key) = forward_key(ip, l4) else {
        if honour_exclusions
            && (classify::is_excluded(sel.id, ip.dst) || inbound::started_outside(ip, l4))
        {
            return Ok(None);
        }
        let translated = match l4 {
            L4::IcmpError => icmp::translate_outbound(ctx, ip)?,
            _ => None,
        };
        let nat_addr = translated.ok_or(DropReason::UnsupportedProtocol)?.nat_addr;
        // The ICMP module rewrote the addresses; what is left is routing.
        let edit = HeaderEdit {
            addr_field: IP_SRC,
            old_addr: ip.src,
            new_addr: ip.src,
            port_off: 0,
            old_port: 0,
            new_port: 0,
            decrement_ttl: true,
            macs: None,
        };
        // Never an ICMP error about an ICMP error (RFC 1122).
        return forward(ctx, ip, edit, nat_addr, sel.id, None)
            .map(Some)
            .map_err(DropReason::from);
    };
    let Translation { entry, hop } =
        match translation(&key, ip, l4, sel, origin_node, cfg, honour_exclusions, now)? {
            Flow::Translate(t) => t,
            Flow::Pass => return Ok(None),
            Flow::Steer(via) => return steer::send(ctx, ip, l4, &via, cfg).map(Some),
        };
    let edit = source_edit(ip, l4, &entry);
    match forward(ctx, ip, edit, entry.nat_addr, sel.id, hop) {
        Ok(verdict) => Ok(Some(verdict)),
        Err(NoHop {
            reason: DropReason::MtuExceeded,
            mtu,
        }) if ip.dont_fragment => {
            let kind = icmp::ErrorKind::FragNeeded { mtu };
            let from = cfg.node_addr;
            bounce(
                ctx,
                ip,
                kind,
                from,
                origin_node,
                sel.id,
                cfg,
                DropReason::MtuExceeded,
            )
            .map(Some)
        }
        Err(e) => Err(e.reason),
    }
}

/// Turns a packet this node will not forward into an ICMP error from `from`
/// and sends it back to its sender: out of the interface it came in on (a
/// local pod, or the uplink for a reply from outside), or through the
/// tunnel to `origin_node` (VNI `policy_id`) for a steered pod. The error
/// quotes the packet as it arrived (for a pod: untranslated), and is counted
/// as a drop of `reason`. Packets that cannot be answered (IP options) are
/// dropped with `reason`.
///
/// Contract with the pod's node: its `tunnel_ingress` accepts such an error
/// for a pod when the outer source is the egress node of the flow that the
/// quote (the pod's own tuple) names.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn bounce(
    ctx: &TcContext,
    ip: &Ipv4,
    kind: icmp::ErrorKind,
    from: [u8; 4],
    origin_node: [u8; 4],
    policy_id: u32,
    cfg: &DatapathConfig,
    reason: DropReason,
) -> Result<i32, DropReason> {
    icmp::into_error(ctx, ip, kind, from).map_err(|_| reason)?;
    stats::count_drop(policy_id, reason);
    if origin_node == [0; 4] {
        // SAFETY: reading a field of the context the kernel handed us.
        let ifindex = unsafe { (*ctx.skb.skb).ifindex };
        // SAFETY: helper without pointer arguments.
        return Ok(unsafe { bpf_redirect(ifindex, 0) } as i32);
    }
    tunnel::redirect(ctx, origin_node, policy_id, cfg.tunnel_ifindex)
}

/// Routes a translated packet (source `src`; through the flow's next-hop
/// cache when there is one), applies `edit` with the next hop's MACs, counts
/// it and redirects it. Nothing is rewritten when there is no next hop.
#[inline(always)]
pub fn forward(
    ctx: &TcContext,
    ip: &Ipv4,
    mut edit: HeaderEdit,
    src: [u8; 4],
    policy_id: u32,
    cache: Option<HopCache>,
) -> Result<i32, NoHop> {
    // SAFETY: reading a field of the context the kernel handed us.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let hop = match cache {
        Some(cache) => fib::cached_lookup(ctx, &cache, src, ip.dst, ifindex),
        None => fib::lookup(ctx, src, ip.dst, ifindex),
    }?;
    edit.macs = hop.macs;
    csum::apply(ctx, ip, &edit).map_err(|reason| NoHop { reason, mtu: 0 })?;
    stats::count_egress(policy_id, ctx.len());
    Ok(fib::send(&hop))
}
