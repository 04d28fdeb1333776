//! The lab itself, without any agent: plain routing and CNI-style
//! masquerade. These prove that the topology and the traffic helpers work,
//! so that a failing datapath test points at the datapath.

use std::{net::Ipv4Addr, time::Duration};

use egress_lab::{
    ClientOpts, LabSpec, PodRef, TcpServer, exec_in, netns::netns_path, spec, tcp_bulk, tcp_probe,
    udp_path_mtu,
};
use egress_tests::{Cluster, TCP, UDP, opts};

fn netns_list() -> String {
    egress_lab::exec::exec("ip", &["netns", "list"])
        .expect("ip netns list")
        .stdout
}

#[test]
fn lab_creates_and_removes_its_namespaces() {
    let cluster = Cluster::without_agents(LabSpec::default());
    let names = cluster.lab.namespaces().to_vec();
    // router, server, 3 nodes, 3 pods each
    assert_eq!(names.len(), 2 + 3 + 9, "{names:?}");
    let listed = netns_list();
    for ns in &names {
        assert!(
            listed
                .lines()
                .any(|l| l.split_whitespace().next() == Some(ns)),
            "`ip netns list` lacks {ns}:\n{listed}"
        );
    }
    let node = exec_in(
        &cluster.lab.node_ns(1),
        "ip",
        &["-o", "addr", "show", "dev", "eth0"],
    )
    .unwrap();
    assert!(node.stdout.contains("172.18.0.11/24"), "{}", node.stdout);
    let mtu = exec_in(
        &cluster.lab.server_ns(),
        "ip",
        &["-o", "link", "show", "dev", "eth0"],
    )
    .unwrap();
    assert!(mtu.stdout.contains("mtu 1400"), "{}", mtu.stdout);
    let nat = exec_in(
        &cluster.lab.node_ns(2),
        "iptables",
        &["-t", "nat", "-S", "POSTROUTING"],
    )
    .unwrap();
    assert!(
        nat.stdout
            .contains("-s 10.244.0.0/16 ! -d 10.244.0.0/16 -j MASQUERADE"),
        "{}",
        nat.stdout
    );
    drop(cluster);
    let listed = netns_list();
    for ns in &names {
        assert!(!netns_path(ns).exists(), "{ns} survived the lab: {listed}");
    }
}

#[test]
fn namespaces_are_removed_when_a_test_panics() {
    let (tx, rx) = std::sync::mpsc::channel();
    let outcome = std::thread::spawn(move || {
        let cluster = Cluster::without_agents(LabSpec {
            nodes: 1,
            pods_per_node: 1,
            policies: LabSpec::default_policies(1, 1),
            ..LabSpec::default()
        });
        tx.send(cluster.lab.namespaces().to_vec()).unwrap();
        panic!("deliberate panic with a lab in scope");
    })
    .join();
    assert!(outcome.is_err(), "the thread was meant to panic");
    let names = rx.recv().unwrap();
    assert!(!names.is_empty());
    for ns in &names {
        assert!(!netns_path(ns).exists(), "{ns} survived a panicking test");
    }
}

#[test]
fn pods_leave_through_node_masquerade_without_agents() {
    let cluster = Cluster::without_agents(LabSpec::default());
    // Without agents every pod is "unselected": expect its node's address.
    let node_ip = |pod: PodRef| spec::node_addr(pod.node);
    for pod in [PodRef::new(1, 1), PodRef::new(2, 2), PodRef::new(3, 3)] {
        let ns = cluster.ns(pod);
        let tcp = tcp_probe(&ns, TCP, opts()).unwrap();
        assert_eq!(*tcp.observed.ip(), node_ip(pod), "TCP from {pod}: {tcp:?}");
        assert!(cluster.tcp.saw(tcp.observed));
        let udp = egress_lab::udp_probe(&ns, UDP, opts()).unwrap();
        assert_eq!(*udp.observed.ip(), node_ip(pod), "UDP from {pod}: {udp:?}");
        let echo =
            egress_lab::icmp_echo(&ns, spec::SERVER_ADDR, 0x77, 3, Duration::from_secs(5)).unwrap();
        assert_eq!(echo.answered.len(), 3, "ping from {pod}: {echo:?}");
        let seen = cluster.icmp.seen_of(&echo);
        assert!(
            !seen.is_empty() && seen.iter().all(|s| s.src == node_ip(pod)),
            "echo requests from {pod} seen as {seen:?}"
        );
    }
}

#[test]
fn pod_to_pod_across_nodes_keeps_pod_addresses() {
    let cluster = Cluster::without_agents(LabSpec::default());
    let target = PodRef::new(2, 2);
    let server = TcpServer::start(
        &cluster.ns(target),
        std::net::SocketAddrV4::new(target.ip(), 9000),
    )
    .unwrap();
    let from = PodRef::new(1, 1);
    let probe = tcp_probe(&cluster.ns(from), server.addr(), opts()).unwrap();
    assert_eq!(*probe.observed.ip(), from.ip(), "{probe:?}");
}

#[test]
fn same_source_port_from_two_pods_through_masquerade() {
    let cluster = Cluster::without_agents(LabSpec::default());
    let o = ClientOpts {
        local_port: Some(40000),
        ..opts()
    };
    // Same node, so both are masqueraded to one address and one must move.
    let a = tcp_probe(&cluster.ns(PodRef::new(1, 1)), TCP, o).unwrap();
    let held = egress_lab::TcpConn::open(&cluster.ns(PodRef::new(1, 2)), TCP, o).unwrap();
    assert_eq!(a.local.port(), 40000);
    assert_eq!(held.local.port(), 40000);
    let b = tcp_probe(&cluster.ns(PodRef::new(1, 3)), TCP, o).unwrap();
    assert_eq!(*b.observed.ip(), Ipv4Addr::new(172, 18, 0, 11));
    assert_ne!(
        held.observed, b.observed,
        "two live flows share one translated tuple"
    );
    held.finish().unwrap();
}

#[test]
fn path_mtu_discovery_works_through_masquerade() {
    let cluster = Cluster::without_agents(LabSpec::default());
    let ns = cluster.ns(PodRef::new(1, 2));
    // 1472 bytes of payload make a 1500-byte packet that the 1400-byte link
    // refuses; the router's fragmentation-needed must reach the pod.
    let mtu = udp_path_mtu(&ns, UDP, 1472, Duration::from_secs(5)).unwrap();
    assert_eq!(
        mtu, 1400,
        "pod's path MTU to the server after a DF datagram"
    );
    // TCP: the server advertises MSS 1460, so segments only fit after PMTUD.
    let t = tcp_bulk(
        &cluster.ns(PodRef::new(2, 2)),
        TCP,
        16 << 20,
        None,
        ClientOpts {
            timeout: Duration::from_secs(10),
            ..opts()
        },
    )
    .unwrap();
    assert_eq!(t.bytes, 16 << 20);
    assert_eq!(*t.observed.ip(), spec::node_addr(2));
}

#[test]
fn topology_json_describes_the_lab() {
    let cluster = Cluster::without_agents(LabSpec::default());
    let path = cluster.lab.dir().join("topology.json");
    cluster.lab.write_topology(&path).unwrap();
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(v["server"]["address"], "198.51.100.10");
    assert_eq!(v["server"]["tcp_port"], 8080);
    assert_eq!(v["nodes"].as_array().unwrap().len(), 3);
    assert_eq!(v["nodes"][0]["pods"][0]["address"], "10.244.1.11");
    assert_eq!(
        v["nodes"][0]["pods"][0]["namespace"],
        cluster.ns(PodRef::new(1, 1))
    );
    assert_eq!(v["nodes"][0]["pods"][0]["expected_source"], "172.18.0.100");
    assert_eq!(v["nodes"][0]["pods"][1]["expected_source"], "172.18.0.11");
    assert_eq!(v["egress_ips"][0]["egress_ip"], "172.18.0.100");
    assert_eq!(v["egress_ips"][0]["node"], "node1");
    let selected: Vec<&str> = v["egress_ips"][0]["selects"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["address"].as_str().unwrap())
        .collect();
    assert_eq!(selected, ["10.244.1.11", "10.244.2.11", "10.244.3.11"]);
}

#[test]
fn labs_of_dead_processes_are_reaped_by_the_next_lab() {
    let small = || LabSpec {
        nodes: 1,
        pods_per_node: 1,
        policies: LabSpec::default_policies(1, 1),
        ..LabSpec::default()
    };
    let orphan = egress_lab::Lab::build(small()).unwrap();
    let names = orphan.namespaces().to_vec();
    // Pretend its owner was killed: hand it to a process that has exited,
    // and skip its destructor as a SIGKILL would.
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead_pid = child.id();
    child.wait().unwrap();
    std::fs::write(orphan.dir().join("owner.pid"), format!("{dead_pid}\n")).unwrap();
    std::mem::forget(orphan);
    assert!(names.iter().all(|ns| netns_path(ns).exists()));

    let _next = egress_lab::Lab::build(small()).unwrap();
    for ns in &names {
        assert!(!netns_path(ns).exists(), "{ns} of a dead owner survived");
    }
}

#[test]
fn time_exceeded_comes_back_through_masquerade() {
    let cluster = Cluster::without_agents(LabSpec::default());
    let pod = PodRef::new(1, 2);
    let hops =
        egress_lab::traffic::udp_trace(&cluster.ns(pod), UDP, 6, Duration::from_secs(2)).unwrap();
    eprintln!("trace from {pod}: {hops:?}");
    use egress_lab::traffic::Hop;
    assert!(
        hops.contains(&Hop::TimeExceeded(spec::ROUTER_NODE_ADDR)),
        "the router's time-exceeded did not come back to {pod}: {hops:?}"
    );
    assert!(
        matches!(hops.last(), Some(Hop::Reached(a)) if *a.ip() == spec::node_addr(1)),
        "{hops:?}"
    );
}

#[test]
fn zero_checksum_udp_through_masquerade() {
    let cluster = Cluster::without_agents(LabSpec::default());
    let pod = PodRef::new(1, 2);
    let o = ClientOpts {
        zero_udp_checksum: true,
        local_port: Some(41234),
        ..opts()
    };
    let mut probe = None;
    let seen = egress_tests::capture(&cluster.lab.server_ns(), "udp and dst port 8081", || {
        probe = Some(egress_lab::udp_probe(&cluster.ns(pod), UDP, o));
    });
    let probe = probe.unwrap().unwrap();
    assert_eq!(*probe.observed.ip(), spec::node_addr(1));
    // The helper really sends zero checksums (and netfilter keeps them so).
    assert!(seen.contains("[no cksum]"), "server captured: {seen}");
}
