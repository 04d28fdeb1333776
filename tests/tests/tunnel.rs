//! Tunnel traffic is accepted only from cluster nodes' datapaths, for pods
//! they host and that the VNI's policy selects; pods never reach a tunnel port.

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

/// A VXLAN datagram for node `to_node`'s tunnel device: `vni` around an
/// inner UDP packet `src -> dst` whose Ethernet source is
/// `02:00:00:00:00:<src_mac_tail>`.
fn vxlan_udp(
    c: &Cluster,
    to_node: u8,
    src_mac_tail: u8,
    vni: u32,
    (src, dst): (SocketAddrV4, SocketAddrV4),
    payload: &[u8],
) -> Vec<u8> {
    vxlan_payload(
        vni,
        &InnerUdp {
            src_mac: [0x02, 0, 0, 0, 0, src_mac_tail],
            dst_mac: mac_of(c, &c.lab.node_ns(to_node), spec::TUNNEL_INTERFACE),
            src,
            dst,
            payload: payload.to_vec(),
        },
    )
}

/// Sends `payload` in one UDP datagram from `from` inside `ns` to `to`.
fn send(c: &Cluster, what: &str, ns: &str, from: SocketAddrV4, to: SocketAddrV4, payload: Vec<u8>) {
    c.expect(what, udp_send(ns, from, to, payload));
}

#[test]
fn vxlan_from_a_non_node_address_is_dropped() {
    let c = Cluster::new(LabSpec::default());
    let vni = c.lab.spec().policies[0].id;
    let tunnel_dst = SocketAddrV4::new(spec::node_addr(1), spec::TUNNEL_PORT);
    let packet = |src_port: u16, payload: &[u8]| {
        let src = SocketAddrV4::new(PodRef::new(2, 1).ip(), src_port);
        vxlan_udp(&c, 1, 0x12, vni, (src, UDP), payload)
    };

    // Control: the same packet from a real node (node 2) is translated and
    // reaches the server, so a silent server below means a drop, not a
    // malformed packet.
    send(
        &c,
        "VXLAN from node2",
        &c.lab.node_ns(2),
        SocketAddrV4::new(spec::node_addr(2), 45001),
        tunnel_dst,
        packet(41001, b"from a node"),
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
        send(
            &c,
            "VXLAN from the router",
            &c.lab.router_ns(),
            SocketAddrV4::new(spec::ROUTER_NODE_ADDR, 45002 + i),
            tunnel_dst,
            packet(42000 + i, b"spoofed"),
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

/// A forged VXLAN datagram to node1's tunnel port: policy 1's VNI around
/// an inner UDP packet from `inner_src` to the server.
fn forged(c: &Cluster, inner_src: SocketAddrV4, vni: u32) -> Vec<u8> {
    vxlan_udp(c, 1, 0x12, vni, (inner_src, UDP), b"forged")
}

/// The repro: an unselected pod on node2 sends node1's VXLAN port a
/// datagram holding policy 1's VNI and a selected pod's inner source.
/// node2 masquerades it to its own address, so node1 would see a cluster
/// node as the outer source; node2's pod_ingress drops it first.
#[test]
fn pods_cannot_send_to_a_node_tunnel_port() {
    let c = Cluster::new(LabSpec::default());
    let vni = c.lab.spec().policies[0].id;
    let tunnel = SocketAddrV4::new(spec::node_addr(1), spec::TUNNEL_PORT);
    let selected = PodRef::new(2, 1);
    // From an unselected pod of another node, from a selected one, and from
    // a pod of node1 itself (to its own node's address, delivered locally).
    let senders = [
        (PodRef::new(2, 2), 43001u16),
        (selected, 43002),
        (PodRef::new(1, 2), 43003),
    ];
    for (i, (pod, inner_port)) in senders.iter().enumerate() {
        let node = pod.node;
        let before = c.drops(node, 0, "tunnel_from_pod");
        send(
            &c,
            &format!("forged VXLAN from {pod}"),
            &c.ns(*pod),
            SocketAddrV4::new(pod.ip(), 45100 + i as u16),
            tunnel,
            forged(&c, SocketAddrV4::new(selected.ip(), *inner_port), vni),
        );
        c.assert_udp_unseen(
            &format!("VXLAN forged by {pod} with {selected}'s inner source"),
            None,
            *inner_port,
        );
        c.wait_drops(node, 0, "tunnel_from_pod", before + 1);
    }
    // The tunnel itself still carries the selected pod's real traffic.
    c.check_udp(selected, egress_tests::opts());
}

/// What a node's own network namespace can still forge (it is trusted with
/// its outer source): node1 accepts its steered traffic only for pods that
/// node2 hosts and that the VNI's policy selects, and only when sent to
/// node1's own address.
#[test]
fn steered_arrivals_need_a_selected_pod_of_the_sending_node() {
    let c = Cluster::new(LabSpec::default());
    let vni = c.lab.spec().policies[0].id;
    let node2 = c.lab.node_ns(2);
    let from = SocketAddrV4::new(spec::node_addr(2), 45200);
    let to = SocketAddrV4::new(spec::node_addr(1), spec::TUNNEL_PORT);
    let cases = [
        (PodRef::new(2, 2), 44001u16, "an unselected pod of node2"),
        (PodRef::new(3, 1), 44002, "policy 1's pod on node3"),
        (PodRef::new(2, 3), 44003, "policy 2's pod on node2"),
    ];
    for (pod, port, what) in cases {
        let before = c.drops(1, vni, "pod_not_selected");
        send(
            &c,
            &format!("VXLAN from node2 for {what}"),
            &node2,
            from,
            to,
            forged(&c, SocketAddrV4::new(pod.ip(), port), vni),
        );
        c.assert_udp_unseen(&format!("steered packet of {what}"), None, port);
        c.wait_drops(1, vni, "pod_not_selected", before + 1);
    }

    // Sent to another address of node1 (its pods' gateway, which node2
    // routes through node1): it reaches the VXLAN socket, not from the
    // tunnel. (An egress IP of node1 would be refused even earlier, by
    // uplink_ingress: no flow.)
    let before = unknown_peer_drops(&c);
    let selected = SocketAddrV4::new(PodRef::new(2, 1).ip(), 44004);
    send(
        &c,
        "VXLAN from node2 to node1's pod gateway address",
        &node2,
        from,
        SocketAddrV4::new(spec::pod_gateway(1), spec::TUNNEL_PORT),
        forged(&c, selected, vni),
    );
    c.assert_udp_unseen("VXLAN sent to another address of node1", None, 44004);
    c.wait_drops(1, 0, "unknown_tunnel_peer", before + 1);

    // Control: node2's selected pod, to node1's address, gets through.
    send(
        &c,
        "VXLAN from node2 for its selected pod",
        &node2,
        from,
        to,
        forged(&c, selected, vni),
    );
    let seen = wait_for(
        "the server sees the steered packet of node2's selected pod",
        Duration::from_secs(5),
        || {
            c.udp
                .seen()
                .into_iter()
                .find(|s| s.peer.port() == 44004)
                .ok_or_else(|| "not yet".to_string())
        },
    );
    let seen = c.expect("control packet", seen);
    assert_eq!(*seen.peer.ip(), EGRESS_A, "{seen:?}");
}

/// A UDP socket of `pod` bound to `port`: it exchanges one datagram with the
/// server (so that the pod's node steers a flow of it to the egress node),
/// then keeps every datagram it receives until `listen` has passed.
/// Returns once the exchange is done; the handle yields (source, payload)s.
fn pod_socket(
    c: &Cluster,
    pod: PodRef,
    port: u16,
    listen: Duration,
) -> std::thread::JoinHandle<egress_lab::Result<Vec<(std::net::SocketAddr, String)>>> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
    let handle = c.expect(
        "pod socket",
        egress_lab::netns::spawn_in_netns(&c.ns(pod), "pod-socket", move || {
            let socket = std::net::UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port))
                .map_err(|e| egress_lab::LabError::Spec(format!("bind {port}: {e}")))?;
            socket
                .set_read_timeout(Some(Duration::from_millis(100)))
                .map_err(|e| egress_lab::LabError::Spec(e.to_string()))?;
            let mut buf = [0u8; 2048];
            let mut answered = false;
            for _ in 0..30 {
                let _ = socket.send_to(b"probe", UDP);
                if let Ok((_, from)) = socket.recv_from(&mut buf)
                    && from == std::net::SocketAddr::V4(UDP)
                {
                    answered = true;
                    break;
                }
            }
            let _ = ready_tx.send(if answered {
                Ok(())
            } else {
                Err("the server never answered".into())
            });
            let deadline = std::time::Instant::now() + listen;
            let mut got = Vec::new();
            while std::time::Instant::now() < deadline {
                if let Ok((n, from)) = socket.recv_from(&mut buf) {
                    got.push((from, String::from_utf8_lossy(&buf[..n]).into_owned()));
                }
            }
            Ok(got)
        }),
    );
    match ready_rx.recv_timeout(Duration::from_secs(10)) {
        Ok(Ok(())) => handle,
        other => c.fail(format!("{pod}'s flow to the server: {other:?}")),
    }
}

/// A forged datagram from `src` to the pod, as VXLAN for node2 with `vni`.
fn forged_reply(
    c: &Cluster,
    vni: u32,
    src: SocketAddrV4,
    pod: SocketAddrV4,
    text: &str,
) -> Vec<u8> {
    vxlan_udp(c, 2, 0x11, vni, (src, pod), text.as_bytes())
}

/// node2 steers n2p1's flows to node1 (policy 1). What arrives for the pod
/// through the tunnel is delivered only when it answers a live flow of the
/// pod that node2 steers, and comes from that flow's egress node: replies
/// with no flow are dropped (`no_flow`), replies from another node
/// (`wrong_tunnel_peer`), and the pod never receives them; the same reply
/// from node1 gets through.
#[test]
fn tunnel_replies_reach_a_pod_only_for_its_steered_flow_from_its_egress_node() {
    let c = Cluster::new(LabSpec::default());
    let pod = PodRef::new(2, 1);
    let vni = c.lab.spec().policies[0].id;
    let port = 47777;
    let pod_addr = SocketAddrV4::new(pod.ip(), port);
    let to = SocketAddrV4::new(spec::node_addr(2), spec::TUNNEL_PORT);
    let from = |n: u8| SocketAddrV4::new(spec::node_addr(n), 45300 + u16::from(n));
    let socket = pod_socket(&c, pod, port, Duration::from_secs(12));

    // No flow: a reply from a server port the pod never talked to, and an
    // ICMP error quoting a packet the pod never sent; from its egress node.
    let no_flow = c.drops(2, vni, "no_flow");
    let wrong_peer = c.drops(2, vni, "wrong_tunnel_peer");
    let stranger = SocketAddrV4::new(spec::SERVER_ADDR, 9999);
    let send_from = |n: u8, what: &str, payload: Vec<u8>| {
        send(&c, what, &c.lab.node_ns(n), from(n), to, payload);
    };
    send_from(
        1,
        "forged reply without a flow",
        forged_reply(&c, vni, stranger, pod_addr, "no-flow"),
    );
    let quote = egress_lab::traffic::ipv4_udp(pod_addr, stranger, b"x");
    let error = egress_lab::traffic::ipv4_port_unreachable(spec::SERVER_ADDR, pod.ip(), &quote);
    send_from(
        1,
        "forged ICMP error without a flow",
        egress_lab::traffic::vxlan_frame(
            vni,
            [0x02, 0, 0, 0, 0, 0x11],
            mac_of(&c, &c.lab.node_ns(2), spec::TUNNEL_INTERFACE),
            &error,
        ),
    );

    // The live flow's reply, from node3: not its egress node.
    send_from(
        3,
        "forged reply from node3",
        forged_reply(&c, vni, UDP, pod_addr, "wrong-peer"),
    );

    // Control: the same reply from node1 is delivered.
    send_from(
        1,
        "reply from node1",
        forged_reply(&c, vni, UDP, pod_addr, "from-node1"),
    );
    let got = c.expect("pod socket", egress_lab::netns::join(socket, &c.ns(pod)));
    let texts: Vec<&str> = got.iter().map(|(_, t)| t.as_str()).collect();
    if texts.iter().any(|t| *t == "no-flow" || *t == "wrong-peer") {
        c.fail(format!("the pod received a forged datagram: {got:?}"));
    }
    if !texts.contains(&"from-node1") {
        c.fail(format!(
            "the reply from the flow's egress node never reached the pod (it got {got:?})"
        ));
    }
    c.wait_drops(2, vni, "no_flow", no_flow + 2);
    c.wait_drops(2, vni, "wrong_tunnel_peer", wrong_peer + 1);
}
