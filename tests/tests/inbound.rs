//! Inbound and local traffic is left alone: a connection that a client
//! outside opens to a selected pod (NodePort or hostPort, client address
//! preserved by the node's DNAT) is answered from the address the client
//! used, and a selected pod reaches every address of its own node with its
//! own source.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use egress_lab::{
    ClientOpts, LabSpec, PodRef, TcpConn, TcpServer, UdpServer, spec, traffic::wait_for, udp_probe,
};
use egress_tests::{Cluster, opts};

/// What kube-proxy (NodePort, `externalTrafficPolicy: Local`) and the
/// portmap plugin (hostPort) do: DNAT the node's port to the pod's.
fn dnat(c: &Cluster, node: u8, proto: &str, port: u16, to: SocketAddrV4) {
    c.sh(
        &c.lab.node_ns(node),
        &format!(
            "iptables -t nat -A PREROUTING -d {} -p {proto} --dport {port} -j DNAT --to-destination {to}",
            spec::node_addr(node)
        ),
    );
}

/// Opens a TCP connection and a UDP exchange from the external server to
/// `node`'s ports, DNATed to `pod`: both must be answered from the node's
/// address and port (a connected socket takes nothing else), and the pod
/// must have seen the client's own address.
fn check_inbound(c: &Cluster, pod: PodRef, node: u8, tcp_port: u16, udp_port: u16) {
    let client = c.lab.server_ns();
    let node_addr = spec::node_addr(node);
    let quick = ClientOpts {
        timeout: Duration::from_secs(3),
        ..opts()
    };
    let conn = c.expect(
        &format!("TCP from the server to {node_addr}:{tcp_port} (DNAT to {pod})"),
        TcpConn::open(&client, SocketAddrV4::new(node_addr, tcp_port), quick),
    );
    if conn.observed != conn.local {
        c.fail(format!(
            "{pod} saw the TCP client as {}, which connected from {}",
            conn.observed, conn.local
        ));
    }
    c.expect(
        &format!("TCP data both ways with {pod} through {node_addr}:{tcp_port}"),
        conn.transfer(256 * 1024, None),
    );
    let probe = c.expect(
        &format!("UDP from the server to {node_addr}:{udp_port} (DNAT to {pod})"),
        udp_probe(&client, SocketAddrV4::new(node_addr, udp_port), quick),
    );
    if probe.observed != probe.local {
        c.fail(format!(
            "{pod} saw the UDP client as {}, which sent from {}",
            probe.observed, probe.local
        ));
    }
}

#[test]
fn connections_opened_from_outside_are_answered_from_the_address_the_client_used() {
    let c = Cluster::new(LabSpec::default());
    // Policy 1 translates n1p1's traffic on node1 and steers n2p1's from
    // node2 to node1.
    let mut servers = Vec::new();
    for pod in [PodRef::new(1, 1), PodRef::new(2, 1)] {
        let tcp = SocketAddrV4::new(pod.ip(), 8080);
        let udp = SocketAddrV4::new(pod.ip(), 8081);
        servers.push((
            c.expect("TCP server in the pod", TcpServer::start(&c.ns(pod), tcp)),
            c.expect("UDP server in the pod", UdpServer::start(&c.ns(pod), udp)),
        ));
        // NodePort 30080/30081 and hostPort 8080/8081 on the pod's node.
        dnat(&c, pod.node, "tcp", 30080, tcp);
        dnat(&c, pod.node, "udp", 30081, udp);
        dnat(&c, pod.node, "tcp", 8080, tcp);
        dnat(&c, pod.node, "udp", 8081, udp);
    }
    for pod in [PodRef::new(1, 1), PodRef::new(2, 1)] {
        check_inbound(&c, pod, pod.node, 30080, 30081);
        check_inbound(&c, pod, pod.node, 8080, 8081);
        // The pods' own connections still leave with the egress IP.
        c.check_tcp(pod, opts());
        c.check_udp(pod, opts());
    }
}

/// A node-local DNS cache on 169.254.20.10 (on `lo`) and an address on
/// another interface of the node, both added while the agent runs: selected
/// pods reach them with their own address, whether their policy translates
/// on this node (n1p1) or steers elsewhere (n1p3, policy 2 on node2).
#[test]
fn pods_reach_every_address_of_their_node_untranslated() {
    let c = Cluster::new(LabSpec::default());
    let node = c.lab.node_ns(1);
    let dns = Ipv4Addr::new(169, 254, 20, 10);
    let other = Ipv4Addr::new(192, 168, 77, 1);
    c.sh(&node, &format!("ip addr add {dns}/32 dev lo"));
    c.sh(&node, "ip link add lcl0 type veth peer name lcl1");
    c.sh(&node, &format!("ip addr add {other}/24 dev lcl0"));
    c.sh(&node, "ip link set lcl0 up");
    c.sh(&node, "ip link set lcl1 up");
    let mut servers = Vec::new();
    for addr in [dns, other] {
        servers.push((
            c.expect(
                "TCP server on the node",
                TcpServer::start(&node, SocketAddrV4::new(addr, 53)),
            ),
            c.expect(
                "UDP server on the node",
                UdpServer::start(&node, SocketAddrV4::new(addr, 53)),
            ),
        ));
    }
    let quick = ClientOpts {
        timeout: Duration::from_secs(1),
        ..opts()
    };
    for pod in [PodRef::new(1, 1), PodRef::new(1, 3)] {
        for addr in [dns, other] {
            let server = SocketAddrV4::new(addr, 53);
            // The agent follows the new addresses within a reconcile tick.
            let probe = wait_for(
                &format!("UDP from {pod} to {server} is answered"),
                Duration::from_secs(10),
                || udp_probe(&c.ns(pod), server, quick).map_err(|e| e.to_string()),
            );
            let probe = c.expect("UDP to a node address", probe);
            if *probe.observed.ip() != pod.ip() {
                c.fail(format!(
                    "UDP from {pod} to {server}: the node saw {}, expected the pod's own {}",
                    probe.observed,
                    pod.ip()
                ));
            }
            let conn = c.expect(
                &format!("TCP from {pod} to {server}"),
                TcpConn::open(&c.ns(pod), server, quick),
            );
            if *conn.observed.ip() != pod.ip() {
                c.fail(format!(
                    "TCP from {pod} to {server}: the node saw {}, expected {}",
                    conn.observed,
                    pod.ip()
                ));
            }
            c.expect("TCP to a node address", conn.finish());
        }
    }
}
