//! Who may use an egress IP (issue 7, 8), one scenario per test: a pod only
//! through its own interface, never at a node's tunnel port, a tunnel
//! arrival only as a selected pod of the node that sent it, a reply through
//! the tunnel only for a live steered flow from that flow's egress node,
//! and per-pod flow caps. Needs root.

use std::net::Ipv4Addr;

use egress_common::{CtState, DropReason, FlowKeyV4, ct_flags, proto};
use egress_testrun::{
    Harness, check,
    expect::Verdict,
    packet::{Frame, tcp},
    world::*,
};

const SPORT: u16 = 40000;
const DPORT: u16 = 443;
/// A third cluster node, holding none of the world's egress IPs.
const NODE3: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 13);

fn drops(h: &Harness, policy: u32, reason: DropReason) -> u64 {
    h.stats(policy).unwrap().drops.get(reason)
}

#[test]
fn pod_packet_to_a_node_tunnel_port_is_dropped() {
    let h = Harness::node().unwrap();
    // The repro, seen from node2's pod_ingress: an unselected pod
    // sends VXLAN (whatever it holds) to a node's tunnel port.
    for (i, (pod, node)) in [
        (POD_UNSELECTED, NODE),
        (POD_UNSELECTED, NODE2),
        (POD_LOCAL, NODE2),
    ]
    .into_iter()
    .enumerate()
    {
        let pkt = Frame::udp(pod.ip, SPORT, node, TUNNEL_PORT)
            .macs(pod.mac, pod.host_mac)
            .build();
        let out = h.pod_ingress(pod, &pkt).unwrap();
        assert_eq!(out.verdict, Verdict::Drop, "{} → {node}", pod.ip);
        assert_eq!(drops(&h, 0, DropReason::TunnelFromPod), i as u64 + 1);
    }
    // The same port on a server outside is just UDP.
    let pkt = Frame::udp(POD_LOCAL.ip, SPORT, SERVER, TUNNEL_PORT).build();
    let out = h.pod_ingress(POD_LOCAL, &pkt).unwrap();
    assert_eq!(out.verdict, Verdict::Redirect);
    assert_eq!(check::view(&out.packet).unwrap().src, LOCAL_EGRESS);
    assert_eq!(h.flows().unwrap().fwd.len(), 1);
}

#[test]
fn neighbour_source_on_another_pod_interface_is_invalid_source() {
    let h = Harness::node().unwrap();
    // The unselected pod forges its selected neighbour's address.
    let forged = Frame::udp(POD_LOCAL.ip, SPORT, SERVER, 53)
        .macs(POD_UNSELECTED.mac, POD_UNSELECTED.host_mac)
        .build();
    let out = h.pod_ingress(POD_UNSELECTED, &forged).unwrap();
    assert_eq!(out.verdict, Verdict::Drop);
    assert_eq!(drops(&h, 0, DropReason::InvalidSource), 1);
    assert!(h.flows().unwrap().fwd.is_empty());
    // The same packet on the neighbour's own interface is translated.
    let out = h.pod_ingress(POD_LOCAL, &forged).unwrap();
    assert_eq!(out.verdict, Verdict::Redirect);
    assert_eq!(check::view(&out.packet).unwrap().src, LOCAL_EGRESS);
}

#[test]
fn pod_whose_interface_is_unresolved_is_refused() {
    let mut h = Harness::node().unwrap();
    // A selected pod the agent could not find an interface for (ifindex 0):
    // fail-closed, not unselected.
    let mut state = node_state();
    state
        .pods
        .insert(Ipv4Addr::new(10, 244, 1, 99), LOCAL_POLICY);
    h.apply(&state).unwrap();
    let pkt = Frame::udp(Ipv4Addr::new(10, 244, 1, 99), SPORT, SERVER, 53).build();
    let out = h.pod_ingress(POD_UNSELECTED, &pkt).unwrap();
    assert_eq!(out.verdict, Verdict::Drop);
    assert_eq!(drops(&h, 0, DropReason::InvalidSource), 1);
}

#[test]
fn pod_to_an_address_of_its_node_is_not_translated() {
    let h = Harness::node().unwrap();
    // The egress IP held here is one of the node's addresses: a pod reaching
    // it stays local (the fuzz target once saw a flow made, then the FIB
    // lookup fail).
    for dst in LOCAL_ADDRS {
        let pkt = Frame::udp(POD_LOCAL.ip, SPORT, dst, 53).build();
        let out = h.pod_ingress(POD_LOCAL, &pkt).unwrap();
        assert_eq!(out.verdict, Verdict::Pass, "to {dst}");
        assert_eq!(check::view(&out.packet).unwrap().src, POD_LOCAL.ip);
    }
    assert!(h.flows().unwrap().fwd.is_empty());
}

#[test]
fn syn_ack_of_no_recorded_connection_is_translated() {
    let h = Harness::node().unwrap();
    // No client opened this connection (pod_egress recorded no SYN): the
    // flags alone must not get the pod's packet out untranslated.
    let pkt = Frame::tcp(POD_LOCAL.ip, 8080, SERVER, SPORT, tcp::SYN | tcp::ACK).build();
    let out = h.pod_ingress(POD_LOCAL, &pkt).unwrap();
    assert_eq!(out.verdict, Verdict::Redirect);
    assert_eq!(check::view(&out.packet).unwrap().src, LOCAL_EGRESS);
    // Steered pods alike: through the tunnel, with a steered entry.
    let pkt = Frame::tcp(POD_STEERED.ip, 8080, SERVER, SPORT, tcp::SYN | tcp::ACK).build();
    let out = h.pod_ingress(POD_STEERED, &pkt).unwrap();
    assert_eq!(out.verdict, Verdict::Redirect);
    assert_eq!(h.flows().unwrap().fwd.len(), 2);
}

#[test]
fn tunnel_arrival_of_a_pod_the_policy_does_not_select_is_dropped() {
    let h = Harness::node().unwrap();
    // node2's unselected pod, node2's own address, and node1's pod claimed
    // by node2: none is policy 1's selected pod of node2.
    for (i, src) in [REMOTE_UNSELECTED, NODE2, POD_LOCAL.ip]
        .into_iter()
        .enumerate()
    {
        let pkt = Frame::udp(src, SPORT, SERVER, 53).build();
        let out = h.tunnel_ingress_from(NODE2, LOCAL_POLICY, &pkt).unwrap();
        assert_eq!(out.verdict, Verdict::Drop, "inner source {src}");
        assert_eq!(
            drops(&h, LOCAL_POLICY, DropReason::PodNotSelected),
            i as u64 + 1
        );
    }
    assert!(h.flows().unwrap().fwd.is_empty());
}

#[test]
fn tunnel_arrival_of_a_selected_pod_from_another_node_is_dropped() {
    let mut h = Harness::node().unwrap();
    let mut state = node_state();
    state.nodes.insert(NODE3);
    h.apply(&state).unwrap();
    // node3 claims node2's selected pod.
    let pkt = Frame::udp(REMOTE_POD, SPORT, SERVER, 53).build();
    let out = h.tunnel_ingress_from(NODE3, LOCAL_POLICY, &pkt).unwrap();
    assert_eq!(out.verdict, Verdict::Drop);
    assert_eq!(drops(&h, LOCAL_POLICY, DropReason::PodNotSelected), 1);
    // From node2 it is translated.
    let out = h.tunnel_ingress_from(NODE2, LOCAL_POLICY, &pkt).unwrap();
    assert_eq!(out.verdict, Verdict::Redirect);
    assert_eq!(check::view(&out.packet).unwrap().src, LOCAL_EGRESS);
}

#[test]
fn tunnel_arrival_to_another_address_of_the_node_is_dropped() {
    let h = Harness::node().unwrap();
    // A pod aiming its VXLAN at the egress IP (or any address but the
    // node's own) rather than the node's address.
    let pkt = Frame::udp(REMOTE_POD, SPORT, SERVER, 53).build();
    let out = h
        .tunnel_ingress_to(NODE2, LOCAL_EGRESS, LOCAL_POLICY, &pkt)
        .unwrap();
    assert_eq!(out.verdict, Verdict::Drop);
    assert_eq!(drops(&h, 0, DropReason::UnknownTunnelPeer), 1);
    assert!(h.flows().unwrap().fwd.is_empty());
}

fn steered_key() -> FlowKeyV4 {
    FlowKeyV4::new(
        POD_STEERED.ip.octets(),
        SERVER.octets(),
        SPORT,
        DPORT,
        proto::TCP,
    )
}

#[test]
fn steered_flow_is_tracked_and_its_reply_delivered_only_from_its_egress_node() {
    let mut h = Harness::node().unwrap();
    let mut state = node_state();
    state.nodes.insert(NODE3);
    h.apply(&state).unwrap();
    let syn = Frame::tcp(POD_STEERED.ip, SPORT, SERVER, DPORT, tcp::SYN).build();
    assert_eq!(
        h.pod_ingress(POD_STEERED, &syn).unwrap().verdict,
        Verdict::Redirect
    );
    let flows = h.flows().unwrap();
    let entry = flows.fwd[&steered_key()];
    assert_ne!(entry.flags & ct_flags::STEERED, 0);
    assert_eq!(entry.origin_node, NODE2.octets(), "the egress node");
    assert_eq!(entry.policy_id, STEERED_POLICY);
    assert_eq!(CtState::from_u8(entry.state), CtState::SynSent);
    assert!(flows.rev.is_empty());
    assert_eq!(h.live_flows().unwrap(), 1);

    let reply = Frame::tcp(SERVER, DPORT, POD_STEERED.ip, SPORT, tcp::SYN | tcp::ACK).build();
    // From a node that is not the flow's egress node.
    let out = h
        .tunnel_ingress_from(NODE3, STEERED_POLICY, &reply)
        .unwrap();
    assert_eq!(out.verdict, Verdict::Drop);
    assert_eq!(drops(&h, STEERED_POLICY, DropReason::WrongTunnelPeer), 1);
    // Another tuple of the pod's, from the right node: no flow.
    let other = Frame::tcp(
        SERVER,
        DPORT,
        POD_STEERED.ip,
        SPORT + 1,
        tcp::SYN | tcp::ACK,
    )
    .build();
    let out = h
        .tunnel_ingress_from(NODE2, STEERED_POLICY, &other)
        .unwrap();
    assert_eq!(out.verdict, Verdict::Drop);
    assert_eq!(drops(&h, STEERED_POLICY, DropReason::NoFlow), 1);
    // The reply from the egress node is delivered and moves the flow on.
    let out = h
        .tunnel_ingress_from(NODE2, STEERED_POLICY, &reply)
        .unwrap();
    assert_eq!(out.verdict, Verdict::Redirect, "retval {}", out.retval);
    let v = check::view(&out.packet).unwrap();
    assert_eq!((v.src, v.dst, v.dport), (SERVER, POD_STEERED.ip, SPORT));
    let entry = h.flows().unwrap().fwd[&steered_key()];
    assert_ne!(entry.flags & ct_flags::SEEN_REPLY, 0);
    assert_eq!(h.stats(STEERED_POLICY).unwrap().reply_packets, 1);
}

#[test]
fn steered_flow_follows_its_policy_to_the_new_egress_node() {
    let mut h = Harness::node().unwrap();
    let mut state = node_state();
    state.nodes.insert(NODE3);
    h.apply(&state).unwrap();
    let syn = Frame::tcp(POD_STEERED.ip, SPORT, SERVER, DPORT, tcp::SYN).build();
    h.pod_ingress(POD_STEERED, &syn).unwrap();
    // Failover: node3 now holds policy 2's IP.
    state.policies.get_mut(&STEERED_POLICY).unwrap().egress_node = Some(NODE3);
    h.apply(&state).unwrap();
    let ack = Frame::tcp(POD_STEERED.ip, SPORT, SERVER, DPORT, tcp::ACK).build();
    assert_eq!(
        h.pod_ingress(POD_STEERED, &ack).unwrap().verdict,
        Verdict::Redirect
    );
    assert_eq!(
        h.flows().unwrap().fwd[&steered_key()].origin_node,
        NODE3.octets()
    );
    let reply = Frame::tcp(SERVER, DPORT, POD_STEERED.ip, SPORT, tcp::ACK).build();
    let out = h
        .tunnel_ingress_from(NODE2, STEERED_POLICY, &reply)
        .unwrap();
    assert_eq!(out.verdict, Verdict::Drop, "the former egress node");
    assert_eq!(drops(&h, STEERED_POLICY, DropReason::WrongTunnelPeer), 1);
    let out = h
        .tunnel_ingress_from(NODE3, STEERED_POLICY, &reply)
        .unwrap();
    assert_eq!(out.verdict, Verdict::Redirect);
    assert_eq!(h.live_flows().unwrap(), 1, "the same flow, moved in place");
}

#[test]
fn pod_flow_limit_caps_local_and_steered_flows() {
    let mut h = Harness::node().unwrap();
    h.set_config(|c| c.max_flows_per_pod = 2).unwrap();
    for (pod, policy) in [(POD_LOCAL, LOCAL_POLICY), (POD_STEERED, STEERED_POLICY)] {
        for port in [SPORT, SPORT + 1] {
            let pkt = Frame::udp(pod.ip, port, SERVER, 53).build();
            let out = h.pod_ingress(pod, &pkt).unwrap();
            assert_eq!(out.verdict, Verdict::Redirect, "{} flow {port}", pod.ip);
        }
        let third = Frame::udp(pod.ip, SPORT + 2, SERVER, 53).build();
        let out = h.pod_ingress(pod, &third).unwrap();
        assert_eq!(out.verdict, Verdict::Drop, "{}'s third flow", pod.ip);
        assert_eq!(drops(&h, policy, DropReason::PodFlowLimit), 1);
        // Its existing flows go on.
        let again = Frame::udp(pod.ip, SPORT, SERVER, 53).build();
        assert_eq!(
            h.pod_ingress(pod, &again).unwrap().verdict,
            Verdict::Redirect
        );
    }
    assert_eq!(h.live_flows().unwrap(), 4);
}
