//! Several egress IPs of one EgressIP (static mode: policies of one group):
//! when a pod's choice moves to another IP of its group, its established
//! flows keep the IP they started with for as long as it is held; a flow
//! whose IP is no longer held moves.

use std::{net::Ipv4Addr, time::Duration};

use egress_lab::{ClientOpts, LabSpec, PodRef, PolicySpec, TcpConn, traffic::wait_for, udp_probe};
use egress_tests::{Cluster, TCP, UDP, opts};

const FIRST: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 100);
const SECOND: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 102);

fn from_port(port: u16) -> ClientOpts {
    ClientOpts {
        local_port: Some(port),
        ..opts()
    }
}

/// Waits until a UDP probe of `ns` (with `opts`) leaves with `want`.
fn leaves_with(c: &Cluster, what: &str, ns: &str, opts: ClientOpts, want: Ipv4Addr) {
    let seen = wait_for(what, Duration::from_secs(10), || {
        let p = udp_probe(ns, UDP, opts).map_err(|e| e.to_string())?;
        if *p.observed.ip() == want {
            Ok(p)
        } else {
            Err(format!("seen as {}", p.observed))
        }
    });
    c.expect(what, seen);
}

/// `pod`, on policy 1 (`FIRST`, held by node1) of the group team-a, opens
/// a TCP connection and a UDP flow from `port`; then its choice moves to
/// the group's second IP (`SECOND`, policy 3, held by node `second_node`):
/// new flows leave with `SECOND`, the established ones keep `FIRST`; once
/// policy 1 is gone, the UDP flow moves to `SECOND`. `flow` names the flow
/// in messages.
fn flows_keep_their_ip_while_it_is_held(
    pod: PodRef,
    second_node: u8,
    port: u16,
    flow: &str,
    spec: LabSpec,
) {
    let mut spec = spec;
    spec.policies[0].group = Some("team-a".into());
    spec.policies.push(PolicySpec {
        name: "team-a-2".into(),
        group: Some("team-a".into()),
        ..PolicySpec::new(3, SECOND, Some(second_node), Vec::new())
    });
    let mut c = Cluster::new(spec);
    let ns = c.ns(pod);

    let conn = c.expect("TCP from the pod", TcpConn::open(&ns, TCP, opts()));
    assert_eq!(*conn.observed.ip(), FIRST, "{}", conn.observed);
    let udp = c.expect(
        &format!("UDP from port {port}"),
        udp_probe(&ns, UDP, from_port(port)),
    );
    assert_eq!(*udp.observed.ip(), FIRST);

    // The pod's choice moves to the group's second IP (as rendezvous
    // hashing does when an IP comes back or is added).
    let moved = c.lab.update_spec(|s| {
        s.policies[0].pods.retain(|p| *p != pod);
        s.policies[2].pods.push(pod);
    });
    c.expect("moving the pod to policy 3", moved);
    leaves_with(
        &c,
        &format!("a new flow of the pod leaves with the second IP, through node{second_node}"),
        &ns,
        opts(),
        SECOND,
    );

    // Established flows stay where they started.
    let again = c.expect(
        &format!("UDP from port {port} again"),
        udp_probe(&ns, UDP, from_port(port)),
    );
    if *again.observed.ip() != FIRST {
        c.fail(format!(
            "the established {flow} moved to {} while {FIRST} is still held",
            again.observed
        ));
    }
    let t = c.expect(
        "the TCP connection opened before the move carries data both ways",
        conn.transfer(512 * 1024, None),
    );
    assert_eq!(*t.observed.ip(), FIRST);

    // The first IP is no longer held: its flows move (replaced in place).
    let removed = c.lab.update_spec(|s| {
        s.policies.remove(0);
    });
    c.expect("removing policy 1", removed);
    leaves_with(
        &c,
        &format!("the {flow} moves to the second IP once the first is gone"),
        &ns,
        from_port(port),
        SECOND,
    );
}

#[test]
fn established_flows_keep_their_egress_ip_while_it_is_held() {
    flows_keep_their_ip_while_it_is_held(
        PodRef::new(1, 1),
        1,
        40123,
        "UDP flow",
        LabSpec::default(),
    );
}

/// The same for a pod whose EgressIP's IPs are held by other nodes: its
/// node keeps steering an established flow to the node of the IP it
/// started with (node1) while that IP is held, new flows go to the
/// second IP's node (node3), and once the first IP is gone the flow moves.
#[test]
fn steered_flows_keep_their_egress_node_while_their_ip_is_held() {
    let pod = PodRef::new(2, 1);
    let mut spec = LabSpec::default();
    spec.policies[0].pods = vec![pod];
    flows_keep_their_ip_while_it_is_held(pod, 3, 40124, "steered UDP flow", spec);
}
