//! What reaches the pods: a capture on every pod's interface judges each
//! IPv4 packet delivered to it (it must be a reply of one of its own
//! flows), and an attacker in the router's namespace keeps sending forged,
//! tagged packets at the egress IPs and the nodes' tunnel port that no pod
//! may ever receive.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use serde::Serialize;

use super::{
    judge::{self, Arrival, Invariant, ServerPorts, Violation},
    packet::{ETH_P_IP, PACKET_OUTGOING, PacketSocket, RawIpv4, ifindex_of},
    stream::{SharedFlows, Threads},
    wire::{self, FROM_ATTACKER},
};
use crate::{
    error::Result,
    netns,
    spec::{self, PodRef},
    traffic::InnerUdp,
};

/// Captures on every pod's `eth0`; reopens when the interface is replaced
/// (a pod deleted and created again).
pub struct Captures {
    pub strays: Arc<Mutex<Vec<Violation>>>,
    pub delivered: Arc<AtomicU64>,
    threads: Threads,
}

impl Captures {
    pub fn start(pods: Vec<(PodRef, String, SharedFlows)>, ports: ServerPorts) -> Result<Self> {
        let strays: Arc<Mutex<Vec<Violation>>> = Arc::default();
        let delivered = Arc::new(AtomicU64::new(0));
        let mut threads = Threads::new();
        for (pod, ns, flows) in pods {
            let (stop, strays, delivered) =
                (threads.stop.clone(), strays.clone(), delivered.clone());
            threads.push(
                &ns,
                netns::spawn_in_netns(&ns, "chaos-capture", move || {
                    let mut sock: Option<PacketSocket> = None;
                    let mut checked = Instant::now();
                    let mut buf = vec![0u8; 2048];
                    while !stop.load(Ordering::Relaxed) {
                        if sock.is_none() || checked.elapsed() > Duration::from_millis(200) {
                            checked = Instant::now();
                            let now = ifindex_of("eth0");
                            if sock.as_ref().map(|s| s.ifindex) != now {
                                sock = now.and_then(|_| {
                                    PacketSocket::open(
                                        "eth0",
                                        ETH_P_IP,
                                        true,
                                        Duration::from_millis(50),
                                    )
                                    .ok()
                                });
                            }
                        }
                        let Some(s) = &sock else {
                            std::thread::sleep(Duration::from_millis(50));
                            continue;
                        };
                        let (len, kind) = match s.recv(&mut buf) {
                            Ok(Some(x)) => x,
                            Ok(None) => continue,
                            Err(_) => {
                                sock = None;
                                continue;
                            }
                        };
                        if kind == PACKET_OUTGOING {
                            continue;
                        }
                        let own = flows.lock().expect("flows").clone();
                        match judge::classify_delivery(&buf[..len], pod, &own, ports) {
                            Ok(()) => {
                                delivered.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(what) => strays.lock().expect("strays").push(Violation {
                                at: Instant::now(),
                                at_ms: 0,
                                invariant: Invariant::StrayDelivery,
                                evidence: format!("{pod} ({}) received {what}", pod.ip()),
                            }),
                        }
                    }
                    Ok(())
                })?,
            );
        }
        Ok(Self {
            strays,
            delivered,
            threads,
        })
    }

    pub fn strays(&self) -> Vec<Violation> {
        self.strays.lock().expect("strays").clone()
    }

    pub fn stop(self) {
        drop(self.threads);
    }
}

/// The kinds of forged packet. None of them is a reply of a live flow:
/// one that copies a flow's five-tuple exactly (the server's address and
/// port to the flow's egress IP and NAT port) is indistinguishable from
/// the server's own reply for any datapath, so it is not sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum Forged {
    /// To a live flow's egress IP and NAT port, from the server's port but
    /// the attacker's own address.
    WrongSourceAddr,
    /// To a live flow's egress IP and NAT port, from the server's address
    /// (spoofed) but another port.
    WrongSourcePort,
    /// From the server's address and port (spoofed) to an egress IP port
    /// no flow uses.
    NoFlowPort,
    /// VXLAN to a pod's node from an address that is no node, the inner
    /// packet copying the server's reply to the pod's real port.
    TunnelFromStranger,
    /// VXLAN to a pod's node from another node's address (spoofed) that
    /// does not hold the pod's egress IP, the inner packet as above.
    TunnelFromWrongNode,
}

pub const ALL_FORGED: [Forged; 5] = [
    Forged::WrongSourceAddr,
    Forged::WrongSourcePort,
    Forged::NoFlowPort,
    Forged::TunnelFromStranger,
    Forged::TunnelFromWrongNode,
];

/// What the attacker knows: the sources the server sees (an on-path
/// observer sees them too), the pods' own ports, who holds each egress IP.
#[derive(Clone)]
pub struct AttackView {
    pub arrivals: Arc<Mutex<Vec<Arrival>>>,
    pub flows: BTreeMap<PodRef, SharedFlows>,
    /// Pod -> its egress IP.
    pub selected: BTreeMap<PodRef, Ipv4Addr>,
    /// Egress IP -> the node number holding it, kept current by the run.
    pub holders: Arc<Mutex<BTreeMap<Ipv4Addr, u8>>>,
    /// False from a fault's injection until the cluster has recovered and
    /// `holders` is current again: meanwhile the flows' egress node may be
    /// the old holder or the new one, both legitimate reply senders.
    pub settled: Arc<AtomicBool>,
    pub nodes: u8,
    pub ports: ServerPorts,
}

pub struct Attacker {
    pub sent: Arc<Mutex<BTreeMap<Forged, u64>>>,
    threads: Threads,
}

impl Attacker {
    pub fn start(
        ns: &str,
        kinds: Vec<Forged>,
        view: AttackView,
        every: Duration,
        seed: u64,
    ) -> Result<Self> {
        let sent: Arc<Mutex<BTreeMap<Forged, u64>>> = Arc::default();
        let mut threads = Threads::new();
        let (stop, sent2) = (threads.stop.clone(), sent.clone());
        threads.push(
            ns,
            netns::spawn_in_netns(ns, "chaos-attacker", move || {
                let raw = RawIpv4::open()
                    .map_err(|e| crate::error::LabError::Traffic(format!("raw socket: {e}")))?;
                let mut rng = fastrand::Rng::with_seed(seed);
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(every);
                    if kinds.is_empty() {
                        continue;
                    }
                    let kind = kinds[rng.usize(..kinds.len())];
                    if let Some((packet, dst)) = forge(kind, &view, &mut rng)
                        && raw.send(&packet, dst).is_ok()
                    {
                        *sent2.lock().expect("sent").entry(kind).or_default() += 1;
                    }
                }
                Ok(())
            })?,
        );
        Ok(Self { sent, threads })
    }

    pub fn sent(&self) -> BTreeMap<Forged, u64> {
        self.sent.lock().expect("sent").clone()
    }

    pub fn stop(self) {
        drop(self.threads);
    }
}

/// One forged packet of `kind` and where it goes, or `None` when nothing
/// to aim at is known yet.
fn forge(kind: Forged, v: &AttackView, rng: &mut fastrand::Rng) -> Option<(Vec<u8>, Ipv4Addr)> {
    let pods: Vec<PodRef> = v.selected.keys().copied().collect();
    let pod = *pods.get(rng.usize(..pods.len().max(1)))?;
    let egress_ip = v.selected[&pod];
    let mut payload = wire::record(FROM_ATTACKER, pod, rng.u64(..));
    // Which kind it is, so that a delivered one says how it got through.
    payload[6] = ALL_FORGED.iter().position(|k| *k == kind).unwrap_or(0) as u8 + 1;
    let server = spec::SERVER_ADDR;
    // The flow's NAT port, as the server saw it last.
    let nat_port = || {
        v.arrivals
            .lock()
            .expect("arrivals")
            .iter()
            .rev()
            .find(|a| a.pod == pod && *a.from.ip() == egress_ip)
            .map(|a| a.from.port())
    };
    let pod_port = || {
        let f = v.flows.get(&pod)?.lock().expect("flows");
        f.udp_ports.iter().next_back().copied()
    };
    let inner = |port: u16| InnerUdp {
        src_mac: [2, 0, 0, 0, 0, 0xee],
        dst_mac: [2, 0, 0, 0, 0, 0xef],
        src: SocketAddrV4::new(server, v.ports.udp),
        dst: SocketAddrV4::new(pod.ip(), port),
        payload: payload.to_vec(),
    };
    let node_dst = SocketAddrV4::new(spec::node_addr(pod.node), spec::TUNNEL_PORT);
    match kind {
        Forged::WrongSourceAddr => {
            let to = SocketAddrV4::new(egress_ip, nat_port()?);
            let from = SocketAddrV4::new(spec::ROUTER_NODE_ADDR, v.ports.udp);
            Some((wire::ipv4_udp(from, to, &payload), egress_ip))
        }
        Forged::WrongSourcePort => {
            let to = SocketAddrV4::new(egress_ip, nat_port()?);
            let from = SocketAddrV4::new(server, v.ports.udp.wrapping_add(1 + rng.u16(..100)));
            Some((wire::ipv4_udp(from, to, &payload), egress_ip))
        }
        Forged::NoFlowPort => {
            let used: Vec<u16> = v
                .arrivals
                .lock()
                .expect("arrivals")
                .iter()
                .filter(|a| a.from.ip() == &egress_ip)
                .map(|a| a.from.port())
                .collect();
            let port = loop {
                let p = rng.u16(1024..);
                if !used.contains(&p) {
                    break p;
                }
            };
            let from = SocketAddrV4::new(server, v.ports.udp);
            let to = SocketAddrV4::new(egress_ip, port);
            Some((wire::ipv4_udp(from, to, &payload), egress_ip))
        }
        Forged::TunnelFromStranger => {
            let p = wire::ipv4_vxlan(
                spec::ROUTER_NODE_ADDR,
                node_dst,
                rng.u32(1..4),
                &inner(pod_port()?),
            );
            Some((p, *node_dst.ip()))
        }
        Forged::TunnelFromWrongNode => {
            // Only while the holders are known: during a failover a "wrong"
            // node by a stale view is the flow's new egress node, whose
            // outer source the datapath trusts as it trusts every node's
            // (docs/architecture.md, trust model).
            if !v.settled.load(Ordering::SeqCst) {
                return None;
            }
            let holder = v.holders.lock().expect("holders").get(&egress_ip).copied();
            let others: Vec<u8> = (1..=v.nodes)
                .filter(|n| *n != pod.node && Some(*n) != holder)
                .collect();
            let from = *others.get(rng.usize(..others.len().max(1)))?;
            let p = wire::ipv4_vxlan(
                spec::node_addr(from),
                node_dst,
                rng.u32(1..4),
                &inner(pod_port()?),
            );
            Some((p, *node_dst.ip()))
        }
    }
}
