//! Tunnel traffic is accepted only from cluster nodes.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use egress_lab::{
    LabSpec, PodRef, exec_in, spec,
    traffic::{InnerUdp, udp_send, vxlan_payload, wait_for},
};
use egress_tests::{Cluster, UDP};

const EGRESS_A: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 100);

fn mac_of(c: &Cluster, ns: &str, dev: &str) -> [u8; 6] {
    let out = c.expect(
        &format!("MAC of {dev} in {ns}"),
        exec_in(ns, "ip", &["-j", "link", "show", "dev", dev]),
    );
    let v: serde_json::Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("ip -j link show: {e}: {}", out.stdout));
    let text = v[0]["address"]
        .as_str()
        .unwrap_or_else(|| panic!("no address in {}", out.stdout));
    let mut mac = [0u8; 6];
    for (byte, part) in mac.iter_mut().zip(text.split(':')) {
        *byte = u8::from_str_radix(part, 16).unwrap_or_else(|e| panic!("MAC {text}: {e}"));
    }
    mac
}

fn unknown_peer_drops(c: &Cluster) -> u64 {
    let stats = c.expect("stats of node1", c.lab.agent(1).stats());
    stats
        .drops(0, "unknown_tunnel_peer")
        .unwrap_or_else(|e| c.fail(format!("stats of node1: {e}\n{}", stats.raw)))
}

#[test]
fn vxlan_from_a_non_node_address_is_dropped() {
    let c = Cluster::new(LabSpec::default());
    let node1 = c.lab.node_ns(1);
    let vni = c.lab.spec().policies[0].id;
    let tunnel_dst = SocketAddrV4::new(spec::node_addr(1), spec::TUNNEL_PORT);
    let packet = |src_port: u16, payload: &[u8]| {
        vxlan_payload(
            vni,
            &InnerUdp {
                src_mac: [0x02, 0, 0, 0, 0, 0x12],
                dst_mac: mac_of(&c, &node1, spec::TUNNEL_INTERFACE),
                src: SocketAddrV4::new(PodRef::new(2, 1).ip(), src_port),
                dst: UDP,
                payload: payload.to_vec(),
            },
        )
    };

    // Control: the same packet from a real node (node 2) is translated and
    // reaches the server, so a silent server below means a drop, not a
    // malformed packet.
    c.expect(
        "VXLAN from node2",
        udp_send(
            &c.lab.node_ns(2),
            SocketAddrV4::new(spec::node_addr(2), 45001),
            tunnel_dst,
            packet(41001, b"from a node"),
        ),
    );
    let control = wait_for(
        "the server sees the crafted tunnel packet sent by node2",
        Duration::from_secs(5),
        || {
            let seen = c.udp.seen();
            seen.iter()
                .find(|s| s.peer.port() == 41001 || *s.peer.ip() == EGRESS_A)
                .copied()
                .ok_or_else(|| format!("server saw {seen:?}"))
        },
    );
    let control = c.expect("control packet", control);
    if *control.peer.ip() != EGRESS_A {
        c.fail(format!(
            "tunnel packet from node2 reached the server as {}, expected {EGRESS_A}",
            control.peer
        ));
    }

    let before = unknown_peer_drops(&c);
    c.udp.clear();
    // The router is on the node network but is not a node.
    for i in 0..5u16 {
        c.expect(
            "VXLAN from the router",
            udp_send(
                &c.lab.router_ns(),
                SocketAddrV4::new(spec::ROUTER_NODE_ADDR, 45002 + i),
                tunnel_dst,
                packet(42000 + i, b"spoofed"),
            ),
        );
    }
    let counted = wait_for(
        "unknown_tunnel_peer (policy 0) counts the spoofed packets",
        Duration::from_secs(5),
        || {
            let now = unknown_peer_drops(&c);
            if now >= before + 5 {
                Ok(now)
            } else {
                Err(format!("counter went from {before} to {now}"))
            }
        },
    );
    c.expect("drop counter", counted);
    std::thread::sleep(Duration::from_millis(500));
    let seen = c.udp.seen();
    if !seen.is_empty() {
        c.fail(format!(
            "spoofed tunnel packets reached the server: {seen:?}"
        ));
    }
}
