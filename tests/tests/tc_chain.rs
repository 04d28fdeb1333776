//! Good neighbour in the TC pipeline: traffic the datapath does not own goes
//! on (TCX "next", `TC_ACT_UNSPEC`) to whatever else is attached to the same
//! hook, here a classic tc filter (as the bandwidth plugin or a policer
//! would be) on a pod's host interface and on the uplink.

use std::{net::SocketAddrV4, time::Duration};

use egress_lab::{LabSpec, PodRef, exec_in, spec, traffic::udp_send, traffic::wait_for};
use egress_tests::{Cluster, UDP, opts};

/// A classic tc filter on `dev`'s ingress that steals UDP to `port` into a
/// veth pair of its own (`sink`), where nothing listens.
fn steal_udp(c: &Cluster, ns: &str, dev: &str, port: u16, sink: &str) {
    let peer = format!("{sink}p");
    let port = port.to_string();
    let run = |args: &[&str]| {
        c.expect(
            &format!("{} in {ns}", args.join(" ")),
            exec_in(ns, args[0], &args[1..]),
        );
    };
    run(&[
        "ip", "link", "add", sink, "type", "veth", "peer", "name", &peer,
    ]);
    run(&["ip", "link", "set", sink, "up"]);
    run(&["ip", "link", "set", &peer, "up"]);
    run(&["tc", "qdisc", "add", "dev", dev, "clsact"]);
    run(&[
        "tc", "filter", "add", "dev", dev, "ingress", "protocol", "ip", "u32", "match", "ip",
        "dport", &port, "0xffff", "match", "ip", "protocol", "17", "0xff", "action", "mirred",
        "egress", "redirect", "dev", sink,
    ]);
}

/// Packets the classic filter's action has handled on `dev`.
fn stolen(c: &Cluster, ns: &str, dev: &str) -> u64 {
    let out = c.expect(
        "tc filter show",
        exec_in(
            ns,
            "tc",
            &["-s", "-j", "filter", "show", "dev", dev, "ingress"],
        ),
    );
    let v: serde_json::Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| c.fail(format!("tc -j: {e}: {}", out.stdout)));
    fn packets(v: &serde_json::Value) -> u64 {
        match v {
            serde_json::Value::Object(m) => {
                let here = m
                    .get("actions")
                    .and_then(|a| a.as_array())
                    .map(|acts| {
                        acts.iter()
                            .map(|a| a["stats"]["packets"].as_u64().unwrap_or(0))
                            .sum()
                    })
                    .unwrap_or(0);
                here + m.values().map(packets).sum::<u64>()
            }
            serde_json::Value::Array(a) => a.iter().map(packets).sum(),
            _ => 0,
        }
    }
    packets(&v)
}

#[test]
fn classic_tc_filters_beside_ours_see_traffic_we_do_not_own() {
    let c = Cluster::new(LabSpec::default());
    let node1 = c.lab.node_ns(1);
    let unselected = PodRef::new(1, 2);
    let port = spec::SERVER_UDP_PORT;

    // A pod's host-side interface, where pod_ingress runs.
    steal_udp(&c, &node1, &unselected.host_interface(), port, "dpsink0");
    c.udp.clear();
    for i in 0..3u16 {
        c.expect(
            "UDP from the unselected pod",
            udp_send(
                &c.ns(unselected),
                SocketAddrV4::new(unselected.ip(), 46000 + i),
                UDP,
                b"for the classic filter".to_vec(),
            ),
        );
    }
    let counted = wait_for(
        "the classic filter on the pod interface acts",
        Duration::from_secs(5),
        || match stolen(&c, &node1, &unselected.host_interface()) {
            n if n >= 3 => Ok(n),
            n => Err(format!("{n} packets")),
        },
    );
    c.expect("classic filter", counted);
    std::thread::sleep(Duration::from_millis(300));
    if !c.udp.seen().is_empty() {
        c.fail(format!(
            "the server got what the classic filter should have taken: {:?}",
            c.udp.seen()
        ));
    }

    // The uplink, where uplink_ingress runs.
    steal_udp(&c, &node1, "eth0", port, "dpsink1");
    for i in 0..3u16 {
        c.expect(
            "UDP from the router to node1",
            udp_send(
                &c.lab.router_ns(),
                SocketAddrV4::new(spec::ROUTER_NODE_ADDR, 47000 + i),
                SocketAddrV4::new(spec::node_addr(1), port),
                b"for the classic filter".to_vec(),
            ),
        );
    }
    let counted = wait_for(
        "the classic filter on the uplink acts",
        Duration::from_secs(5),
        || match stolen(&c, &node1, "eth0") {
            n if n >= 3 => Ok(n),
            n => Err(format!("{n} packets")),
        },
    );
    c.expect("classic filter on the uplink", counted);

    // Traffic we own is ours alone: selected pods still leave translated.
    c.check_tcp(PodRef::new(1, 1), opts());
    c.check_tcp(PodRef::new(2, 1), opts());
}
