//! A pod is who its interface says it is: a selected pod's address on any
//! other pod's interface is refused (`invalid_source`), a selected address
//! whose interface the agent cannot find is refused until it can, and a
//! pod with several addresses keeps working.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use egress_lab::{
    LabSpec, PodRef,
    traffic::{ipv4_udp, raw_ipv4_send, udp_send, wait_for},
};
use egress_tests::{Cluster, UDP, opts};

/// An unselected pod with CAP_NET_RAW forges its selected neighbour's
/// source, on the egress node (policy 1 translates there) and on another
/// node (policy 1 steers to node1): nothing reaches the server.
#[test]
fn a_pod_cannot_borrow_a_selected_neighbours_address() {
    let c = Cluster::new(LabSpec::default());
    for (node, port) in [(1u8, 46001u16), (2, 46002)] {
        let forger = PodRef::new(node, 2);
        let victim = PodRef::new(node, 1);
        let before = c.drops(node, 0, "invalid_source");
        for i in 0..3 {
            c.expect(
                &format!("raw datagram from {forger} as {victim}"),
                raw_ipv4_send(
                    &c.ns(forger),
                    ipv4_udp(
                        SocketAddrV4::new(victim.ip(), port),
                        UDP,
                        format!("spoofed {i}").as_bytes(),
                    ),
                ),
            );
        }
        c.assert_udp_unseen(&format!("{forger} forging {victim}'s source"), None, port);
        c.wait_drops(node, 0, "invalid_source", before + 3);
        // The victim itself still leaves with its egress IP.
        c.check_udp(victim, opts());
    }
}

/// A selected address whose host-side interface cannot be found (here: no
/// route to it yet) is refused, not treated as unselected; once the route
/// appears the agent finds the interface and the address leaves with its
/// egress IP, beside the pod's first address.
#[test]
fn a_second_address_is_refused_until_its_interface_is_found() {
    let mut c = Cluster::new(LabSpec::default());
    let pod = PodRef::new(1, 1);
    let second = Ipv4Addr::new(10, 244, 1, 111);
    let egress = c.lab.spec().policies[0].egress_ip;
    c.sh(&c.ns(pod), &format!("ip addr add {second}/32 dev eth0"));
    let selected = c.lab.update_spec(|s| s.policies[0].addresses.push(second));
    c.expect("selecting the pod's second address", selected);
    let logged = wait_for(
        "the agent says why the second address has no interface",
        Duration::from_secs(10),
        || {
            let log = std::fs::read_to_string(&c.lab.agent(1).log).unwrap_or_default();
            if log.contains("cannot find the selected pod's host-side interface")
                && log.contains(&second.to_string())
            {
                Ok(())
            } else {
                Err("not yet".to_string())
            }
        },
    );
    c.expect("log line", logged);
    let before = c.drops(1, 0, "invalid_source");
    for i in 0..3u16 {
        c.expect(
            "datagram from the second address",
            udp_send(
                &c.ns(pod),
                SocketAddrV4::new(second, 47000 + i),
                UDP,
                b"unresolved".to_vec(),
            ),
        );
    }
    c.assert_udp_unseen("the unresolved second address", None, 47000);
    c.wait_drops(1, 0, "invalid_source", before + 3);

    // The CNI's route to it appears: found within a reconcile tick.
    c.sh(
        &c.lab.node_ns(1),
        &format!("ip route add {second}/32 dev {}", pod.host_interface()),
    );
    let out = wait_for(
        "the second address leaves with the egress IP",
        Duration::from_secs(10),
        || {
            udp_send(
                &c.ns(pod),
                SocketAddrV4::new(second, 47100),
                UDP,
                b"resolved".to_vec(),
            )
            .map_err(|e| e.to_string())?;
            std::thread::sleep(Duration::from_millis(200));
            c.udp
                .seen()
                .into_iter()
                .find(|s| s.peer.port() == 47100)
                .ok_or_else(|| "not seen yet".to_string())
        },
    );
    let seen = c.expect("second address through", out);
    assert_eq!(*seen.peer.ip(), egress, "{seen:?}");
    // The pod's first address is unaffected.
    c.check_udp(pod, opts());
}
