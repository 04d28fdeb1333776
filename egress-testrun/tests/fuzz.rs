//! The fuzz target, bounded and with a fixed seed, as an ordinary test (a few
//! seconds); `cargo xtask fuzz --duration S` runs it long. Needs root.

use egress_common::{FlowKeyV4, proto};
use egress_testrun::{
    Harness,
    fuzz::{self, Limits},
    invariants,
    packet::{Frame, tcp},
    world::*,
};

const SEED: u64 = 0x5eed_0007;
const PACKETS: u64 = 2000;

#[test]
fn fixed_seed_run_keeps_every_invariant() {
    let summary = fuzz::run(
        SEED,
        Limits {
            duration: None,
            packets: Some(PACKETS),
        },
    )
    .unwrap();
    println!("{}", summary.render());
    assert_eq!(summary.packets, PACKETS);
    assert_eq!(summary.failures(), 0, "{}", summary.render());
    // The run reached the interesting paths at all, or it proves nothing.
    let reached = [
        ("pod_ingress", &["pass", "drop", "redirect"][..]),
        ("uplink_ingress", &["pass", "drop", "redirect"][..]),
        // tunnel_ingress never passes: everything on the tunnel is ours.
        ("tunnel_ingress", &["drop", "redirect"][..]),
    ];
    for (program, verdicts) in reached {
        for verdict in verdicts {
            assert!(
                summary
                    .verdicts
                    .contains_key(&(program, verdict.to_string())),
                "no {verdict} from {program}:\n{}",
                summary.render()
            );
        }
    }
    assert!(summary.flows_at_end > 10, "{}", summary.render());
}

#[test]
fn table_invariants_catch_an_entry_deleted_behind_the_datapath() {
    let mut h = Harness::node().unwrap();
    let syn = Frame::tcp(POD_LOCAL.ip, 40000, SERVER, 80, tcp::SYN).build();
    h.pod_ingress(POD_LOCAL, &syn).unwrap();
    assert_eq!(
        invariants::check_tables(&h.flows().unwrap(), h.live_flows().unwrap()),
        vec![]
    );
    h.delete_forward(&FlowKeyV4::new(
        POD_LOCAL.ip.octets(),
        SERVER.octets(),
        40000,
        80,
        proto::TCP,
    ))
    .unwrap();
    let found: Vec<&str> = invariants::check_tables(&h.flows().unwrap(), h.live_flows().unwrap())
        .iter()
        .map(|v| v.invariant)
        .collect();
    assert_eq!(found, ["twins", "flow_count"]);
}

#[test]
fn credential_invariant_catches_a_node_address_leak() {
    // What a fail-closed pod's packet passed to the stack looks like: the
    // invariant must call it a leak (and not one to an excluded destination).
    let pkt = Frame::udp(POD_ORPHAN_CLOSED.ip, 5000, SERVER, 53).build();
    let passed = egress_testrun::Outcome {
        retval: 0,
        verdict: egress_testrun::expect::Verdict::Pass,
        packet: pkt.clone(),
    };
    let flows = egress_testrun::Flows::default();
    let found = invariants::check_packet(
        invariants::Ingress::Pod(POD_ORPHAN_CLOSED),
        &pkt,
        &passed,
        &flows,
    );
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].invariant, "credential");
    let to_cluster = Frame::udp(POD_ORPHAN_CLOSED.ip, 5000, CLUSTER_PEER, 53).build();
    let passed = egress_testrun::Outcome {
        packet: to_cluster.clone(),
        ..passed
    };
    assert!(
        invariants::check_packet(
            invariants::Ingress::Pod(POD_ORPHAN_CLOSED),
            &to_cluster,
            &passed,
            &flows,
        )
        .is_empty()
    );
}

#[test]
fn steered_invariant_catches_a_packet_steered_without_its_entry() {
    // A steered pod's packet redirected unchanged, with no STEERED entry
    // left behind: its replies could never be told from forged ones.
    let pkt = Frame::udp(POD_STEERED.ip, 5000, SERVER, 53).build();
    let redirected = egress_testrun::Outcome {
        retval: 7,
        verdict: egress_testrun::expect::Verdict::Redirect,
        packet: pkt.clone(),
    };
    let flows = egress_testrun::Flows::default();
    let found = invariants::check_packet(
        invariants::Ingress::Pod(POD_STEERED),
        &pkt,
        &redirected,
        &flows,
    );
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].invariant, "steered");
}

#[test]
fn tunnel_invariant_catches_a_reply_delivered_from_the_wrong_node() {
    // A steered flow of the pod's towards node2, and a reply for it that
    // tunnel_ingress would have delivered from node1's own address.
    let key = FlowKeyV4::new(
        POD_STEERED.ip.octets(),
        SERVER.octets(),
        5000,
        53,
        proto::UDP,
    );
    let mut flows = egress_testrun::Flows::default();
    flows.fwd.insert(
        key,
        egress_common::NatEntryV4 {
            origin_node: NODE2.octets(),
            flags: egress_common::ct_flags::STEERED,
            policy_id: STEERED_POLICY,
            ..Default::default()
        },
    );
    let reply = Frame::udp(SERVER, 53, POD_STEERED.ip, 5000).build();
    let delivered = egress_testrun::Outcome {
        retval: 7,
        verdict: egress_testrun::expect::Verdict::Redirect,
        packet: reply.clone(),
    };
    let from = |remote| {
        invariants::check_packet(
            invariants::Ingress::Tunnel {
                remote,
                vni: STEERED_POLICY,
            },
            &reply,
            &delivered,
            &flows,
        )
    };
    assert!(from(NODE2).is_empty(), "{:?}", from(NODE2));
    let found = from(NODE);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].invariant, "credential");
}
