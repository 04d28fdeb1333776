//! Our conntrack: entries expire after their timeout, and a full table
//! refuses new flows (counted) while existing ones keep working.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use egress_lab::{
    ClientOpts, LabSpec, PodRef, TcpConn, spec, tcp_probe,
    traffic::{tcp_raw_segments, wait_for},
    udp_probe,
};
use egress_tests::{Cluster, TCP, UDP, opts};

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
    s.datapath.gc_interval = Duration::from_secs(1);
    s.datapath.timeouts.udp = Duration::from_secs(4);
    s.datapath.timeouts.icmp = Duration::from_secs(4);
    s.datapath.timeouts.tcp_closing = Duration::from_secs(4);
    s.datapath.timeouts.tcp_reset = Duration::from_secs(4);
    s.datapath.timeouts.tcp_syn_sent = Duration::from_secs(4);
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
    s.datapath.max_flows = MAX_FLOWS as u32;
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

/// `egress-agent status --json` of node `n`.
fn status(c: &Cluster, n: u8) -> serde_json::Value {
    let text = c.expect("status", c.lab.agent(n).cli(&["status", "--json"]));
    serde_json::from_str(&text).unwrap_or_else(|e| c.fail(format!("status --json: {e}: {text}")))
}

/// Node 1's flow counters: (live as counted, entries in nat_fwd_v4, reclaimed).
fn flow_counts(c: &Cluster) -> (u64, u64, u64) {
    let s = status(c, 1);
    let f = &s["flows"];
    let get = |k: &str| {
        f[k].as_u64()
            .unwrap_or_else(|| c.fail(format!("status has no flows.{k}: {s}")))
    };
    (get("live"), get("entries"), get("reclaimed"))
}

fn drops(c: &Cluster, policy: u32, reason: &str) -> u64 {
    let stats = c.expect("stats of node1", c.lab.agent(1).stats());
    stats.drops(policy, reason).unwrap_or_else(|e| c.fail(e))
}

/// The server's kernel drops TCP to `port` without a word, as a firewall
/// would: nothing answers the segments sent there.
fn black_hole(c: &Cluster, port: u16) {
    let port = port.to_string();
    c.expect(
        "DROP rule on the server",
        egress_lab::exec_in(
            &c.lab.server_ns(),
            "iptables",
            &["-I", "INPUT", "-p", "tcp", "--dport", &port, "-j", "DROP"],
        ),
    );
}

const BLACK_HOLE_PORT: u16 = 9099;

/// The repro: lone TCP ACKs (no SYN) from a selected pod to a
/// server that drops them. Each made an Established entry with a 21,600 s
/// timeout; now each is Unreplied and goes after the unreplied timeout.
#[test]
fn lone_acks_stay_unreplied_and_expire_after_the_unreplied_timeout() {
    const ACKS: u16 = 300;
    let mut s = LabSpec::default();
    s.datapath.gc_interval = Duration::from_secs(1);
    s.datapath.timeouts.unreplied = Duration::from_secs(4);
    let c = Cluster::new(s);
    black_hole(&c, BLACK_HOLE_PORT);
    let pod = PodRef::new(1, 1);
    let server = SocketAddrV4::new(spec::SERVER_ADDR, BLACK_HOLE_PORT);
    c.expect(
        "lone ACKs",
        tcp_raw_segments(
            &c.ns(pod),
            SocketAddrV4::new(pod.ip(), 20000),
            server,
            0x10,
            ACKS,
        ),
    );
    let sent = Instant::now();
    let ours = |c: &Cluster| -> Vec<serde_json::Value> {
        entries_mentioning(c, &pod.ip().to_string())
            .into_iter()
            .filter(|e| e["server"].as_str() == Some(&server.to_string()))
            .collect()
    };
    let made = ours(&c);
    if made.len() != usize::from(ACKS) {
        c.fail(format!(
            "{ACKS} lone ACKs made {} entries on node1 (expected one each)",
            made.len()
        ));
    }
    if let Some(e) = made.iter().find(|e| e["state"] != "Unreplied") {
        c.fail(format!("a lone ACK's entry is not Unreplied: {e}"));
    }
    let gone = wait_for(
        "the lone ACKs' entries expire",
        Duration::from_secs(20),
        || match ours(&c).len() {
            0 => Ok(sent.elapsed()),
            n => Err(format!("{n} left")),
        },
    );
    let after = c.expect("expiry", gone);
    if after < Duration::from_secs(3) {
        c.fail(format!(
            "entries expired after {after:?}, before their 4 s timeout"
        ));
    }
    // A real connection to a server that answers is Established.
    let conn = c.expect("TCP connection", TcpConn::open(&c.ns(pod), TCP, opts()));
    let established = entries_mentioning(&c, &pod.ip().to_string())
        .into_iter()
        .any(|e| e["server"].as_str() == Some(&TCP.to_string()) && e["state"] == "Established");
    if !established {
        c.fail("an answered connection is not Established");
    }
    c.expect("finish", conn.finish());
}

/// A full table reclaims an unreplied flow for a new one (early drop), and
/// one pod cannot hold more than its cap.
#[test]
fn unreplied_flows_make_room_and_pods_are_capped() {
    const MAX_FLOWS: u64 = 20;
    const PER_POD: u32 = 12;
    let mut s = LabSpec::default();
    s.datapath.max_flows = MAX_FLOWS as u32;
    s.datapath.max_flows_per_pod = PER_POD;
    let c = Cluster::new(s);
    black_hole(&c, BLACK_HOLE_PORT);
    let (local, remote) = (PodRef::new(1, 1), PodRef::new(2, 1));
    let server = SocketAddrV4::new(spec::SERVER_ADDR, BLACK_HOLE_PORT);

    // One pod cannot take the table: its 13th flow is refused...
    c.expect(
        "lone ACKs from the local pod",
        tcp_raw_segments(
            &c.ns(local),
            SocketAddrV4::new(local.ip(), 21000),
            server,
            0x10,
            15,
        ),
    );
    let counted = wait_for(
        "pod_flow_limit counts",
        Duration::from_secs(5),
        || match drops(&c, 1, "pod_flow_limit") {
            n if n >= 3 => Ok(n),
            n => Err(format!("pod_flow_limit = {n}")),
        },
    );
    c.expect("pod_flow_limit", counted);
    let (live, entries, _) = flow_counts(&c);
    if live != u64::from(PER_POD) || entries != u64::from(PER_POD) {
        c.fail(format!(
            "after 15 flows from one pod capped at {PER_POD}: {live} live, {entries} entries"
        ));
    }
    // ...while another pod (steered here from node 2) still gets flows,
    // until the table is full of unreplied ones.
    c.expect(
        "lone ACKs from the remote pod",
        tcp_raw_segments(
            &c.ns(remote),
            SocketAddrV4::new(remote.ip(), 22000),
            server,
            0x10,
            8,
        ),
    );
    let full = wait_for(
        "the table fills",
        Duration::from_secs(5),
        || match flow_counts(&c) {
            (live, _, _) if live >= MAX_FLOWS => Ok(()),
            (live, entries, _) => Err(format!("{live} live, {entries} entries")),
        },
    );
    c.expect("full table", full);
    let before = drops(&c, 1, "flow_table_full");

    // A full table of unreplied flows still admits a real connection: one
    // unreplied flow is reclaimed for it.
    c.check_tcp(remote, opts());
    let (live, entries, reclaimed) = flow_counts(&c);
    if reclaimed == 0 {
        c.fail(format!(
            "a new flow got into a full table without reclaiming ({live} live, {entries} entries)"
        ));
    }
    if live > MAX_FLOWS || entries > MAX_FLOWS {
        c.fail(format!(
            "table over its size: {live} live, {entries} entries"
        ));
    }
    if drops(&c, 1, "flow_table_full") != before {
        c.fail("flow_table_full counted although an unreplied flow could be reclaimed");
    }
}

/// The live-flow count follows the entries that exist: entries deleted
/// behind the agent's back are released from the count (global and per
/// pod) by the next sweep, so the pod and the table can be used again.
#[test]
fn flow_counts_are_reconciled_with_the_entries() {
    const MAX_FLOWS: u64 = 4;
    let mut s = LabSpec::default();
    s.datapath.max_flows = MAX_FLOWS as u32;
    s.datapath.max_flows_per_pod = 3;
    s.datapath.gc_interval = Duration::from_secs(1);
    let c = Cluster::new(s);
    let pod = PodRef::new(1, 1);
    for _ in 0..3 {
        c.check_udp(pod, opts());
    }
    let (live, entries, _) = flow_counts(&c);
    if (live, entries) != (3, 3) {
        c.fail(format!("after 3 UDP flows: {live} live, {entries} entries"));
    }
    // The pod is at its cap.
    let refused = udp_probe(
        &c.ns(pod),
        UDP,
        ClientOpts {
            timeout: Duration::from_secs(1),
            ..opts()
        },
    );
    if let Ok(p) = refused {
        c.fail(format!(
            "a 4th flow beyond the pod's cap of 3 left as {}",
            p.observed
        ));
    }

    // Remove every NAT entry behind the agent's back.
    let maps = format!("/sys/fs/bpf/{}/maps", c.lab.instance(1));
    for map in ["nat_fwd_v4", "nat_rev_v4"] {
        let path = format!("{maps}/{map}");
        let dump = c.expect(
            "bpftool map dump",
            egress_lab::exec_in(
                &c.lab.node_ns(1),
                "bpftool",
                &["-j", "map", "dump", "pinned", &path],
            ),
        );
        let entries: Vec<serde_json::Value> = serde_json::from_str(&dump.stdout)
            .unwrap_or_else(|e| c.fail(format!("bpftool dump: {e}: {}", dump.stdout)));
        for e in entries {
            let key: Vec<String> = e["key"]
                .as_array()
                .unwrap_or_else(|| c.fail(format!("no raw key in {e}")))
                .iter()
                .map(|b| b.as_str().unwrap_or_default().to_owned())
                .collect();
            let mut args = vec!["map", "delete", "pinned", path.as_str(), "key", "hex"];
            let hex: Vec<String> = key
                .iter()
                .map(|b| b.trim_start_matches("0x").to_owned())
                .collect();
            args.extend(hex.iter().map(String::as_str));
            c.expect(
                "bpftool map delete",
                egress_lab::exec_in(&c.lab.node_ns(1), "bpftool", &args),
            );
        }
    }
    let reconciled = wait_for(
        "the collector corrects the count",
        Duration::from_secs(10),
        || match flow_counts(&c) {
            (0, 0, _) => Ok(()),
            (live, entries, _) => Err(format!("{live} live, {entries} entries")),
        },
    );
    c.expect("reconciled count", reconciled);
    // The pod's own count was corrected too: it may open 3 flows again.
    for _ in 0..3 {
        c.check_udp(pod, opts());
    }
}
