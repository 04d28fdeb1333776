//! Failover measured with real traffic in a Kubernetes-mode lab.
//!
//! A pod sends a numbered UDP datagram every 10 ms to the server through an
//! egress IP held by another node, A. Then A's uplink is cut (the router's
//! end of its link goes down) and A's agent is killed with SIGKILL at the
//! same moment. A is either another node than the elected assigner (the
//! sender is then on the assigner's node) or the assigner itself
//! ([`Holder::Leader`]: a standby must take the leader Lease as well). A is cut off, so every
//! datagram the server sees with the egress IP as its source after the cut
//! came through the new holder: the figure is the time from the cut to the
//! first of those. Fail-closed means that none may arrive with a node's own
//! address meanwhile.
//!
//! The phases come from the API server's history (when the assigner moved
//! the IP in status, when the new holder published its claim, when status
//! said it was announced) and from watching the new holder's uplink for the
//! address.

use std::{
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use serde::Serialize;

use crate::{
    error::{LabError, Result, io_err},
    exec,
    kubernetes::{self, EGRESS_IPS, LEASES},
    netns,
    spec::{self, PodRef, PolicySpec},
    topology::{CONVERGE_TIMEOUT, Lab},
    traffic::wait_for,
};

/// The egress IP that fails over.
pub const FAILOVER_EGRESS_IP: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 100);
/// Where the server counts the pod's datagrams (apart from the test
/// observers' ports).
pub const FAILOVER_UDP_PORT: u16 = 8091;
const SEND_INTERVAL: Duration = Duration::from_millis(10);
const POLICY_NAME: &str = "failover";

/// Which node holds the IP that fails over.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Holder {
    /// Another node than the elected assigner.
    NotLeader,
    /// The elected assigner itself.
    Leader,
}

/// What one failover looked like. Times are milliseconds after the cut.
#[derive(Clone, Debug, Serialize)]
pub struct FailoverReport {
    /// The elected assigner before the cut.
    pub leader: String,
    /// Whether the cut-off holder was that assigner.
    pub holder: Holder,
    /// The assigner after the cut, and when it took the leader Lease (when
    /// the holder was the assigner).
    pub new_leader: Option<String>,
    pub cut_to_new_leader_ms: Option<u64>,
    /// The node that held the IP and was cut off.
    pub old_holder: String,
    /// The node that took the IP over.
    pub new_holder: String,
    /// The node of the sending pod.
    pub sender_node: String,
    pub egress_ip: Ipv4Addr,
    /// The figure: the first datagram through the new holder.
    pub cut_to_first_packet_ms: u64,
    /// The assigner noticed (heartbeats) and wrote the new holder in status.
    pub cut_to_status_moved_ms: Option<u64>,
    /// The old holder's last claim renewal, before the cut: its claim
    /// expires for the others a claim lifetime after that.
    pub old_claim_renewed_ms_before_cut: Option<u64>,
    /// The new holder published its claim (after the old one expired).
    pub cut_to_claimed_ms: Option<u64>,
    /// The address appeared on the new holder's uplink.
    pub cut_to_address_ms: Option<u64>,
    /// Status said the new holder has announced it.
    pub cut_to_announced_ms: Option<u64>,
    pub datagrams_sent: u64,
    pub datagrams_received: u64,
    /// Datagrams the server saw with a source other than the egress IP:
    /// must be 0 (fail-closed).
    pub leaked: u64,
    pub heartbeat_interval_ms: u64,
    pub heartbeat_timeout_ms: u64,
    pub claim_ttl_ms: u64,
    pub claim_renew_ms: u64,
}

impl FailoverReport {
    /// One line for people: `failover: link cut -> first packet via node3: 1234 ms`.
    pub fn summary(&self) -> String {
        let ms = |v: Option<u64>| v.map_or("?".to_owned(), |v| format!("{v} ms"));
        format!(
            "failover: link cut -> first packet via {}: {} ms (old holder {}{}, leader {}{}, sender on {}; status moved {}, old claim last renewed {} before the cut, claimed {}, address up {}, announced {}; {} of {} datagrams arrived, {} leaked)",
            self.new_holder,
            self.cut_to_first_packet_ms,
            self.old_holder,
            if self.holder == Holder::Leader {
                " = the assigner"
            } else {
                ""
            },
            self.leader,
            match (&self.new_leader, self.cut_to_new_leader_ms) {
                (Some(l), Some(ms)) => format!(" then {l} after {ms} ms"),
                _ => String::new(),
            },
            self.sender_node,
            ms(self.cut_to_status_moved_ms),
            ms(self.old_claim_renewed_ms_before_cut),
            ms(self.cut_to_claimed_ms),
            ms(self.cut_to_address_ms),
            ms(self.cut_to_announced_ms),
            self.datagrams_received,
            self.datagrams_sent,
            self.leaked,
        )
    }

    pub fn write_json(&self, path: &Path) -> Result<()> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .map_err(io_err(format!("creating {}", parent.display())))?;
        }
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| LabError::Spec(format!("cannot serialise the report: {e}")))?;
        std::fs::write(path, text + "\n").map_err(io_err(format!("writing {}", path.display())))
    }
}

/// One datagram as the server saw it.
#[derive(Clone, Copy, Debug)]
pub struct Arrival {
    pub at: Instant,
    pub from: SocketAddrV4,
    pub seq: u64,
}

/// Records the numbered datagrams arriving at the server.
pub struct Receiver {
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Vec<Arrival>>>,
    ns: String,
    thread: Option<JoinHandle<Result<()>>>,
}

impl Receiver {
    pub fn start(ns: &str, addr: SocketAddrV4) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let log: Arc<Mutex<Vec<Arrival>>> = Arc::default();
        let (stop2, log2) = (stop.clone(), log.clone());
        // Bound here, so that no datagram is sent before it listens.
        let socket = netns::in_netns(ns, move || {
            UdpSocket::bind(addr).map_err(io_err(format!("binding {addr} for the failover")))
        })?;
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .map_err(io_err("setting the receiver's timeout"))?;
        let thread = thread::Builder::new()
            .name("failover-receiver".into())
            .spawn(move || {
                let mut buf = [0u8; 64];
                while !stop2.load(Ordering::Relaxed) {
                    let Ok((len, std::net::SocketAddr::V4(from))) = socket.recv_from(&mut buf)
                    else {
                        continue;
                    };
                    let Ok(seq) = <[u8; 8]>::try_from(&buf[..len]) else {
                        continue;
                    };
                    log2.lock().expect("receiver log poisoned").push(Arrival {
                        at: Instant::now(),
                        from,
                        seq: u64::from_be_bytes(seq),
                    });
                }
                Ok(())
            })
            .map_err(io_err("spawning the failover receiver"))?;
        Ok(Self {
            stop,
            log,
            ns: ns.to_owned(),
            thread: Some(thread),
        })
    }

    pub fn arrivals(&self) -> Vec<Arrival> {
        self.log.lock().expect("receiver log poisoned").clone()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = netns::join(t, &self.ns);
        }
    }
}

/// Sends a numbered datagram every `interval` from a pod until dropped.
pub struct Sender {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    ns: String,
    thread: Option<JoinHandle<Result<()>>>,
}

impl Sender {
    pub fn start(ns: &str, to: SocketAddrV4) -> Result<Self> {
        Self::every(ns, to, SEND_INTERVAL)
    }

    pub fn every(ns: &str, to: SocketAddrV4, interval: Duration) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let (stop2, sent2) = (stop.clone(), sent.clone());
        let thread = netns::spawn_in_netns(ns, "failover-sender", move || {
            let socket = UdpSocket::bind("0.0.0.0:0")
                .map_err(io_err("binding the failover sender's socket"))?;
            let mut next = Instant::now();
            let mut seq: u64 = 0;
            while !stop2.load(Ordering::Relaxed) {
                // Unreachable errors are expected while the path is down.
                let _ = socket.send_to(&seq.to_be_bytes(), to);
                seq += 1;
                sent2.store(seq, Ordering::Relaxed);
                next += interval;
                thread::sleep(next.saturating_duration_since(Instant::now()));
            }
            Ok(())
        })?;
        Ok(Self {
            stop,
            sent,
            ns: ns.to_owned(),
            thread: Some(thread),
        })
    }

    /// Stops sending; returns how many datagrams were sent.
    pub fn stop(&mut self) -> Result<u64> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            netns::join(t, &self.ns)?;
        }
        Ok(self.sent.load(Ordering::Relaxed))
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// Watches `dev` in `ns` for `ip` (every 5 ms, for up to `limit`) and
/// returns when it appeared.
fn watch_for_address(
    ns: &str,
    dev: &'static str,
    ip: Ipv4Addr,
    limit: Duration,
) -> Result<JoinHandle<Result<Option<Instant>>>> {
    netns::spawn_in_netns(ns, "failover-address-watch", move || {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            let found = nix::ifaddrs::getifaddrs()
                .map_err(|e| LabError::Traffic(format!("getifaddrs: {e}")))?
                .any(|a| {
                    a.interface_name == dev
                        && a.address
                            .as_ref()
                            .and_then(|s| s.as_sockaddr_in())
                            .is_some_and(|sin| sin.ip() == ip)
                });
            if found {
                return Ok(Some(Instant::now()));
            }
            thread::sleep(Duration::from_millis(5));
        }
        Ok(None)
    })
}

/// Runs the failover in `lab` (Kubernetes mode, three nodes or more, agents
/// started, no policies of its own): sets up the egress IP, cuts its holder
/// off `after_renewal` after it last renewed its claim, and reports. The
/// new holder waits until that claim expires, a claim lifetime after the
/// renewal, so `Duration::ZERO` measures the longest failover and
/// `claim_renew` the shortest. `lab`'s holder node is left cut off with
/// its agent dead. The holder is not the elected assigner.
pub fn measure_failover(lab: &mut Lab, after_renewal: Duration) -> Result<FailoverReport> {
    measure_failover_of(lab, after_renewal, Holder::NotLeader)
}

/// [`measure_failover`] with the holder chosen by `holder`.
pub fn measure_failover_of(
    lab: &mut Lab,
    after_renewal: Duration,
    holder: Holder,
) -> Result<FailoverReport> {
    let nodes = lab.spec().nodes;
    let k8s = lab
        .spec()
        .kubernetes
        .as_ref()
        .map(|k| k.agent.clone())
        .ok_or_else(|| LabError::Spec("failover needs a Kubernetes-mode lab".into()))?;
    if nodes < 3 {
        return Err(LabError::Spec(format!(
            "failover needs three nodes (holder, successor, sender), the lab has {nodes}"
        )));
    }
    let kube = lab
        .kube()
        .ok_or_else(|| LabError::Spec("failover needs a Kubernetes-mode lab".into()))?;
    let leader = wait_for("an assigner is elected", CONVERGE_TIMEOUT, || {
        kube.leader()
            .ok_or_else(|| "no holder of the leader lease".into())
    })?;
    let leader_n = kubernetes::node_number(&leader)
        .ok_or_else(|| LabError::Spec(format!("leader {leader} is not a lab node")))?;
    // A holds, B takes over, the pod sends from S; A is the assigner or
    // not, and S is never A nor B.
    let mut others = (1..=nodes).filter(|n| *n != leader_n);
    let (first, second) = match (others.next(), others.next()) {
        (Some(a), Some(b)) => (a, b),
        _ => unreachable!("three nodes or more"),
    };
    let (a, b, sender_n) = match holder {
        Holder::NotLeader => (first, second, leader_n),
        Holder::Leader => (leader_n, first, second),
    };
    let sender_pod = PodRef::new(sender_n, 1);
    let ip = FAILOVER_EGRESS_IP;
    lab.set_policies(vec![PolicySpec {
        name: POLICY_NAME.into(),
        ..PolicySpec::new(1, ip, Some(a), vec![sender_pod])
    }])?;
    lab.wait_converged(CONVERGE_TIMEOUT)?;

    // B becomes eligible too. Placement is sticky, so the IP stays on A;
    // the status catching up with the new generation shows the assigner saw it.
    let kube = lab.kube().expect("checked above");
    let patched = kube.update_egress_ip(POLICY_NAME, |spec| {
        spec.node_selector = Some(kubernetes::hostname_in(&[a, b]));
    })?;
    let generation = patched["metadata"]["generation"].as_i64();
    wait_for(
        "the assigner sees the widened nodeSelector",
        CONVERGE_TIMEOUT,
        || {
            let eip = kube.egress_ip(POLICY_NAME).ok_or("EgressIP gone")?;
            let observed = eip["status"]["observedGeneration"].as_i64();
            let holder = kubernetes::holder_in(&eip, ip);
            if observed == generation && holder == Some((kubernetes::node_name(a), true)) {
                Ok(())
            } else {
                Err(format!(
                    "observedGeneration {observed:?} (want {generation:?}), holder {holder:?}"
                ))
            }
        },
    )?;

    let server = Receiver::start(
        &lab.server_ns(),
        SocketAddrV4::new(spec::SERVER_ADDR, FAILOVER_UDP_PORT),
    )?;
    let mut sender = Sender::start(
        &lab.pod_ns(sender_pod),
        SocketAddrV4::new(spec::SERVER_ADDR, FAILOVER_UDP_PORT),
    )?;
    wait_for(
        "the pod's datagrams reach the server through the egress IP",
        Duration::from_secs(10),
        || match server.arrivals().last() {
            Some(s) if *s.from.ip() == ip => Ok(()),
            other => Err(format!("last seen: {other:?}")),
        },
    )?;

    let address_watch = watch_for_address(&lab.node_ns(b), "eth0", ip, Duration::from_secs(30))?;
    let old_claims_lease = format!("egress-claims-{}", kubernetes::node_name(a));
    let api = lab.kube().expect("checked above").api();
    let renewed_after = |since: Instant| {
        api.history().into_iter().rfind(|e| {
            e.collection == LEASES
                && e.at > since
                && e.object["metadata"]["name"] == old_claims_lease
        })
    };
    let watching = Instant::now();
    let renewal = loop {
        if let Some(e) = renewed_after(watching) {
            break e.at;
        }
        if watching.elapsed() > k8s.claim_renew * 4 {
            return Err(LabError::Traffic(format!(
                "{old_claims_lease} was not renewed within four renewal periods"
            )));
        }
        thread::sleep(Duration::from_millis(2));
    };
    thread::sleep((renewal + after_renewal).saturating_duration_since(Instant::now()));
    let cut = Instant::now();
    exec::exec_in(
        &lab.router_ns(),
        "ip",
        &["link", "set", &format!("n{a}"), "down"],
    )?;
    // Datagrams sent before the link was down may still have gone through
    // A; every later one went through the new holder if it arrived.
    let first_after_cut = sender.sent.load(Ordering::Relaxed);
    lab.kill_agent(a)?;

    let first = wait_for(
        "a datagram through the new holder",
        Duration::from_secs(30),
        || {
            server
                .arrivals()
                .into_iter()
                .find(|s| s.seq >= first_after_cut && *s.from.ip() == ip)
                .ok_or_else(|| format!("none numbered {first_after_cut} or more"))
        },
    )?;
    // A little more traffic through the new path, for the loss and leak counts.
    let settle = first.at + Duration::from_millis(500);
    thread::sleep(settle.saturating_duration_since(Instant::now()));
    let sent = sender.stop()?;
    let seen = server.arrivals();
    let leaked = seen.iter().filter(|s| *s.from.ip() != ip).count() as u64;

    let kube = lab.kube().expect("checked above");
    let new_holder = kubernetes::node_name(b);
    let after = |at: Instant| at.checked_duration_since(cut).map(|d| d.as_millis() as u64);
    // The new holder per status, and the address on its uplink.
    wait_for(
        "the status names the new holder, announced",
        Duration::from_secs(10),
        || match kube.holder(POLICY_NAME, ip) {
            Some((node, true)) if node == new_holder => Ok(()),
            other => Err(format!(
                "status: {other:?}, expected {new_holder} announced"
            )),
        },
    )?;
    let history = kube.api().history();
    let status_event = |announced: bool| {
        history.iter().find(|e| {
            e.collection == EGRESS_IPS
                && e.at > cut
                && kubernetes::holder_in(&e.object, ip)
                    .is_some_and(|(node, ann)| node == new_holder && (ann || !announced))
        })
    };
    let claimed = history.iter().find(|e| {
        e.collection == LEASES
            && e.at > cut
            && e.object["metadata"]["name"] == format!("egress-claims-{new_holder}")
            && e.object["metadata"]["annotations"]["egress.example.dev/claimed-ips"]
                .as_str()
                .is_some_and(|c| c.split(',').any(|s| s == ip.to_string()))
    });
    let old_renewal = history
        .iter()
        .rfind(|e| {
            e.collection == LEASES
                && e.at <= cut
                && e.object["metadata"]["name"] == old_claims_lease
        })
        .map(|e| cut.duration_since(e.at).as_millis() as u64);
    let address_at = netns::join(address_watch, &lab.node_ns(b))?;

    let on_uplink = kubernetes::addresses_on(&lab.node_ns(b), "eth0")?;
    if !on_uplink.contains(&ip) {
        return Err(LabError::Traffic(format!(
            "{new_holder} holds {ip} per status but its eth0 has only {on_uplink:?}"
        )));
    }

    let ms = |d: Duration| d.as_millis() as u64;
    let heartbeat = k8s.heartbeat.as_ref();
    let cut_to_status_moved_ms = status_event(false).and_then(|e| after(e.at));
    let cut_to_announced_ms = status_event(true).and_then(|e| after(e.at));
    let new_leader = history.iter().find_map(|e| {
        let h = e.object["spec"]["holderIdentity"].as_str()?;
        (e.collection == LEASES
            && e.at > cut
            && e.object["metadata"]["name"] == kubernetes::LEADER_LEASE
            && h != leader)
            .then(|| (h.to_owned(), after(e.at)))
    });
    Ok(FailoverReport {
        holder,
        new_leader: new_leader.as_ref().map(|(l, _)| l.clone()),
        cut_to_new_leader_ms: new_leader.and_then(|(_, at)| at),
        leader,
        old_holder: kubernetes::node_name(a),
        new_holder,
        sender_node: kubernetes::node_name(sender_n),
        egress_ip: ip,
        cut_to_first_packet_ms: after(first.at).unwrap_or_default(),
        cut_to_status_moved_ms,
        old_claim_renewed_ms_before_cut: old_renewal,
        cut_to_claimed_ms: claimed.and_then(|e| after(e.at)),
        cut_to_address_ms: address_at.and_then(after),
        cut_to_announced_ms,
        datagrams_sent: sent,
        datagrams_received: seen.len() as u64,
        leaked,
        heartbeat_interval_ms: heartbeat.map_or(0, |h| ms(h.interval)),
        heartbeat_timeout_ms: heartbeat.map_or(0, |h| ms(h.timeout)),
        claim_ttl_ms: ms(k8s.claim_ttl),
        claim_renew_ms: ms(k8s.claim_renew),
    })
}
