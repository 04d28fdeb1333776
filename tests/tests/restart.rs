//! The datapath and its pinned state outlive the agent: a crash (kill -9)
//! and restart in the middle of long transfers breaks none of them.

use std::{
    net::Ipv4Addr,
    sync::atomic::Ordering,
    thread,
    time::{Duration, Instant},
};

use egress_lab::{ClientOpts, LabSpec, PodRef, TcpConn};
use egress_tests::{Cluster, TCP, opts};

const EGRESS_A: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 100);
const BYTES: u64 = 64 << 20;
const DURATION: Duration = Duration::from_secs(12);

#[test]
fn killing_and_restarting_the_agent_keeps_transfers_alive() {
    let mut c = Cluster::new(LabSpec::default());
    let long = ClientOpts {
        timeout: Duration::from_secs(20),
        ..opts()
    };
    // One local pod of the egress node and one steered through the tunnel.
    let pods = [PodRef::new(1, 1), PodRef::new(2, 1)];
    let mut transfers = Vec::new();
    for pod in pods {
        let conn = c.expect(
            &format!("connecting {pod}"),
            TcpConn::open(&c.ns(pod), TCP, long),
        );
        if *conn.observed.ip() != EGRESS_A {
            c.fail(format!("{pod}: server saw {}", conn.observed));
        }
        let progress = conn.progress();
        let handle = thread::spawn(move || conn.transfer(BYTES, Some(DURATION)));
        transfers.push((pod, progress, handle));
    }

    thread::sleep(Duration::from_secs(2));
    let at_kill: Vec<u64> = transfers
        .iter()
        .map(|(_, p, _)| p.load(Ordering::Relaxed))
        .collect();
    let killed = Instant::now();
    let killed_result = c.lab.kill_agent(1);
    c.expect("kill -9 of node1's agent", killed_result);
    thread::sleep(Duration::from_secs(1));
    let restarted = c.lab.start_agent(1);
    c.expect("restarting node1's agent", restarted);
    eprintln!("agent of node1 back after {:?}", killed.elapsed());

    for ((pod, progress, handle), sent_before) in transfers.into_iter().zip(at_kill) {
        let result = handle
            .join()
            .unwrap_or_else(|_| c.fail(format!("transfer thread of {pod} panicked")));
        match result {
            Ok(t) => {
                if t.bytes != BYTES {
                    c.fail(format!("{pod}: server counted {} of {BYTES} bytes", t.bytes));
                }
            }
            Err(e) => c.fail(format!(
                "{pod}: transfer broke across the agent's crash and restart ({sent_before} bytes sent before the kill, {} in all): {e}",
                progress.load(Ordering::Relaxed)
            )),
        }
        if sent_before == 0 || sent_before >= BYTES {
            c.fail(format!(
                "{pod}: the kill did not land mid-transfer ({sent_before} of {BYTES} bytes sent)"
            ));
        }
    }
    // New flows work with the restarted agent, locally and remotely.
    for pod in pods {
        c.check_tcp(pod, opts());
    }
}

#[test]
fn graceful_restart_with_kept_state_keeps_connections() {
    let mut c = Cluster::new(LabSpec {
        agent_args: vec!["--keep-state-on-exit".into()],
        ..LabSpec::default()
    });
    let pods = [PodRef::new(1, 1), PodRef::new(2, 1)];
    let held: Vec<TcpConn> = pods
        .iter()
        .map(|pod| {
            c.expect(
                &format!("connecting {pod}"),
                TcpConn::open(&c.ns(*pod), TCP, opts()),
            )
        })
        .collect();
    for n in [1, 2] {
        let restarted = c.lab.restart_agent(n);
        c.expect(
            &format!("SIGTERM and restart of node{n}'s agent"),
            restarted,
        );
    }
    for (pod, conn) in pods.iter().zip(held) {
        let seen = conn.observed;
        c.expect(
            &format!("{pod}'s connection (seen as {seen}) across graceful restarts"),
            conn.finish(),
        );
        if *seen.ip() != EGRESS_A {
            c.fail(format!("{pod}: server saw {seen}"));
        }
    }
    for pod in pods {
        c.check_tcp(pod, opts());
    }
}

#[test]
fn sigterm_without_kept_state_detaches_everything() {
    let mut c = Cluster::new(LabSpec::default());
    let pod = PodRef::new(1, 1);
    c.check_tcp(pod, opts());
    let stopped = c.lab.stop_agent(1);
    c.expect("SIGTERM of node1's agent", stopped);
    let pins = std::path::Path::new("/sys/fs/bpf").join(c.lab.instance(1));
    if pins.exists() {
        c.fail(format!(
            "{} survived a stop without --keep-state-on-exit",
            pins.display()
        ));
    }
    let node = c.lab.node_ns(1);
    for dev in ["veth1", "eth0"] {
        let filters = c.expect(
            &format!("tc filters of {dev}"),
            egress_lab::exec_in(&node, "tc", &["filter", "show", "dev", dev, "ingress"]),
        );
        if filters.stdout.contains("bpf") {
            c.fail(format!(
                "{dev} still has a BPF filter after the stop:\n{}",
                filters.stdout
            ));
        }
    }
    let addrs = c.expect(
        "addresses of node1's eth0",
        egress_lab::exec_in(&node, "ip", &["-o", "addr", "show", "dev", "eth0"]),
    );
    if addrs.stdout.contains(&EGRESS_A.to_string()) {
        c.fail(format!(
            "node1 still holds {EGRESS_A} after the stop:\n{}",
            addrs.stdout
        ));
    }
    // Without the datapath the pod is just another pod: node masquerade.
    let p = c.expect(
        "TCP after the stop",
        egress_lab::tcp_probe(&c.ns(pod), TCP, opts()),
    );
    if *p.observed.ip() != egress_lab::spec::node_addr(1) {
        c.fail(format!(
            "after the agent detached, the server saw {}",
            p.observed
        ));
    }
}
