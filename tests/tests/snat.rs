//! Selected pods leave with their egress IP, locally and through the
//! tunnel; unselected pods and excluded destinations are left alone.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use egress_lab::{
    ClientOpts, LabSpec, PodRef, TcpConn, TcpServer, UdpServer, spec, tcp_probe, udp_probe,
};
use egress_tests::{Cluster, TCP, opts};

const EGRESS_A: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 100);

#[test]
fn selected_pod_on_the_egress_node_leaves_with_the_egress_ip() {
    let c = Cluster::new(LabSpec::default());
    let pod = PodRef::new(1, 1);
    c.check_leaves_as(pod, EGRESS_A, 0x1111);
}

#[test]
fn selected_pods_on_other_nodes_are_steered_to_the_egress_node() {
    let c = Cluster::new(LabSpec::default());
    // Policy 2's egress IP is held by node 2: node 1 and node 3 steer to
    // it, and node 2 translates its own pod locally.
    c.check_steered_pods_of_the_default_layout(0x2000);
}

#[test]
fn unselected_pods_leave_with_their_node_address() {
    let c = Cluster::new(LabSpec::default());
    for n in 1..=3 {
        let pod = PodRef::new(n, 2);
        c.check_leaves_as(pod, spec::node_addr(n), 0x3000 + u16::from(n));
    }
}

#[test]
fn pods_sharing_a_source_port_get_distinct_nat_ports() {
    let mut s = LabSpec::default();
    // Two pods on the egress node and one remote, all on one egress IP.
    s.policies[0].pods = vec![PodRef::new(1, 1), PodRef::new(1, 2), PodRef::new(2, 1)];
    let c = Cluster::new(s);
    let o = ClientOpts {
        local_port: Some(40000),
        ..opts()
    };
    let pods = [PodRef::new(1, 1), PodRef::new(1, 2), PodRef::new(2, 1)];
    // All connections stay open at once so that their translations coexist.
    let conns: Vec<TcpConn> = pods
        .iter()
        .map(|pod| {
            c.expect(
                &format!("TCP from {pod} port 40000"),
                TcpConn::open(&c.ns(*pod), TCP, o),
            )
        })
        .collect();
    let observed: Vec<SocketAddrV4> = conns.iter().map(|t| t.observed).collect();
    for (pod, seen) in pods.iter().zip(&observed) {
        if *seen.ip() != EGRESS_A {
            c.fail(format!(
                "TCP from {pod}: server saw {seen}, expected {EGRESS_A}"
            ));
        }
    }
    let ports: BTreeSet<u16> = observed.iter().map(|a| a.port()).collect();
    if ports.len() != pods.len() {
        c.fail(format!(
            "three pods with source port 40000 share NAT ports: server saw {observed:?}"
        ));
    }
    for (pod, conn) in pods.iter().zip(conns) {
        c.expect(&format!("finishing TCP from {pod}"), conn.finish());
    }

    // UDP the same way, one after the other (each flow stays in the table).
    let udp: Vec<SocketAddrV4> = pods.iter().map(|p| c.check_udp(*p, o).observed).collect();
    let ports: BTreeSet<u16> = udp.iter().map(|a| a.port()).collect();
    if ports.len() != pods.len() {
        c.fail(format!(
            "UDP flows from port 40000 share NAT ports: {udp:?}"
        ));
    }
}

#[test]
fn excluded_destinations_are_not_translated() {
    let mut s = LabSpec::default();
    // Policy 1 also excludes the server itself: its pods reach the server
    // untouched by us, so the node's ordinary masquerade applies.
    s.policies[0].excluded_cidrs = vec!["198.51.100.10/32".parse().unwrap()];
    let c = Cluster::new(s);

    // Cluster-wide exclusion: pod-to-pod across nodes keeps pod addresses.
    let target = PodRef::new(2, 2);
    let server = c.expect(
        "TCP server in a pod",
        TcpServer::start(&c.ns(target), SocketAddrV4::new(target.ip(), 9000)),
    );
    for from in [PodRef::new(1, 1), PodRef::new(3, 1), PodRef::new(1, 3)] {
        let p = c.expect(
            &format!("TCP {from} -> pod {target}"),
            tcp_probe(&c.ns(from), server.addr(), opts()),
        );
        if *p.observed.ip() != from.ip() {
            c.fail(format!(
                "pod-to-pod from {from}: {target} saw {}, expected the pod address {}",
                p.observed,
                from.ip()
            ));
        }
    }

    // Per-policy exclusion.
    for pod in [PodRef::new(1, 1), PodRef::new(2, 1)] {
        let p = c.expect(
            &format!("TCP from {pod}"),
            tcp_probe(&c.ns(pod), TCP, opts()),
        );
        if *p.observed.ip() != spec::node_addr(pod.node) {
            c.fail(format!(
                "{pod} to an excluded destination: server saw {}, expected its node's {}",
                p.observed,
                spec::node_addr(pod.node)
            ));
        }
    }
    // Policy 2 has no such exclusion.
    c.check_tcp(PodRef::new(1, 3), opts());
}

#[test]
fn policy_changes_apply_when_the_config_file_changes() {
    let mut c = Cluster::new(LabSpec::default());
    let pod = PodRef::new(3, 2);
    c.check_tcp(pod, opts());
    let mut policies = c.lab.spec().policies.clone();
    policies[0].pods.push(pod);
    let rewritten = c.lab.set_policies(policies);
    c.expect("rewriting the agents' configs", rewritten);
    c.wait_leaves_with(
        pod,
        EGRESS_A,
        Duration::from_secs(20),
        "after being added to policy 1",
    );
    c.check_udp(pod, opts());
    // Pods that did not change still behave.
    c.check_tcp(PodRef::new(1, 1), opts());
    c.check_tcp(PodRef::new(1, 2), opts());
}

#[test]
fn zero_checksum_udp_is_translated_both_ways() {
    let c = Cluster::new(LabSpec::default());
    // A server whose answers carry zero checksums too, for the reply path.
    let server = c.expect(
        "zero-checksum UDP server",
        UdpServer::start_with(
            &c.lab.server_ns(),
            SocketAddrV4::new(spec::SERVER_ADDR, 8082),
            true,
        ),
    );
    let o = ClientOpts {
        zero_udp_checksum: true,
        ..opts()
    };
    for pod in [PodRef::new(1, 1), PodRef::new(2, 1)] {
        // A checksum "updated" from zero would be wrong and the server's
        // kernel would drop the datagram; a reply made wrong on the way back
        // would be dropped by the pod's.
        let p = c.expect(
            &format!("zero-checksum UDP from {pod}"),
            udp_probe(&c.ns(pod), server.addr(), o),
        );
        if *p.observed.ip() != EGRESS_A {
            c.fail(format!(
                "{pod}: server saw {}, expected {EGRESS_A}",
                p.observed
            ));
        }
    }
}
