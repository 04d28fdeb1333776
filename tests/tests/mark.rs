//! openshift-sdn style classification: packets carrying a policy's
//! `skb->mark` on an upstream device (OVS's `tun0` there) are translated,
//! whatever their source address.
//!
//! The node stands in for OVS: iptables marks the pod's packets and policy
//! routing sends marked packets through a veth pair (`vethm1` -> `vethm0`)
//! inside the node, so they arrive on `vethm0` with the mark, as they would
//! on `tun0`. The agent attaches `pod_ingress` to it like to any `veth*`.

use std::{net::Ipv4Addr, time::Duration};

use egress_lab::{LabSpec, PodRef, exec_in};
use egress_tests::{Cluster, opts};

const MARK: u32 = 0x2ec40e;
const EGRESS_A: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 100);

fn sh(c: &Cluster, ns: &str, cmd: &str) -> String {
    let args: Vec<&str> = cmd.split_whitespace().collect();
    let out = c.expect(cmd, exec_in(ns, args[0], &args[1..]));
    out.stdout
}

#[test]
fn marked_packets_leave_with_the_policy_egress_ip() {
    let mut s = LabSpec::default();
    s.policies[0].marks = vec![MARK];
    let c = Cluster::new(s);
    let pod = PodRef::new(1, 2);
    // Selected by no pod address: before the mark is set it leaves as its node.
    c.check_tcp(pod, opts());

    let node = c.lab.node_ns(1);
    sh(&c, &node, "ip link add vethm1 type veth peer name vethm0");
    sh(&c, &node, "ip link set vethm0 up");
    sh(&c, &node, "ip link set vethm1 up");
    let link = sh(&c, &node, "ip -o link show dev vethm0");
    let mac = link
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .unwrap_or_else(|| c.fail(format!("no MAC in {link}")))
        .to_owned();
    sh(
        &c,
        &node,
        &format!("ip neigh add 169.254.99.1 lladdr {mac} dev vethm1 nud permanent"),
    );
    sh(
        &c,
        &node,
        &format!("ip rule add fwmark {MARK:#x} lookup 100"),
    );
    sh(
        &c,
        &node,
        "ip route add default via 169.254.99.1 dev vethm1 onlink table 100",
    );
    sh(
        &c,
        &node,
        "iptables -t nat -I POSTROUTING -o vethm1 -j RETURN",
    );
    sh(
        &c,
        &node,
        &format!(
            "iptables -t mangle -A PREROUTING -s {} -d 198.51.100.0/24 -j MARK --set-mark {MARK:#x}",
            pod.ip()
        ),
    );

    let probe = c.wait_leaves_with(
        pod,
        EGRESS_A,
        Duration::from_secs(15),
        &format!("once its packets carry mark {MARK:#x}"),
    );
    if !c.tcp.saw(probe.observed) {
        c.fail(format!("the server's log lacks {}", probe.observed));
    }
    let stats = c.expect("stats", c.lab.agent(1).stats());
    let flows = stats
        .counter(1, "new_flows")
        .unwrap_or_else(|e| c.fail(format!("{e}\n{}", stats.raw)));
    assert!(flows >= 1, "policy 1 counted no new flow:\n{}", stats.raw);
}
