//! A selected pod whose egress IP no live node holds is dropped and counted
//! (fail-closed), never leaked with its pod or node address; with fail-open
//! it leaves with its node's address.

use std::{net::Ipv4Addr, time::Duration};

use egress_lab::{ClientOpts, LabSpec, PodRef, spec, tcp_probe};
use egress_model::FailurePolicy;
use egress_tests::{Cluster, TCP, opts};

fn no_node(failure_policy: FailurePolicy) -> LabSpec {
    let mut s = LabSpec::default();
    s.policies[0].node = None;
    s.policies[0].failure_policy = failure_policy;
    s
}

#[test]
fn fail_closed_drops_and_counts_without_leaking() {
    let c = Cluster::new(no_node(FailurePolicy::FailClosed));
    let quick = ClientOpts {
        timeout: Duration::from_secs(2),
        ..opts()
    };
    // One pod on a node that would have translated, one that would have steered.
    for pod in [PodRef::new(1, 1), PodRef::new(2, 1)] {
        if let Ok(p) = tcp_probe(&c.ns(pod), TCP, quick) {
            c.fail(format!(
                "{pod} reached the server as {} although no node holds its egress IP",
                p.observed
            ));
        }
        let node = c.expect("stats", c.lab.agent(pod.node).stats());
        let drops = node
            .drops(1, "no_egress_node")
            .unwrap_or_else(|e| c.fail(format!("stats: {e}\n{}", node.raw)));
        if drops == 0 {
            c.fail(format!(
                "node {} counted no no_egress_node drop for policy 1:\n{}",
                pod.node, node.raw
            ));
        }
    }
    // Nothing reached the server: not as the pod, not as its node.
    let leaked: Vec<_> = c.tcp.seen().into_iter().map(|s| s.peer).collect();
    if !leaked.is_empty() {
        c.fail(format!("the server saw the selected pods as {leaked:?}"));
    }
    // Unselected pods are unaffected.
    c.check_tcp(PodRef::new(1, 2), opts());
}

#[test]
fn fail_open_leaves_with_the_node_address() {
    let c = Cluster::new(no_node(FailurePolicy::FailOpen));
    for n in [1u8, 2] {
        let pod = PodRef::new(n, 1);
        let p = c.expect("probe", tcp_probe(&c.ns(pod), TCP, opts()));
        let want: Ipv4Addr = spec::node_addr(n);
        if *p.observed.ip() != want {
            c.fail(format!(
                "{pod} left as {}, expected its node address {want}",
                p.observed
            ));
        }
    }
}
