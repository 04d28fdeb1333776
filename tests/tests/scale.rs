//! Many concurrent connections through one egress IP.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use egress_lab::{LabSpec, PodRef, spec, tcp_many};
use egress_tests::{Cluster, ObserverProcess};

const EGRESS_A: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 100);
const CONNECTIONS: usize = 10_000;

#[test]
fn ten_thousand_concurrent_connections_through_one_egress_ip() {
    let c = Cluster::new(LabSpec::default());
    // The server runs in its own process: one process may not hold the
    // descriptors of both ends of 10,000 connections.
    let server = ObserverProcess::start(
        env!("CARGO_BIN_EXE_egress-tcp-observer"),
        &c.lab.server_ns(),
        SocketAddrV4::new(spec::SERVER_ADDR, 8090),
    );
    let pod = PodRef::new(1, 1);
    let many = c.expect(
        "opening the connections",
        tcp_many(
            &c.ns(pod),
            server.addr,
            CONNECTIONS,
            256,
            Duration::from_secs(30),
        ),
    );
    if !many.failures.is_empty() {
        let sample: Vec<_> = many.failures.iter().take(5).collect();
        c.fail(format!(
            "{} of {CONNECTIONS} connections failed (first: {sample:?}); {} were open at once",
            many.failures.len(),
            many.concurrent
        ));
    }
    assert_eq!(many.concurrent, CONNECTIONS);
    let wrong: Vec<_> = many
        .observed
        .iter()
        .filter(|a| *a.ip() != EGRESS_A)
        .take(5)
        .collect();
    if !wrong.is_empty() {
        c.fail(format!(
            "connections seen with other sources than {EGRESS_A}: {wrong:?}"
        ));
    }
    let distinct: BTreeSet<u16> = many.observed.iter().map(|a| a.port()).collect();
    if distinct.len() != CONNECTIONS {
        c.fail(format!(
            "{CONNECTIONS} live connections used only {} distinct NAT ports",
            distinct.len()
        ));
    }
    // The observer reports every 100 ms.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut server_side = 0;
    while Instant::now() < deadline {
        server_side = server.seen().iter().filter(|a| *a.ip() == EGRESS_A).count();
        if server_side >= CONNECTIONS {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if server_side < CONNECTIONS {
        c.fail(format!(
            "the server accepted {server_side} connections from {EGRESS_A}, expected {CONNECTIONS}"
        ));
    }
    eprintln!(
        "{CONNECTIONS} concurrent connections through {EGRESS_A} in {:?}",
        many.elapsed
    );
}
