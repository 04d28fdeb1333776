//! ICMP errors about translated flows come back to the pod translated, in
//! the outer and the embedded header: a time-exceeded from the router,
//! addressed to the egress IP, reaches the pod's socket (which only accepts
//! it if the quoted packet carries the pod's own address and port).

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use egress_lab::{
    LabSpec, PodRef, spec,
    traffic::{Hop, InnerUdp, internet_checksum, udp_send, udp_trace, vxlan_payload, wait_for},
};
use egress_tests::{Cluster, UDP, opts};

const EGRESS_A: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 100);

#[test]
fn time_exceeded_from_the_router_reaches_selected_pods() {
    let c = Cluster::new(LabSpec::default());
    for pod in [PodRef::new(1, 1), PodRef::new(2, 1)] {
        let hops = c.expect(
            &format!("UDP trace from {pod}"),
            udp_trace(&c.ns(pod), UDP, 8, Duration::from_secs(2)),
        );
        eprintln!("trace from {pod}: {hops:?}");
        if !hops.contains(&Hop::TimeExceeded(spec::ROUTER_NODE_ADDR)) {
            c.fail(format!(
                "{pod}: the router's time-exceeded (sent to {EGRESS_A}) never reached the pod: {hops:?}"
            ));
        }
        match hops.last() {
            Some(Hop::Reached(seen)) if *seen.ip() == EGRESS_A => {}
            other => c.fail(format!(
                "{pod}: trace ended with {other:?}, expected the server to see {EGRESS_A}: {hops:?}"
            )),
        }
    }
}

/// An IPv4/UDP frame as node 2 would steer it from pod n2p1 (VXLAN payload
/// from `vxlan_payload`), with the inner TTL and total length changed.
fn steered(c: &Cluster, ttl: u8, extra_len: u16, src_port: u16) -> Vec<u8> {
    let vni = c.lab.spec().policies[0].id;
    let mut p = vxlan_payload(
        vni,
        &InnerUdp {
            src_mac: [0x02, 0, 0, 0, 0, 0x12],
            dst_mac: tunnel_mac(c),
            src: SocketAddrV4::new(PodRef::new(2, 1).ip(), src_port),
            dst: UDP,
            payload: b"crafted".to_vec(),
        },
    );
    // VXLAN header (8) and inner Ethernet (14), then the IPv4 header.
    let ip = 8 + 14;
    p[ip + 8] = ttl;
    let len = u16::from_be_bytes([p[ip + 2], p[ip + 3]]) + extra_len;
    p[ip + 2..ip + 4].copy_from_slice(&len.to_be_bytes());
    p[ip + 10..ip + 12].copy_from_slice(&[0, 0]);
    let sum = internet_checksum(&p[ip..ip + 20]);
    p[ip + 10..ip + 12].copy_from_slice(&sum.to_be_bytes());
    p
}

/// The MAC of node1's tunnel device, the inner destination of steered frames.
fn tunnel_mac(c: &Cluster) -> [u8; 6] {
    let out = c.expect(
        "tunnel MAC",
        egress_lab::exec_in(
            &c.lab.node_ns(1),
            "ip",
            &["-j", "link", "show", "dev", spec::TUNNEL_INTERFACE],
        ),
    );
    let v: serde_json::Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| c.fail(format!("ip -j link: {e}: {}", out.stdout)));
    let text = v[0]["address"].as_str().unwrap_or_default();
    let mut mac = [0u8; 6];
    for (byte, part) in mac.iter_mut().zip(text.split(':')) {
        *byte = u8::from_str_radix(part, 16).unwrap_or_else(|e| c.fail(format!("MAC {text}: {e}")));
    }
    mac
}

fn drops(c: &Cluster, reason: &str) -> u64 {
    let stats = c.expect("stats of node1", c.lab.agent(1).stats());
    stats.drops(1, reason).unwrap_or_else(|e| c.fail(e))
}

#[test]
fn exhausted_ttl_and_bad_lengths_are_answered_or_dropped_not_forwarded() {
    let c = Cluster::new(LabSpec::default());
    let pod = PodRef::new(2, 1);
    c.check_udp(pod, opts());
    let tunnel = SocketAddrV4::new(spec::node_addr(1), spec::TUNNEL_PORT);
    let from_node2 = |port: u16, payload: Vec<u8>| {
        c.expect(
            "VXLAN from node2",
            udp_send(
                &c.lab.node_ns(2),
                SocketAddrV4::new(spec::node_addr(2), port),
                tunnel,
                payload,
            ),
        );
    };

    // A tunnel arrival with TTL 1: the pod gets "time exceeded" back
    // through the tunnel, from node1, and the server nothing. node2 delivers
    // an error through the tunnel only about a flow it steers to node1: the
    // pod's own datagram from that port makes one.
    c.expect(
        "UDP from the pod's port 41100",
        udp_send(
            &c.ns(pod),
            SocketAddrV4::new(pod.ip(), 41100),
            UDP,
            b"flow".to_vec(),
        ),
    );
    c.udp.clear();
    let before = drops(&c, "ttl_exceeded");
    let seen = egress_tests::capture(&c.ns(pod), "icmp[icmptype] == 11", || {
        from_node2(45100, steered(&c, 1, 0, 41100));
    });
    if !seen.contains(&format!("{} > {}", spec::node_addr(1), pod.ip())) {
        c.fail(format!("{pod} got no time-exceeded from node1: {seen:?}"));
    }
    if drops(&c, "ttl_exceeded") <= before {
        c.fail("ttl_exceeded not counted");
    }

    // Total length beyond the frame: dropped, counted.
    let before = drops(&c, "bad_length");
    from_node2(45101, steered(&c, 64, 200, 41101));
    let counted = wait_for("bad_length counts", Duration::from_secs(5), || match drops(
        &c,
        "bad_length",
    ) {
        n if n > before => Ok(n),
        n => Err(format!("still {n}")),
    });
    c.expect("bad_length", counted);
    std::thread::sleep(Duration::from_millis(300));
    if !c.udp.seen().is_empty() {
        c.fail(format!("the server got {:?}", c.udp.seen()));
    }

    // A reply whose TTL runs out at node1: the server hears "time exceeded"
    // from the egress IP it sent to.
    let local = PodRef::new(1, 1);
    let traffic = |e: std::io::Error| egress_lab::LabError::Traffic(e.to_string());
    let server = c.expect(
        "UDP socket on the server",
        egress_lab::netns::in_netns(&c.lab.server_ns(), move || {
            let s = std::net::UdpSocket::bind(SocketAddrV4::new(spec::SERVER_ADDR, 9098))
                .map_err(traffic)?;
            s.set_read_timeout(Some(Duration::from_secs(5)))
                .map_err(traffic)?;
            Ok(s)
        }),
    );
    c.expect(
        "UDP from the local pod",
        udp_send(
            &c.ns(local),
            SocketAddrV4::new(local.ip(), 43210),
            SocketAddrV4::new(spec::SERVER_ADDR, 9098),
            b"hello".to_vec(),
        ),
    );
    let mut buf = [0u8; 64];
    let (_, observed) = server
        .recv_from(&mut buf)
        .unwrap_or_else(|e| c.fail(format!("the server got nothing from {local}: {e}")));
    if observed.ip() != std::net::IpAddr::V4(EGRESS_A) {
        c.fail(format!("{local} reached the server as {observed}"));
    }
    let seen = egress_tests::capture(&c.lab.server_ns(), "icmp[icmptype] == 11", || {
        // The router takes one: node1 gets TTL 1.
        server.set_ttl(2).unwrap_or_else(|e| c.fail(e));
        server
            .send_to(b"late", observed)
            .unwrap_or_else(|e| c.fail(e));
    });
    if !seen.contains(&format!("{EGRESS_A} > {}", spec::SERVER_ADDR)) {
        c.fail(format!(
            "the server got no time-exceeded from {EGRESS_A}: {seen:?}"
        ));
    }
}
