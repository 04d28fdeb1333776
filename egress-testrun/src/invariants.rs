//! What must hold after every packet, whatever it was:
//!
//! 1. **The egress IP is not lent out, nor withheld.** A packet from a pod
//!    that a fail-closed policy selects (arriving on that pod's interface,
//!    with its address) that leaves — redirected, or passed to a kernel that
//!    would forward it — has the policy's egress IP as its source, unless its
//!    destination is excluded (cluster, service, node, policy exclusions), or
//!    it is steered unchanged to the node that holds the egress IP. No packet
//!    leaves pod_ingress with an egress IP as source unless a pod of that
//!    policy sent it on its own interface. A tunnel arrival leaves with an
//!    egress IP only as the sending node's selected pod under its policy's
//!    VNI, and reaches a local pod only as a reply (or an ICMP error quoting
//!    the pod's packet) of a live steered flow of that pod whose egress node
//!    sent it.
//! 2. **Checksums verify** on every frame that leaves: the IPv4 header
//!    checksum always, the transport one when the packet is complete, the
//!    quoted header of ICMP errors, each whenever the input's verified.
//! 3. **Every forward entry has its reverse twin** and vice versa, but a
//!    steered entry, which has none ([`expect::needs_reverse_twin`]) and
//!    names the egress node of an active policy that steers from here. A
//!    packet steered through the tunnel leaves its flow's steered entry,
//!    naming the node it was sent to (when its protocol keeps flows).
//! 4. **The flow count equals the live entries** (no collector runs here).

use std::net::Ipv4Addr;

use egress_common::{FlowKeyV4, ct_flags, proto};
use ipnet::Ipv4Net;

use crate::{
    Flows, Outcome, Program, check, expect,
    packet::raw,
    world::{self, Pod},
};

/// A broken invariant, with what it was about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// Which invariant: `credential`, `checksum`, `twins`, `steered` or
    /// `flow_count`.
    pub invariant: &'static str,
    pub message: String,
}

fn violation(invariant: &'static str, message: String) -> Violation {
    Violation { invariant, message }
}

/// Where a packet entered.
#[derive(Clone, Copy, Debug)]
pub enum Ingress {
    /// pod_ingress on this pod's host-side interface.
    Pod(Pod),
    Uplink,
    /// tunnel_ingress, decapsulated from `remote` with `vni`.
    Tunnel {
        remote: Ipv4Addr,
        vni: u32,
    },
}

impl Ingress {
    pub fn program(self) -> Program {
        match self {
            Self::Pod(_) => Program::PodIngress,
            Self::Uplink => Program::UplinkIngress,
            Self::Tunnel { .. } => Program::TunnelIngress,
        }
    }

    pub fn describe(self) -> String {
        match self {
            Self::Pod(p) => p.interface.to_string(),
            Self::Uplink => world::UPLINK.to_string(),
            Self::Tunnel { remote, vni } => format!("{} from {remote} VNI {vni}", world::TUNNEL),
        }
    }
}

/// Destinations a policy never translates (as the node's `NodeState` says).
pub fn excluded(policy: u32, dst: Ipv4Addr) -> bool {
    let state = world::shared_node_state();
    let hit = |net: &Ipv4Net| net.contains(&dst);
    state.nodes.contains(&dst)
        || world::LOCAL_ADDRS.contains(&dst)
        || state.global_excluded.iter().any(hit)
        || state
            .policies
            .get(&policy)
            .is_some_and(|p| p.excluded.iter().any(hit))
}

/// Whether the kernel's IPv4 input would accept and forward a passed frame
/// (`ip_rcv_core`'s checks, then `ip_forward`'s TTL check). Frames it would
/// discard do not leave.
pub fn kernel_would_forward(frame: &[u8]) -> bool {
    if frame.len() < raw::IP + 20 || frame[12..14] != [0x08, 0x00] {
        return false;
    }
    let ihl = raw::ihl_bytes(frame);
    let total = usize::from(u16::from_be_bytes([
        frame[raw::IP_TOTAL_LEN],
        frame[raw::IP_TOTAL_LEN + 1],
    ]));
    frame[raw::IP] >> 4 == 4
        && ihl >= 20
        && frame.len() >= raw::IP + ihl
        && check::ip_checksum_ok(frame) == Some(true)
        && total >= ihl
        && total <= frame.len() - raw::IP
        && frame[raw::IP_TTL] > 1
}

/// Invariants 1 and 2 for one packet.
pub fn check_packet(
    ingress: Ingress,
    input: &[u8],
    out: &Outcome,
    flows: &Flows,
) -> Vec<Violation> {
    let mut found = Vec::new();
    let leaves = match out.verdict {
        expect::Verdict::Redirect => true,
        expect::Verdict::Pass => kernel_would_forward(&out.packet),
        _ => false,
    };
    if !leaves {
        return found;
    }
    match ingress {
        Ingress::Pod(pod) => {
            found.extend(not_to_tunnel(pod, input));
            found.extend(credential(pod, input, out, flows));
            found.extend(steered_entry(pod, input, out, flows));
        }
        Ingress::Tunnel { remote, vni } => {
            found.extend(tunnel_trust(remote, vni, input, out, flows))
        }
        Ingress::Uplink => {}
    }
    found.extend(checksums(input, &out.packet));
    found
}

/// A tunnel arrival may leave with an egress IP only when it is the known
/// selected pod of the node that sent it, under its policy's VNI; and may
/// reach a local pod only as a reply of that pod's own flow.
fn tunnel_trust(
    remote: Ipv4Addr,
    vni: u32,
    input: &[u8],
    out: &Outcome,
    flows: &Flows,
) -> Option<Violation> {
    let (Ok(before), Ok(after)) = (check::view(input), check::view(&out.packet)) else {
        return None;
    };
    let state = world::shared_node_state();
    let node = state.nodes.contains(&remote);
    if let Some((&id, _)) = state
        .policies
        .iter()
        .find(|(_, p)| p.egress_ip == after.src && after.src != before.src)
    {
        let genuine = remote == world::NODE2
            && before.src == world::REMOTE_POD
            && id == world::LOCAL_POLICY
            && vni == id;
        if !genuine {
            return Some(violation(
                if node {
                    expect::tunnel_spoof_invariant()
                } else {
                    "credential"
                },
                format!(
                    "{}→{} from {remote} (VNI {vni}) left with policy {id}'s egress IP {}",
                    before.src, before.dst, after.src
                ),
            ));
        }
    }
    if let Some(pod) = world::pod_by_ip(after.dst) {
        // The pod's tuple of what was delivered: a reply's reversed, or the
        // quoted packet of an ICMP error.
        let own = |k: &FlowKeyV4| match check::quoted_tuple(&out.packet) {
            Some((src, dst, sport, dport)) => {
                (k.src_addr, k.dst_addr, k.src_port, k.dst_port)
                    == (src.octets(), dst.octets(), sport, dport)
            }
            None => {
                let ports = if after.proto == proto::ICMP {
                    (after.sport, 0)
                } else {
                    (after.dport, after.sport)
                };
                k.src_addr == pod.ip.octets()
                    && k.dst_addr == after.src.octets()
                    && k.proto == after.proto
                    && (k.src_port, k.dst_port) == ports
            }
        };
        let own_flow = flows.fwd.iter().any(|(k, e)| {
            own(k) && e.flags & ct_flags::STEERED != 0 && e.origin_node == remote.octets()
        });
        if !own_flow {
            return Some(violation(
                if node {
                    expect::tunnel_unsolicited_invariant()
                } else {
                    "credential"
                },
                format!(
                    "{}→{} from {remote} (VNI {vni}) was delivered to pod {} without a steered flow of its to {remote}",
                    before.src, before.dst, pod.ip
                ),
            ));
        }
    }
    None
}

fn credential(pod: Pod, input: &[u8], out: &Outcome, flows: &Flows) -> Option<Violation> {
    let (Ok(before), Ok(after)) = (check::view(input), check::view(&out.packet)) else {
        return None;
    };
    let state = world::shared_node_state();
    let policy_of = |ip: Ipv4Addr| state.pods.get(&ip).copied();
    // Lent out: the egress IP on a packet its pod did not send on its own interface.
    if let Some((&id, _)) = state
        .policies
        .iter()
        .find(|(_, p)| p.egress_ip == after.src && after.src != before.src)
    {
        let own = before.src == pod.ip && pod.policy == Some(id);
        if !own {
            let invariant = if policy_of(before.src) == Some(id) {
                // Another pod's interface with the selected pod's address.
                expect::spoofed_source_invariant()
            } else {
                "credential"
            };
            return Some(violation(
                invariant,
                format!(
                    "{} sent {}→{} on {} and it left with policy {id}'s egress IP {}",
                    pod.ip, before.src, before.dst, pod.interface, after.src
                ),
            ));
        }
    }
    // Withheld: a selected fail-closed pod's own packet leaving with another source.
    if before.src != pod.ip {
        return None;
    }
    let id = pod.policy?;
    let policy = &state.policies[&id];
    if policy.failure_policy != egress_model::FailurePolicy::FailClosed
        || excluded(id, before.dst)
        || after.src == policy.egress_ip
    {
        return None;
    }
    let steered = !state.is_local(policy)
        && policy.egress_node.is_some()
        && out.verdict == expect::Verdict::Redirect
        && after.src == before.src
        && after.dst == before.dst;
    if steered {
        return None;
    }
    // The answer to a connection a client opened (NodePort, hostPort):
    // untranslated, and only while the pod has no flow of that tuple.
    let answers_inbound = expect::pod_syn_ack_passes()
        && before.proto == proto::TCP
        && before.tcp_flags & 0x12 == 0x12
        && out.verdict == expect::Verdict::Pass
        && after == before
        && !flows.fwd.contains_key(&FlowKeyV4::new(
            before.src.octets(),
            before.dst.octets(),
            before.sport,
            before.dport,
            proto::TCP,
        ));
    if answers_inbound {
        return None;
    }
    Some(violation(
        "credential",
        format!(
            "{}→{} from fail-closed policy {id}'s pod left ({}) with source {} instead of {}",
            before.src,
            before.dst,
            out.verdict.name(),
            after.src,
            policy.egress_ip
        ),
    ))
}

/// No pod's packet (selected or not) reaches a cluster node's tunnel port.
/// A later fragment carries no port: it is judged by its first fragment,
/// without which it never reassembles.
fn not_to_tunnel(pod: Pod, input: &[u8]) -> Option<Violation> {
    let before = check::view(input).ok()?;
    let offset = u16::from_be_bytes([input[raw::IP + 6], input[raw::IP + 7]]) & 0x1fff;
    let to_tunnel = offset == 0
        && before.proto == proto::UDP
        && before.dport == world::TUNNEL_PORT
        && world::shared_node_state().nodes.contains(&before.dst);
    to_tunnel.then(|| {
        violation(
            "credential",
            format!(
                "{} sent UDP {}→{}:{} on {} and it left for the node's tunnel port",
                pod.ip, before.src, before.dst, before.dport, pod.interface
            ),
        )
    })
}

/// A selected pod's packet redirected unchanged into the tunnel must have
/// left (or refreshed) the flow's steered entry naming the node it goes to.
fn steered_entry(pod: Pod, input: &[u8], out: &Outcome, flows: &Flows) -> Option<Violation> {
    if out.verdict != expect::Verdict::Redirect {
        return None;
    }
    let (Ok(before), Ok(after)) = (check::view(input), check::view(&out.packet)) else {
        return None;
    };
    let state = world::shared_node_state();
    let id = pod.policy?;
    let policy = &state.policies[&id];
    if before.src != pod.ip || after.src != before.src || state.is_local(policy) {
        return None;
    }
    let key = match before.proto {
        proto::TCP | proto::UDP => FlowKeyV4::new(
            before.src.octets(),
            before.dst.octets(),
            before.sport,
            before.dport,
            before.proto,
        ),
        proto::ICMP if input.get(raw::IP + raw::ihl_bytes(input)) == Some(&8) => FlowKeyV4::new(
            before.src.octets(),
            before.dst.octets(),
            before.sport,
            0,
            proto::ICMP,
        ),
        // Echo replies and ICMP errors keep no flow.
        _ => return None,
    };
    let entry = flows.fwd.get(&key);
    let ok = entry.is_some_and(|e| {
        e.flags & ct_flags::STEERED != 0
            && policy
                .egress_node
                .is_some_and(|n| n.octets() == e.origin_node)
    });
    (!ok).then(|| {
        violation(
            "steered",
            format!(
                "{}→{} ({}) was steered through the tunnel but its flow entry is {entry:?}",
                before.src, before.dst, before.proto
            ),
        )
    })
}

fn checksums(input: &[u8], output: &[u8]) -> Vec<Violation> {
    let mut found = Vec::new();
    let fail = |what: &str| {
        violation(
            "checksum",
            format!(
                "{what} checksum broken by the datapath\n  in:  {}\n  out: {}",
                check::hex(input),
                check::hex(output)
            ),
        )
    };
    if check::ip_checksum_ok(input) == Some(true) && check::ip_checksum_ok(output) == Some(false) {
        found.push(fail("IPv4 header"));
    }
    if check::l4_checksum_ok(input) == Some(true) && check::l4_checksum_ok(output) == Some(false) {
        found.push(fail("transport"));
    }
    if check::quoted_ip_checksum_ok(input) == Some(true)
        && check::quoted_ip_checksum_ok(output) == Some(false)
    {
        found.push(fail("quoted IPv4 header"));
    }
    found
}

/// Invariants 3 and 4 over the maps.
pub fn check_tables(flows: &Flows, live_flows: u64) -> Vec<Violation> {
    let mut found = Vec::new();
    let state = world::shared_node_state();
    for (key, entry) in &flows.fwd {
        if !expect::needs_reverse_twin(entry) {
            // A steered entry: a local pod's, towards the egress node of a
            // policy that steers, and nothing in nat_rev_v4 leads to it.
            let pod = world::pod_by_ip(Ipv4Addr::from(key.src_addr));
            let to_node = state.policies.values().any(|p| {
                !state.is_local(p) && p.egress_node.map(|n| n.octets()) == Some(entry.origin_node)
            });
            if pod.is_none() || !to_node {
                found.push(violation(
                    "steered",
                    format!("steered entry {key:?} → {entry:?} is not a local pod's towards an egress node"),
                ));
            }
            if flows
                .rev
                .contains_key(&key.reply_after_nat(entry.nat_addr, entry.nat_port))
            {
                found.push(violation(
                    "steered",
                    format!("steered entry {key:?} → {entry:?} has a reverse entry"),
                ));
            }
            continue;
        }
        let rk = key.reply_after_nat(entry.nat_addr, entry.nat_port);
        match flows.rev.get(&rk) {
            Some(rev) if rk.forward_before_nat(rev) == *key => {}
            Some(rev) => found.push(violation(
                "twins",
                format!(
                    "forward {key:?} → {entry:?}: its reverse {rk:?} points at {:?}",
                    rk.forward_before_nat(rev)
                ),
            )),
            None => found.push(violation(
                "twins",
                format!("forward {key:?} → {entry:?} has no reverse entry {rk:?}"),
            )),
        }
    }
    for (rk, rev) in &flows.rev {
        let fk = rk.forward_before_nat(rev);
        match flows.fwd.get(&fk) {
            Some(entry) if fk.reply_after_nat(entry.nat_addr, entry.nat_port) == *rk => {}
            Some(entry) => found.push(violation(
                "twins",
                format!(
                    "reverse {rk:?} → {rev:?}: its forward {fk:?} translates to {:?}",
                    fk.reply_after_nat(entry.nat_addr, entry.nat_port)
                ),
            )),
            None => found.push(violation(
                "twins",
                format!("reverse {rk:?} → {rev:?} has no forward entry {fk:?}"),
            )),
        }
    }
    if live_flows != flows.fwd.len() as u64 {
        found.push(violation(
            "flow_count",
            format!(
                "flow_count says {live_flows} live flows, nat_fwd_v4 holds {}",
                flows.fwd.len()
            ),
        ));
    }
    found
}
