//! Measurements of the agent's life cycle in the lab: the new-pod window
//! and claim-renewal jitter under a full NAT map.

use std::{
    path::Path,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use aya::maps::{HashMap, Map, MapData};
use egress_common::{CtState, FlowKeyV4, NatEntryV4, maps as names};
use egress_lab::{Lab, LabSpec, PodRef, kubernetes::LEASES, window};

/// `cargo xtask new-pod-window`: `runs` measurements on a selected pod
/// (n2p1, steered to node1's egress IP), printed and written to
/// target/lab/new-pod-window.json.
pub fn new_pod_window(kubernetes: bool, runs: u32) -> Result<()> {
    let spec = if kubernetes {
        LabSpec::kubernetes()
    } else {
        LabSpec::default()
    };
    let mut lab = Lab::build(spec)?;
    lab.start_agents()?;
    if kubernetes {
        lab.wait_converged(egress_lab::topology::CONVERGE_TIMEOUT)?;
    }
    let pod = PodRef::new(2, 1);
    let mut reports = Vec::new();
    for _ in 0..runs {
        let r = window::measure_new_pod_window(&mut lab, pod)?;
        println!("{}", r.summary());
        reports.push(r);
    }
    let firsts: Vec<f64> = reports.iter().filter_map(|r| r.first_egress_ms).collect();
    let leaked: u64 = reports.iter().map(|r| r.leaked).sum();
    if firsts.len() == reports.len() {
        let mut sorted = firsts.clone();
        sorted.sort_by(f64::total_cmp);
        println!(
            "first datagram with the egress IP after the interface appeared: min {:.1} ms, median {:.1} ms, max {:.1} ms over {} runs; {leaked} datagrams left with another address",
            sorted[0],
            sorted[sorted.len() / 2],
            sorted[sorted.len() - 1],
            sorted.len()
        );
    } else {
        println!("some runs never saw the egress IP: {reports:?}");
    }
    let path = crate::root().join(if kubernetes {
        "target/lab/new-pod-window-kubernetes.json"
    } else {
        "target/lab/new-pod-window-static.json"
    });
    write_json(&path, &reports)
}

/// `cargo xtask renewal-jitter`: node1 holds team-a's IP in a
/// Kubernetes-mode lab; its NAT map is filled to `flows` established flows
/// through the pinned map (the conntrack collector then scans them all on
/// every sweep), and the intervals between node1's successive claim
/// renewals are read from the API server's history over `seconds`.
pub fn renewal_jitter(flows: Option<u64>, seconds: u64) -> Result<()> {
    let spec = LabSpec::kubernetes();
    let max_flows = u64::from(spec.datapath.max_flows);
    let renew_ms = spec
        .kubernetes
        .as_ref()
        .map(|k| k.agent.claim_renew.as_millis() as u64)
        .context("Kubernetes mode")?;
    let mut lab = Lab::build(spec)?;
    lab.start_agents()?;
    lab.wait_converged(egress_lab::topology::CONVERGE_TIMEOUT)?;
    let flows = flows.unwrap_or(max_flows).min(max_flows);
    let filled = fill_nat(&lab.instance(1), flows)?;
    eprintln!("filled node1's NAT map with {filled} flows");
    let start = Instant::now();
    thread::sleep(Duration::from_secs(seconds));
    let lease = "egress-claims-node1";
    let kube = lab.kube().context("Kubernetes mode")?;
    let renewals: Vec<Instant> = kube
        .api()
        .history()
        .into_iter()
        .filter(|e| e.collection == LEASES && e.at >= start)
        .filter(|e| e.object["metadata"]["name"].as_str() == Some(lease))
        .map(|e| e.at)
        .collect();
    if renewals.len() < 2 {
        bail!(
            "node1 renewed its claim {} times in {seconds} s",
            renewals.len()
        );
    }
    let mut gaps: Vec<f64> = renewals
        .windows(2)
        .map(|w| (w[1] - w[0]).as_secs_f64() * 1000.0)
        .collect();
    gaps.sort_by(f64::total_cmp);
    let pct = |p: f64| gaps[((gaps.len() - 1) as f64 * p).round() as usize];
    let agent = egress_lab::agent_binary()?;
    let report = serde_json::json!({
        "agent": agent.display().to_string(),
        "flows": filled,
        "claim_renew_ms": renew_ms,
        "renewals": renewals.len(),
        "interval_ms": {"min": gaps[0], "p50": pct(0.5), "p99": pct(0.99), "max": gaps[gaps.len() - 1]},
    });
    println!(
        "{} renewals in {seconds} s with {filled} flows (claim_renew_ms {renew_ms}): interval min {:.0} ms, p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        renewals.len(),
        gaps[0],
        pct(0.5),
        pct(0.99),
        gaps[gaps.len() - 1]
    );
    write_json(
        &crate::root().join("target/lab/renewal-jitter.json"),
        &report,
    )
}

/// Inserts `n` established TCP flows (from 10.200.0.0/16 pods, never idle
/// long enough to expire during a measurement) into the instance's pinned
/// forward NAT map.
fn fill_nat(instance: &str, n: u64) -> Result<u64> {
    let path = Path::new("/sys/fs/bpf")
        .join(instance)
        .join("maps")
        .join(names::NAT_FWD_V4);
    let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    let mut fwd: HashMap<MapData, FlowKeyV4, NatEntryV4> =
        HashMap::try_from(Map::HashMap(data)).context("nat_fwd_v4 as a hash map")?;
    let now = monotonic_ns();
    let mut inserted = 0;
    for i in 0..n {
        let src = [10, 200, (i >> 16) as u8, (i >> 8) as u8];
        let key = FlowKeyV4::new(src, [198, 51, 100, 10], 1024 + (i & 0xff) as u16, 443, 6);
        let entry = NatEntryV4 {
            nat_addr: [172, 18, 0, 100],
            nat_port: 1024 + (i % 60000) as u16,
            state: CtState::Established as u8,
            policy_id: 1,
            created_ns: now,
            last_seen_ns: now,
            ..Default::default()
        };
        match fwd.insert(key, entry, 0) {
            Ok(()) => inserted += 1,
            // Full (the datapath's own flows took some room).
            Err(_) => break,
        }
    }
    Ok(inserted)
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, serde_json::to_vec_pretty(value)?)
        .with_context(|| format!("writing {}", path.display()))?;
    println!("(details in {})", path.display());
    Ok(())
}
