//! An egress IP is a credential: the node holding it answers on it only for
//! its flows (packets that match none are dropped, `no_flow`, unless the
//! operator says otherwise; ARP keeps working), and only while its claim is
//! valid (the datapath's fence stamp): past it the node stops translating,
//! drops replies and tunnel arrivals for the IP, and stops answering ARP
//! for it even though the kernel still has the address.

use std::{
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    time::Duration,
};

use egress_common::DatapathConfig;
use egress_lab::{
    ClientOpts, LabSpec, PodRef, TcpConn,
    exec::run_unchecked,
    icmp_echo, netns, spec,
    traffic::{udp_send, wait_for},
    udp_probe,
};
use egress_tests::{Cluster, TCP, UDP, opts};

const EGRESS_A: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 100);

fn drops(c: &Cluster, reason: &str) -> u64 {
    let stats = c.expect("stats of node1", c.lab.agent(1).stats());
    stats.drops(1, reason).unwrap_or_else(|e| c.fail(e))
}

fn wait_drops_above(c: &Cluster, reason: &str, before: u64) -> u64 {
    let counted = wait_for(
        &format!("node1 counts {reason} for policy 1"),
        Duration::from_secs(5),
        || match drops(c, reason) {
            n if n > before => Ok(n),
            n => Err(format!("still {n}")),
        },
    );
    c.expect(reason, counted)
}

/// Replies to ARP requests for `ip` that the router gets (`arping`).
fn arp_replies(c: &Cluster, ip: Ipv4Addr) -> u32 {
    let mut cmd = c.expect("arping", netns::command_in(&c.lab.router_ns(), "arping"));
    cmd.args(["-c", "3", "-w", "3", "-I", "br0", &ip.to_string()]);
    let out = c.expect(
        "arping",
        run_unchecked(&mut cmd, None, Duration::from_secs(10)),
    );
    let line = out
        .stdout
        .lines()
        .find(|l| l.starts_with("Received "))
        .unwrap_or_else(|| c.fail(format!("arping said: {}{}", out.stdout, out.stderr)));
    line.split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| c.fail(format!("arping said: {line}")))
}

/// A TCP connect from the router to `ip:port`: `Some(true)` answered
/// (connected or refused by the host), `None` no answer at all.
fn tcp_answered(c: &Cluster, ip: Ipv4Addr, port: u16) -> Option<bool> {
    let to = SocketAddrV4::new(ip, port);
    let outcome = netns::in_netns(&c.lab.router_ns(), move || {
        Ok(TcpStream::connect_timeout(
            &to.into(),
            Duration::from_secs(2),
        ))
    });
    match c.expect("connect from the router", outcome) {
        Ok(_) => Some(true),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Some(true),
        Err(_) => None,
    }
}

fn pings_answered(c: &Cluster, ip: Ipv4Addr, ident: u16) -> usize {
    let echo = c.expect(
        "ping from the router",
        icmp_echo(&c.lab.router_ns(), ip, ident, 2, Duration::from_secs(2)),
    );
    echo.answered.len()
}

#[test]
fn packets_to_an_egress_ip_without_a_flow_are_dropped_unless_configured() {
    let mut c = Cluster::new(LabSpec::default());
    c.check_udp(PodRef::new(1, 1), opts());

    // Host services do not answer on the egress IP: no RST, no connection.
    let before = drops(&c, "no_flow");
    if tcp_answered(&c, EGRESS_A, 22).is_some() {
        c.fail("the host answered a TCP SYN to the egress IP");
    }
    wait_drops_above(&c, "no_flow", before);
    if pings_answered(&c, EGRESS_A, 0x4e01) != 0 {
        c.fail("the host answered a ping to the egress IP by default");
    }
    // ARP for the egress IP still works.
    if arp_replies(&c, EGRESS_A) == 0 {
        c.fail("no ARP reply for the egress IP");
    }

    // The operator may let pings through...
    let updated = c
        .lab
        .update_spec(|s| s.datapath.answer_ping_on_egress_ips = true);
    c.expect("enable answer_ping_on_egress_ips", updated);
    let answered = wait_for(
        "pings to the egress IP answered",
        Duration::from_secs(10),
        || match pings_answered(&c, EGRESS_A, 0x4e02) {
            0 => Err("no answer".to_owned()),
            n => Ok(n),
        },
    );
    c.expect("ping", answered);
    if tcp_answered(&c, EGRESS_A, 22).is_some() {
        c.fail("answer_ping_on_egress_ips let TCP through too");
    }
    // ...or turn the no_flow drop off altogether.
    let updated = c
        .lab
        .update_spec(|s| s.datapath.pass_unmatched_to_egress_ips = true);
    c.expect("enable pass_unmatched_to_egress_ips", updated);
    let refused = wait_for(
        "the host answers TCP on the egress IP",
        Duration::from_secs(10),
        || tcp_answered(&c, EGRESS_A, 22).ok_or_else(|| "no answer".to_owned()),
    );
    c.expect("host answer", refused);
    // Translated traffic was never affected.
    c.check_tcp(PodRef::new(1, 1), opts());
    c.check_udp(PodRef::new(2, 1), opts());
}

/// Writes `DatapathConfig::claims_valid_until_ns` of node `n` through the
/// pinned map, as the agent's fence does.
fn set_claims_valid_until(c: &Cluster, n: u8, ns: u64) {
    let path = format!("/sys/fs/bpf/{}/maps/config", c.lab.instance(n));
    let node = c.lab.node_ns(n);
    let key = ["key", "0", "0", "0", "0"];
    let mut lookup = vec!["-j", "map", "lookup", "pinned", &path];
    lookup.extend(key);
    let out = c.expect(
        "bpftool map lookup",
        egress_lab::exec_in(&node, "bpftool", &lookup),
    );
    let v: serde_json::Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| c.fail(format!("bpftool lookup: {e}: {}", out.stdout)));
    let mut value: Vec<u8> = v["value"]
        .as_array()
        .unwrap_or_else(|| c.fail(format!("no raw value in {v}")))
        .iter()
        .map(|b| {
            u8::from_str_radix(b.as_str().unwrap_or_default().trim_start_matches("0x"), 16)
                .unwrap_or_else(|e| c.fail(format!("value byte {b}: {e}")))
        })
        .collect();
    assert_eq!(value.len(), size_of::<DatapathConfig>(), "{v}");
    let at = std::mem::offset_of!(DatapathConfig, claims_valid_until_ns);
    value[at..at + 8].copy_from_slice(&ns.to_ne_bytes());
    let hex: Vec<String> = value.iter().map(|b| format!("{b:02x}")).collect();
    let mut update = vec!["map", "update", "pinned", &path];
    update.extend(key);
    update.extend(["value", "hex"]);
    update.extend(hex.iter().map(String::as_str));
    c.expect(
        "bpftool map update",
        egress_lab::exec_in(&node, "bpftool", &update),
    );
}

fn node_has_address(c: &Cluster, n: u8, ip: Ipv4Addr) -> bool {
    let out = c.expect(
        "ip addr",
        egress_lab::exec_in(&c.lab.node_ns(n), "ip", &["-4", "-o", "addr", "show"]),
    );
    out.stdout.contains(&format!(" {ip}/"))
}

#[test]
fn a_lapsed_claim_stops_translation_replies_and_arp() {
    let c = Cluster::new(LabSpec::default());
    let (local, remote) = (PodRef::new(1, 1), PodRef::new(2, 1));
    c.check_udp(local, opts());
    c.check_udp(remote, opts());
    let held = c.expect("TCP connection", TcpConn::open(&c.ns(local), TCP, opts()));

    // The fence moves into the past: the claim has lapsed.
    set_claims_valid_until(&c, 1, 0);
    let before = drops(&c, "claim_expired");
    c.udp.clear();
    let quick = ClientOpts {
        timeout: Duration::from_secs(1),
        ..opts()
    };
    for pod in [local, remote] {
        if let Ok(p) = udp_probe(&c.ns(pod), UDP, quick) {
            c.fail(format!(
                "{pod}'s UDP left with {} after node1's claim lapsed",
                p.observed
            ));
        }
    }
    let seen = c.udp.seen();
    if !seen.is_empty() {
        c.fail(format!(
            "the server saw {seen:?} after node1's claim lapsed"
        ));
    }
    let after_sends = wait_drops_above(&c, "claim_expired", before + 1);
    // Replies (anything to the egress IP) are dropped too.
    c.expect(
        "a datagram to the egress IP",
        udp_send(
            &c.lab.server_ns(),
            SocketAddrV4::new(spec::SERVER_ADDR, 5555),
            SocketAddrV4::new(EGRESS_A, 40000),
            b"reply".to_vec(),
        ),
    );
    wait_drops_above(&c, "claim_expired", after_sends);
    // Nobody answers ARP for the IP although node1 still has the address.
    if !node_has_address(&c, 1, EGRESS_A) {
        c.fail("node1 lost the egress IP: the test needs the address to linger");
    }
    let replies = arp_replies(&c, EGRESS_A);
    if replies != 0 {
        c.fail(format!(
            "{replies} ARP replies for the egress IP after the claim lapsed"
        ));
    }

    // Renewed: everything works again, the held connection included.
    set_claims_valid_until(&c, 1, u64::MAX);
    c.check_udp(local, opts());
    c.check_udp(remote, opts());
    if arp_replies(&c, EGRESS_A) == 0 {
        c.fail("no ARP reply for the egress IP after the claim was renewed");
    }
    c.expect("the held connection after the renewal", held.finish());
}
