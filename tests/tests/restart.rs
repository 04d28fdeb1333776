//! The datapath and its pinned state outlive the agent: a crash (kill -9),
//! a SIGTERM and restart in the middle of long transfers or of a steady
//! datagram stream breaks none of them and leaks nothing; only
//! `egress-agent reset` removes them.
//!
//! In Kubernetes mode a restart also keeps the node's egress IPs (restart
//! grace, adopted by the successor): a rolling restart of every agent moves
//! no IP and leaks nothing; a drained node hands its IPs over on SIGTERM;
//! a successor that never hears from its controller leaves the previous
//! agent's fence in place.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use egress_lab::{
    ClientOpts, LabSpec, PodRef, TcpConn, failover,
    kubernetes::{self, EGRESS_IPS, LEASES, NODES},
    spec,
    traffic::wait_for,
};
use egress_tests::{Cluster, TCP, opts};
use serde_json::{Value, json};

const EGRESS_A: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 100);
const BYTES: u64 = 64 << 20;
const DURATION: Duration = Duration::from_secs(12);
/// Where the restart test's datagram stream goes (apart from the observers).
const STREAM_PORT: u16 = 8093;
/// The Kubernetes-mode tests' datagram streams, one port per EgressIP.
const K8S_STREAM_PORT: u16 = 8095;
/// How long the agents get to follow a change in Kubernetes mode.
const FOLLOW: Duration = Duration::from_secs(30);

#[test]
fn killing_and_restarting_the_agent_keeps_transfers_alive() {
    let mut c = Cluster::new(LabSpec::default());
    let long = ClientOpts {
        timeout: Duration::from_secs(20),
        ..opts()
    };
    // One local pod of the egress node and one steered through the tunnel.
    let pods = [PodRef::new(1, 1), PodRef::new(2, 1)];
    let mut transfers = Vec::new();
    for pod in pods {
        let conn = c.expect(
            &format!("connecting {pod}"),
            TcpConn::open(&c.ns(pod), TCP, long),
        );
        if *conn.observed.ip() != EGRESS_A {
            c.fail(format!("{pod}: server saw {}", conn.observed));
        }
        let progress = conn.progress();
        let handle = thread::spawn(move || conn.transfer(BYTES, Some(DURATION)));
        transfers.push((pod, progress, handle));
    }

    thread::sleep(Duration::from_secs(2));
    let at_kill: Vec<u64> = transfers
        .iter()
        .map(|(_, p, _)| p.load(Ordering::Relaxed))
        .collect();
    let killed = Instant::now();
    let killed_result = c.lab.kill_agent(1);
    c.expect("kill -9 of node1's agent", killed_result);
    thread::sleep(Duration::from_secs(1));
    let restarted = c.lab.start_agent(1);
    c.expect("restarting node1's agent", restarted);
    eprintln!("agent of node1 back after {:?}", killed.elapsed());

    for ((pod, progress, handle), sent_before) in transfers.into_iter().zip(at_kill) {
        let result = handle
            .join()
            .unwrap_or_else(|_| c.fail(format!("transfer thread of {pod} panicked")));
        match result {
            Ok(t) => {
                if t.bytes != BYTES {
                    c.fail(format!("{pod}: server counted {} of {BYTES} bytes", t.bytes));
                }
            }
            Err(e) => c.fail(format!(
                "{pod}: transfer broke across the agent's crash and restart ({sent_before} bytes sent before the kill, {} in all): {e}",
                progress.load(Ordering::Relaxed)
            )),
        }
        if sent_before == 0 || sent_before >= BYTES {
            c.fail(format!(
                "{pod}: the kill did not land mid-transfer ({sent_before} of {BYTES} bytes sent)"
            ));
        }
    }
    // New flows work with the restarted agent, locally and remotely.
    for pod in pods {
        c.check_tcp(pod, opts());
    }
}

#[test]
fn graceful_restart_keeps_connections() {
    let mut c = Cluster::new(LabSpec::default());
    let pods = [PodRef::new(1, 1), PodRef::new(2, 1)];
    let held: Vec<TcpConn> = pods
        .iter()
        .map(|pod| {
            c.expect(
                &format!("connecting {pod}"),
                TcpConn::open(&c.ns(*pod), TCP, opts()),
            )
        })
        .collect();
    for n in [1, 2] {
        let restarted = c.lab.restart_agent(n);
        c.expect(
            &format!("SIGTERM and restart of node{n}'s agent"),
            restarted,
        );
    }
    for (pod, conn) in pods.iter().zip(held) {
        let seen = conn.observed;
        c.expect(
            &format!("{pod}'s connection (seen as {seen}) across graceful restarts"),
            conn.finish(),
        );
        if *seen.ip() != EGRESS_A {
            c.fail(format!("{pod}: server saw {seen}"));
        }
    }
    for pod in pods {
        c.check_tcp(pod, opts());
    }
}

/// The repro: a pod on node2 sends a datagram every 10 ms through
/// node1's egress IP while node2's agent gets SIGTERM and is started again
/// with the same command, as a DaemonSet rolling update does. The server
/// must see every datagram with the egress IP and none with node2's own
/// address.
#[test]
fn sigterm_and_restart_leak_nothing() {
    let mut c = Cluster::new(LabSpec::default());
    let pod = PodRef::new(2, 1);
    let to = SocketAddrV4::new(spec::SERVER_ADDR, STREAM_PORT);
    let server = c.expect(
        "the datagram receiver",
        failover::Receiver::start(&c.lab.server_ns(), to),
    );
    let sender = c.expect("the pod's sender", failover::Sender::start(&c.ns(pod), to));
    thread::sleep(Duration::from_millis(500));
    let restarted = c.lab.restart_agent(2);
    c.expect("SIGTERM and restart of node2's agent", restarted);
    thread::sleep(Duration::from_millis(500));
    let (sent, arrivals) = stop_and_check_source(&c, sender, &server);
    // The stream went on through the restart: datagrams were not merely
    // dropped meanwhile (a handful may be lost to the restart itself).
    if (arrivals.len() as u64) + 20 < sent {
        c.fail(format!(
            "only {} of {sent} datagrams arrived across the restart",
            arrivals.len()
        ));
    }
}

#[test]
fn sigterm_keeps_everything_and_reset_removes_it() {
    let mut c = Cluster::new(LabSpec::default());
    let pod = PodRef::new(1, 1);
    c.check_tcp(pod, opts());
    let stopped = c.lab.stop_agent(1);
    c.expect("SIGTERM of node1's agent", stopped);
    let pins = std::path::Path::new("/sys/fs/bpf").join(c.lab.instance(1));
    let node = c.lab.node_ns(1);
    let holds_egress_ip = |c: &Cluster| {
        c.expect(
            "addresses of node1's eth0",
            egress_lab::exec_in(&node, "ip", &["-o", "addr", "show", "dev", "eth0"]),
        )
        .stdout
        .contains(&EGRESS_A.to_string())
    };
    // TCX attachments show neither as tc filters nor in this bpftool's
    // `net show`: the pins hold them, and traffic shows whether they act.
    if !pins.exists() {
        c.fail(format!("SIGTERM removed {}", pins.display()));
    }
    if !holds_egress_ip(&c) {
        c.fail(format!("SIGTERM released {EGRESS_A}"));
    }
    // With the agent stopped, the kept datapath still translates.
    c.check_tcp(pod, opts());

    let agent = c.lab.agent(1);
    let state_dir = agent.state_dir.to_string_lossy().into_owned();
    let bin = c.expect("the agent binary", egress_lab::agent_binary());
    c.expect(
        "egress-agent reset",
        egress_lab::exec_in(
            &node,
            &bin.to_string_lossy(),
            &[
                "reset",
                "--instance",
                &c.lab.instance(1),
                "--state-dir",
                &state_dir,
            ],
        ),
    );
    if pins.exists() {
        c.fail(format!("{} survived reset", pins.display()));
    }
    if holds_egress_ip(&c) {
        c.fail(format!("node1 still holds {EGRESS_A} after reset"));
    }
    let tunnel = egress_lab::exec_in(&node, "ip", &["link", "show", spec::TUNNEL_INTERFACE]);
    if tunnel.is_ok() {
        c.fail("the tunnel device survived reset");
    }
    // Without the datapath the pod is just another pod: node masquerade.
    let p = c.expect(
        "TCP after the reset",
        egress_lab::tcp_probe(&c.ns(pod), TCP, opts()),
    );
    if *p.observed.ip() != spec::node_addr(1) {
        c.fail(format!("after the reset, the server saw {}", p.observed));
    }
}

// ------------------------------------------------------- Kubernetes mode

/// The IP lock Lease of `ip`, as stored.
/// Stops `sender`, lets its last datagrams arrive, and fails unless every
/// datagram `server` received came from `EGRESS_A`. Returns how many were
/// sent, and the arrivals.
fn stop_and_check_source(
    c: &Cluster,
    mut sender: failover::Sender,
    server: &failover::Receiver,
) -> (u64, Vec<failover::Arrival>) {
    let sent = c.expect("stopping the sender", sender.stop());
    thread::sleep(Duration::from_millis(200));
    let arrivals = server.arrivals();
    let leaked: Vec<_> = arrivals
        .iter()
        .filter(|a| *a.from.ip() != EGRESS_A)
        .collect();
    if !leaked.is_empty() {
        c.fail(format!(
            "{} of {} datagrams ({sent} sent) reached the server with another source than {EGRESS_A}, e.g. {:?}",
            leaked.len(),
            arrivals.len(),
            leaked[0]
        ));
    }
    (sent, arrivals)
}

fn ip_lock(c: &Cluster, ip: Ipv4Addr) -> Value {
    let name = format!("egress-ip-{}", ip.to_string().replace('.', "-"));
    c.lab
        .kube()
        .expect("Kubernetes mode")
        .api()
        .get(LEASES, Some(spec::AGENT_NAMESPACE), &name)
        .unwrap_or_else(|| c.fail(format!("{ip} has no lock Lease {name}")))
}

/// Node `n`'s claims Lease annotations, as stored.
fn claims_annotations(c: &Cluster, n: u8) -> Value {
    let name = format!("egress-claims-{}", kubernetes::node_name(n));
    c.lab
        .kube()
        .expect("Kubernetes mode")
        .api()
        .get(LEASES, Some(spec::AGENT_NAMESPACE), &name)
        .map(|l| l["metadata"]["annotations"].clone())
        .unwrap_or_else(|| c.fail(format!("node{n} has no claims Lease {name}")))
}

fn holds(c: &Cluster, n: u8, ip: Ipv4Addr) -> bool {
    kubernetes::addresses_on(&c.lab.node_ns(n), "eth0")
        .map(|a| a.contains(&ip))
        .unwrap_or(false)
}

/// The longest silence of any one flow in `arrivals` (a flow: one source
/// address and port, so one pod's socket through its NAT entry), and how
/// many datagrams each flow missed in the sequence it sent.
fn gaps(arrivals: &[failover::Arrival]) -> (Duration, u64) {
    let mut flows: BTreeMap<SocketAddrV4, Vec<&failover::Arrival>> = BTreeMap::new();
    for a in arrivals {
        flows.entry(a.from).or_default().push(a);
    }
    let mut longest = Duration::ZERO;
    let mut missed = 0;
    for seen in flows.values() {
        for w in seen.windows(2) {
            longest = longest.max(w[1].at.duration_since(w[0].at));
            missed += w[1].seq.saturating_sub(w[0].seq + 1);
        }
    }
    (longest, missed)
}

/// A DaemonSet rolling update, one node at a time: each agent gets SIGTERM
/// (its node is not drained) and a new one starts, while the selected pods
/// of every node send a datagram every 10 ms and established TCP streams
/// run through both egress IPs (locally and through the tunnel). No IP
/// moves (status and locks untouched: the successor adopts its node's
/// claims under the restart grace), no datagram reaches the server with a
/// node address, and every TCP stream carries on to the last byte.
#[test]
fn a_rolling_restart_in_kubernetes_mode_moves_no_ip_and_leaks_nothing() {
    let mut c = Cluster::new(LabSpec::kubernetes());
    let policies = c.lab.spec().policies.clone();
    let locks_before: Vec<Value> = policies.iter().map(|p| ip_lock(&c, p.egress_ip)).collect();
    // One receiver per EgressIP, and every selected pod of every node
    // sending to its own.
    let mut receivers = Vec::new();
    let mut senders = Vec::new();
    for (i, p) in policies.iter().enumerate() {
        let to = SocketAddrV4::new(spec::SERVER_ADDR, K8S_STREAM_PORT + i as u16);
        receivers.push((
            p.egress_ip,
            c.expect(
                "a datagram receiver",
                failover::Receiver::start(&c.lab.server_ns(), to),
            ),
        ));
        for pod in &p.pods {
            senders.push(c.expect(
                &format!("{pod}'s sender"),
                failover::Sender::start(&c.ns(*pod), to),
            ));
        }
    }
    // Established TCP streams: local on node1, steered to node1 from node3,
    // steered to node2 from node1.
    let long = ClientOpts {
        timeout: Duration::from_secs(20),
        ..opts()
    };
    let stop_streams = Arc::new(AtomicBool::new(false));
    let mut streams = Vec::new();
    for pod in [PodRef::new(1, 1), PodRef::new(3, 1), PodRef::new(1, 3)] {
        let conn = c.expect(
            &format!("connecting {pod}"),
            TcpConn::open(&c.ns(pod), TCP, long),
        );
        if Some(*conn.observed.ip()) != c.lab.expected_source(pod) {
            c.fail(format!("{pod}: server saw {}", conn.observed));
        }
        let progress = conn.progress();
        let stop = stop_streams.clone();
        let handle = thread::spawn(move || conn.stream_until(256 << 10, stop));
        streams.push((pod, progress, handle));
    }
    thread::sleep(Duration::from_millis(500));

    let started = Instant::now();
    for n in 1..=c.lab.spec().nodes {
        let restarted = c.lab.restart_agent(n);
        c.expect(
            &format!("SIGTERM and restart of node{n}'s agent"),
            restarted,
        );
        // The streams are still being written after this restart.
        let at_restart: Vec<u64> = streams
            .iter()
            .map(|(_, p, _)| p.load(Ordering::Relaxed))
            .collect();
        let flowing = wait_for(
            &format!("every TCP stream flows after node{n}'s restart"),
            Duration::from_secs(10),
            || {
                let stuck: Vec<PodRef> = streams
                    .iter()
                    .zip(&at_restart)
                    .filter(|((_, p, _), before)| p.load(Ordering::Relaxed) <= **before)
                    .map(|((pod, _, _), _)| *pod)
                    .collect();
                if stuck.is_empty() {
                    Ok(())
                } else {
                    Err(format!("no progress from {stuck:?}"))
                }
            },
        );
        c.expect("TCP progress", flowing);
        for p in &policies {
            let holder = p.node.expect("lab policies have a node");
            if !holds(&c, holder, p.egress_ip) {
                c.fail(format!(
                    "node{holder} no longer holds {} after node{n}'s restart",
                    p.egress_ip
                ));
            }
        }
    }
    eprintln!(
        "rolling restart of {} agents took {:?}",
        c.lab.spec().nodes,
        started.elapsed()
    );
    thread::sleep(Duration::from_secs(1));
    let sent: u64 = senders
        .iter_mut()
        .map(|s| c.expect("stopping a sender", s.stop()))
        .sum();
    stop_streams.store(true, Ordering::Relaxed);
    for (pod, progress, handle) in streams {
        let result = handle
            .join()
            .unwrap_or_else(|_| c.fail(format!("stream thread of {pod} panicked")));
        match result {
            Ok(t) => eprintln!("{pod}: {} bytes through the rolling restart", t.bytes),
            Err(e) => c.fail(format!(
                "{pod}: the TCP stream broke across the rolling restart ({} bytes written): {e}",
                progress.load(Ordering::Relaxed)
            )),
        }
    }
    thread::sleep(Duration::from_millis(200));

    let mut received = 0;
    for (ip, receiver) in &receivers {
        let arrivals = receiver.arrivals();
        received += arrivals.len() as u64;
        let wrong: Vec<_> = arrivals.iter().filter(|a| a.from.ip() != ip).collect();
        if !wrong.is_empty() {
            c.fail(format!(
                "{} of {} datagrams of {ip}'s pods reached the server with another source, e.g. {:?}",
                wrong.len(),
                arrivals.len(),
                wrong[0]
            ));
        }
        let (longest, missed) = gaps(&arrivals);
        eprintln!(
            "{ip}: {} datagrams arrived, longest silence of a flow {longest:?}, {missed} missed",
            arrivals.len()
        );
        // Nothing is torn down by a restart: a flow pauses at most for a
        // scheduling hiccup of this shared machine, never for a restart.
        if longest > Duration::from_secs(2) {
            c.fail(format!(
                "a flow through {ip} stopped for {longest:?} during the rolling restart"
            ));
        }
    }
    eprintln!("{received} of {sent} datagrams arrived");

    // Neither status nor locks moved at any point.
    let kube = c.lab.kube().expect("Kubernetes mode");
    for e in kube.api().history().iter().filter(|e| e.at >= started) {
        for p in &policies {
            let holder = kubernetes::node_name(p.node.expect("a node"));
            if e.collection == EGRESS_IPS && e.object["metadata"]["name"] == p.name.as_str() {
                let seen = kubernetes::holder_in(&e.object, p.egress_ip).map(|(n, _)| n);
                if seen.as_ref() != Some(&holder) {
                    c.fail(format!(
                        "{}'s status moved during the rolling restart: {seen:?}, not {holder}",
                        p.egress_ip
                    ));
                }
            }
        }
    }
    for (p, before) in policies.iter().zip(&locks_before) {
        let after = ip_lock(&c, p.egress_ip);
        if after["metadata"]["resourceVersion"] != before["metadata"]["resourceVersion"] {
            c.fail(format!(
                "{}'s lock changed during the rolling restart: {before} -> {after}",
                p.egress_ip
            ));
        }
    }
    // Each restart went through the restart grace (not a hand-over that
    // happened to be quick).
    for n in 1..=c.lab.spec().nodes {
        let name = format!("egress-claims-{}", kubernetes::node_name(n));
        let graced = kube.api().history().iter().any(|e| {
            e.collection == LEASES
                && e.at >= started
                && e.object["metadata"]["name"] == name.as_str()
                && e.object["metadata"]["annotations"]["egress.example.dev/restart-grace-ms"]
                    .is_string()
        });
        let holds_any = policies.iter().any(|p| p.node == Some(n));
        if holds_any && !graced {
            c.fail(format!(
                "node{n}'s agent stopped without publishing a restart grace"
            ));
        }
    }
    // And the cluster still does what the objects say.
    let converged = c.lab.wait_converged(FOLLOW);
    c.expect("convergence after the rolling restart", converged);
}

/// `kubectl drain` (cordon, then the node's agent gets SIGTERM): the node
/// hands its IP over, and the agent exits once it has let go of it (not
/// after a restart grace). Then a node the cluster autoscaler removes
/// (the `ToBeDeletedByClusterAutoscaler` taint, which alone moves nothing):
/// its agent's SIGTERM hands over. Meanwhile a pod of another node sends
/// through the IP, and nothing of it leaves with a node address.
#[test]
fn a_drained_node_hands_its_ip_over_on_sigterm() {
    let mut c = Cluster::new(LabSpec::kubernetes());
    let kube = c.lab.kube().expect("Kubernetes mode");
    c.expect(
        "widening the nodeSelector",
        kube.update_egress_ip("team-a", |spec| {
            spec.node_selector = Some(kubernetes::hostname_in(&[1, 3]));
        }),
    );
    let to = SocketAddrV4::new(spec::SERVER_ADDR, K8S_STREAM_PORT);
    let server = c.expect(
        "the datagram receiver",
        failover::Receiver::start(&c.lab.server_ns(), to),
    );
    let sender = c.expect(
        "the pod's sender",
        failover::Sender::start(&c.ns(PodRef::new(2, 1)), to),
    );
    thread::sleep(Duration::from_millis(300));

    let holder_is = |c: &Cluster, n: u8| {
        let kube = c.lab.kube().expect("Kubernetes mode");
        let want = kubernetes::node_name(n);
        let moved = wait_for(
            &format!("{EGRESS_A} held and announced by node{n}"),
            FOLLOW,
            || match kube.holder("team-a", EGRESS_A) {
                Some((node, true)) if node == want && holds(c, n, EGRESS_A) => Ok(()),
                other => Err(format!("status {other:?}")),
            },
        );
        c.expect("the hand-over", moved);
    };
    let handed_over = |c: &Cluster, n: u8| {
        if holds(c, n, EGRESS_A) {
            c.fail(format!(
                "node{n} still has {EGRESS_A} after handing it over"
            ));
        }
        let a = claims_annotations(c, n);
        if a["egress.example.dev/draining"] != "true"
            || a["egress.example.dev/claimed-ips"] != ""
            || !a["egress.example.dev/restart-grace-ms"].is_null()
        {
            c.fail(format!(
                "node{n}'s claims Lease after its drain: {a} (want draining, nothing claimed, no grace)"
            ));
        }
    };

    // Drain: cordon, then SIGTERM. The agent reads its Node afresh.
    kube.api().patch(
        NODES,
        None,
        &kubernetes::node_name(1),
        json!({"spec": {"unschedulable": true}}),
    );
    let stopping = Instant::now();
    let stopped = c.lab.stop_agent(1);
    c.expect("SIGTERM of the drained node's agent", stopped);
    eprintln!(
        "node1's agent handed over and exited in {:?}",
        stopping.elapsed()
    );
    holder_is(&c, 3);
    handed_over(&c, 1);

    // Scale-down: node1 is back (uncordoned, a new agent); node3 gets the
    // autoscaler's taint, which alone moves nothing, then SIGTERM.
    let kube = c.lab.kube().expect("Kubernetes mode");
    kube.api().patch(
        NODES,
        None,
        &kubernetes::node_name(1),
        json!({"spec": {"unschedulable": null}}),
    );
    let started = c.lab.start_agent(1);
    c.expect("node1's new agent", started);
    let kube = c.lab.kube().expect("Kubernetes mode");
    kube.api().patch(
        NODES,
        None,
        &kubernetes::node_name(3),
        json!({"spec": {"taints": [{"key": "ToBeDeletedByClusterAutoscaler",
            "value": "1767225600", "effect": "NoSchedule"}]}}),
    );
    thread::sleep(Duration::from_secs(2));
    if kube.holder("team-a", EGRESS_A).map(|(n, _)| n) != Some(kubernetes::node_name(3)) {
        c.fail("the autoscaler's taint alone moved the IP: the SIGTERM below would prove nothing");
    }
    let stopped = c.lab.stop_agent(3);
    c.expect("SIGTERM of the scaled-down node's agent", stopped);
    holder_is(&c, 1);
    handed_over(&c, 3);

    thread::sleep(Duration::from_millis(300));
    let (sent, arrivals) = stop_and_check_source(&c, sender, &server);
    if arrivals.is_empty() {
        c.fail(format!("none of {sent} datagrams arrived"));
    }
}

/// A successor agent whose controller fails at start (here: its heartbeat
/// port is taken) never hears a fence from it. It must leave the previous
/// agent's fence (the restart grace's end) as it is, not apply the
/// channel's initial "holds nothing": the node's pod keeps leaving with the
/// egress IP after the failed successor exited, and the next successor
/// adopts the IP.
#[test]
fn a_successor_that_never_hears_from_its_controller_keeps_the_previous_fence() {
    let mut c = Cluster::new(LabSpec::kubernetes());
    let lock_before = ip_lock(&c, EGRESS_A);
    let to = SocketAddrV4::new(spec::SERVER_ADDR, K8S_STREAM_PORT);
    let server = c.expect(
        "the datagram receiver",
        failover::Receiver::start(&c.lab.server_ns(), to),
    );
    // node1's own pod: translated by node1's datapath, under its stamp.
    let mut sender = c.expect(
        "the pod's sender",
        failover::Sender::start(&c.ns(PodRef::new(1, 1)), to),
    );
    thread::sleep(Duration::from_millis(300));
    let stopped = c.lab.stop_agent(1);
    c.expect("SIGTERM of node1's agent (a restart)", stopped);

    let port = spec::HEARTBEAT_PORT;
    let blocker = c.expect(
        "taking the heartbeat port",
        egress_lab::netns::in_netns(&c.lab.node_ns(1), move || {
            UdpSocket::bind(("0.0.0.0", port))
                .map_err(|e| egress_lab::LabError::Traffic(format!("binding {port}: {e}")))
        }),
    );
    if c.lab.start_agent(1).is_ok() {
        c.fail("node1's agent started although its heartbeat port was taken");
    }
    let failed = Instant::now();
    let log = std::fs::read_to_string(&c.lab.agent(1).log).unwrap_or_default();
    if !log.contains("heartbeat responder") {
        c.fail("node1's successor did not fail on its heartbeat port as the test meant");
    }
    thread::sleep(Duration::from_millis(1500));
    let after: Vec<_> = server
        .arrivals()
        .into_iter()
        .filter(|a| a.at > failed + Duration::from_millis(200))
        .collect();
    if after.is_empty() || after.iter().any(|a| *a.from.ip() != EGRESS_A) {
        c.fail(format!(
            "after the failed successor exited, node1's pod got {} datagrams through, from {:?} (want some, all from {EGRESS_A}: the restart grace still runs)",
            after.len(),
            after.iter().map(|a| *a.from.ip()).collect::<std::collections::BTreeSet<_>>()
        ));
    }

    drop(blocker);
    let started = c.lab.start_agent(1);
    c.expect("node1's next agent", started);
    let converged = c.lab.wait_converged(FOLLOW);
    c.expect("adoption by the next agent", converged);
    let lock_after = ip_lock(&c, EGRESS_A);
    if lock_after["metadata"]["resourceVersion"] != lock_before["metadata"]["resourceVersion"] {
        c.fail(format!(
            "{EGRESS_A}'s lock changed hands: {lock_before} -> {lock_after}"
        ));
    }
    let _ = sender.stop();
    let leaked = server
        .arrivals()
        .iter()
        .filter(|a| *a.from.ip() != EGRESS_A)
        .count();
    if leaked > 0 {
        c.fail(format!(
            "{leaked} datagrams of node1's pod left with another source than {EGRESS_A}"
        ));
    }
}
