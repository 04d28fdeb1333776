//! ICMP errors about translated flows come back to the pod translated, in
//! the outer and the embedded header: a time-exceeded from the router,
//! addressed to the egress IP, reaches the pod's socket (which only accepts
//! it if the quoted packet carries the pod's own address and port).

use std::{net::Ipv4Addr, time::Duration};

use egress_lab::{
    LabSpec, PodRef, spec,
    traffic::{Hop, udp_trace},
};
use egress_tests::{Cluster, UDP};

const EGRESS_A: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 100);

#[test]
fn time_exceeded_from_the_router_reaches_selected_pods() {
    let c = Cluster::new(LabSpec::default());
    for pod in [PodRef::new(1, 1), PodRef::new(2, 1)] {
        let hops = c.expect(
            &format!("UDP trace from {pod}"),
            udp_trace(&c.ns(pod), UDP, 8, Duration::from_secs(2)),
        );
        eprintln!("trace from {pod}: {hops:?}");
        if !hops.contains(&Hop::TimeExceeded(spec::ROUTER_NODE_ADDR)) {
            c.fail(format!(
                "{pod}: the router's time-exceeded (sent to {EGRESS_A}) never reached the pod: {hops:?}"
            ));
        }
        match hops.last() {
            Some(Hop::Reached(seen)) if *seen.ip() == EGRESS_A => {}
            other => c.fail(format!(
                "{pod}: trace ended with {other:?}, expected the server to see {EGRESS_A}: {hops:?}"
            )),
        }
    }
}
