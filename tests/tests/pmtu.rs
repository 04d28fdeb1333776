//! Path-MTU discovery through the egress IP: the router's
//! fragmentation-needed, addressed to the egress IP, must come back to the
//! pod translated (outer and embedded header), locally and through the tunnel.

use std::{net::Ipv4Addr, time::Duration};

use egress_lab::{ClientOpts, LabSpec, PodRef, tcp_bulk, udp_path_mtu};
use egress_tests::{Cluster, TCP, UDP, opts};

const EGRESS_A: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 100);

/// Client options for the bulk transfers: more time than a probe gets.
fn bulk_opts() -> ClientOpts {
    ClientOpts {
        timeout: Duration::from_secs(15),
        ..opts()
    }
}

#[test]
fn fragmentation_needed_reaches_selected_pods_translated() {
    let c = Cluster::new(LabSpec::default());
    for pod in [PodRef::new(1, 1), PodRef::new(2, 1)] {
        c.check_udp(pod, opts());
        // 1472 bytes of UDP payload fill a 1500-byte packet with DF set; the
        // pod's kernel lowers its path MTU only if the ICMP error it gets
        // quotes its own address and port, i.e. if it was translated back.
        // Remote pods lose 50 bytes to the tunnel on the way.
        let payload = if pod.node == 1 { 1472 } else { 1422 };
        let mtu = c.expect(
            &format!("path-MTU probe from {pod}"),
            udp_path_mtu(&c.ns(pod), UDP, payload, Duration::from_secs(5)),
        );
        if mtu != 1400 {
            c.fail(format!(
                "{pod}: path MTU to the server is {mtu} after a {payload}-byte DF datagram, expected 1400 from the router's fragmentation-needed"
            ));
        }
    }
}

#[test]
fn large_transfers_cross_the_small_mtu_link() {
    let c = Cluster::new(LabSpec::default());
    // The server advertises MSS 1460 over a 1400-byte link: the transfer
    // stalls unless fragmentation-needed reaches the pod.
    for pod in [PodRef::new(1, 1), PodRef::new(2, 1)] {
        let t = c.expect(
            &format!("32 MiB from {pod}"),
            tcp_bulk(&c.ns(pod), TCP, 32 << 20, None, bulk_opts()),
        );
        if *t.observed.ip() != EGRESS_A {
            c.fail(format!(
                "{pod}: server saw {}, expected {EGRESS_A}",
                t.observed
            ));
        }
    }
}

fn capture_syn(c: &Cluster, during: impl FnOnce()) -> String {
    egress_tests::capture(
        &c.lab.server_ns(),
        "tcp[tcpflags] == tcp-syn and dst port 8080",
        during,
    )
}

#[test]
fn steered_tcp_is_clamped_to_fit_the_tunnel() {
    // No bottleneck beyond the tunnel: only MSS clamping can make a
    // full-size pod segment plus 50 bytes of VXLAN fit the 1500-byte uplink.
    let c = Cluster::new(LabSpec {
        server_link_mtu: 1500,
        server_advmss: None,
        ..LabSpec::default()
    });
    let pod = PodRef::new(2, 1);
    let syn = capture_syn(&c, || {
        c.check_tcp(pod, opts());
    });
    if !syn.contains("mss 1410") {
        c.fail(format!(
            "the steered SYN of {pod} reached the server without MSS 1410: {syn}"
        ));
    }
    // A local pod's SYN is not clamped.
    let local = capture_syn(&c, || {
        c.check_tcp(PodRef::new(1, 1), opts());
    });
    if !local.contains("mss 1460") {
        c.fail(format!("the local pod's SYN lost its MSS 1460: {local}"));
    }
    let t = c.expect(
        "16 MiB steered through the tunnel",
        tcp_bulk(&c.ns(pod), TCP, 16 << 20, None, bulk_opts()),
    );
    if *t.observed.ip() != EGRESS_A {
        c.fail(format!("{pod}: server saw {}", t.observed));
    }
}

/// Node 1 reaches the server through a link narrower (MTU 1300) than the
/// pods' and the tunnel's: its own `bpf_fib_lookup` says "fragmentation
/// needed" for full-size pod packets, before any router could.
fn narrow_path_from_node1(c: &Cluster) {
    let (router, node1) = (c.lab.router_ns(), c.lab.node_ns(1));
    let run = |ns: &str, args: &[&str]| {
        c.expect(
            &format!("{} in {ns}", args.join(" ")),
            egress_lab::exec_in(ns, args[0], &args[1..]),
        );
    };
    run(
        &router,
        &[
            "ip", "link", "add", "dpnarrow", "type", "veth", "peer", "name", "dpnarrow", "netns",
            &node1,
        ],
    );
    for (ns, addr) in [(&router, "192.0.2.2/30"), (&node1, "192.0.2.1/30")] {
        run(ns, &["ip", "addr", "add", addr, "dev", "dpnarrow"]);
        run(ns, &["ip", "link", "set", "dpnarrow", "mtu", "1300", "up"]);
    }
    // Replies go back through the node network: no reverse-path check here.
    run(
        &router,
        &[
            "sysctl",
            "-qw",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.dpnarrow.rp_filter=0",
        ],
    );
    run(
        &node1,
        &[
            "ip",
            "route",
            "replace",
            "198.51.100.0/24",
            "via",
            "192.0.2.2",
            "dev",
            "dpnarrow",
        ],
    );
}

#[test]
fn the_egress_node_sends_fragmentation_needed_for_what_it_cannot_forward() {
    let c = Cluster::new(LabSpec::default());
    for pod in [PodRef::new(1, 1), PodRef::new(2, 1)] {
        c.check_udp(pod, opts());
    }
    narrow_path_from_node1(&c);
    let stats = || c.expect("stats", c.lab.agent(1).stats());
    let before = stats()
        .drops(1, "mtu_exceeded")
        .unwrap_or_else(|e| c.fail(e));
    // A local pod gets the error out of its own interface; a pod on node 2
    // through the tunnel, quoting its own untranslated packet.
    for pod in [PodRef::new(1, 1), PodRef::new(2, 1)] {
        let payload = if pod.node == 1 { 1472 } else { 1422 };
        let mtu = c.expect(
            &format!("path-MTU probe from {pod}"),
            udp_path_mtu(&c.ns(pod), UDP, payload, Duration::from_secs(5)),
        );
        if mtu != 1300 {
            c.fail(format!(
                "{pod}: path MTU is {mtu} after a {payload}-byte DF datagram, expected 1300 from node1's fragmentation-needed"
            ));
        }
    }
    let after = stats()
        .drops(1, "mtu_exceeded")
        .unwrap_or_else(|e| c.fail(e));
    if after < before + 2 {
        c.fail(format!("mtu_exceeded went from {before} to {after}"));
    }
    // And then traffic fits: TCP through the narrow link, both ways.
    for pod in [PodRef::new(1, 1), PodRef::new(2, 1)] {
        let t = c.expect(
            &format!("4 MiB from {pod}"),
            tcp_bulk(&c.ns(pod), TCP, 4 << 20, None, bulk_opts()),
        );
        if *t.observed.ip() != EGRESS_A {
            c.fail(format!("{pod}: server saw {}", t.observed));
        }
    }
}
