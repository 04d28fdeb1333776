//! tunnel_ingress, one scenario per test. `BPF_PROG_TEST_RUN` cannot give a
//! packet tunnel metadata: `__sk_buff` has no field for the skb's metadata
//! dst and the kernel refuses unknown context fields, so a plain test run
//! reaches tunnel_ingress as a packet with no tunnel key. The harness
//! therefore runs tunnel packets through a small injector program that sets
//! the key with `bpf_skb_set_tunnel_key` (what the VXLAN device's receive
//! path does) and tail-calls tunnel_ingress; the plain run is tested too.
//! Needs root.

use egress_common::{CtState, DropReason, FlowKeyV4, ct_flags, proto};
use egress_testrun::{
    Harness, check,
    expect::{self, Verdict},
    packet::{Frame, tcp},
    world::*,
};

const SPORT: u16 = 40000;

#[test]
fn without_tunnel_metadata_the_packet_is_dropped_as_malformed() {
    let h = Harness::node().unwrap();
    let pkt = Frame::udp(REMOTE_POD, SPORT, SERVER, 53).build();
    let out = h.tunnel_ingress(&pkt).unwrap();
    assert_eq!(out.verdict, Verdict::Drop);
    // Unattributable: counted under policy 0.
    assert_eq!(h.stats(0).unwrap().drops.get(DropReason::Malformed), 1);
}

#[test]
fn steered_arrival_is_translated_and_forwarded() {
    let h = Harness::node().unwrap();
    let syn = Frame::tcp(REMOTE_POD, SPORT, SERVER, 443, tcp::SYN).build();
    let out = h.tunnel_ingress_from(NODE2, LOCAL_POLICY, &syn).unwrap();

    assert_eq!(out.verdict, Verdict::Redirect, "retval {}", out.retval);
    let v = check::view(&out.packet).unwrap();
    assert_eq!(
        (v.src, v.sport, v.dst, v.dport),
        (LOCAL_EGRESS, SPORT, SERVER, 443)
    );
    assert_eq!((v.dst_mac, v.src_mac), (ROUTER_MAC, UPLINK_MAC));
    check::all_checksums_ok(&out.packet).unwrap();
    let key = FlowKeyV4::new(REMOTE_POD.octets(), SERVER.octets(), SPORT, 443, proto::TCP);
    let entry = h.flows().unwrap().fwd[&key];
    assert_eq!(
        entry.origin_node,
        NODE2.octets(),
        "replies go back to node2"
    );
    assert_ne!(entry.flags & ct_flags::REMOTE_ORIGIN, 0);
    assert_eq!(CtState::from_u8(entry.state), CtState::SynSent);
    assert_eq!(h.live_flows().unwrap(), 1);
}

#[test]
fn tunnel_packet_from_a_stranger_is_dropped() {
    let h = Harness::node().unwrap();
    let pkt = Frame::udp(REMOTE_POD, SPORT, SERVER, 53).build();
    let out = h.tunnel_ingress_from(STRANGER, LOCAL_POLICY, &pkt).unwrap();
    assert_eq!(out.verdict, Verdict::Drop);
    assert_eq!(
        h.stats(0).unwrap().drops.get(DropReason::UnknownTunnelPeer),
        1
    );
    assert!(h.flows().unwrap().fwd.is_empty());
}

#[test]
fn unknown_vni_is_dropped() {
    let h = Harness::node().unwrap();
    let pkt = Frame::udp(REMOTE_POD, SPORT, SERVER, 53).build();
    let out = h.tunnel_ingress_from(NODE2, 4242, &pkt).unwrap();
    assert_eq!(out.verdict, Verdict::Drop);
    assert_eq!(h.stats(0).unwrap().drops.get(DropReason::UnknownVni), 1);
}

#[test]
fn arrival_for_a_policy_held_elsewhere_is_dropped() {
    let h = Harness::node().unwrap();
    let pkt = Frame::udp(REMOTE_POD, SPORT, SERVER, 53).build();
    let out = h.tunnel_ingress_from(NODE2, STEERED_POLICY, &pkt).unwrap();
    assert_eq!(out.verdict, Verdict::Drop);
    assert_eq!(
        h.stats(STEERED_POLICY)
            .unwrap()
            .drops
            .get(DropReason::NoEgressNode),
        1
    );
}

#[test]
fn reply_for_a_local_pod_is_delivered() {
    let h = Harness::node().unwrap();
    // This node's pod of policy 2 is steered to node2, which translates the
    // reply back and sends it through the tunnel.
    let syn = Frame::tcp(POD_STEERED.ip, SPORT, SERVER, 443, tcp::SYN).build();
    assert_eq!(
        h.pod_ingress(POD_STEERED, &syn).unwrap().verdict,
        Verdict::Redirect
    );
    let reply = Frame::tcp(SERVER, 443, POD_STEERED.ip, SPORT, tcp::SYN | tcp::ACK).build();

    let out = h
        .tunnel_ingress_from(NODE2, STEERED_POLICY, &reply)
        .unwrap();
    assert_eq!(out.verdict, Verdict::Redirect, "retval {}", out.retval);
    let v = check::view(&out.packet).unwrap();
    assert_eq!((v.dst, v.dport, v.src), (POD_STEERED.ip, SPORT, SERVER));
    assert_eq!(
        (v.dst_mac, v.src_mac),
        (POD_STEERED.mac, POD_STEERED.host_mac)
    );
    check::all_checksums_ok(&out.packet).unwrap();
    assert_eq!(h.stats(STEERED_POLICY).unwrap().reply_packets, 1);
}

#[test]
fn unsolicited_tunnel_packet_for_a_local_pod() {
    let h = Harness::node().unwrap();
    // No flow of the pod's: a node (or a pod of one, issue 7) pushing a
    // packet past NetworkPolicy into a selected pod.
    let pkt = Frame::tcp(SERVER, 443, POD_LOCAL.ip, 22, tcp::SYN).build();
    let out = h.tunnel_ingress_from(NODE2, LOCAL_POLICY, &pkt).unwrap();
    let (verdict, reason) = expect::tunnel_unsolicited_to_pod();
    assert_eq!(out.verdict, verdict);
    if let Some(reason) = reason {
        assert_eq!(h.stats(LOCAL_POLICY).unwrap().drops.get(reason), 1);
    }
}

#[test]
fn arrival_whose_inner_source_is_not_a_pod_of_the_sender() {
    let h = Harness::node().unwrap();
    // node2 forwards a packet claiming to come from node1's own pod.
    let pkt = Frame::udp(POD_LOCAL.ip, SPORT, SERVER, 53).build();
    let out = h.tunnel_ingress_from(NODE2, LOCAL_POLICY, &pkt).unwrap();
    let (verdict, reason) = expect::tunnel_foreign_inner_source();
    assert_eq!(out.verdict, verdict);
    if let Some(reason) = reason {
        assert_eq!(h.stats(LOCAL_POLICY).unwrap().drops.get(reason), 1);
        assert!(h.flows().unwrap().fwd.is_empty());
    }
}
