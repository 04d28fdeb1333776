//! The datapath fuzz target: a seeded, self-contained mutational generator
//! feeding pod_ingress, uplink_ingress and (through the tunnel-metadata
//! injector, with forged outer sources and VNIs too) tunnel_ingress
//! interleaved, so that replies, ICMP errors and forged packets meet the
//! flows earlier packets created,
//! with the [`invariants`](crate::invariants) checked after every packet.
//!
//! Deterministic for a seed, except where the datapath itself draws a
//! random NAT port (a taken port); the reproducer names the seed and the
//! packet number.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use anyhow::Result;
use egress_common::{DropReason, FlowKeyV4, NatEntryV4, PolicyStats, proto};
use etherparse::{Icmpv4Type, TcpOptionElement, icmpv4};

use crate::{
    Harness,
    check::hex,
    expect::{self, Verdict},
    invariants::{self, Ingress, Violation},
    packet::{Frame, raw, tcp},
    world::{self, PODS},
};

/// When to stop.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub duration: Option<Duration>,
    pub packets: Option<u64>,
}

/// A violation with what reproduces it.
#[derive(Clone, Debug)]
pub struct Finding {
    pub seed: u64,
    /// 1-based number of the packet after which the invariant broke.
    pub packet: u64,
    pub program: &'static str,
    pub ingress: String,
    pub frame: String,
    pub violation: Violation,
}

impl Finding {
    pub fn reproducer(&self) -> String {
        format!(
            "cargo xtask fuzz --seed {} --packets {}  # {} on {}: {}",
            self.seed, self.packet, self.program, self.ingress, self.frame
        )
    }
}

#[derive(Clone, Debug, Default)]
pub struct Summary {
    pub seed: u64,
    pub packets: u64,
    pub elapsed: Duration,
    /// (program, verdict) -> packets.
    pub verdicts: BTreeMap<(&'static str, String), u64>,
    /// Drops by reason over all policies.
    pub drops: BTreeMap<&'static str, u64>,
    /// The first frame dropped for each reason, and where it entered.
    pub drop_samples: BTreeMap<&'static str, (String, String)>,
    pub flows_at_end: usize,
    /// Broken invariants (the first few of each kind are kept in full).
    pub findings: Vec<Finding>,
    pub violations: BTreeMap<&'static str, u64>,
}

impl Summary {
    /// Violations that are not known holes.
    pub fn failures(&self) -> u64 {
        self.violations
            .iter()
            .filter(|(k, _)| !expect::known_hole(k))
            .map(|(_, n)| n)
            .sum()
    }

    pub fn render(&self) -> String {
        let mut s = String::new();
        let rate = self.packets as f64 / self.elapsed.as_secs_f64().max(1e-9);
        let _ = writeln!(
            s,
            "fuzz: seed {}, {} packets in {:.1} s ({rate:.0}/s), {} flows at the end",
            self.seed,
            self.packets,
            self.elapsed.as_secs_f64(),
            self.flows_at_end
        );
        let _ = writeln!(s, "verdicts:");
        for ((prog, verdict), n) in &self.verdicts {
            let _ = writeln!(s, "  {prog:<15} {verdict:<9} {n}");
        }
        let _ = writeln!(s, "drops by reason:");
        for (reason, n) in &self.drops {
            let _ = writeln!(s, "  {reason:<20} {n}");
        }
        let _ = writeln!(s, "first frame dropped for each reason:");
        for (reason, (ingress, frame)) in &self.drop_samples {
            let _ = writeln!(s, "  {reason:<20} {ingress}: {frame}");
        }
        if self.violations.is_empty() {
            let _ = writeln!(s, "invariant violations: none");
        } else {
            let _ = writeln!(s, "invariant violations:");
            for (inv, n) in &self.violations {
                let known = if expect::known_hole(inv) {
                    " (known hole, see egress-testrun expect.rs)"
                } else {
                    ""
                };
                let _ = writeln!(s, "  {inv:<15} {n}{known}");
            }
            for f in &self.findings {
                let _ = writeln!(
                    s,
                    "- [{}] packet {}: {}\n  reproduce: {}",
                    f.violation.invariant,
                    f.packet,
                    f.violation.message,
                    f.reproducer()
                );
            }
        }
        s
    }
}

/// Full findings kept per invariant.
const KEEP_PER_INVARIANT: usize = 3;

/// Runs the fuzz target on a fresh harness until `limits`.
pub fn run(seed: u64, limits: Limits) -> Result<Summary> {
    let harness = Harness::node()?;
    let mut generator = Generator::new(seed);
    let mut summary = Summary {
        seed,
        ..Default::default()
    };
    let started = Instant::now();
    let mut flows = harness.flows()?;
    let mut before = drop_totals(&harness)?;
    loop {
        if limits.packets.is_some_and(|n| summary.packets >= n)
            || limits.duration.is_some_and(|d| started.elapsed() >= d)
        {
            break;
        }
        summary.packets += 1;
        let (ingress, frame) = generator.next(&flows);
        let out = match ingress {
            Ingress::Pod(pod) => harness.pod_ingress(pod, &frame)?,
            Ingress::Uplink => harness.uplink_ingress(&frame)?,
            Ingress::Tunnel { remote, vni } => harness.tunnel_ingress_from(remote, vni, &frame)?,
        };
        let program = ingress.program().name();
        *summary
            .verdicts
            .entry((program, out.verdict.name()))
            .or_default() += 1;
        if out.verdict.leaves() {
            generator.remember(&out.packet);
        }
        flows = harness.flows()?;
        let mut found = invariants::check_packet(ingress, &frame, &out, &flows);
        found.extend(invariants::check_tables(&flows, harness.live_flows()?));
        if out.verdict == Verdict::Drop {
            let after = drop_totals(&harness)?;
            for reason in DropReason::ALL {
                let d = after.drops.get(reason) - before.drops.get(reason);
                if d > 0 {
                    *summary.drops.entry(reason.name()).or_default() += d;
                    summary
                        .drop_samples
                        .entry(reason.name())
                        .or_insert_with(|| (ingress.describe(), hex(&frame)));
                }
            }
            before = after;
        }
        for violation in found {
            let n = summary.violations.entry(violation.invariant).or_default();
            *n += 1;
            if *n as usize <= KEEP_PER_INVARIANT {
                summary.findings.push(Finding {
                    seed,
                    packet: summary.packets,
                    program,
                    ingress: ingress.describe(),
                    frame: hex(&frame),
                    violation,
                });
            }
        }
    }
    summary.elapsed = started.elapsed();
    summary.flows_at_end = flows.fwd.len();
    Ok(summary)
}

/// Every policy's counters added up.
fn drop_totals(harness: &Harness) -> Result<PolicyStats> {
    let mut total = PolicyStats::default();
    for id in 0..=world::ORPHAN_OPEN_POLICY {
        total.accumulate(&harness.stats(id)?);
    }
    Ok(total)
}

/// Addresses a packet may come from or go to: the world's, and a few others.
const SOMEWHERE: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 7);
const PORTS: [u16; 7] = [53, 80, 443, 1024, 40000, 40001, 65535];

struct Generator {
    rng: fastrand::Rng,
    /// Frames that left recently: what ICMP errors quote.
    recent: Vec<Vec<u8>>,
}

impl Generator {
    fn new(seed: u64) -> Self {
        Self {
            rng: fastrand::Rng::with_seed(seed),
            recent: Vec::new(),
        }
    }

    fn remember(&mut self, frame: &[u8]) {
        const KEEP: usize = 32;
        if self.recent.len() == KEEP {
            let i = self.rng.usize(..KEEP);
            self.recent[i] = frame.to_vec();
        } else {
            self.recent.push(frame.to_vec());
        }
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.rng.usize(..items.len())]
    }

    fn chance(&mut self, percent: u8) -> bool {
        self.rng.u8(..100) < percent
    }

    fn port(&mut self) -> u16 {
        if self.chance(10) {
            self.rng.u16(..)
        } else {
            self.pick(&PORTS)
        }
    }

    fn tcp_flags(&mut self) -> u8 {
        let common = [
            tcp::SYN,
            tcp::ACK,
            tcp::SYN | tcp::ACK,
            tcp::FIN | tcp::ACK,
            tcp::RST,
            tcp::RST | tcp::ACK,
            tcp::PSH | tcp::ACK,
        ];
        if self.chance(80) {
            self.pick(&common)
        } else {
            self.rng.u8(..) & 0x3f
        }
    }

    /// The next packet and where it enters.
    fn next(&mut self, flows: &crate::Flows) -> (Ingress, Vec<u8>) {
        let roll = self.rng.u8(..100);
        let (ingress, frame) = if roll < 50 {
            self.pod_packet()
        } else if roll < 85 {
            (Ingress::Uplink, self.outside_packet(flows))
        } else {
            self.tunnel_packet()
        };
        (ingress, self.mutate(frame))
    }

    fn pod_packet(&mut self) -> (Ingress, Frame) {
        let pod = self.pick(&PODS);
        // Mostly its own address; sometimes a neighbour's or a stranger's.
        let src = if self.chance(90) {
            pod.ip
        } else if self.chance(70) {
            self.pick(&PODS).ip
        } else {
            SOMEWHERE
        };
        let dst = if self.chance(75) {
            self.pick(&[world::SERVER, world::SERVER2])
        } else {
            self.pick(&[
                world::EXCLUDED_SERVER,
                world::CLUSTER_PEER,
                world::SERVICE,
                world::NODE,
                world::NODE2,
                world::LOCAL_EGRESS,
                SOMEWHERE,
            ])
        };
        let frame = match self.rng.u8(..10) {
            0..=3 => {
                let flags = self.tcp_flags();
                let mut f = Frame::tcp(src, self.port(), dst, self.port(), flags);
                if flags & tcp::SYN != 0 && self.chance(70) {
                    f = f.mss(self.pick(&[536, 1410, 1460, 9000, 65535]));
                }
                f
            }
            4..=6 => {
                // Now and then at a tunnel port: a pod posing as a node's datapath.
                let dport = if self.chance(10) {
                    world::TUNNEL_PORT
                } else {
                    self.port()
                };
                Frame::udp(src, self.port(), dst, dport)
            }
            7 | 8 => Frame::echo_request(src, dst, self.port()),
            _ => {
                // An error about what a server sent the pod.
                let about = Frame::udp(dst, self.port(), src, self.port()).build();
                Frame::icmp_error(
                    src,
                    dst,
                    Icmpv4Type::DestinationUnreachable(icmpv4::DestUnreachableHeader::Port),
                    &about,
                    8,
                )
            }
        };
        let frame = frame.macs(pod.mac, pod.host_mac);
        (Ingress::Pod(pod), frame)
    }

    /// What another node (or something posing as one) sends through the tunnel.
    fn tunnel_packet(&mut self) -> (Ingress, Frame) {
        let remote = if self.chance(80) {
            world::NODE2
        } else {
            self.pick(&[world::STRANGER, world::NODE])
        };
        let vni = if self.chance(70) {
            world::LOCAL_POLICY
        } else {
            self.pick(&[
                world::STEERED_POLICY,
                world::ORPHAN_CLOSED_POLICY,
                world::ORPHAN_OPEN_POLICY,
                4242,
            ])
        };
        let server = self.pick(&[world::SERVER, world::SERVER2]);
        let (src, dst) = match self.rng.u8(..4) {
            // node2's selected pod, steered here.
            0 | 1 => (world::REMOTE_POD, server),
            // A reply node2 translated back for one of our pods.
            2 => (server, self.pick(&PODS).ip),
            // Someone else's address inside.
            _ => (
                self.pick(&[world::POD_LOCAL.ip, SOMEWHERE, world::CLUSTER_PEER]),
                self.pick(&[server, world::POD_LOCAL.ip]),
            ),
        };
        let frame = match self.rng.u8(..3) {
            0 => Frame::tcp(src, self.port(), dst, self.port(), self.tcp_flags()),
            1 => Frame::udp(src, self.port(), dst, self.port()),
            _ => Frame::echo_request(src, dst, self.port()),
        };
        (Ingress::Tunnel { remote, vni }, frame)
    }

    fn outside_packet(&mut self, flows: &crate::Flows) -> Frame {
        let mut live: Vec<(&FlowKeyV4, &NatEntryV4)> = flows.fwd.iter().collect();
        live.sort_by_key(|(k, _)| (k.src_addr, k.dst_addr, k.src_port, k.dst_port, k.proto));
        let roll = self.rng.u8(..100);
        let frame = if roll < 60 && !live.is_empty() {
            let (key, entry) = live[self.rng.usize(..live.len())];
            let (server, egress) = (Ipv4Addr::from(key.dst_addr), Ipv4Addr::from(entry.nat_addr));
            match key.proto {
                proto::TCP => Frame::tcp(
                    server,
                    key.dst_port,
                    egress,
                    entry.nat_port,
                    self.tcp_flags(),
                ),
                proto::UDP => Frame::udp(server, key.dst_port, egress, entry.nat_port),
                _ => Frame::echo_reply(server, egress, entry.nat_port),
            }
        } else if roll < 80 && !self.recent.is_empty() {
            // An error about a frame that left, possibly itself an error.
            let about = self.recent[self.rng.usize(..self.recent.len())].clone();
            let Ok(v) = crate::check::view(&about) else {
                return Frame::udp(SOMEWHERE, 1, world::LOCAL_EGRESS, 1);
            };
            let kind = match self.rng.u8(..3) {
                0 => Icmpv4Type::DestinationUnreachable(
                    icmpv4::DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1400 },
                ),
                1 => Icmpv4Type::TimeExceeded(icmpv4::TimeExceededCode::TtlExceededInTransit),
                _ => Icmpv4Type::DestinationUnreachable(icmpv4::DestUnreachableHeader::Port),
            };
            let from = if self.chance(50) {
                v.dst
            } else {
                world::ROUTER
            };
            let quote_l4 = self.pick(&[0, 4, 8, 8, 8, 64]);
            Frame::icmp_error(from, v.src, kind, &about, quote_l4)
        } else {
            let dst = self.pick(&[world::LOCAL_EGRESS, world::NODE, world::STEERED_EGRESS]);
            let src = self.pick(&[world::SERVER, world::SERVER2, SOMEWHERE]);
            match self.rng.u8(..4) {
                0 => Frame::tcp(src, self.port(), dst, self.port(), self.tcp_flags()),
                1 => Frame::udp(src, self.port(), dst, self.port()),
                2 => Frame::echo_request(src, dst, self.port()),
                _ => Frame::echo_reply(src, dst, self.port()),
            }
        };
        frame.macs(world::ROUTER_MAC, world::UPLINK_MAC)
    }

    /// Zero to three mutations: what senders would write wrong on purpose.
    fn mutate(&mut self, mut frame: Frame) -> Vec<u8> {
        if self.chance(10) {
            frame = frame.ttl(self.pick(&[0, 1, 2]));
        }
        if self.chance(8) {
            let options: &[u8] = self.pick(&[
                &[1, 1, 1, 0][..],
                &[7, 7, 4, 0, 0, 0, 0][..],
                &[0x44, 12, 5, 0, 0, 0, 0, 0, 0, 0, 0, 0][..],
                &[1; 40][..],
            ]);
            frame = frame.ip_options(options);
        }
        if self.chance(5) {
            frame = frame.fragment(self.chance(50), self.pick(&[0, 1, 185]));
        }
        if self.chance(5) {
            frame = frame.no_udp_checksum();
        }
        if self.chance(4) {
            frame = frame.tcp_options(&[
                TcpOptionElement::Noop,
                TcpOptionElement::Noop,
                TcpOptionElement::MaximumSegmentSize(self.rng.u16(..)),
            ]);
        }
        let mut bytes = frame.build();
        for _ in 0..self.rng.usize(..=3) {
            if !self.chance(35) {
                continue;
            }
            match self.rng.u8(..7) {
                // IHL that disagrees with the header that is there.
                0 => bytes[raw::IP] = 0x40 | self.rng.u8(..16),
                // Total length shorter or longer than the frame.
                1 => {
                    let len = (bytes.len() - raw::IP) as u16;
                    let new = match self.rng.u8(..3) {
                        0 => len.saturating_sub(self.rng.u16(1..40)),
                        1 => len + self.rng.u16(1..200),
                        _ => self.rng.u16(..),
                    };
                    raw::set_total_len(&mut bytes, new);
                }
                // A frame cut short, transport header included.
                2 => {
                    // BPF_PROG_TEST_RUN refuses IPv4 frames shorter than
                    // Ethernet + 20 bytes (EINVAL): cut after that.
                    let keep = self
                        .rng
                        .usize(raw::MIN_TEST_RUN_IPV4..bytes.len().max(raw::MIN_TEST_RUN_IPV4 + 1));
                    bytes.truncate(keep);
                }
                // Trailing bytes beyond the IP packet (Ethernet padding).
                3 => bytes.extend(std::iter::repeat_n(0, self.rng.usize(1..32))),
                // Another protocol number for the same bytes.
                4 => bytes[raw::IP_PROTO] = self.pick(&[1, 6, 17, 47, 132]),
                // A transport byte flipped (ports, flags, ICMP type...).
                5 => {
                    let l4 = raw::IP + raw::ihl_bytes(&bytes);
                    if l4 + 14 < bytes.len() {
                        let i = l4 + self.rng.usize(..14);
                        bytes[i] ^= 1 << self.rng.u8(..8);
                    }
                }
                // A header checksum a sender got wrong.
                _ => {
                    if bytes.len() > raw::IP_CSUM + 1 {
                        bytes[raw::IP_CSUM] ^= 0x5a;
                    }
                    return bytes;
                }
            }
            if bytes.len() >= raw::IP + 20 {
                raw::fix_ip_checksum(&mut bytes);
            }
        }
        bytes
    }
}
