//! The datapath with its state from Kubernetes objects: the agents run
//! `egress-agent run --kubernetes` against the lab's API server, the lab's
//! policies are EgressIPs, and the pods are Pod objects. The same traffic
//! checks as in static mode, then the datapath following changes of the
//! objects, then failover after a node is cut off.

use std::{net::Ipv4Addr, time::Duration};

use egress_k8s::crd::{EgressIP, EgressIPStatusItem};
use egress_lab::{
    LabSpec, PodRef, agent, failover, kubernetes, spec, traffic::wait_for, workspace_root,
};
use egress_tests::{Cluster, opts};

const EGRESS_A: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 100);
const EGRESS_B: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 101);
const EGRESS_C: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 102);

/// How long the agents get to follow a change of the objects.
const FOLLOW: Duration = Duration::from_secs(20);

#[test]
fn the_rendered_kubernetes_config_passes_the_agents_check() {
    let spec = LabSpec::kubernetes();
    let text = agent::render_config("k8scheck", &spec, 2).unwrap();
    let v: toml::Value = toml::from_str(&text).unwrap();
    assert!(v.get("policies").is_none(), "{text}");
    assert_eq!(v["cluster"]["nodes"].as_array().map(Vec::len), Some(0));
    assert_eq!(
        v["kubernetes"]["cluster_cidrs"].as_array().unwrap()[0].as_str(),
        Some("10.244.0.0/16")
    );
    let dir = workspace_root().join("target/lab");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("k8s-check-{}.toml", std::process::id()));
    std::fs::write(&path, &text).unwrap();
    let bin = agent::agent_binary().unwrap();
    let out = std::process::Command::new(&bin)
        .args(["check", "--kubernetes", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&path);
    assert!(
        out.status.success(),
        "egress-agent check --kubernetes rejected the lab's config: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn egress_ips_from_kubernetes_translate_locally_steer_and_leave_others_alone() {
    let c = Cluster::new(LabSpec::kubernetes());
    let kube = c.lab.kube().expect("Kubernetes mode");

    // The assigner wrote each IP's holder in status, OVN-K style, and the
    // holder announced it.
    for (name, ip, node) in [("team-a", EGRESS_A, "node1"), ("team-b", EGRESS_B, "node2")] {
        let eip = kube.egress_ip(name).expect("EgressIP exists");
        let status = serde_json::from_value::<EgressIP>(eip.clone())
            .expect("the stored EgressIP decodes")
            .status
            .expect("status written");
        assert_eq!(
            status.items,
            [EgressIPStatusItem {
                node: node.into(),
                egress_ip: ip.to_string()
            }],
            "{eip}"
        );
        assert_eq!(kube.holder(name, ip), Some((node.to_owned(), true)));
    }

    // Local SNAT on the holder.
    let local = PodRef::new(1, 1);
    c.check_leaves_as(local, EGRESS_A, 0x4111);

    // Steered through the tunnel from the other nodes, and local on node 2.
    c.check_steered_pods_of_the_default_layout(0x4200);

    // Pods no EgressIP selects leave as their node.
    for n in 1..=3 {
        let pod = PodRef::new(n, 2);
        c.check_leaves_as(pod, spec::node_addr(n), 0x4300 + u16::from(n));
    }
}

/// Waits until TCP from `pod` leaves with `want`.
fn wait_for_source(c: &Cluster, pod: PodRef, want: Ipv4Addr, why: &str) {
    c.wait_leaves_with(pod, want, FOLLOW, &format!("after {why}"));
}

#[test]
fn the_datapath_follows_pod_labels_pod_deletion_and_egress_ip_changes() {
    let mut c = Cluster::new(LabSpec::kubernetes());

    // Relabel: an unselected pod joins team-a, a selected one leaves it.
    let joining = PodRef::new(3, 2);
    let leaving = PodRef::new(2, 1);
    c.check_tcp(joining, opts());
    let mut policies = c.lab.spec().policies.clone();
    policies[0].pods.push(joining);
    policies[0].pods.retain(|p| *p != leaving);
    let relabelled = c.lab.set_policies(policies);
    c.expect("relabelling pods", relabelled);
    wait_for_source(&c, joining, EGRESS_A, "being labelled into team-a");
    wait_for_source(&c, leaving, spec::node_addr(2), "losing its team-a label");
    c.check_udp(joining, opts());
    c.check_udp(leaving, opts());

    // Delete a selected pod's object: nothing selects its address any more.
    let deleted = PodRef::new(3, 1);
    c.check_tcp(deleted, opts());
    let removed = c.lab.delete_pod_object(deleted);
    c.expect("deleting a Pod object", removed);
    assert_eq!(c.lab.expected_source(deleted), Some(spec::node_addr(3)));
    wait_for_source(
        &c,
        deleted,
        spec::node_addr(3),
        "its Pod object was deleted",
    );

    // Change team-b's EgressIP: another address, held by another node.
    let mut policies = c.lab.spec().policies.clone();
    policies[1].egress_ip = EGRESS_C;
    policies[1].node = Some(3);
    let changed = c.lab.set_policies(policies);
    c.expect("changing team-b's EgressIP", changed);
    wait_for_source(
        &c,
        PodRef::new(1, 3),
        EGRESS_C,
        "team-b moved to 172.18.0.102 on node3",
    );
    // Everything else settles too: status, addresses, every node's maps.
    let converged = c.lab.wait_converged(FOLLOW);
    c.expect("convergence after the change", converged);
    let kube = c.lab.kube().expect("Kubernetes mode");
    assert_eq!(
        kube.holder("team-b", EGRESS_C),
        Some(("node3".to_owned(), true))
    );
    let node2 = c.expect(
        "node2's addresses",
        kubernetes::addresses_on(&c.lab.node_ns(2), "eth0"),
    );
    assert!(
        !node2.contains(&EGRESS_B),
        "node2 still holds the old IP: {node2:?}"
    );
    // Now local on node3 and steered from nodes 1 and 2.
    for pod in [PodRef::new(3, 3), PodRef::new(1, 3), PodRef::new(2, 3)] {
        assert_eq!(c.lab.expected_source(pod), Some(EGRESS_C));
        c.check_tcp(pod, opts());
        c.check_udp(pod, opts());
    }
    // team-a was not disturbed.
    c.check_tcp(PodRef::new(1, 1), opts());
    c.check_tcp(joining, opts());
}

/// The kernel removes a claimed address when its lifetime ends, up to a
/// second and a quarter before the claim's fence: a renewal that comes that
/// late (a short link cut, a SIGSTOP of the holder) keeps the claim but
/// finds the address gone. The agent puts it back with the next renewal
/// (chaos found the status naming the holder for good while its IP carried
/// no traffic). An address removed by hand is the same thing to the agent.
#[test]
fn a_claimed_address_gone_while_the_claim_holds_comes_back() {
    let c = Cluster::new(LabSpec::kubernetes());
    let kube = c.lab.kube().expect("Kubernetes mode");
    assert_eq!(
        kube.holder("team-a", EGRESS_A),
        Some(("node1".to_owned(), true))
    );
    let node1 = c.lab.node_ns(1);
    let on_node1 = || kubernetes::addresses_on(&node1, "eth0").map(|a| a.contains(&EGRESS_A));
    assert!(
        c.expect("node1's addresses", on_node1()),
        "node1 does not hold {EGRESS_A}"
    );

    let to = format!("{EGRESS_A}/32");
    let flushed = egress_lab::exec_in(&node1, "ip", &["addr", "flush", "dev", "eth0", "to", &to]);
    c.expect("removing the address", flushed);
    // (Back within a renewal period: checking that it went would race.)

    let back = wait_for(
        &format!("{EGRESS_A} back on node1"),
        FOLLOW,
        || match on_node1() {
            Ok(true) => Ok(()),
            Ok(false) => Err("absent".to_owned()),
            Err(e) => Err(e.to_string()),
        },
    );
    c.expect("the claimed address coming back", back);
    // Still node1's, and it carries the traffic again.
    assert_eq!(
        kube.holder("team-a", EGRESS_A),
        Some(("node1".to_owned(), true))
    );
    wait_for_source(&c, PodRef::new(1, 1), EGRESS_A, "the address came back");
    wait_for_source(&c, PodRef::new(2, 1), EGRESS_A, "the address came back");
}

/// The cut comes right after the holder renewed its claim: the successor
/// then waits the longest for that claim to expire, so this is the longest
/// failover with these timings.
#[test]
fn failover_after_a_link_cut_and_an_agent_crash() {
    let mut c = Cluster::new(LabSpec {
        policies: Vec::new(),
        ..LabSpec::kubernetes()
    });
    let report = match failover::measure_failover(&mut c.lab, Duration::ZERO) {
        Ok(r) => r,
        Err(e) => c.fail(format!("failover: {e}")),
    };
    let summary = report.summary();
    println!("{summary}");
    let path = workspace_root().join("target/lab/failover.json");
    if let Err(e) = report.write_json(&path) {
        c.fail(format!("writing {}: {e}\n{summary}", path.display()));
    }
    assert_ne!(report.new_holder, report.old_holder, "{summary}");
    assert_eq!(report.leaked, 0, "fail-closed leaked: {summary}");
    assert!(
        report.cut_to_first_packet_ms < 10_000,
        "failover took too long: {summary}"
    );
}

/// The same when the holder is the elected assigner: a warm standby takes
/// the leader Lease and moves the IP; nothing leaks meanwhile.
#[test]
fn failover_when_the_holder_is_the_assigner() {
    let mut c = Cluster::new(LabSpec {
        policies: Vec::new(),
        ..LabSpec::kubernetes()
    });
    let report =
        match failover::measure_failover_of(&mut c.lab, Duration::ZERO, failover::Holder::Leader) {
            Ok(r) => r,
            Err(e) => c.fail(format!("failover: {e}")),
        };
    let summary = report.summary();
    println!("{summary}");
    let path = workspace_root().join("target/lab/failover-holder-is-leader.json");
    if let Err(e) = report.write_json(&path) {
        c.fail(format!("writing {}: {e}\n{summary}", path.display()));
    }
    assert_eq!(report.old_holder, report.leader, "{summary}");
    assert_ne!(report.new_holder, report.old_holder, "{summary}");
    assert!(
        report
            .new_leader
            .as_ref()
            .is_some_and(|l| *l != report.leader),
        "no standby took the leader Lease: {summary}"
    );
    assert_eq!(report.leaked, 0, "fail-closed leaked: {summary}");
    assert!(
        report.cut_to_first_packet_ms < 10_000,
        "failover took too long: {summary}"
    );
}

#[test]
fn without_node_ip_each_agent_takes_its_address_from_its_node_object() {
    let mut spec = LabSpec::kubernetes();
    spec.kubernetes
        .as_mut()
        .expect("Kubernetes mode")
        .node_ip_env = false;
    let c = Cluster::new(spec);
    for n in 1..=3u8 {
        let log = std::fs::read_to_string(&c.lab.agent(n).log).unwrap();
        let line = log
            .lines()
            .find(|l| l.contains("node address"))
            .unwrap_or_else(|| panic!("node{n}'s agent logged no node address:\n{log}"));
        assert!(
            line.contains(&format!("address={}", spec::node_addr(n)))
                && line.contains("source=the Node object's address"),
            "node{n}: {line}"
        );
    }
    // The addresses found drive the datapath: local SNAT on node1 and
    // steering from node2 to node1 both work.
    c.check_tcp(PodRef::new(1, 1), opts());
    c.check_tcp(PodRef::new(2, 1), opts());
}
