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

#[test]
fn established_flows_keep_their_egress_ip_while_it_is_held() {
    let mut spec = LabSpec::default();
    let pod = PodRef::new(1, 1);
    spec.policies[0].group = Some("team-a".into());
    spec.policies.push(PolicySpec {
        name: "team-a-2".into(),
        group: Some("team-a".into()),
        ..PolicySpec::new(3, SECOND, Some(1), Vec::new())
    });
    let mut c = Cluster::new(spec);
    let ns = c.ns(pod);

    let conn = c.expect("TCP from the pod", TcpConn::open(&ns, TCP, opts()));
    assert_eq!(*conn.observed.ip(), FIRST, "{}", conn.observed);
    let udp = c.expect("UDP from port 40123", udp_probe(&ns, UDP, from_port(40123)));
    assert_eq!(*udp.observed.ip(), FIRST);

    // The pod's choice moves to the group's second IP (as rendezvous
    // hashing does when an IP comes back or is added).
    let moved = c.lab.update_spec(|s| {
        s.policies[0].pods.retain(|p| *p != pod);
        s.policies[2].pods.push(pod);
    });
    c.expect("moving the pod to policy 3", moved);
    let fresh = wait_for(
        "a new flow of the pod leaves with the second IP",
        Duration::from_secs(10),
        || {
            let p = udp_probe(&ns, UDP, opts()).map_err(|e| e.to_string())?;
            if *p.observed.ip() == SECOND {
                Ok(p)
            } else {
                Err(format!("seen as {}", p.observed))
            }
        },
    );
    c.expect("new flow", fresh);

    // Established flows stay where they started.
    let again = c.expect(
        "UDP from port 40123 again",
        udp_probe(&ns, UDP, from_port(40123)),
    );
    if *again.observed.ip() != FIRST {
        c.fail(format!(
            "the established UDP flow moved to {} while {FIRST} is still held",
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
    let moved = wait_for(
        "the UDP flow moves to the second IP once the first is gone",
        Duration::from_secs(10),
        || {
            let p = udp_probe(&ns, UDP, from_port(40123)).map_err(|e| e.to_string())?;
            if *p.observed.ip() == SECOND {
                Ok(p)
            } else {
                Err(format!("seen as {}", p.observed))
            }
        },
    );
    c.expect("flow moved", moved);
}

/// The same for a pod whose EgressIP's IPs are held by other nodes: its
/// node keeps steering an established flow to the node of the IP it
/// started with (node1) while that IP is held, new flows go to the
/// second IP's node (node3), and once the first IP is gone the flow moves.
#[test]
fn steered_flows_keep_their_egress_node_while_their_ip_is_held() {
    let mut spec = LabSpec::default();
    let pod = PodRef::new(2, 1);
    spec.policies[0].group = Some("team-a".into());
    spec.policies[0].pods = vec![pod];
    spec.policies.push(PolicySpec {
        name: "team-a-2".into(),
        group: Some("team-a".into()),
        ..PolicySpec::new(3, SECOND, Some(3), Vec::new())
    });
    let mut c = Cluster::new(spec);
    let ns = c.ns(pod);

    let conn = c.expect("TCP from the pod", TcpConn::open(&ns, TCP, opts()));
    assert_eq!(*conn.observed.ip(), FIRST, "{}", conn.observed);
    let udp = c.expect("UDP from port 40124", udp_probe(&ns, UDP, from_port(40124)));
    assert_eq!(*udp.observed.ip(), FIRST);

    let moved = c.lab.update_spec(|s| {
        s.policies[0].pods.clear();
        s.policies[2].pods.push(pod);
    });
    c.expect("moving the pod to policy 3", moved);
    let fresh = wait_for(
        "a new flow of the pod leaves with the second IP, through node3",
        Duration::from_secs(10),
        || {
            let p = udp_probe(&ns, UDP, opts()).map_err(|e| e.to_string())?;
            if *p.observed.ip() == SECOND {
                Ok(p)
            } else {
                Err(format!("seen as {}", p.observed))
            }
        },
    );
    c.expect("new flow", fresh);

    let again = c.expect(
        "UDP from port 40124 again",
        udp_probe(&ns, UDP, from_port(40124)),
    );
    if *again.observed.ip() != FIRST {
        c.fail(format!(
            "the established steered UDP flow moved to {} while {FIRST} is still held",
            again.observed
        ));
    }
    let t = c.expect(
        "the TCP connection opened before the move carries data both ways",
        conn.transfer(512 * 1024, None),
    );
    assert_eq!(*t.observed.ip(), FIRST);

    let removed = c.lab.update_spec(|s| {
        s.policies.remove(0);
    });
    c.expect("removing policy 1", removed);
    let moved = wait_for(
        "the steered UDP flow moves to the second IP once the first is gone",
        Duration::from_secs(10),
        || {
            let p = udp_probe(&ns, UDP, from_port(40124)).map_err(|e| e.to_string())?;
            if *p.observed.ip() == SECOND {
                Ok(p)
            } else {
                Err(format!("seen as {}", p.observed))
            }
        },
    );
    c.expect("flow moved", moved);
}
