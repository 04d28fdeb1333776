//! pod_ingress, one scenario per test (in the style of cilium's bpf/tests:
//! build the packet, set the maps up, run it, check the packet and the maps).
//! Every test builds its own namespace and datapath (see egress-testrun's
//! harness) and needs root.

use egress_common::{CtState, DropReason, FlowKeyV4, ct_flags, proto};
use egress_testrun::{
    Harness, check,
    expect::{self, Verdict},
    packet::{Frame, raw, tcp},
    world::*,
};

const SPORT: u16 = 40000;
const DPORT: u16 = 80;

fn syn() -> Vec<u8> {
    Frame::tcp(POD_LOCAL.ip, SPORT, SERVER, DPORT, tcp::SYN)
        .mss(1460)
        .macs(POD_LOCAL.mac, POD_LOCAL.host_mac)
        .build()
}

fn tcp_key() -> FlowKeyV4 {
    FlowKeyV4::new(
        POD_LOCAL.ip.octets(),
        SERVER.octets(),
        SPORT,
        DPORT,
        proto::TCP,
    )
}

/// The packet left untouched, to the kernel.
fn assert_passed_untouched(out: &egress_testrun::Outcome, input: &[u8]) {
    assert_eq!(out.verdict, Verdict::Pass, "retval {}", out.retval);
    assert_eq!(out.packet, input, "a passed packet must not be rewritten");
}

fn assert_dropped(h: &Harness, out: &egress_testrun::Outcome, policy: u32, reason: DropReason) {
    assert_eq!(out.verdict, Verdict::Drop, "retval {}", out.retval);
    let stats = h.stats(policy).unwrap();
    assert_eq!(
        stats.drops.get(reason),
        1,
        "policy {policy} must count one {} drop: {:?}",
        reason.name(),
        stats.drops
    );
    assert_eq!(
        stats.drops.total(),
        1,
        "and no other drop: {:?}",
        stats.drops
    );
}

fn assert_no_flows(h: &Harness) {
    let flows = h.flows().unwrap();
    assert!(flows.fwd.is_empty() && flows.rev.is_empty(), "{flows:?}");
    assert_eq!(h.live_flows().unwrap(), 0);
}

#[test]
fn first_packet_of_a_local_flow_is_translated_and_forwarded() {
    let h = Harness::node().unwrap();
    let out = h.pod_ingress(POD_LOCAL, &syn()).unwrap();

    assert_eq!(out.verdict, Verdict::Redirect, "retval {}", out.retval);
    let v = check::view(&out.packet).unwrap();
    assert_eq!(
        (v.src, v.sport),
        (LOCAL_EGRESS, SPORT),
        "source → egress IP, own port kept"
    );
    assert_eq!((v.dst, v.dport), (SERVER, DPORT));
    assert_eq!(v.ttl, 63, "forwarded as a router");
    assert_eq!(
        (v.dst_mac, v.src_mac),
        (ROUTER_MAC, UPLINK_MAC),
        "the FIB's next hop"
    );
    check::all_checksums_ok(&out.packet).unwrap();

    let flows = h.flows().unwrap();
    let entry = flows.fwd[&tcp_key()];
    assert_eq!(entry.nat_addr, LOCAL_EGRESS.octets());
    assert_eq!(entry.nat_port, SPORT);
    assert_eq!(entry.policy_id, LOCAL_POLICY);
    assert_eq!(CtState::from_u8(entry.state), CtState::SynSent);
    assert_eq!(entry.flags, 0);
    assert_eq!(entry.origin_node, [0; 4]);
    let reply = FlowKeyV4::new(
        SERVER.octets(),
        LOCAL_EGRESS.octets(),
        DPORT,
        SPORT,
        proto::TCP,
    );
    let rev = flows.rev[&reply];
    assert_eq!(
        (rev.orig_addr, rev.orig_port),
        (POD_LOCAL.ip.octets(), SPORT)
    );
    assert_eq!(rev.policy_id, LOCAL_POLICY);
    assert_eq!((flows.fwd.len(), flows.rev.len()), (1, 1));
    assert_eq!(h.live_flows().unwrap(), 1);

    let stats = h.stats(LOCAL_POLICY).unwrap();
    assert_eq!((stats.new_flows, stats.egress_packets), (1, 1));
    assert_eq!(stats.egress_bytes, out.packet.len() as u64);
    assert_eq!(stats.drops.total(), 0);
}

#[test]
fn established_packet_reuses_the_flow() {
    let h = Harness::node().unwrap();
    h.pod_ingress(POD_LOCAL, &syn()).unwrap();
    let synack = Frame::tcp(SERVER, DPORT, LOCAL_EGRESS, SPORT, tcp::SYN | tcp::ACK).build();
    assert_eq!(
        h.uplink_ingress(&synack).unwrap().verdict,
        Verdict::Redirect
    );

    let data = Frame::tcp(POD_LOCAL.ip, SPORT, SERVER, DPORT, tcp::ACK | tcp::PSH)
        .payload(&[7; 300])
        .build();
    let out = h.pod_ingress(POD_LOCAL, &data).unwrap();
    assert_eq!(out.verdict, Verdict::Redirect);
    let v = check::view(&out.packet).unwrap();
    assert_eq!(
        (v.src, v.sport, v.dst, v.dport),
        (LOCAL_EGRESS, SPORT, SERVER, DPORT)
    );
    check::all_checksums_ok(&out.packet).unwrap();
    assert_eq!(
        &out.packet[out.packet.len() - 300..],
        &[7; 300],
        "payload intact"
    );

    let entry = h.flows().unwrap().fwd[&tcp_key()];
    assert_eq!(CtState::from_u8(entry.state), CtState::Established);
    assert_ne!(entry.flags & ct_flags::SEEN_REPLY, 0);
    assert_ne!(entry.hop.stamp, 0, "the next hop is cached for the flow");
    let stats = h.stats(LOCAL_POLICY).unwrap();
    assert_eq!((stats.new_flows, stats.egress_packets), (1, 2));
    assert_eq!(h.live_flows().unwrap(), 1);
}

#[test]
fn taken_port_is_replaced_by_a_free_one() {
    let mut h = Harness::node().unwrap();
    // A second pod of policy 1 using the same source port to the same server.
    let mut state = node_state();
    state.pods.insert(POD_UNSELECTED.ip, LOCAL_POLICY);
    h.apply(&state).unwrap();
    h.pod_ingress(POD_LOCAL, &syn()).unwrap();
    let second = Frame::tcp(POD_UNSELECTED.ip, SPORT, SERVER, DPORT, tcp::SYN).build();

    let out = h.pod_ingress(POD_UNSELECTED, &second).unwrap();
    assert_eq!(out.verdict, Verdict::Redirect);
    let v = check::view(&out.packet).unwrap();
    assert_eq!(v.src, LOCAL_EGRESS);
    assert_ne!(v.sport, SPORT, "the port is the first pod's");
    assert!(v.sport >= 1024, "NAT ports come from the configured range");
    check::all_checksums_ok(&out.packet).unwrap();
    let key = FlowKeyV4::new(
        POD_UNSELECTED.ip.octets(),
        SERVER.octets(),
        SPORT,
        DPORT,
        proto::TCP,
    );
    assert_eq!(h.flows().unwrap().fwd[&key].nat_port, v.sport);
    assert_eq!(h.live_flows().unwrap(), 2);
}

#[test]
fn echo_request_is_translated_by_its_identifier() {
    let h = Harness::node().unwrap();
    let ping = Frame::echo_request(POD_LOCAL.ip, SERVER, 7).build();
    let out = h.pod_ingress(POD_LOCAL, &ping).unwrap();
    assert_eq!(out.verdict, Verdict::Redirect);
    let v = check::view(&out.packet).unwrap();
    assert_eq!((v.src, v.sport), (LOCAL_EGRESS, 7));
    check::all_checksums_ok(&out.packet).unwrap();
    let key = FlowKeyV4::new(POD_LOCAL.ip.octets(), SERVER.octets(), 7, 0, proto::ICMP);
    assert_eq!(
        CtState::from_u8(h.flows().unwrap().fwd[&key].state),
        CtState::Open
    );
}

#[test]
fn ip_options_are_translated_field_by_field() {
    let h = Harness::node().unwrap();
    // Record route: the header is 32 bytes, off the one-store fast path.
    let with_options = Frame::udp(POD_LOCAL.ip, 5353, SERVER, 53)
        .ip_options(&[7, 7, 4, 0, 0, 0, 0])
        .build();
    assert_eq!(raw::ihl_bytes(&with_options), 28);
    let out = h.pod_ingress(POD_LOCAL, &with_options).unwrap();
    assert_eq!(out.verdict, Verdict::Redirect);
    let v = check::view(&out.packet).unwrap();
    assert_eq!((v.src, v.sport, v.ttl), (LOCAL_EGRESS, 5353, 63));
    check::all_checksums_ok(&out.packet).unwrap();
}

#[test]
fn steered_packet_keeps_its_addresses_and_is_redirected() {
    let h = Harness::node().unwrap();
    let syn = Frame::tcp(POD_STEERED.ip, SPORT, SERVER, DPORT, tcp::SYN)
        .mss(1460)
        .build();
    let out = h.pod_ingress(POD_STEERED, &syn).unwrap();

    // The tunnel key (VNI 2, remote node2) and the redirect's target (the
    // tunnel device) live in the skb's metadata dst and the per-CPU redirect
    // state, which BPF_PROG_TEST_RUN does not return: the lab's tunnel tests
    // see them on the wire. What the test run shows: a redirect, the inner
    // packet unchanged but for the MSS clamped to fit the tunnel.
    assert_eq!(out.verdict, Verdict::Redirect);
    let v = check::view(&out.packet).unwrap();
    assert_eq!(
        (v.src, v.sport, v.dst, v.dport, v.ttl),
        (POD_STEERED.ip, SPORT, SERVER, DPORT, 64)
    );
    let mss_at = raw::IP + 20 + 20 + 2;
    assert_eq!(
        u16::from_be_bytes([out.packet[mss_at], out.packet[mss_at + 1]]),
        TUNNEL_MSS
    );
    check::all_checksums_ok(&out.packet).unwrap();
    let flows = h.flows().unwrap();
    assert_eq!(flows.fwd.len(), expect::steered_flow_entries(), "{flows:?}");
    assert!(flows.rev.is_empty(), "nothing comes back here: {flows:?}");
    let stats = h.stats(STEERED_POLICY).unwrap();
    assert_eq!(
        (stats.steered_packets, stats.egress_packets, stats.new_flows),
        (1, 0, 0)
    );
}

#[test]
fn policy_excluded_destination_passes_untouched() {
    let h = Harness::node().unwrap();
    let pkt = Frame::tcp(POD_LOCAL.ip, SPORT, EXCLUDED_SERVER, DPORT, tcp::SYN).build();
    assert_passed_untouched(&h.pod_ingress(POD_LOCAL, &pkt).unwrap(), &pkt);
    assert_no_flows(&h);
}

#[test]
fn node_and_cluster_destinations_pass_untouched() {
    let h = Harness::node().unwrap();
    for dst in [NODE, NODE2, CLUSTER_PEER, SERVICE] {
        let pkt = Frame::udp(POD_LOCAL.ip, 5000, dst, 53).build();
        assert_passed_untouched(&h.pod_ingress(POD_LOCAL, &pkt).unwrap(), &pkt);
    }
    assert_no_flows(&h);
}

#[test]
fn fail_closed_policy_without_egress_node_drops() {
    let h = Harness::node().unwrap();
    let pkt = Frame::udp(POD_ORPHAN_CLOSED.ip, 5000, SERVER, 53).build();
    let out = h.pod_ingress(POD_ORPHAN_CLOSED, &pkt).unwrap();
    assert_dropped(&h, &out, ORPHAN_CLOSED_POLICY, DropReason::NoEgressNode);
    assert_no_flows(&h);
}

#[test]
fn fail_open_policy_without_egress_node_passes() {
    let h = Harness::node().unwrap();
    let pkt = Frame::udp(POD_ORPHAN_OPEN.ip, 5000, SERVER, 53).build();
    assert_passed_untouched(&h.pod_ingress(POD_ORPHAN_OPEN, &pkt).unwrap(), &pkt);
    assert_eq!(h.stats(ORPHAN_OPEN_POLICY).unwrap().drops.total(), 0);
}

#[test]
fn first_fragment_of_selected_traffic_is_dropped() {
    let h = Harness::node().unwrap();
    let pkt = Frame::udp(POD_LOCAL.ip, 5000, SERVER, 53)
        .payload(&[1; 64])
        .fragment(true, 0)
        .build();
    let out = h.pod_ingress(POD_LOCAL, &pkt).unwrap();
    assert_dropped(&h, &out, LOCAL_POLICY, DropReason::Fragment);
    assert_no_flows(&h);
}

#[test]
fn later_fragment_of_selected_traffic_is_dropped() {
    let h = Harness::node().unwrap();
    let pkt = Frame::other(POD_LOCAL.ip, SERVER, 17, &[9; 40])
        .fragment(false, 185)
        .build();
    let out = h.pod_ingress(POD_LOCAL, &pkt).unwrap();
    assert_dropped(&h, &out, LOCAL_POLICY, DropReason::Fragment);
}

#[test]
fn total_length_beyond_the_frame() {
    let h = Harness::node().unwrap();
    let mut pkt = Frame::udp(POD_LOCAL.ip, 5000, SERVER, 53).build();
    let claimed = (pkt.len() - raw::IP + 100) as u16;
    raw::set_total_len(&mut pkt, claimed);
    assert_eq!(
        check::ip_checksum_ok(&pkt),
        Some(true),
        "a sender's valid header"
    );
    let out = h.pod_ingress(POD_LOCAL, &pkt).unwrap();
    match expect::pod_bad_length() {
        // Translated as it is; the receiver discards it (never with another source).
        None => {
            assert_eq!(out.verdict, Verdict::Redirect);
            assert_eq!(check::view(&out.packet).unwrap().src, LOCAL_EGRESS);
            assert_eq!(check::ip_checksum_ok(&out.packet), Some(true));
        }
        Some(reason) => assert_dropped(&h, &out, LOCAL_POLICY, reason),
    }
}

#[test]
fn truncated_transport_header_is_dropped() {
    let h = Harness::node().unwrap();
    let mut pkt = syn();
    // Ports present, TCP flags cut off.
    pkt.truncate(raw::IP + 20 + 10);
    raw::set_total_len(&mut pkt, 30);
    let out = h.pod_ingress(POD_LOCAL, &pkt).unwrap();
    assert_dropped(&h, &out, LOCAL_POLICY, DropReason::Malformed);
    assert_no_flows(&h);
}

#[test]
fn unsupported_protocol_from_a_selected_pod_is_dropped() {
    let h = Harness::node().unwrap();
    let gre = Frame::other(POD_LOCAL.ip, SERVER, 47, &[0; 24]).build();
    let out = h.pod_ingress(POD_LOCAL, &gre).unwrap();
    assert_dropped(&h, &out, LOCAL_POLICY, DropReason::UnsupportedProtocol);
}

#[test]
fn unselected_pod_passes_untouched() {
    let h = Harness::node().unwrap();
    let pkt = Frame::tcp(POD_UNSELECTED.ip, SPORT, SERVER, DPORT, tcp::SYN).build();
    assert_passed_untouched(&h.pod_ingress(POD_UNSELECTED, &pkt).unwrap(), &pkt);
    assert_no_flows(&h);
    for id in 0..=ORPHAN_OPEN_POLICY {
        assert_eq!(h.stats(id).unwrap(), Default::default(), "policy {id}");
    }
}

#[test]
fn mark_selects_traffic_from_an_upstream_device() {
    let mut h = Harness::node().unwrap();
    let mut state = node_state();
    state.marks.insert(0x2ec40e, LOCAL_POLICY);
    h.apply(&state).unwrap();
    // Not a pod of ours: only the mark (openshift-sdn's) selects it.
    let pkt = Frame::udp(CLUSTER_PEER, 5000, SERVER, 53).build();
    let out = h
        .pod_ingress_marked(POD_UNSELECTED, 0x2ec40e, &pkt)
        .unwrap();
    assert_eq!(out.verdict, Verdict::Redirect);
    assert_eq!(check::view(&out.packet).unwrap().src, LOCAL_EGRESS);
    check::all_checksums_ok(&out.packet).unwrap();
}

#[test]
fn ttl_expiring_packet_is_left_to_the_stack() {
    let h = Harness::node().unwrap();
    let pkt = Frame::udp(POD_LOCAL.ip, 5000, SERVER, 53).ttl(1).build();
    let out = h.pod_ingress(POD_LOCAL, &pkt).unwrap();
    match expect::pod_ttl_expired() {
        None => assert_passed_untouched(&out, &pkt),
        Some(reason) => assert_dropped(&h, &out, LOCAL_POLICY, reason),
    }
    assert_no_flows(&h);
}

#[test]
fn policy_change_moves_a_live_flow_to_the_new_egress_ip() {
    let mut h = Harness::node().unwrap();
    h.pod_ingress(POD_LOCAL, &syn()).unwrap();
    let moved = std::net::Ipv4Addr::new(172, 18, 0, 104);
    let mut state = node_state();
    state.policies.get_mut(&LOCAL_POLICY).unwrap().egress_ip = moved;
    h.apply(&state).unwrap();

    let ack = Frame::tcp(POD_LOCAL.ip, SPORT, SERVER, DPORT, tcp::ACK).build();
    let out = h.pod_ingress(POD_LOCAL, &ack).unwrap();
    assert_eq!(out.verdict, Verdict::Redirect);
    assert_eq!(check::view(&out.packet).unwrap().src, moved);
    let flows = h.flows().unwrap();
    assert_eq!(flows.fwd[&tcp_key()].nat_addr, moved.octets());
    assert_eq!(
        flows.rev.len(),
        1,
        "the old reply tuple is released: {flows:?}"
    );
    assert_eq!(
        h.live_flows().unwrap(),
        1,
        "replaced in place, not a new flow"
    );
}

#[test]
fn full_flow_table_refuses_new_flows() {
    let mut h = Harness::node().unwrap();
    h.set_config(|c| c.max_flows = 1).unwrap();
    h.pod_ingress(POD_LOCAL, &syn()).unwrap();
    // Answered, so early drop may not reclaim it.
    let synack = Frame::tcp(SERVER, DPORT, LOCAL_EGRESS, SPORT, tcp::SYN | tcp::ACK).build();
    assert_eq!(
        h.uplink_ingress(&synack).unwrap().verdict,
        Verdict::Redirect
    );
    let other = Frame::tcp(POD_LOCAL.ip, SPORT + 1, SERVER, DPORT, tcp::SYN).build();
    let out = h.pod_ingress(POD_LOCAL, &other).unwrap();
    assert_dropped(&h, &out, LOCAL_POLICY, DropReason::FlowTableFull);
    assert_eq!(h.live_flows().unwrap(), 1);
    // The live flow still goes through.
    let ack = Frame::tcp(POD_LOCAL.ip, SPORT, SERVER, DPORT, tcp::ACK).build();
    assert_eq!(
        h.pod_ingress(POD_LOCAL, &ack).unwrap().verdict,
        Verdict::Redirect
    );
}

#[test]
fn full_table_reclaims_an_unreplied_flow_for_a_new_one() {
    let mut h = Harness::node().unwrap();
    h.set_config(|c| c.max_flows = 1).unwrap();
    h.pod_ingress(POD_LOCAL, &syn()).unwrap();
    let other = Frame::tcp(POD_LOCAL.ip, SPORT + 1, SERVER, DPORT, tcp::SYN).build();
    let out = h.pod_ingress(POD_LOCAL, &other).unwrap();
    assert_eq!(out.verdict, Verdict::Redirect, "retval {}", out.retval);
    let flows = h.flows().unwrap();
    assert!(
        !flows.fwd.contains_key(&tcp_key()),
        "the unanswered flow made room: {flows:?}"
    );
    assert_eq!((flows.fwd.len(), flows.rev.len()), (1, 1), "{flows:?}");
    assert_eq!(h.live_flows().unwrap(), 1);
}

#[test]
fn lone_ack_opens_a_flow_in_the_pickup_state() {
    let h = Harness::node().unwrap();
    let ack = Frame::tcp(POD_LOCAL.ip, SPORT, SERVER, DPORT, tcp::ACK).build();
    assert_eq!(
        h.pod_ingress(POD_LOCAL, &ack).unwrap().verdict,
        Verdict::Redirect
    );
    let entry = h.flows().unwrap().fwd[&tcp_key()];
    assert_eq!(CtState::from_u8(entry.state), expect::first_ack_state());
}

/// Found by the fuzz target: a TCP header cut short after the flags (ports
/// and flags parse, the checksum field is missing) used to create a flow,
/// then fail the checksum rewrite (`rewrite_failed`) and leave the flow in
/// the table. The parser now asks for the whole fixed header first.
#[test]
fn tcp_header_cut_after_the_flags_makes_no_flow() {
    let h = Harness::node().unwrap();
    let mut pkt = Frame::tcp(POD_LOCAL.ip, SPORT, SERVER, DPORT, tcp::ACK).build();
    pkt.truncate(raw::IP + 20 + 14);
    raw::set_total_len(&mut pkt, 34);
    let out = h.pod_ingress(POD_LOCAL, &pkt).unwrap();
    assert_dropped(&h, &out, LOCAL_POLICY, DropReason::Malformed);
    assert_no_flows(&h);
}
