//! Fault injection in the Kubernetes-mode lab, in the spirit of Jepsen:
//! continuous probes record what the server, the pods and the node network
//! see while a seeded schedule of faults (with recovery in between) runs,
//! and three invariants are judged on the record, with the server-side
//! capture as the judge:
//!
//! 1. the server never sees a selected FailClosed pod's packet with any
//!    source but its egress IP (no node or pod address), nor an unselected
//!    pod's with an egress IP;
//! 2. at most one MAC answers ARP for each egress IP in each probe window,
//!    and only a node with a valid claim on it answers at all;
//! 3. no packet is delivered to a pod that is not a reply of its own flow,
//!    forged packets from the router's namespace included.
//!
//! Pieces: [`wire`] (tagged records and raw frames), [`stream`] (server,
//! pod senders, long-lived TCP), [`arp`], [`delivery`] (pod captures and
//! the attacker), [`faults`] (injectors with healing guards), [`judge`]
//! (the invariants, pure), and here the set-up, the schedule and the report.

pub mod arp;
pub mod delivery;
pub mod faults;
pub mod judge;
pub mod packet;
pub mod stream;
pub mod wire;

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use serde::Serialize;
use serde_json::json;

pub use delivery::{ALL_FORGED, Forged};
pub use faults::{ALL_FAULTS, FaultKind};
use judge::{ArpSeen, ClaimEvent, Expected, Invariant, ServerPorts, Violation};
use stream::{ChaosServer, PodSender, SharedFlows, TcpEvent, TcpHolder};

use crate::{
    error::{LabError, Result, io_err},
    kubernetes::{self, LEASES, POD_NAMESPACE, PODS, POLICY_LABEL},
    spec::{self, LabSpec, PodRef},
    topology::{CONVERGE_TIMEOUT, Lab},
    traffic::wait_for,
};

/// The EgressIPs of a chaos run: every node may hold either; pod 1 of
/// every node is selected by the first, pod 3 by the second, pod 2 by
/// nothing.
pub const EGRESS_IPS_IN_PLAY: [(&str, Ipv4Addr, u8); 2] = [
    ("chaos-a", Ipv4Addr::new(172, 18, 0, 100), 1),
    ("chaos-b", Ipv4Addr::new(172, 18, 0, 101), 3),
];
pub const UDP_PORT: u16 = 8095;
pub const TCP_PORT: u16 = 8096;
const PORTS: ServerPorts = ServerPorts {
    udp: UDP_PORT,
    tcp: TCP_PORT,
};
/// An ARP frame may reach the capture this long after its node's claim
/// ended (scheduling of the capture thread; the claim's end is the API
/// server's own clock, the same as the capture's).
const ARP_SLACK: Duration = Duration::from_millis(50);

/// The lab a chaos run needs: Kubernetes mode, three nodes, three pods
/// each, no lab policies (the run creates its own EgressIPs).
pub fn lab_spec() -> LabSpec {
    LabSpec {
        policies: Vec::new(),
        ..LabSpec::kubernetes()
    }
}

#[derive(Clone, Debug)]
pub struct ChaosSpec {
    /// Faults are injected until this much time has passed.
    pub duration: Duration,
    /// Stop after this many faults, whatever the duration.
    pub max_faults: Option<usize>,
    pub seed: u64,
    /// What to inject: rounds of these kinds, each round in a seeded order.
    pub faults: Vec<FaultKind>,
    /// What the attacker forges.
    pub forged: Vec<Forged>,
    /// Each pod's datagram interval.
    pub send_interval: Duration,
    pub arp_interval: Duration,
    pub attack_interval: Duration,
    /// How long a fault is held (a stopped agent, a partition, a cut link,
    /// a killed agent down), drawn in this range.
    pub hold: (Duration, Duration),
    /// Quiet time after recovery, drawn in this range.
    pub settle: (Duration, Duration),
    /// A fault the cluster has not recovered from after this long is a
    /// liveness failure.
    pub recover_timeout: Duration,
}

impl ChaosSpec {
    pub fn new(duration: Duration, seed: u64) -> Self {
        Self {
            duration,
            max_faults: None,
            seed,
            faults: ALL_FAULTS.to_vec(),
            forged: ALL_FORGED.to_vec(),
            send_interval: Duration::from_millis(20),
            arp_interval: Duration::from_millis(100),
            attack_interval: Duration::from_millis(20),
            hold: (Duration::from_millis(500), Duration::from_millis(4000)),
            settle: (Duration::from_millis(500), Duration::from_millis(2000)),
            recover_timeout: Duration::from_secs(30),
        }
    }
}

/// The order of faults: rounds of `kinds`, each shuffled by the seeded
/// generator, so that every kind comes up once per round.
pub fn schedule(rng: &mut fastrand::Rng, kinds: &[FaultKind], count: usize) -> Vec<FaultKind> {
    let mut out = Vec::with_capacity(count);
    while out.len() < count && !kinds.is_empty() {
        let mut round = kinds.to_vec();
        rng.shuffle(&mut round);
        out.extend(round);
    }
    out.truncate(count);
    out
}

// ------------------------------------------------------------- set-up

/// Creates the chaos EgressIPs (no nodeSelector: any node may hold them)
/// and labels the pods, then waits until both IPs are announced and every
/// node has programmed its selected pods.
pub fn setup(lab: &Lab) -> Result<()> {
    let kube = lab
        .kube()
        .ok_or_else(|| LabError::Spec("chaos needs a Kubernetes-mode lab".into()))?;
    let api = kube.api();
    for (name, ip, index) in EGRESS_IPS_IN_PLAY {
        kube.create_egress_ip(&kubernetes::lab_egress_ip(name, &[ip]));
        for n in 1..=lab.spec().nodes {
            api.patch(
                PODS,
                Some(POD_NAMESPACE),
                &PodRef::new(n, index).to_string(),
                json!({"metadata": {"labels": {POLICY_LABEL: name}}}),
            );
        }
    }
    wait_for("the chaos EgressIPs are in place", CONVERGE_TIMEOUT, || {
        converged(lab)
    })?;
    Ok(())
}

/// Both IPs announced by a node that has the address (and no other node
/// has it), and every node programming its selected pods.
fn converged(lab: &Lab) -> std::result::Result<BTreeMap<Ipv4Addr, u8>, String> {
    let mut holders = BTreeMap::new();
    for (name, ip, index) in EGRESS_IPS_IN_PLAY {
        let holder = faults::holder_of(lab, name, ip)
            .ok_or_else(|| format!("{name}: no announced holder"))?;
        for n in 1..=lab.spec().nodes {
            let has = kubernetes::addresses_on(&lab.node_ns(n), "eth0")
                .map_err(|e| e.to_string())?
                .contains(&ip);
            if has != (n == holder) {
                return Err(format!(
                    "{ip}: status says node{holder}, node{n}'s uplink {} it",
                    if has { "has" } else { "lacks" }
                ));
            }
        }
        for n in 1..=lab.spec().nodes {
            let programmed =
                kubernetes::programmed_policies(lab.agent(n)).map_err(|e| e.to_string())?;
            let pod = PodRef::new(n, index);
            let ok = programmed.get(&ip).is_some_and(|(node, pods)| {
                *node == Some(spec::node_addr(holder)) && pods.contains(&pod.ip())
            });
            if !ok && lab.kube().is_some_and(|k| k.has_pod(pod)) {
                return Err(format!(
                    "node{n} programs {:?} for {ip}, want node{holder} with {pod}",
                    programmed.get(&ip)
                ));
            }
        }
        holders.insert(ip, holder);
    }
    Ok(holders)
}

// ------------------------------------------------------------- probes

/// Every probe of a run, started together.
pub struct Probes {
    pub started: Instant,
    pub server: ChaosServer,
    pub senders: BTreeMap<PodRef, PodSender>,
    pub tcp: BTreeMap<PodRef, TcpHolder>,
    pub captures: delivery::Captures,
    pub arp: arp::ArpWatch,
    pub attacker: delivery::Attacker,
    pub flows: BTreeMap<PodRef, SharedFlows>,
    pub expected: Expected,
    pub holders: Arc<Mutex<BTreeMap<Ipv4Addr, u8>>>,
    /// Whether `holders` is current (no fault under way); see
    /// [`delivery::AttackView::settled`].
    pub settled: Arc<AtomicBool>,
    /// Node uplink MAC -> node name.
    pub macs: BTreeMap<[u8; 6], String>,
}

fn mac_of(ns: &str, dev: &str) -> Result<[u8; 6]> {
    let out = crate::exec::exec_in(ns, "ip", &["-j", "link", "show", "dev", dev])?;
    let v: serde_json::Value = serde_json::from_str(&out.stdout)
        .map_err(|e| LabError::Traffic(format!("ip -j link in {ns}: {e}")))?;
    v[0]["address"]
        .as_str()
        .and_then(wire::parse_mac)
        .ok_or_else(|| LabError::Traffic(format!("no MAC for {dev} in {ns}: {}", out.stdout)))
}

/// Starts the server, every pod's stream (and a long-lived TCP connection
/// from pod 1 of every node), the pods' captures, the ARP watch and the
/// attacker, then waits until every pod's datagrams arrive.
pub fn start_probes(lab: &Lab, spec: &ChaosSpec) -> Result<Probes> {
    let udp = SocketAddrV4::new(spec::SERVER_ADDR, UDP_PORT);
    let tcp = SocketAddrV4::new(spec::SERVER_ADDR, TCP_PORT);
    let server = ChaosServer::start(&lab.server_ns(), udp, tcp)?;
    let mut expected = Expected::default();
    for (name, ip, index) in EGRESS_IPS_IN_PLAY {
        expected.egress_ips.insert(ip);
        for n in 1..=lab.spec().nodes {
            expected
                .selected
                .insert(PodRef::new(n, index), (name.to_owned(), ip));
        }
    }
    let flows: BTreeMap<PodRef, SharedFlows> = lab
        .pods()
        .into_iter()
        .map(|p| (p, SharedFlows::default()))
        .collect();
    let captures = delivery::Captures::start(
        flows
            .iter()
            .map(|(p, f)| (*p, lab.pod_ns(*p), f.clone()))
            .collect(),
        PORTS,
    )?;
    let mut senders = BTreeMap::new();
    for (pod, f) in &flows {
        senders.insert(
            *pod,
            PodSender::start(&lab.pod_ns(*pod), *pod, udp, spec.send_interval, f.clone())?,
        );
    }
    let mut tcp_holders = BTreeMap::new();
    for n in 1..=lab.spec().nodes {
        let pod = PodRef::new(n, EGRESS_IPS_IN_PLAY[0].2);
        tcp_holders.insert(
            pod,
            TcpHolder::start(&lab.pod_ns(pod), pod, tcp, flows[&pod].clone())?,
        );
    }
    let mut macs = BTreeMap::new();
    for n in 1..=lab.spec().nodes {
        macs.insert(mac_of(&lab.node_ns(n), "eth0")?, kubernetes::node_name(n));
    }
    let arp = arp::ArpWatch::start(
        &lab.router_ns(),
        "br0",
        mac_of(&lab.router_ns(), "br0")?,
        EGRESS_IPS_IN_PLAY.iter().map(|e| e.1).collect(),
        spec.arp_interval,
    )?;
    let holders = Arc::new(Mutex::new(converged(lab).unwrap_or_default()));
    let settled = Arc::new(AtomicBool::new(true));
    let attacker = delivery::Attacker::start(
        &lab.router_ns(),
        spec.forged.clone(),
        delivery::AttackView {
            arrivals: server.arrivals.clone(),
            flows: flows.clone(),
            selected: expected
                .selected
                .iter()
                .map(|(p, (_, ip))| (*p, *ip))
                .collect(),
            holders: holders.clone(),
            settled: settled.clone(),
            nodes: lab.spec().nodes,
            ports: PORTS,
        },
        spec.attack_interval,
        spec.seed ^ 0x5eed,
    )?;
    let probes = Probes {
        started: Instant::now(),
        server,
        senders,
        tcp: tcp_holders,
        captures,
        arp,
        attacker,
        flows,
        expected,
        holders,
        settled,
        macs,
    };
    wait_for(
        "every pod's stream reaches the server",
        CONVERGE_TIMEOUT,
        || probes.streams_flowing(probes.started),
    )?;
    Ok(probes)
}

impl Probes {
    /// Every sending pod has had a datagram arrive since `since`, with the
    /// source it must have; every TCP holder is connected.
    pub fn streams_flowing(&self, since: Instant) -> std::result::Result<(), String> {
        let arrivals = self.server.arrivals.lock().expect("arrivals");
        for (pod, sender) in &self.senders {
            if sender.paused.load(Ordering::Relaxed) {
                continue;
            }
            let ok = arrivals
                .iter()
                .rev()
                .take_while(|a| a.at >= since)
                .any(|a| {
                    a.pod == *pod
                        && match self.expected.selected.get(pod) {
                            Some((_, ip)) => a.from.ip() == ip,
                            None => true,
                        }
                });
            if !ok {
                return Err(format!(
                    "nothing of {pod} arrived (as it should) since the fault healed"
                ));
            }
        }
        drop(arrivals);
        for (pod, h) in &self.tcp {
            let last = h.events().last().map(|e| e.what.clone());
            if last.as_deref() != Some("connected") {
                return Err(format!("{pod}'s TCP connection: last event {last:?}"));
            }
        }
        Ok(())
    }

    /// Every violation so far, judged on everything recorded.
    pub fn violations(&self, lab: &Lab) -> Vec<Violation> {
        let nodes = lab.spec().nodes;
        let mut out: Vec<Violation> = self
            .server
            .arrivals()
            .iter()
            .filter_map(|a| judge::judge_source(a, &self.expected, nodes))
            .collect();
        let ttl = lab
            .spec()
            .kubernetes
            .as_ref()
            .map_or(Duration::ZERO, |k| k.agent.claim_ttl);
        out.extend(judge::judge_arp(
            &self.arp.seen(),
            &self.macs,
            &claim_history(lab),
            ttl,
            ARP_SLACK,
        ));
        out.extend(self.captures.strays());
        out.sort_by_key(|v| v.at);
        for v in &mut out {
            v.at_ms = ms_since(self.started, v.at);
        }
        out
    }

    pub fn tcp_events(&self) -> Vec<TcpEvent> {
        let mut all: Vec<TcpEvent> = self.tcp.values().flat_map(TcpHolder::events).collect();
        all.sort_by_key(|e| e.at);
        for e in &mut all {
            e.at_ms = ms_since(self.started, e.at);
        }
        all
    }

    /// Records echoed over every held TCP connection.
    pub fn tcp_echoed(&self) -> BTreeMap<PodRef, u64> {
        self.tcp
            .iter()
            .map(|(p, h)| (*p, h.echoed.load(Ordering::Relaxed)))
            .collect()
    }

    pub fn arp_seen(&self) -> Vec<ArpSeen> {
        self.arp.seen()
    }

    /// Stops every probe thread.
    pub fn stop(self) {
        let Self {
            server,
            senders,
            tcp,
            captures,
            arp,
            attacker,
            ..
        } = self;
        attacker.stop();
        for s in senders.into_values() {
            s.stop();
        }
        for h in tcp.into_values() {
            h.stop();
        }
        arp.stop();
        captures.stop();
        server.stop();
    }
}

fn ms_since(start: Instant, at: Instant) -> u64 {
    at.saturating_duration_since(start).as_millis() as u64
}

/// Every stored version of every claims Lease.
pub fn claim_history(lab: &Lab) -> Vec<ClaimEvent> {
    let Some(kube) = lab.kube() else {
        return Vec::new();
    };
    kube.api()
        .history()
        .into_iter()
        .filter(|e| e.collection == LEASES)
        .filter_map(|e| {
            let node = e.object["metadata"]["name"]
                .as_str()?
                .strip_prefix("egress-claims-")?
                .to_owned();
            let annotations = &e.object["metadata"]["annotations"];
            let ips = annotations["egress.example.dev/claimed-ips"]
                .as_str()
                .unwrap_or_default()
                .split(',')
                .filter_map(|s| s.trim().parse().ok())
                .collect();
            Some(ClaimEvent {
                at: e.at,
                node,
                ips,
                deleted: e.type_ == "DELETED",
                restart_grace: annotations["egress.example.dev/restart-grace-ms"]
                    .as_str()
                    .and_then(|ms| ms.parse().ok())
                    .map(Duration::from_millis),
            })
        })
        .collect()
}

// ------------------------------------------------------------- faults

/// One injected fault, as the report shows it. Times in ms since the run
/// started.
#[derive(Clone, Debug, Serialize)]
pub struct FaultRecord {
    pub kind: FaultKind,
    pub target: String,
    pub injected_ms: u64,
    pub healed_ms: u64,
    /// When the cluster was whole again (streams flowing, IPs announced);
    /// `None`: not within the recovery timeout.
    pub recovered_ms: Option<u64>,
    /// Holder of each egress IP before and after.
    pub holders_before: BTreeMap<Ipv4Addr, u8>,
    pub holders_after: BTreeMap<Ipv4Addr, u8>,
    /// The longest time each egress IP's streams went without a datagram
    /// between injection and recovery.
    pub outage_ms: BTreeMap<Ipv4Addr, u64>,
    pub note: String,
}

fn between(rng: &mut fastrand::Rng, (lo, hi): (Duration, Duration)) -> Duration {
    let (lo, hi) = (lo.as_millis() as u64, hi.as_millis() as u64);
    Duration::from_millis(if hi > lo { rng.u64(lo..=hi) } else { lo })
}

/// A node holding one of the egress IPs (drawn), else any node.
fn some_holder(lab: &Lab, rng: &mut fastrand::Rng) -> u8 {
    let (name, ip, _) = EGRESS_IPS_IN_PLAY[rng.usize(..EGRESS_IPS_IN_PLAY.len())];
    faults::holder_of(lab, name, ip).unwrap_or_else(|| rng.u8(1..=lab.spec().nodes))
}

fn the_assigner(lab: &Lab) -> Result<u8> {
    wait_for("an elected assigner", CONVERGE_TIMEOUT, || {
        faults::assigner(lab).ok_or_else(|| "no leader".to_string())
    })
}

/// Injects `kind`, holds it, heals it; returns the target and a note.
fn inject(
    lab: &mut Lab,
    probes: &Probes,
    kind: FaultKind,
    rng: &mut fastrand::Rng,
    spec: &ChaosSpec,
) -> Result<(String, String)> {
    let hold = between(rng, spec.hold);
    let held = format!("held {} ms", hold.as_millis());
    Ok(match kind {
        FaultKind::KillHolder | FaultKind::KillAssigner => {
            let n = if kind == FaultKind::KillHolder {
                some_holder(lab, rng)
            } else {
                the_assigner(lab)?
            };
            faults::sigkill(lab, n)?;
            faults::hold(hold);
            lab.start_agent(n)?;
            (
                kubernetes::node_name(n),
                format!("down {} ms", hold.as_millis()),
            )
        }
        FaultKind::StopHolder | FaultKind::StopAssigner => {
            let n = if kind == FaultKind::StopHolder {
                some_holder(lab, rng)
            } else {
                the_assigner(lab)?
            };
            let stopped = faults::sigstop(lab, n)?;
            faults::hold(hold);
            stopped.heal();
            (kubernetes::node_name(n), held)
        }
        FaultKind::ApiPartition => {
            let n = rng.u8(1..=lab.spec().nodes);
            let rules = faults::partition_api(lab, n)?;
            faults::hold(hold);
            rules.heal()?;
            (kubernetes::node_name(n), held)
        }
        FaultKind::HeartbeatLossAtAssigner => {
            let n = the_assigner(lab)?;
            let rules = faults::drop_heartbeats(lab, n)?;
            faults::hold(hold);
            rules.heal()?;
            (kubernetes::node_name(n), held)
        }
        FaultKind::RollingRestart => {
            let steps = faults::rolling_restart(lab)?;
            let note = steps
                .iter()
                .map(|(n, a, b)| format!("node{n} back in {} ms", (*b - *a).as_millis()))
                .collect::<Vec<_>>()
                .join(", ");
            ("every node".into(), note)
        }
        FaultKind::BadObjects => {
            let bad = faults::put_bad_objects(lab)?;
            faults::hold(hold);
            bad.heal();
            ("EgressIPs".into(), held)
        }
        FaultKind::PodChurn => {
            let (_, _, index) = EGRESS_IPS_IN_PLAY[1];
            let pod = PodRef::new(rng.u8(1..=lab.spec().nodes), index);
            let sender = &probes.senders[&pod];
            // A deleted pod sends nothing; it starts again once its node
            // programs it (the new-pod window before that is measured by
            // `cargo xtask new-pod-window`, not here).
            sender.paused.store(true, Ordering::Relaxed);
            thread::sleep(spec.send_interval * 3);
            let deleted = faults::delete_pod(lab, pod)?;
            faults::hold(hold);
            deleted.recreate(lab)?;
            let programmed = wait_for(
                &format!("node{} programs {pod} again", pod.node),
                spec.recover_timeout,
                || {
                    let p = kubernetes::programmed_policies(lab.agent(pod.node))
                        .map_err(|e| e.to_string())?;
                    if p.values().any(|(_, pods)| pods.contains(&pod.ip())) {
                        Ok(())
                    } else {
                        Err("not yet".to_string())
                    }
                },
            );
            sender.paused.store(false, Ordering::Relaxed);
            programmed?;
            (pod.to_string(), held)
        }
        FaultKind::LinkCutHolder => {
            let n = some_holder(lab, rng);
            let cut = faults::cut_link(lab, n)?;
            faults::hold(hold);
            cut.heal()?;
            (kubernetes::node_name(n), held)
        }
    })
}

/// Waits until the cluster is whole again after a fault healed at `healed`.
fn recover(
    lab: &Lab,
    probes: &Probes,
    healed: Instant,
    timeout: Duration,
) -> Result<BTreeMap<Ipv4Addr, u8>> {
    wait_for("the cluster recovers", timeout, || {
        let holders = converged(lab)?;
        probes.streams_flowing(healed)?;
        Ok(holders)
    })
}

// ------------------------------------------------------------- report

#[derive(Clone, Debug, Serialize)]
pub struct ChaosReport {
    pub seed: u64,
    pub duration_ms: u64,
    pub faults: Vec<FaultRecord>,
    pub faults_by_kind: BTreeMap<String, u64>,
    pub violations: Vec<Violation>,
    pub violations_by_invariant: BTreeMap<String, u64>,
    /// Faults the cluster did not recover from in time, and errors of the
    /// run itself.
    pub liveness: Vec<String>,
    /// TCP connections that ended (reset, closed, stalled) and reconnections.
    pub tcp_events: Vec<TcpEvent>,
    pub datagrams_sent: u64,
    pub arrivals: u64,
    pub arp_probes: u64,
    pub arp_frames: u64,
    pub delivered_ok: u64,
    pub forged_sent: BTreeMap<String, u64>,
}

impl ChaosReport {
    pub fn summary(&self) -> String {
        let mut s = format!(
            "chaos: seed {}, {:.1} s, {} faults, {} invariant violations, {} liveness failures\n",
            self.seed,
            self.duration_ms as f64 / 1000.0,
            self.faults.len(),
            self.violations.len(),
            self.liveness.len()
        );
        s.push_str("faults injected:\n");
        for (k, n) in &self.faults_by_kind {
            s.push_str(&format!("  {k:28} {n}\n"));
        }
        s.push_str(&format!(
            "probes: {} datagrams sent, {} arrived; {} ARP probe windows, {} ARP frames for egress IPs; {} packets delivered to pods as replies of their flows; forged packets sent: {}\n",
            self.datagrams_sent,
            self.arrivals,
            self.arp_probes,
            self.arp_frames,
            self.delivered_ok,
            self.forged_sent
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        s.push_str("timeline (ms since start; holders of 172.18.0.100/.101 before -> after; longest stream gap per IP):\n");
        for f in &self.faults {
            let h = |m: &BTreeMap<Ipv4Addr, u8>| {
                m.values()
                    .map(|n| format!("n{n}"))
                    .collect::<Vec<_>>()
                    .join("/")
            };
            s.push_str(&format!(
                "  {:>7} {:28} {:8} healed {:>7} recovered {:>9}  {} -> {}  gaps {}  ({})\n",
                f.injected_ms,
                f.kind.name(),
                f.target,
                f.healed_ms,
                f.recovered_ms.map_or("NEVER".into(), |r| r.to_string()),
                h(&f.holders_before),
                h(&f.holders_after),
                f.outage_ms
                    .values()
                    .map(|g| format!("{g}"))
                    .collect::<Vec<_>>()
                    .join("/"),
                f.note
            ));
        }
        let moved: Vec<String> = self
            .faults
            .iter()
            .flat_map(|f| {
                f.holders_before.iter().filter_map(move |(ip, before)| {
                    let after = f.holders_after.get(ip)?;
                    (after != before).then(|| {
                        format!(
                            "{} {ip} n{before}->n{after}: {} ms without datagrams",
                            f.kind.name(),
                            f.outage_ms.get(ip).copied().unwrap_or_default()
                        )
                    })
                })
            })
            .collect();
        s.push_str(&format!("failovers observed: {}\n", moved.len()));
        for m in moved {
            s.push_str(&format!("  {m}\n"));
        }
        let broken: Vec<&TcpEvent> = self
            .tcp_events
            .iter()
            .filter(|e| e.what != "connected")
            .collect();
        s.push_str(&format!("TCP connections ended: {}\n", broken.len()));
        for e in broken.iter().take(20) {
            s.push_str(&format!(
                "  {:>7} {} port {} {} after {} echoes\n",
                e.at_ms, e.pod, e.local_port, e.what, e.echoed
            ));
        }
        s.push_str(&format!("violations: {}\n", self.violations.len()));
        for (k, n) in &self.violations_by_invariant {
            s.push_str(&format!("  {k:28} {n}\n"));
        }
        for v in self.violations.iter().take(40) {
            s.push_str(&format!(
                "  {:>7} {:?}: {}\n",
                v.at_ms, v.invariant, v.evidence
            ));
        }
        if self.violations.len() > 40 {
            s.push_str(&format!(
                "  ... {} more in the JSON report\n",
                self.violations.len() - 40
            ));
        }
        for l in &self.liveness {
            s.push_str(&format!("liveness: {l}\n"));
        }
        s
    }

    pub fn write_json(&self, path: &Path) -> Result<()> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .map_err(io_err(format!("creating {}", parent.display())))?;
        }
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| LabError::Spec(format!("cannot serialise the chaos report: {e}")))?;
        std::fs::write(path, text + "\n").map_err(io_err(format!("writing {}", path.display())))
    }
}

/// Runs a whole chaos schedule in `lab` (built from [`lab_spec`], agents
/// started): set-up, probes, faults until the duration or the fault count
/// is reached, then the judgement.
pub fn run(lab: &mut Lab, spec: &ChaosSpec) -> Result<ChaosReport> {
    setup(lab)?;
    let probes = start_probes(lab, spec)?;
    let mut rng = fastrand::Rng::with_seed(spec.seed);
    let mut records = Vec::new();
    let mut liveness = Vec::new();
    let count = spec.max_faults.unwrap_or(usize::MAX / 2).min(100_000);
    let plan = schedule(&mut rng, &spec.faults, count.min(10_000));
    for kind in plan {
        if probes.started.elapsed() >= spec.duration {
            break;
        }
        let before = probes.holders.lock().expect("holders").clone();
        probes.settled.store(false, Ordering::SeqCst);
        let injected = Instant::now();
        tracing::info!(fault = kind.name(), "chaos: injecting");
        let (target, note) = match inject(lab, &probes, kind, &mut rng, spec) {
            Ok(x) => x,
            Err(e) => {
                liveness.push(format!(
                    "{} at {} ms: the fault itself failed: {e}",
                    kind.name(),
                    ms_since(probes.started, injected)
                ));
                ("?".into(), String::new())
            }
        };
        let healed = Instant::now();
        let (recovered, after) = match recover(lab, &probes, healed, spec.recover_timeout) {
            Ok(h) => (Some(Instant::now()), h),
            Err(e) => {
                liveness.push(format!(
                    "{} of {target} at {} ms: not recovered: {e}",
                    kind.name(),
                    ms_since(probes.started, injected)
                ));
                // Whatever state the cluster is in, the next fault starts
                // from it; a dead agent is started again.
                for n in 1..=lab.spec().nodes {
                    if lab.agent(n).pid().is_none() {
                        let _ = lab.start_agent(n);
                    }
                }
                (None, converged(lab).unwrap_or_default())
            }
        };
        *probes.holders.lock().expect("holders") = after.clone();
        probes.settled.store(true, Ordering::SeqCst);
        let end = recovered.unwrap_or_else(Instant::now);
        let arrivals = probes.server.arrivals();
        let outage_ms = EGRESS_IPS_IN_PLAY
            .iter()
            .map(|(_, ip, _)| {
                let times: Vec<Instant> = arrivals
                    .iter()
                    .filter(|a| a.from.ip() == ip && a.at >= injected)
                    .map(|a| a.at)
                    .collect();
                (
                    *ip,
                    judge::longest_gap(&times, injected, end).as_millis() as u64,
                )
            })
            .collect();
        records.push(FaultRecord {
            kind,
            target,
            injected_ms: ms_since(probes.started, injected),
            healed_ms: ms_since(probes.started, healed),
            recovered_ms: recovered.map(|r| ms_since(probes.started, r)),
            holders_before: before,
            holders_after: after,
            outage_ms,
            note,
        });
        thread::sleep(between(&mut rng, spec.settle));
    }
    // A last look: what the probes saw after the final recovery counts too.
    thread::sleep(Duration::from_millis(500));
    let violations = probes.violations(lab);
    let mut report = ChaosReport {
        seed: spec.seed,
        duration_ms: ms_since(probes.started, Instant::now()),
        faults_by_kind: records.iter().fold(BTreeMap::new(), |mut m, f| {
            *m.entry(f.kind.name().to_owned()).or_default() += 1;
            m
        }),
        faults: records,
        violations_by_invariant: violations.iter().fold(BTreeMap::new(), |mut m, v| {
            *m.entry(format!("{:?}", v.invariant)).or_default() += 1;
            m
        }),
        violations,
        liveness,
        tcp_events: probes.tcp_events(),
        datagrams_sent: probes
            .senders
            .values()
            .map(|s| s.sent.load(Ordering::Relaxed))
            .sum(),
        arrivals: probes.server.arrivals.lock().expect("arrivals").len() as u64,
        arp_probes: probes.arp.probes.load(Ordering::Relaxed),
        arp_frames: probes.arp.seen.lock().expect("arp").len() as u64,
        delivered_ok: probes.captures.delivered.load(Ordering::Relaxed),
        forged_sent: probes
            .attacker
            .sent()
            .into_iter()
            .map(|(k, v)| (format!("{k:?}"), v))
            .collect(),
    };
    report.violations.truncate(10_000);
    probes.stop();
    Ok(report)
}

impl Invariant {
    pub fn all() -> [Self; 4] {
        [
            Self::Source,
            Self::ArpTwoMacs,
            Self::ArpNotHolder,
            Self::StrayDelivery,
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schedule_is_seeded_and_covers_every_kind_each_round() {
        let plan = |seed| schedule(&mut fastrand::Rng::with_seed(seed), &ALL_FAULTS, 25);
        assert_eq!(plan(7), plan(7));
        assert_ne!(plan(7), plan(8));
        let first_round: std::collections::BTreeSet<_> = plan(7)[..10].iter().copied().collect();
        assert_eq!(first_round.len(), ALL_FAULTS.len());
        assert_eq!(plan(7).len(), 25);
        for k in ALL_FAULTS {
            assert_eq!(FaultKind::parse(k.name()), Some(k));
        }
    }
}
