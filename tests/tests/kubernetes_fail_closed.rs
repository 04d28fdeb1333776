//! Fail-closed in Kubernetes mode where no node holds an IP: pods of an
//! EgressIP without a usable IP never leave with their node's address, and
//! a holder that is alive but stuck (SIGSTOP) stops answering for its IP
//! when its claim lapses, so that only the new holder does.

use std::{net::Ipv4Addr, net::SocketAddrV4, thread, time::Duration, time::Instant};

use egress_k8s::crd::EgressIP;
use egress_lab::{
    LabSpec, PodRef, PolicySpec, failover,
    kubernetes::{self, POD_NAMESPACE, PODS, POLICY_LABEL},
    spec,
    traffic::wait_for,
};
use egress_tests::Cluster;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use serde_json::json;

/// Where the streams of these tests go (apart from the observers' ports).
const STREAM_PORT: u16 = 8094;
const FOLLOW: Duration = Duration::from_secs(30);

/// Labels `pod` for the EgressIP `eip`, created.
fn select_with(c: &Cluster, pod: PodRef, eip: &EgressIP) {
    let kube = c.lab.kube().expect("Kubernetes mode");
    kube.create_egress_ip(eip);
    let name = eip.metadata.name.as_deref().expect("named");
    kube.api().patch(
        PODS,
        Some(POD_NAMESPACE),
        &pod.to_string(),
        json!({"metadata": {"labels": {POLICY_LABEL: name}}}),
    );
}

fn egress_ip(name: &str, ip: Ipv4Addr, node_selector: LabelSelector) -> EgressIP {
    let mut eip = kubernetes::lab_egress_ip(name, &[ip]);
    eip.spec.node_selector = Some(node_selector);
    eip
}

/// Pods of an EgressIP that no node can hold (its nodeSelector matches no
/// node, so it never gets a status) and of one whose only IP is invalid
/// (inside the cluster network) stop leaving with their node's address as
/// soon as the agent knows they are selected, and never leave with it
/// afterwards.
#[test]
fn pods_of_egress_ips_without_a_usable_ip_fail_closed() {
    let c = Cluster::new(LabSpec::kubernetes());
    let cases = [
        (
            PodRef::new(2, 2),
            "no-node",
            egress_ip(
                "no-node",
                Ipv4Addr::new(172, 18, 0, 110),
                kubernetes::match_labels(&[(kubernetes::HOSTNAME_LABEL, "nowhere")]),
            ),
        ),
        (
            PodRef::new(3, 2),
            "bad-ip",
            egress_ip(
                "bad-ip",
                Ipv4Addr::new(10, 244, 9, 9),
                LabelSelector::default(),
            ),
        ),
    ];
    for (pod, _, eip) in &cases {
        // Unselected so far: it leaves as its node.
        assert_eq!(c.lab.expected_source(*pod), Some(spec::node_addr(pod.node)));
        c.check_udp(*pod, egress_tests::opts());
        select_with(&c, *pod, eip);
    }
    let to = SocketAddrV4::new(spec::SERVER_ADDR, STREAM_PORT);
    let server = c.expect(
        "the datagram receiver",
        failover::Receiver::start(&c.lab.server_ns(), to),
    );
    for (pod, name, _) in &cases {
        // Until the agent has applied the selection the pod still leaves as
        // its node; then nothing of it may arrive any more.
        let held = wait_for(&format!("{pod} ({name}) is held closed"), FOLLOW, || {
            let stats = c.lab.agent(pod.node).stats().map_err(|e| e.to_string())?;
            let before = stats.drops(0, "no_egress_node")?;
            // To another port than the stream's: until the selection is
            // applied these probes still leave as the node, which is not
            // what the receiver below judges.
            let _ = egress_lab::traffic::udp_send(
                &c.ns(*pod),
                SocketAddrV4::new(pod.ip(), 40000),
                SocketAddrV4::new(spec::SERVER_ADDR, STREAM_PORT + 1),
                vec![0; 8],
            );
            thread::sleep(Duration::from_millis(100));
            let stats = c.lab.agent(pod.node).stats().map_err(|e| e.to_string())?;
            let after = stats.drops(0, "no_egress_node")?;
            if after > before {
                Ok(())
            } else {
                Err(format!("no_egress_node of policy 0 stays at {after}"))
            }
        });
        c.expect("the selection applied", held);
    }
    let mut senders: Vec<failover::Sender> = cases
        .iter()
        .map(|(pod, _, _)| c.expect("a pod's sender", failover::Sender::start(&c.ns(*pod), to)))
        .collect();
    thread::sleep(Duration::from_secs(2));
    let started = Instant::now();
    let sent: u64 = senders
        .iter_mut()
        .map(|s| c.expect("stopping a sender", s.stop()))
        .sum();
    thread::sleep(Duration::from_millis(200));
    let arrivals: Vec<_> = server
        .arrivals()
        .into_iter()
        .filter(|a| a.at <= started)
        .collect();
    let from_nodes: Vec<_> = arrivals
        .iter()
        .filter(|a| (1..=3).any(|n| *a.from.ip() == spec::node_addr(n)))
        .collect();
    if !from_nodes.is_empty() || sent == 0 {
        c.fail(format!(
            "{} of {sent} datagrams of FailClosed pods without a usable egress IP reached the server with a node address (all arrivals: {})",
            from_nodes.len(),
            arrivals.len()
        ));
    }
}

/// SIGSTOP the holder's agent with its link up: its claim lapses, the
/// assigner moves the IP, and by the time the new holder has the address
/// the old one has let go of it (address and translation), and the router
/// hears exactly one MAC for it. Needs dp-core's datapath side of the
/// claim stamp (LOCAL policies stop translating, ARP for lapsed IPs is
/// dropped) as well as the agent's.
#[test]
fn a_stopped_holder_lets_go_of_its_ip_when_its_claim_lapses() {
    let mut c = Cluster::new(LabSpec {
        policies: Vec::new(),
        ..LabSpec::kubernetes()
    });
    let ip = failover::FAILOVER_EGRESS_IP;
    let kube = c.lab.kube().expect("Kubernetes mode");
    let leader = c.expect(
        "an assigner is elected",
        wait_for("an assigner is elected", FOLLOW, || {
            kube.leader().ok_or_else(|| "no leader yet".to_string())
        }),
    );
    let leader_n = kubernetes::node_number(&leader).expect("a lab node");
    let mut others = (1..=3u8).filter(|n| *n != leader_n);
    let (a, b) = (others.next().unwrap(), others.next().unwrap());
    // The old holder's own pod: once a's claim lapses nothing of it may
    // leave with the egress IP through a (b's pod path goes through b).
    let pod_on_a = PodRef::new(a, 1);
    let set = c.lab.set_policies(vec![PolicySpec {
        name: "stopped".into(),
        ..PolicySpec::new(1, ip, Some(a), vec![pod_on_a])
    }]);
    c.expect("the policy", set);
    c.expect("convergence", c.lab.wait_converged(FOLLOW));
    let kube = c.lab.kube().expect("Kubernetes mode");
    c.expect(
        "widening the nodeSelector",
        kube.update_egress_ip("stopped", |spec| {
            spec.node_selector = Some(kubernetes::hostname_in(&[a, b]));
        }),
    );
    let node_a = c.lab.node_ns(a);
    let node_b = c.lab.node_ns(b);
    let has = |ns: &str| {
        kubernetes::addresses_on(ns, "eth0")
            .map(|s| s.contains(&ip))
            .unwrap_or(false)
    };
    if !has(&node_a) {
        c.fail(format!("node{a} does not hold {ip} before the stop"));
    }
    let to = SocketAddrV4::new(spec::SERVER_ADDR, STREAM_PORT);
    let server = c.expect(
        "the datagram receiver",
        failover::Receiver::start(&c.lab.server_ns(), to),
    );
    let mut sender = c.expect(
        "the pod's sender",
        failover::Sender::start(&c.ns(pod_on_a), to),
    );
    thread::sleep(Duration::from_millis(300));

    let pid = c.lab.agent(a).pid().expect("node a's agent runs") as i32;
    let pid = nix::unistd::Pid::from_raw(pid);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).expect("SIGSTOP");
    let stopped = Instant::now();
    let moved = wait_for(&format!("node{b} holds {ip}"), FOLLOW, || {
        if has(&node_b) {
            Ok(Instant::now())
        } else {
            Err("not yet".to_string())
        }
    });
    let a_still_has = has(&node_a);
    let macs = router_arping(&c, ip);
    thread::sleep(Duration::from_millis(500));
    let _ = sender.stop();
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT);
    let moved = c.expect("the IP moves", moved);
    eprintln!(
        "node{b} holds {ip} {:?} after node{a}'s agent was stopped",
        moved - stopped
    );
    if a_still_has {
        c.fail(format!(
            "node{a} (stopped) still held {ip} when node{b} had claimed it"
        ));
    }
    let late: Vec<_> = server
        .arrivals()
        .into_iter()
        .filter(|x| x.at > moved && *x.from.ip() == ip)
        .collect();
    if !late.is_empty() {
        c.fail(format!(
            "{} datagrams of node{a}'s pod still left with {ip} through the stopped node after node{b} held it",
            late.len()
        ));
    }
    match macs {
        Ok(m) if m.len() == 1 => {}
        Ok(m) => c.fail(format!("the router heard {} MACs for {ip}: {m:?}", m.len())),
        Err(e) => c.fail(format!("arping from the router: {e}")),
    }
}

/// The distinct MACs that answer ARP requests for `ip` on the router's
/// node-network bridge.
fn router_arping(c: &Cluster, ip: Ipv4Addr) -> Result<Vec<String>, String> {
    let out = egress_lab::exec_in(
        &c.lab.router_ns(),
        "arping",
        &["-c", "3", "-w", "4", "-I", "br0", &ip.to_string()],
    );
    // arping exits non-zero when nobody answers; the output says so.
    let text = match out {
        Ok(o) => o.stdout,
        Err(e) => e.to_string(),
    };
    let mut macs: Vec<String> = text
        .lines()
        .filter(|l| l.contains("reply from"))
        .filter_map(|l| Some(l.split('[').nth(1)?.split(']').next()?.to_lowercase()))
        .collect();
    macs.sort();
    macs.dedup();
    if macs.is_empty() {
        return Err(format!("no answer: {text}"));
    }
    Ok(macs)
}
