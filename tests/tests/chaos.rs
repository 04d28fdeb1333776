//! Fault injection in the Kubernetes-mode lab (`egress_lab::chaos`): a
//! short fixed-seed schedule of every fault kind with the three invariants
//! judged throughout, and the rolling-restart acceptance test of issue 8.
//! `cargo xtask chaos --duration S [--seed N]` runs the long version.

use std::{
    collections::BTreeMap,
    thread,
    time::{Duration, Instant},
};

use egress_lab::{
    Lab,
    chaos::{self, ALL_FAULTS, ChaosSpec, faults},
};

fn lab() -> Lab {
    egress_tests::init_tracing();
    let mut lab = Lab::build(chaos::lab_spec()).unwrap_or_else(|e| panic!("building the lab: {e}"));
    if let Err(e) = lab.start_agents() {
        panic!("starting the agents: {e}");
    }
    lab
}

/// One round of every fault kind in a fixed seeded order, short holds:
/// no invariant violation, and the cluster recovers from each fault.
#[test]
fn a_fixed_seed_round_of_every_fault_keeps_the_invariants() {
    let mut lab = lab();
    let spec = ChaosSpec {
        max_faults: Some(ALL_FAULTS.len()),
        forged: chaos::ALL_FORGED.to_vec(),
        hold: (Duration::from_millis(500), Duration::from_millis(1500)),
        settle: (Duration::from_millis(300), Duration::from_millis(600)),
        ..ChaosSpec::new(Duration::from_secs(600), 1)
    };
    let report = chaos::run(&mut lab, &spec).unwrap_or_else(|e| panic!("the chaos run: {e}"));
    let summary = report.summary();
    eprintln!("{summary}");
    let _ = report.write_json(&lab.dir().join("chaos.json"));
    assert_eq!(report.faults.len(), ALL_FAULTS.len(), "{summary}");
    assert!(
        report.violations.is_empty() && report.liveness.is_empty(),
        "invariant violations or liveness failures (lab {}):\n{summary}",
        lab.dir().display()
    );
    // The probes saw something to judge.
    assert!(
        report.arrivals > 1000 && report.arp_frames > 10 && report.delivered_ok > 1000,
        "{summary}"
    );
}

/// Issue 8: a rolling restart of every agent, pods of every node sending
/// (a UDP stream, and an established TCP connection from pod 1 of every
/// node through its egress IP), shows zero datagrams with a node address at
/// the server and no established TCP connection reset: each connection
/// carries data before, during and after, and is never reset or closed.
#[test]
fn a_rolling_restart_of_every_agent_leaks_nothing_and_resets_no_connection() {
    let mut lab = lab();
    let spec = ChaosSpec {
        forged: chaos::ALL_FORGED.to_vec(),
        ..ChaosSpec::new(Duration::from_secs(60), 0)
    };
    chaos::setup(&lab).unwrap_or_else(|e| panic!("set-up: {e}"));
    let probes = chaos::start_probes(&lab, &spec).unwrap_or_else(|e| panic!("probes: {e}"));
    thread::sleep(Duration::from_secs(1));
    let before = probes.tcp_echoed();
    let mut during = Vec::new();
    let restarted = Instant::now();
    for n in 1..=lab.spec().nodes {
        let at = probes.tcp_echoed();
        lab.stop_agent(n)
            .unwrap_or_else(|e| panic!("SIGTERM node{n}: {e}"));
        lab.start_agent(n)
            .unwrap_or_else(|e| panic!("starting node{n} again: {e}"));
        during.push((n, at, probes.tcp_echoed()));
    }
    eprintln!("rolling restart took {:?}", restarted.elapsed());
    thread::sleep(Duration::from_secs(2));
    let after = probes.tcp_echoed();
    let holders: BTreeMap<_, _> = chaos::EGRESS_IPS_IN_PLAY
        .iter()
        .map(|(name, ip, _)| (*ip, faults::holder_of(&lab, name, *ip)))
        .collect();
    let violations = probes.violations(&lab);
    let tcp = probes.tcp_events();
    let arrivals = probes.server.arrivals();
    probes.stop();

    let leaks: Vec<_> = violations
        .iter()
        .filter(|v| v.invariant == chaos::judge::Invariant::Source)
        .collect();
    let ended: Vec<_> = tcp.iter().filter(|e| e.what != "connected").collect();
    let connects = tcp.iter().filter(|e| e.what == "connected").count();
    let mut problems = Vec::new();
    if !violations.is_empty() {
        problems.push(format!(
            "{} violations ({} with another source at the server): {:#?}",
            violations.len(),
            leaks.len(),
            violations.iter().take(20).collect::<Vec<_>>()
        ));
    }
    if !ended.is_empty() || connects != usize::from(lab.spec().nodes) {
        problems.push(format!("TCP connections ended or were replaced: {tcp:#?}"));
    }
    for (pod, b) in &before {
        if *b == 0 {
            problems.push(format!("{pod}: no data before the restart"));
        }
        if after[pod] <= during.last().map_or(0, |d| d.2[pod]) {
            problems.push(format!("{pod}: no data after the restart"));
        }
        for (n, at, end) in &during {
            if end[pod] <= at[pod] {
                problems.push(format!("{pod}: no data while node{n}'s agent restarted"));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "rolling restart (lab {}; {} datagrams arrived; holders after {holders:?}):\n{}",
        lab.dir().display(),
        arrivals.len(),
        problems.join("\n")
    );
}
