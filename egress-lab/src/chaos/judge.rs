//! The three invariants as pure functions over what the probes observed.
//! The probes only record; these decide, so that each rule is unit-tested
//! on hand-made observations.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use serde::Serialize;

use super::wire::{self, FROM_SERVER};
use crate::spec::{self, PodRef};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum Invariant {
    /// The server saw a selected FailClosed pod's packet with a source other
    /// than its egress IP (a node or pod address), or an unselected pod's
    /// with an egress IP.
    Source,
    /// Two MACs answered ARP for one egress IP in one probe window.
    ArpTwoMacs,
    /// A MAC answered (or announced) an egress IP whose node held no valid
    /// claim on it at that moment.
    ArpNotHolder,
    /// A pod received a packet that is not a reply of one of its own flows.
    StrayDelivery,
}

#[derive(Clone, Debug, Serialize)]
pub struct Violation {
    #[serde(skip)]
    pub at: Instant,
    /// Milliseconds since the run started (filled in by the report).
    pub at_ms: u64,
    pub invariant: Invariant,
    pub evidence: String,
}

impl Violation {
    fn new(at: Instant, invariant: Invariant, evidence: String) -> Self {
        Self {
            at,
            at_ms: 0,
            invariant,
            evidence,
        }
    }
}

// ------------------------------------------------------------- sources

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Udp,
    Tcp,
}

/// A pod's record as the server received it.
#[derive(Clone, Copy, Debug)]
pub struct Arrival {
    pub at: Instant,
    pub from: SocketAddrV4,
    pub pod: PodRef,
    pub seq: u64,
    pub proto: Proto,
}

/// What the server must see as the source of each pod's traffic.
#[derive(Clone, Debug, Default)]
pub struct Expected {
    /// Selected FailClosed pods: their EgressIP's name and IP.
    pub selected: BTreeMap<PodRef, (String, Ipv4Addr)>,
    /// Every egress IP in play (an unselected pod must never carry one).
    pub egress_ips: BTreeSet<Ipv4Addr>,
}

fn describe_addr(ip: Ipv4Addr, nodes: u8) -> String {
    if let Some(n) = (1..=nodes).find(|n| spec::node_addr(*n) == ip) {
        format!("node{n}'s address")
    } else if spec::CLUSTER_CIDR
        .parse::<ipnet::Ipv4Net>()
        .is_ok_and(|c| c.contains(&ip))
    {
        "a pod address".into()
    } else {
        "neither the egress IP nor a node".into()
    }
}

/// The source invariant for one arrival.
pub fn judge_source(a: &Arrival, expected: &Expected, nodes: u8) -> Option<Violation> {
    let proto = match a.proto {
        Proto::Udp => "datagram",
        Proto::Tcp => "TCP connection",
    };
    match expected.selected.get(&a.pod) {
        Some((name, ip)) if a.from.ip() != ip => Some(Violation::new(
            a.at,
            Invariant::Source,
            format!(
                "{} ({}, selected by FailClosed EgressIP {name} {ip}): {proto} {} arrived from {} ({})",
                a.pod,
                a.pod.ip(),
                a.seq,
                a.from,
                describe_addr(*a.from.ip(), nodes)
            ),
        )),
        Some(_) => None,
        None if expected.egress_ips.contains(a.from.ip()) => Some(Violation::new(
            a.at,
            Invariant::Source,
            format!(
                "{} ({}, selected by nothing): {proto} {} arrived from {}, an egress IP",
                a.pod,
                a.pod.ip(),
                a.seq,
                a.from
            ),
        )),
        None => None,
    }
}

// ----------------------------------------------------------------- ARP

/// An ARP frame on the node network whose sender IP is an egress IP.
#[derive(Clone, Debug)]
pub struct ArpSeen {
    pub at: Instant,
    pub ip: Ipv4Addr,
    pub mac: [u8; 6],
    /// How many probes for `ip` had been sent when it was seen: frames with
    /// the same round answered the same probe window.
    pub round: u64,
    pub op: u16,
}

/// One stored version of a node's claims Lease.
#[derive(Clone, Debug)]
pub struct ClaimEvent {
    pub at: Instant,
    pub node: String,
    pub ips: BTreeSet<Ipv4Addr>,
    pub deleted: bool,
    /// The restart grace this version carries (an agent stopping for a
    /// restart): its claims are live that long rather than the claim TTL.
    pub restart_grace: Option<Duration>,
}

/// Whether `node` held a valid claim on `ip` at `at`: its last claims
/// Lease version stored at or before `at` lists `ip` and is younger than
/// the claim lifetime (the TTL, or the restart grace it carries if longer;
/// plus `slack` for the frame's trip to the capture).
pub fn held_at(
    claims: &[ClaimEvent],
    node: &str,
    ip: Ipv4Addr,
    at: Instant,
    ttl: Duration,
    slack: Duration,
) -> bool {
    claims
        .iter()
        .rfind(|c| c.node == node && c.at <= at)
        .is_some_and(|c| {
            let lifetime = c.restart_grace.map_or(ttl, |g| g.max(ttl));
            !c.deleted && c.ips.contains(&ip) && at <= c.at + lifetime + slack
        })
}

/// Both ARP invariants. `macs`: each node's uplink MAC.
pub fn judge_arp(
    seen: &[ArpSeen],
    macs: &BTreeMap<[u8; 6], String>,
    claims: &[ClaimEvent],
    ttl: Duration,
    slack: Duration,
) -> Vec<Violation> {
    let mut out = Vec::new();
    let mut windows: BTreeMap<(Ipv4Addr, u64), BTreeSet<[u8; 6]>> = BTreeMap::new();
    let what = |op| {
        if op == wire::ARP_REPLY {
            "reply"
        } else {
            "request/announcement"
        }
    };
    for s in seen {
        let window = windows.entry((s.ip, s.round)).or_default();
        if window.insert(s.mac) && window.len() == 2 {
            out.push(Violation::new(
                s.at,
                Invariant::ArpTwoMacs,
                format!(
                    "two MACs for {} in probe window {}: {}",
                    s.ip,
                    s.round,
                    window
                        .iter()
                        .map(|m| format!(
                            "{} ({})",
                            wire::mac_string(*m),
                            macs.get(m).map_or("no node", String::as_str)
                        ))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
        match macs.get(&s.mac) {
            None => out.push(Violation::new(
                s.at,
                Invariant::ArpNotHolder,
                format!(
                    "ARP {} for {} from {}, which is no node's uplink",
                    what(s.op),
                    s.ip,
                    wire::mac_string(s.mac)
                ),
            )),
            Some(node) if !held_at(claims, node, s.ip, s.at, ttl, slack) => {
                let last = claims.iter().rfind(|c| &c.node == node && c.at <= s.at);
                out.push(Violation::new(
                    s.at,
                    Invariant::ArpNotHolder,
                    format!(
                        "ARP {} for {} from {node} ({}) without a valid claim: its last claims Lease {}",
                        what(s.op),
                        s.ip,
                        wire::mac_string(s.mac),
                        match last {
                            None => "did not exist yet".to_owned(),
                            Some(c) => format!(
                                "was stored {} ms before and listed {:?}{}",
                                s.at.duration_since(c.at).as_millis(),
                                c.ips,
                                if c.deleted { " (deleted)" } else { "" }
                            ),
                        }
                    ),
                ));
            }
            Some(_) => {}
        }
    }
    out
}

// ------------------------------------------------------------ delivery

/// The flows a pod opened: what may be delivered to it.
#[derive(Clone, Debug, Default)]
pub struct OwnFlows {
    pub udp_ports: BTreeSet<u16>,
    pub tcp_ports: BTreeSet<u16>,
}

/// Server ports of the chaos streams.
#[derive(Clone, Copy, Debug)]
pub struct ServerPorts {
    pub udp: u16,
    pub tcp: u16,
}

/// Whether an IPv4 packet delivered to `pod` is a reply of one of its own
/// flows (or an ICMP error about one); `Err` says what it is instead.
pub fn classify_delivery(
    pkt: &[u8],
    pod: PodRef,
    own: &OwnFlows,
    ports: ServerPorts,
) -> Result<(), String> {
    if pkt.len() < 20 || pkt[0] >> 4 != 4 {
        return Err(format!("not IPv4 ({} bytes)", pkt.len()));
    }
    let ihl = usize::from(pkt[0] & 0x0f) * 4;
    let proto = pkt[9];
    let src = Ipv4Addr::new(pkt[12], pkt[13], pkt[14], pkt[15]);
    let dst = Ipv4Addr::new(pkt[16], pkt[17], pkt[18], pkt[19]);
    let l4 = pkt.get(ihl..).unwrap_or_default();
    let ports_of = |l4: &[u8]| -> Option<(u16, u16)> {
        Some((
            u16::from_be_bytes(l4.get(0..2)?.try_into().ok()?),
            u16::from_be_bytes(l4.get(2..4)?.try_into().ok()?),
        ))
    };
    let what = |why: &str| {
        let tag = match (proto, l4.get(8..)) {
            (17, Some(p)) => wire::parse_record(p)
                .map(|(m, pod, s)| {
                    let forged = (m == wire::FROM_ATTACKER)
                        .then(|| super::delivery::ALL_FORGED.get(usize::from(p[6]).wrapping_sub(1)))
                        .flatten()
                        .map(|k| format!(" (forged: {k:?})"))
                        .unwrap_or_default();
                    format!(
                        ", payload {} of {pod} #{s}{forged}",
                        String::from_utf8_lossy(&m)
                    )
                })
                .unwrap_or_default(),
            _ => String::new(),
        };
        let (sp, dp) = ports_of(l4).unwrap_or_default();
        format!("{why}: proto {proto} {src}:{sp} -> {dst}:{dp}{tag}")
    };
    if dst != pod.ip() {
        return Err(what("not addressed to the pod"));
    }
    match proto {
        17 => {
            let (sp, dp) = ports_of(l4).ok_or_else(|| what("truncated UDP"))?;
            if src != spec::SERVER_ADDR || sp != ports.udp || !own.udp_ports.contains(&dp) {
                return Err(what("UDP of no flow of the pod"));
            }
            match l4.get(8..).and_then(wire::parse_record) {
                Some((m, p, _)) if m == FROM_SERVER && p == pod => Ok(()),
                _ => Err(what(
                    "UDP on the pod's flow but not the server's echo for it",
                )),
            }
        }
        6 => {
            let (sp, dp) = ports_of(l4).ok_or_else(|| what("truncated TCP"))?;
            if src == spec::SERVER_ADDR && sp == ports.tcp && own.tcp_ports.contains(&dp) {
                Ok(())
            } else {
                Err(what("TCP of no connection of the pod"))
            }
        }
        1 => {
            // An ICMP error quotes the packet it is about: it must be one the
            // pod sent on one of its flows.
            let kind = l4.first().copied().unwrap_or(255);
            let quoted = l4.get(8..).unwrap_or_default();
            let about_own = [3u8, 11, 12].contains(&kind)
                && quoted.len() >= 28
                && quoted[12..16] == pod.ip().octets()
                && quoted[16..20] == spec::SERVER_ADDR.octets()
                && match quoted[9] {
                    17 => ports_of(&quoted[20..])
                        .is_some_and(|(sp, dp)| own.udp_ports.contains(&sp) && dp == ports.udp),
                    6 => ports_of(&quoted[20..])
                        .is_some_and(|(sp, dp)| own.tcp_ports.contains(&sp) && dp == ports.tcp),
                    _ => false,
                };
            if about_own {
                Ok(())
            } else {
                Err(what(&format!("ICMP type {kind} about no flow of the pod")))
            }
        }
        _ => Err(what("unexpected protocol")),
    }
}

// ------------------------------------------------------------- outages

/// The longest stretch within `[from, to]` without an arrival in `times`
/// (sorted), counting from `from` and up to `to`.
pub fn longest_gap(times: &[Instant], from: Instant, to: Instant) -> Duration {
    let mut last = from;
    let mut longest = Duration::ZERO;
    for t in times.iter().copied().filter(|t| *t >= from && *t <= to) {
        longest = longest.max(t - last);
        last = t;
    }
    longest.max(to.saturating_duration_since(last))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn expected() -> Expected {
        let mut e = Expected::default();
        e.selected
            .insert(PodRef::new(2, 1), ("chaos-a".into(), ip("172.18.0.100")));
        e.egress_ips.insert(ip("172.18.0.100"));
        e
    }

    fn arrival(pod: PodRef, from: &str) -> Arrival {
        Arrival {
            at: Instant::now(),
            from: from.parse().unwrap(),
            pod,
            seq: 5,
            proto: Proto::Udp,
        }
    }

    #[test]
    fn a_selected_pod_must_arrive_with_its_egress_ip_and_an_unselected_one_never_does() {
        let e = expected();
        let sel = PodRef::new(2, 1);
        assert!(judge_source(&arrival(sel, "172.18.0.100:4000"), &e, 3).is_none());
        let v = judge_source(&arrival(sel, "172.18.0.12:4000"), &e, 3).unwrap();
        assert!(v.evidence.contains("node2's address"), "{}", v.evidence);
        let v = judge_source(&arrival(sel, "10.244.2.11:4000"), &e, 3).unwrap();
        assert!(v.evidence.contains("a pod address"), "{}", v.evidence);
        let free = PodRef::new(2, 2);
        assert!(judge_source(&arrival(free, "172.18.0.12:4000"), &e, 3).is_none());
        assert!(judge_source(&arrival(free, "172.18.0.100:4000"), &e, 3).is_some());
    }

    fn claim(at: Instant, node: &str, ips: &[&str]) -> ClaimEvent {
        ClaimEvent {
            at,
            node: node.into(),
            ips: ips.iter().map(|s| ip(s)).collect(),
            deleted: false,
            restart_grace: None,
        }
    }

    #[test]
    fn arp_from_the_claim_holder_is_fine_and_two_macs_or_a_lapsed_claim_are_not() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let (m1, m2) = ([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
        let macs = BTreeMap::from([(m1, "node1".to_owned()), (m2, "node2".to_owned())]);
        let claims = vec![
            claim(t0, "node1", &["172.18.0.100"]),
            claim(t0 + ms(2000), "node2", &["172.18.0.100"]),
        ];
        let seen = |at, mac, round| ArpSeen {
            at,
            ip: ip("172.18.0.100"),
            mac,
            round,
            op: wire::ARP_REPLY,
        };
        let ttl = ms(1500);
        let slack = ms(50);
        // node1 within its claim, node2 after claiming: fine.
        let ok = [seen(t0 + ms(100), m1, 1), seen(t0 + ms(2100), m2, 20)];
        assert!(judge_arp(&ok, &macs, &claims, ttl, slack).is_empty());
        // node1 after its claim lapsed (not renewed since t0).
        let late = [seen(t0 + ms(1600), m1, 16)];
        let v = judge_arp(&late, &macs, &claims, ttl, slack);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].invariant, Invariant::ArpNotHolder);
        // Both in one window (node1 is also past its claim by then).
        let both = [seen(t0 + ms(2100), m2, 20), seen(t0 + ms(2150), m1, 20)];
        let v = judge_arp(&both, &macs, &claims, ttl, slack);
        assert!(v.iter().any(|v| v.invariant == Invariant::ArpTwoMacs));
        // A MAC that is no node's.
        let stranger = [seen(t0 + ms(100), [2, 9, 9, 9, 9, 9], 1)];
        assert_eq!(judge_arp(&stranger, &macs, &claims, ttl, slack).len(), 1);
        // Under a restart grace the claim lives that long.
        let graced = vec![ClaimEvent {
            restart_grace: Some(ms(30_000)),
            ..claim(t0, "node1", &["172.18.0.100"])
        }];
        assert!(judge_arp(&late, &macs, &graced, ttl, slack).is_empty());
        let after_grace = [seen(t0 + ms(30_100), m1, 300)];
        assert_eq!(judge_arp(&after_grace, &macs, &graced, ttl, slack).len(), 1);
        // Before node2 ever claimed.
        assert!(!held_at(
            &claims,
            "node2",
            ip("172.18.0.100"),
            t0 + ms(10),
            ttl,
            slack
        ));
    }

    fn udp_packet(src: &str, dst: &str, payload: &[u8]) -> Vec<u8> {
        wire::ipv4_udp(src.parse().unwrap(), dst.parse().unwrap(), payload)
    }

    #[test]
    fn only_replies_of_the_pods_own_flows_may_be_delivered() {
        let pod = PodRef::new(2, 1);
        let own = OwnFlows {
            udp_ports: BTreeSet::from([40000]),
            tcp_ports: BTreeSet::from([41000]),
        };
        let ports = ServerPorts {
            udp: 8095,
            tcp: 8096,
        };
        let echo = wire::record(FROM_SERVER, pod, 1);
        let ok = udp_packet("198.51.100.10:8095", "10.244.2.11:40000", &echo);
        assert_eq!(classify_delivery(&ok, pod, &own, ports), Ok(()));
        // Another pod's echo on this pod's flow.
        let other = wire::record(FROM_SERVER, PodRef::new(3, 1), 1);
        let p = udp_packet("198.51.100.10:8095", "10.244.2.11:40000", &other);
        assert!(classify_delivery(&p, pod, &own, ports).is_err());
        // The attacker's packet, on the right port but from elsewhere.
        let atk = wire::record(wire::FROM_ATTACKER, pod, 1);
        let p = udp_packet("172.18.0.1:8095", "10.244.2.11:40000", &atk);
        let e = classify_delivery(&p, pod, &own, ports).unwrap_err();
        assert!(e.contains("EGCX"), "{e}");
        // A port the pod never used.
        let p = udp_packet("198.51.100.10:8095", "10.244.2.11:40001", &echo);
        assert!(classify_delivery(&p, pod, &own, ports).is_err());
        // An ICMP error quoting the pod's own datagram.
        let quoted = udp_packet("10.244.2.11:40000", "198.51.100.10:8095", &[0; 8]);
        let mut icmp = vec![3, 4, 0, 0, 0, 0, 0x05, 0x78];
        icmp.extend_from_slice(&quoted[..28]);
        let mut p = udp_packet("172.18.0.11:1", "10.244.2.11:1", &[]);
        p.truncate(20);
        p[9] = 1;
        p.extend_from_slice(&icmp);
        assert_eq!(classify_delivery(&p, pod, &own, ports), Ok(()));
    }

    #[test]
    fn the_longest_gap_counts_the_edges() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let times = [t0 + ms(10), t0 + ms(20), t0 + ms(900), t0 + ms(950)];
        assert_eq!(longest_gap(&times, t0, t0 + ms(1000)), ms(880));
        assert_eq!(longest_gap(&[], t0, t0 + ms(300)), ms(300));
    }
}
