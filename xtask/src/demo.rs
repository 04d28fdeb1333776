//! `cargo xtask demo`: what the server sees of each pod, next to what the
//! policies say it should see, then the egress node's NAT table.

use std::{net::SocketAddrV4, time::Duration};

use anyhow::{Result, bail};
use egress_lab::{
    ClientOpts, IcmpObserver, Lab, TcpServer, UdpServer, icmp_echo, spec, tcp_probe, udp_probe,
};

struct Row {
    pod: String,
    policy: String,
    proto: &'static str,
    expected: String,
    seen: String,
    ok: bool,
}

pub fn run() -> Result<()> {
    let lab = crate::lab::up()?;
    let result = show(&lab);
    // The lab stays up for inspection whatever the outcome.
    lab.persist();
    result
}

fn show(lab: &Lab) -> Result<()> {
    let srv = lab.server_ns();
    let tcp = TcpServer::start(
        &srv,
        SocketAddrV4::new(spec::SERVER_ADDR, spec::SERVER_TCP_PORT),
    )?;
    let udp = UdpServer::start(
        &srv,
        SocketAddrV4::new(spec::SERVER_ADDR, spec::SERVER_UDP_PORT),
    )?;
    let icmp = IcmpObserver::start(&srv)?;
    let opts = ClientOpts {
        timeout: Duration::from_secs(3),
        ..ClientOpts::default()
    };
    let mut rows = Vec::new();
    for (k, pod) in lab.pods().into_iter().enumerate() {
        let ns = lab.pod_ns(pod);
        let expected = lab.expected_source(pod);
        let expected_text = expected.map_or("dropped".to_owned(), |ip| ip.to_string());
        let policy = lab
            .policy_of(pod)
            .map_or("-".to_owned(), |p| format!("{} ({})", p.id, p.name));
        let row = |proto, seen: Option<String>, ok| Row {
            pod: format!("{pod} {}", pod.ip()),
            policy: policy.clone(),
            proto,
            expected: expected_text.clone(),
            seen: seen.unwrap_or_else(|| "nothing".into()),
            ok,
        };

        let t = tcp_probe(&ns, tcp.addr(), opts);
        rows.push(match t {
            Ok(p) => row(
                "tcp",
                Some(p.observed.to_string()),
                Some(*p.observed.ip()) == expected,
            ),
            Err(e) => row("tcp", Some(format!("error: {e}")), expected.is_none()),
        });
        let u = udp_probe(&ns, udp.addr(), opts);
        rows.push(match u {
            Ok(p) => row(
                "udp",
                Some(p.observed.to_string()),
                Some(*p.observed.ip()) == expected,
            ),
            Err(e) => row("udp", Some(format!("error: {e}")), expected.is_none()),
        });
        let ident = 0x4000 + k as u16;
        let echo = icmp_echo(&ns, spec::SERVER_ADDR, ident, 3, Duration::from_secs(3));
        rows.push(match echo {
            Ok(r) => {
                let seen_of = icmp.seen_of(&r);
                let sources: Vec<String> = seen_of.iter().map(|s| s.src.to_string()).collect();
                let seen_ok =
                    !sources.is_empty() && seen_of.iter().all(|s| Some(s.src) == expected);
                let replies = format!("{}/{} replies", r.answered.len(), r.sent);
                let seen = if sources.is_empty() {
                    format!("nothing ({replies})")
                } else {
                    format!("{} ({replies})", dedup(sources))
                };
                let ok = if expected.is_some() {
                    seen_ok && r.answered.len() == usize::from(r.sent)
                } else {
                    seen_of.is_empty()
                };
                row("icmp", Some(seen), ok)
            }
            Err(e) => row("icmp", Some(format!("error: {e}")), false),
        });
    }
    print_table(&rows);

    let egress_node = lab
        .spec()
        .policies
        .first()
        .and_then(|p| p.node)
        .unwrap_or(1);
    let pin = format!("/sys/fs/bpf/{}/maps/nat_fwd_v4", lab.instance(egress_node));
    println!("\n$ bpftool map dump pinned {pin}   (egress node node{egress_node})");
    match egress_lab::exec::exec("bpftool", &["map", "dump", "pinned", &pin]) {
        Ok(out) => print!("{}", out.stdout),
        Err(e) => println!("{e}"),
    }
    println!(
        "\nThe lab stays up: see target/lab/topology.json; remove it with `cargo xtask lab down`."
    );
    let failed = rows.iter().filter(|r| !r.ok).count();
    if failed > 0 {
        bail!(
            "{failed} of {} checks did not match the policies",
            rows.len()
        );
    }
    Ok(())
}

fn dedup(mut v: Vec<String>) -> String {
    v.sort();
    v.dedup();
    v.join(", ")
}

fn print_table(rows: &[Row]) {
    let headers = [
        "pod",
        "policy",
        "proto",
        "expected source",
        "server saw",
        "",
    ];
    let cells: Vec<[String; 6]> = rows
        .iter()
        .map(|r| {
            [
                r.pod.clone(),
                r.policy.clone(),
                r.proto.to_owned(),
                r.expected.clone(),
                r.seen.clone(),
                if r.ok { "ok" } else { "MISMATCH" }.to_owned(),
            ]
        })
        .collect();
    let mut widths = headers.map(str::len);
    for row in &cells {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count().min(70));
        }
    }
    let line = |cols: [&str; 6]| {
        let parts: Vec<String> = cols
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(headers);
    for row in &cells {
        line([&row[0], &row[1], &row[2], &row[3], &row[4], &row[5]]);
    }
}
