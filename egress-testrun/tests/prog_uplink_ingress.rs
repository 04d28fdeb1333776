//! uplink_ingress, one scenario per test: replies and ICMP errors for flows
//! made by pod_ingress (or set up in the maps, for pods steered here through
//! the tunnel), and traffic that is none of ours. Needs root.

use egress_common::{CtState, FlowKeyV4, NatEntryV4, ct_flags, proto};
use egress_testrun::{
    Harness, check,
    expect::{self, Verdict},
    packet::{Frame, raw, tcp},
    world::*,
};

const SPORT: u16 = 40000;

/// A UDP flow from the local pod to the server, made by pod_ingress; its
/// translated packet.
fn udp_flow(h: &Harness) -> Vec<u8> {
    let out = h
        .pod_ingress(
            POD_LOCAL,
            &Frame::udp(POD_LOCAL.ip, SPORT, SERVER, 53).build(),
        )
        .unwrap();
    assert_eq!(out.verdict, Verdict::Redirect);
    out.packet
}

fn assert_delivered_to_local_pod(out: &egress_testrun::Outcome, sport: u16) {
    assert_eq!(out.verdict, Verdict::Redirect, "retval {}", out.retval);
    let v = check::view(&out.packet).unwrap();
    assert_eq!(
        (v.dst, v.dport),
        (POD_LOCAL.ip, SPORT),
        "destination restored"
    );
    assert_eq!(v.sport, sport);
    assert_eq!((v.dst_mac, v.src_mac), (POD_LOCAL.mac, POD_LOCAL.host_mac));
    check::all_checksums_ok(&out.packet).unwrap();
}

#[test]
fn tcp_reply_is_translated_back_and_delivered_to_the_pod() {
    let h = Harness::node().unwrap();
    let syn = Frame::tcp(POD_LOCAL.ip, SPORT, SERVER, 80, tcp::SYN).build();
    h.pod_ingress(POD_LOCAL, &syn).unwrap();
    let synack = Frame::tcp(SERVER, 80, LOCAL_EGRESS, SPORT, tcp::SYN | tcp::ACK)
        .mss(1460)
        .build();

    let out = h.uplink_ingress(&synack).unwrap();
    assert_delivered_to_local_pod(&out, 80);
    let v = check::view(&out.packet).unwrap();
    assert_eq!((v.src, v.ttl), (SERVER, 63));
    let key = FlowKeyV4::new(
        POD_LOCAL.ip.octets(),
        SERVER.octets(),
        SPORT,
        80,
        proto::TCP,
    );
    let entry = h.flows().unwrap().fwd[&key];
    assert_eq!(CtState::from_u8(entry.state), CtState::Established);
    assert_ne!(entry.flags & ct_flags::SEEN_REPLY, 0);
    let stats = h.stats(LOCAL_POLICY).unwrap();
    assert_eq!(stats.reply_packets, 1);
    assert_eq!(stats.reply_bytes, out.packet.len() as u64);
}

#[test]
fn reply_to_a_replaced_port_restores_the_pod_port() {
    let mut h = Harness::node().unwrap();
    let mut state = node_state();
    state.pods.insert(POD_UNSELECTED.ip, LOCAL_POLICY);
    h.apply(&state).unwrap();
    h.pod_ingress(
        POD_LOCAL,
        &Frame::udp(POD_LOCAL.ip, SPORT, SERVER, 53).build(),
    )
    .unwrap();
    let out = h
        .pod_ingress(
            POD_UNSELECTED,
            &Frame::udp(POD_UNSELECTED.ip, SPORT, SERVER, 53).build(),
        )
        .unwrap();
    let nat_port = check::view(&out.packet).unwrap().sport;
    assert_ne!(nat_port, SPORT);

    let reply = Frame::udp(SERVER, 53, LOCAL_EGRESS, nat_port).build();
    let out = h.uplink_ingress(&reply).unwrap();
    assert_eq!(out.verdict, Verdict::Redirect);
    let v = check::view(&out.packet).unwrap();
    assert_eq!((v.dst, v.dport), (POD_UNSELECTED.ip, SPORT));
    check::all_checksums_ok(&out.packet).unwrap();
}

#[test]
fn zero_checksum_udp_reply_keeps_no_checksum() {
    let h = Harness::node().unwrap();
    udp_flow(&h);
    let reply = Frame::udp(SERVER, 53, LOCAL_EGRESS, SPORT)
        .no_udp_checksum()
        .build();
    let out = h.uplink_ingress(&reply).unwrap();
    assert_delivered_to_local_pod(&out, 53);
    let csum_at = raw::IP + 20 + 6;
    assert_eq!(
        &out.packet[csum_at..csum_at + 2],
        &[0, 0],
        "a zero UDP checksum means none and must stay zero"
    );
}

#[test]
fn echo_reply_is_translated_back() {
    let h = Harness::node().unwrap();
    h.pod_ingress(
        POD_LOCAL,
        &Frame::echo_request(POD_LOCAL.ip, SERVER, 7).build(),
    )
    .unwrap();
    let out = h
        .uplink_ingress(&Frame::echo_reply(SERVER, LOCAL_EGRESS, 7).build())
        .unwrap();
    assert_eq!(out.verdict, Verdict::Redirect);
    let v = check::view(&out.packet).unwrap();
    assert_eq!((v.dst, v.sport), (POD_LOCAL.ip, 7));
    check::all_checksums_ok(&out.packet).unwrap();
}

#[test]
fn icmp_error_about_a_translated_flow_is_restored_outside_and_in_the_quote() {
    let h = Harness::node().unwrap();
    let translated = udp_flow(&h);
    // The router cannot forward it: fragmentation needed, quoting what left.
    let error = Frame::frag_needed(ROUTER, LOCAL_EGRESS, 1400, &translated).build();
    assert_eq!(
        check::quoted_tuple(&error),
        Some((LOCAL_EGRESS, SERVER, SPORT, 53))
    );

    let out = h.uplink_ingress(&error).unwrap();
    assert_eq!(out.verdict, Verdict::Redirect, "retval {}", out.retval);
    let v = check::view(&out.packet).unwrap();
    assert_eq!((v.src, v.dst), (ROUTER, POD_LOCAL.ip));
    assert_eq!(
        check::quoted_tuple(&out.packet),
        Some((POD_LOCAL.ip, SERVER, SPORT, 53)),
        "the quote must name the pod's own packet"
    );
    check::all_checksums_ok(&out.packet).unwrap();
}

#[test]
fn reply_for_a_pod_of_another_node_goes_back_through_the_tunnel() {
    let mut h = Harness::node().unwrap();
    // Set up what tunnel_ingress makes for a pod of node2 steered here
    // (test runs cannot give tunnel_ingress its tunnel metadata).
    let key = FlowKeyV4::new(REMOTE_POD.octets(), SERVER.octets(), SPORT, 443, proto::TCP);
    h.insert_flow(
        &key,
        &NatEntryV4 {
            nat_addr: LOCAL_EGRESS.octets(),
            origin_node: NODE2.octets(),
            nat_port: SPORT,
            state: CtState::SynSent as u8,
            flags: ct_flags::REMOTE_ORIGIN,
            policy_id: LOCAL_POLICY,
            ..Default::default()
        },
    )
    .unwrap();
    let synack = Frame::tcp(SERVER, 443, LOCAL_EGRESS, SPORT, tcp::SYN | tcp::ACK)
        .mss(1460)
        .build();

    let out = h.uplink_ingress(&synack).unwrap();
    // Re-encapsulated towards node2 (the key itself is not visible to a
    // test run): destination restored, MSS clamped to fit the tunnel.
    assert_eq!(out.verdict, Verdict::Redirect);
    let v = check::view(&out.packet).unwrap();
    assert_eq!((v.dst, v.dport, v.src), (REMOTE_POD, SPORT, SERVER));
    let mss_at = raw::IP + 20 + 20 + 2;
    assert_eq!(
        u16::from_be_bytes([out.packet[mss_at], out.packet[mss_at + 1]]),
        TUNNEL_MSS
    );
    check::all_checksums_ok(&out.packet).unwrap();
    assert_eq!(
        CtState::from_u8(h.flows().unwrap().fwd[&key].state),
        CtState::Established
    );
}

#[test]
fn traffic_for_the_node_passes_untouched() {
    let h = Harness::node().unwrap();
    let pkt = Frame::tcp(SERVER, 80, NODE, 22, tcp::SYN).build();
    let out = h.uplink_ingress(&pkt).unwrap();
    assert_eq!(out.verdict, Verdict::Pass);
    assert_eq!(out.packet, pkt);
}

#[test]
fn packet_to_an_egress_ip_without_a_flow() {
    let h = Harness::node().unwrap();
    let pkt = Frame::tcp(SERVER, 80, LOCAL_EGRESS, 22, tcp::SYN).build();
    let out = h.uplink_ingress(&pkt).unwrap();
    let (verdict, reason) = expect::uplink_no_flow();
    assert_eq!(out.verdict, verdict);
    if let Some(reason) = reason {
        assert_eq!(h.stats(LOCAL_POLICY).unwrap().drops.get(reason), 1);
    } else {
        assert_eq!(out.packet, pkt);
    }
}

#[test]
fn fragment_to_an_egress_ip_is_dropped() {
    let h = Harness::node().unwrap();
    udp_flow(&h);
    let frag = Frame::udp(SERVER, 53, LOCAL_EGRESS, SPORT)
        .payload(&[3; 64])
        .fragment(true, 0)
        .build();
    let out = h.uplink_ingress(&frag).unwrap();
    assert_eq!(out.verdict, Verdict::Drop);
    assert_eq!(
        h.stats(LOCAL_POLICY)
            .unwrap()
            .drops
            .get(egress_common::DropReason::Fragment),
        1
    );
}
