//! Our conntrack: entries expire after their timeout, and a full table
//! refuses new flows (counted) while existing ones keep working.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use egress_lab::{ClientOpts, LabSpec, PodRef, TcpConn, tcp_probe, traffic::wait_for};
use egress_tests::{Cluster, TCP, opts};

const EGRESS_A: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 100);

/// NAT entries of node 1 whose text mentions `needle` (the pod's address,
/// however the agent formats it).
fn entries_mentioning(c: &Cluster, needle: &str) -> Vec<serde_json::Value> {
    let entries = c.expect("nat list of node1", c.lab.agent(1).nat_list());
    entries
        .into_iter()
        .filter(|e| {
            let text = e.to_string();
            text.contains(needle) || text.contains(&needle.replace('.', ","))
        })
        .collect()
}

#[test]
fn nat_entries_expire_after_their_timeout() {
    let mut s = LabSpec::default();
    s.datapath.gc_interval_secs = 1;
    s.datapath.timeouts.udp = 4;
    s.datapath.timeouts.icmp = 4;
    s.datapath.timeouts.tcp_closing = 4;
    s.datapath.timeouts.tcp_reset = 4;
    s.datapath.timeouts.tcp_syn_sent = 4;
    let c = Cluster::new(s);
    let pod = PodRef::new(1, 1);
    let needle = pod.ip().to_string();

    c.check_udp(pod, opts());
    c.check_tcp(pod, opts());
    let created = Instant::now();
    let present = entries_mentioning(&c, &needle);
    if present.len() < 2 {
        c.fail(format!(
            "after a UDP and a TCP exchange from {pod}, node1's NAT table holds {} entries for it: {present:?}",
            present.len()
        ));
    }
    // Well inside the timeout nothing may go.
    std::thread::sleep(Duration::from_secs(1));
    if entries_mentioning(&c, &needle).is_empty() && created.elapsed() < Duration::from_secs(3) {
        c.fail("NAT entries vanished before their 4 s timeout");
    }
    let gone = wait_for(
        &format!("node1's NAT entries of {pod} expire"),
        Duration::from_secs(20),
        || {
            let left = entries_mentioning(&c, &needle);
            if left.is_empty() {
                Ok(created.elapsed())
            } else {
                Err(format!("{} left: {left:?}", left.len()))
            }
        },
    );
    let after = c.expect("expiry", gone);
    if after < Duration::from_secs(3) {
        c.fail(format!(
            "entries expired after {after:?}, before their 4 s timeout"
        ));
    }
    // The flow can start again afterwards.
    c.check_udp(pod, opts());
}

#[test]
fn full_flow_table_refuses_new_flows_but_keeps_old_ones() {
    const MAX_FLOWS: u64 = 3;
    let mut s = LabSpec::default();
    s.datapath.max_flows = MAX_FLOWS;
    let c = Cluster::new(s);
    let pod = PodRef::new(1, 1);

    let held: Vec<TcpConn> = (0..MAX_FLOWS)
        .map(|i| {
            let conn = c.expect(
                &format!("flow {i} of {MAX_FLOWS}"),
                TcpConn::open(&c.ns(pod), TCP, opts()),
            );
            if *conn.observed.ip() != EGRESS_A {
                c.fail(format!("flow {i}: server saw {}", conn.observed));
            }
            conn
        })
        .collect();

    let before = c
        .expect("stats", c.lab.agent(1).stats())
        .drops(1, "flow_table_full")
        .unwrap_or_else(|e| c.fail(e));
    let refused = tcp_probe(
        &c.ns(pod),
        TCP,
        ClientOpts {
            timeout: Duration::from_secs(2),
            ..opts()
        },
    );
    if let Ok(p) = refused {
        c.fail(format!(
            "a new flow beyond max_flows = {MAX_FLOWS} was admitted: server saw {}",
            p.observed
        ));
    }
    let counted = wait_for(
        "policy 1's flow_table_full counter rises",
        Duration::from_secs(5),
        || {
            let stats = c.lab.agent(1).stats().map_err(|e| e.to_string())?;
            let now = stats.drops(1, "flow_table_full")?;
            if now > before {
                Ok(now)
            } else {
                Err(format!("still {now}"))
            }
        },
    );
    c.expect("flow_table_full", counted);

    // Traffic of unselected pods does not use our table.
    c.check_tcp(PodRef::new(1, 2), opts());
    // The admitted flows still carry data both ways.
    for (i, conn) in held.into_iter().enumerate() {
        c.expect(
            &format!("old flow {i} after the table filled"),
            conn.finish(),
        );
    }
}
