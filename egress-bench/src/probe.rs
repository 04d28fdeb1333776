//! Probes of the ebpf datapath through its pinned objects: per-packet cost
//! with `BPF_PROG_TEST_RUN`, control-plane map updates, and the agent's drop
//! counters.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use egress_common::{
    DropReason, FlowKeyV4, NatEntryV4, PodPolicyV4, PolicyStats, PolicyV4, maps, policy_flags,
    proto,
};
use serde::{Deserialize, Serialize};

use crate::bpf;

pub fn pin_dir(instance: &str) -> PathBuf {
    PathBuf::from(format!("/sys/fs/bpf/{instance}"))
}

fn open_map(instance: &str, name: &str) -> Result<OwnedFd> {
    Ok(bpf::obj_get(&pin_dir(instance).join("maps").join(name))?)
}

fn open_prog(instance: &str, name: &str) -> Result<OwnedFd> {
    Ok(bpf::obj_get(&pin_dir(instance).join("progs").join(name))?)
}

// --- packets -------------------------------------------------------------

fn csum_fold(mut sum: u32) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn csum_add(data: &[u8], mut sum: u32) -> u32 {
    for c in data.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from_be_bytes([c[0], 0])
        };
        sum += u32::from(w);
    }
    sum
}

pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;

/// An Ethernet + IPv4 + TCP frame with valid checksums, as a pod or the
/// server would send it, so that the programs take their real paths.
pub fn tcp_frame(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    flags: u8,
    payload: usize,
) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + 20 + 20 + payload);
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let total = (20 + 20 + payload) as u16;
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[4..6].copy_from_slice(&1u16.to_be_bytes());
    ip[6] = 0x40; // DF
    ip[8] = 64;
    ip[9] = proto::TCP;
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    let c = csum_fold(csum_add(&ip, 0));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    let mut tcp = vec![0u8; 20 + payload];
    tcp[0..2].copy_from_slice(&sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&dport.to_be_bytes());
    tcp[4..8].copy_from_slice(&1000u32.to_be_bytes());
    tcp[8..12].copy_from_slice(&(if flags & TCP_ACK != 0 { 2000u32 } else { 0 }).to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = flags;
    tcp[14..16].copy_from_slice(&65535u16.to_be_bytes());
    for b in tcp[20..].iter_mut() {
        *b = b'x';
    }
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, proto::TCP]);
    pseudo.extend_from_slice(&((20 + payload) as u16).to_be_bytes());
    let c = csum_fold(csum_add(&tcp, csum_add(&pseudo, 0)));
    tcp[16..18].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&tcp);
    f
}

// --- BPF_PROG_TEST_RUN ---------------------------------------------------

/// Loads `r0 = TC_ACT_OK; exit` as a TC program: its test-run time is the
/// harness's own overhead, subtracted from single-run figures.
fn empty_tc_prog() -> Result<OwnedFd> {
    let insns: [u8; 16] = [0xb7, 0, 0, 0, 0, 0, 0, 0, 0x95, 0, 0, 0, 0, 0, 0, 0];
    bpf::load_sched_cls(&insns).context("BPF_PROG_LOAD of the empty program")
}

#[derive(Clone, Debug, clap::Args)]
pub struct ProgTestArgs {
    /// The agent instance of the egress node (pins under /sys/fs/bpf/<instance>).
    #[arg(long)]
    pub instance: String,
    /// Index of the policy/pod whose packets are crafted.
    #[arg(long, default_value_t = 0)]
    pub policy_index: u32,
    /// Single runs (fresh packet each) of the established forward packet, of
    /// the reply and of the empty program, interleaved: the medians the
    /// per-packet figures come from.
    #[arg(long, default_value_t = 1_000_000)]
    pub samples: u32,
    /// Single runs of first packets of new flows (each creates a flow).
    #[arg(long, default_value_t = 2000)]
    pub new_flow_samples: u32,
    /// `repeat` of the one batched run per kind (the bpftool-style figure).
    #[arg(long, default_value_t = 1_000_000)]
    pub repeat: u32,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ProgTestResult {
    /// Single runs behind each of `empty_ns`, `established_fwd_ns`, `reply_rev_ns`.
    pub samples: u32,
    /// Test-run time of an empty TC program, per single run.
    pub empty_ns: f64,
    /// Medians of single runs on fresh packets, minus `empty_ns`.
    pub established_fwd_ns: f64,
    pub reply_rev_ns: f64,
    pub new_flow_ns: f64,
    pub new_flow_p99_ns: f64,
    /// `repeat`-batched averages. The kernel reuses one skb across repeats,
    /// so only the first iteration sees the untranslated packet: this is the
    /// cost of the pass-through path after translation, a lower bound.
    pub batched_fwd_ns: f64,
    pub batched_rev_ns: f64,
    pub retvals: BTreeMap<String, u32>,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn median_u32(v: &mut [u32]) -> f64 {
    v.sort_unstable();
    f64::from(v[v.len() / 2])
}

fn p99(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[(v.len() * 99 / 100).min(v.len() - 1)]
}

/// Must run inside the egress node's namespace: the programs' FIB lookups
/// use the caller's.
pub fn prog_test(a: &ProgTestArgs) -> Result<ProgTestResult> {
    use egress_lab::bench_topology::{POD1_BASE, SERVER, pod_addr};
    let fwd = open_prog(&a.instance, maps::programs::POD_INGRESS)?;
    let rev = open_prog(&a.instance, maps::programs::UPLINK_INGRESS)?;
    let nat_fwd = open_map(&a.instance, maps::NAT_FWD_V4)?;
    let empty = empty_tc_prog()?;
    let pod = pod_addr(POD1_BASE, a.policy_index);
    // The pod's packets must arrive on the interface the agent resolved for
    // it, or pod_ingress refuses them (invalid_source).
    let pods = open_map(&a.instance, maps::POD_POLICY_V4)?;
    let mut entry = [0u8; size_of::<PodPolicyV4>()];
    if !bpf::lookup(&pods, &pod.octets(), &mut entry)? {
        bail!("pod_policy_v4 has no entry for {pod}");
    }
    let pod_if = u32::from_ne_bytes([entry[4], entry[5], entry[6], entry[7]]);
    if pod_if == 0 {
        bail!("the agent has not resolved the interface of {pod} (pod_policy_v4 ifindex 0)");
    }
    let on_pod_if = bpf::SkbContext {
        ifindex: pod_if,
        ..Default::default()
    };
    let run_fwd = |pkt: &[u8], repeat: u32| {
        bpf::test_run_skb(&fwd, pkt, &on_pod_if, repeat).map(|r| bpf::TestRun {
            retval: r.retval,
            duration_ns: r.duration_ns,
        })
    };
    let samples = a.samples.max(10);
    let mut res = ProgTestResult {
        samples,
        ..Default::default()
    };
    let probe = tcp_frame(pod, SERVER, 1, 1, TCP_ACK, 0);

    // One flow brought to Established through the programs themselves.
    let (sport, dport) = (40_000u16, 8000u16);
    let syn = tcp_frame(pod, SERVER, sport, dport, TCP_SYN, 0);
    let r = run_fwd(&syn, 1)?;
    res.retvals.insert("syn".into(), r.retval);
    let key = FlowKeyV4::new(pod.octets(), SERVER.octets(), sport, dport, proto::TCP);
    let mut val = [0u8; size_of::<NatEntryV4>()];
    if !bpf::lookup(&nat_fwd, bpf::bytes_of(&key), &mut val)? {
        bail!(
            "pod_ingress (retval {}) created no nat_fwd_v4 entry for {pod}:{sport} -> {SERVER}:{dport}",
            r.retval
        );
    }
    let nat_addr = Ipv4Addr::from([val[0], val[1], val[2], val[3]]);
    let nat_port = u16::from_ne_bytes([val[8], val[9]]);
    let synack = tcp_frame(SERVER, nat_addr, dport, nat_port, TCP_SYN | TCP_ACK, 0);
    let r = bpf::test_run(&rev, &synack, 1)?;
    res.retvals.insert("synack".into(), r.retval);

    let est = tcp_frame(pod, SERVER, sport, dport, TCP_ACK, 64);
    let reply = tcp_frame(SERVER, nat_addr, dport, nat_port, TCP_ACK, 64);
    // Interleaved, so that drift in machine load shifts all three alike; the
    // empty program's median is subtracted from the others'.
    let cap = samples as usize;
    let (mut e, mut fwd_v, mut rev_v) = (
        Vec::with_capacity(cap),
        Vec::with_capacity(cap),
        Vec::with_capacity(cap),
    );
    let (mut est_ret, mut reply_ret) = (0, 0);
    for _ in 0..samples {
        e.push(bpf::test_run(&empty, &probe, 1)?.duration_ns);
        let r = run_fwd(&est, 1)?;
        est_ret = r.retval;
        fwd_v.push(r.duration_ns);
        let r = bpf::test_run(&rev, &reply, 1)?;
        reply_ret = r.retval;
        rev_v.push(r.duration_ns);
    }
    res.retvals.insert("established".into(), est_ret);
    res.retvals.insert("reply".into(), reply_ret);
    res.empty_ns = median_u32(&mut e);
    res.established_fwd_ns = median_u32(&mut fwd_v) - res.empty_ns;
    res.reply_rev_ns = median_u32(&mut rev_v) - res.empty_ns;

    let mut new_v = Vec::new();
    for k in 0..a.new_flow_samples.max(10) {
        let sp = 10_000 + (k % 50_000) as u16;
        let dp = 20_000 + (k / 50_000) as u16;
        let syn = tcp_frame(pod, SERVER, sp, dp, TCP_SYN, 0);
        let r = run_fwd(&syn, 1)?;
        res.retvals.insert("new_flow".into(), r.retval);
        new_v.push(f64::from(r.duration_ns) - res.empty_ns);
    }
    res.new_flow_ns = median(&mut new_v);
    res.new_flow_p99_ns = p99(&mut new_v);

    res.batched_fwd_ns = f64::from(run_fwd(&est, a.repeat)?.duration_ns);
    res.batched_rev_ns = f64::from(bpf::test_run(&rev, &reply, a.repeat)?.duration_ns);
    Ok(res)
}

// --- control plane --------------------------------------------------------

/// One egress IP added and removed straight in the datapath's maps (what the
/// agent writes for a new policy with one pod), timed without process start.
pub fn map_add_remove(
    instance: &str,
    id: u32,
    egress: Ipv4Addr,
    pod: Ipv4Addr,
) -> Result<(Duration, Duration)> {
    let policies = open_map(instance, maps::POLICIES_V4)?;
    let addrs = open_map(instance, maps::EGRESS_ADDRS_V4)?;
    let pods = open_map(instance, maps::POD_POLICY_V4)?;
    let policy = PolicyV4 {
        egress_addr: egress.octets(),
        egress_node: egress_lab::bench_topology::NODE1.octets(),
        flags: policy_flags::ACTIVE | policy_flags::LOCAL,
        group: id,
    };
    let pp = PodPolicyV4 {
        policy_id: id,
        ifindex: 0,
    };
    let t = Instant::now();
    bpf::update(&policies, &id.to_ne_bytes(), bpf::bytes_of(&policy))?;
    bpf::update(&addrs, &egress.octets(), &id.to_ne_bytes())?;
    bpf::update(&pods, &pod.octets(), bpf::bytes_of(&pp))?;
    let add = t.elapsed();
    let t = Instant::now();
    bpf::delete(&pods, &pod.octets())?;
    bpf::delete(&addrs, &egress.octets())?;
    bpf::update(
        &policies,
        &id.to_ne_bytes(),
        bpf::bytes_of(&PolicyV4::default()),
    )?;
    let del = t.elapsed();
    Ok((add, del))
}

/// Drops by reason summed over policies `0..=n` and CPUs, plus live flows.
pub fn agent_counters(instance: &str, n: u32) -> Result<BTreeMap<String, f64>> {
    let stats = open_map(instance, maps::POLICY_STATS)?;
    let cpus = bpf::possible_cpus()?;
    let stride = size_of::<PolicyStats>().next_multiple_of(8);
    let mut buf = vec![0u8; stride * cpus];
    let mut total = PolicyStats::default();
    for id in 0..=n {
        if !bpf::lookup(&stats, &id.to_ne_bytes(), &mut buf)? {
            continue;
        }
        for c in 0..cpus {
            let mut s = PolicyStats::default();
            // SAFETY: PolicyStats is plain repr(C) u64s and the slice holds
            // at least size_of::<PolicyStats>() bytes at this offset.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    buf[c * stride..].as_ptr(),
                    (&mut s as *mut PolicyStats).cast::<u8>(),
                    size_of::<PolicyStats>(),
                );
            }
            total.accumulate(&s);
        }
    }
    let mut m = BTreeMap::new();
    for r in DropReason::ALL {
        m.insert(format!("drop_{}", r.name()), total.drops.get(r) as f64);
    }
    m.insert("new_flows".into(), total.new_flows as f64);
    let fc = open_map(instance, maps::FLOW_COUNT)?;
    let mut v = [0u8; 8];
    let created = if bpf::lookup(&fc, &0u32.to_ne_bytes(), &mut v)? {
        u64::from_ne_bytes(v)
    } else {
        0
    };
    let released = if bpf::lookup(&fc, &1u32.to_ne_bytes(), &mut v)? {
        u64::from_ne_bytes(v)
    } else {
        0
    };
    m.insert("flows_created".into(), created as f64);
    m.insert("flows_live".into(), created.saturating_sub(released) as f64);
    Ok(m)
}

/// `run_time_ns` and `run_cnt` of a pinned program (needs
/// `kernel.bpf_stats_enabled=1`).
pub fn prog_stats(instance: &str, prog: &str) -> Result<(u64, u64)> {
    let path = pin_dir(instance).join("progs").join(prog);
    let out = egress_lab::exec::exec(
        "bpftool",
        &["-j", "prog", "show", "pinned", &path.to_string_lossy()],
    )?
    .stdout;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    Ok((
        v["run_time_ns"].as_u64().unwrap_or(0),
        v["run_cnt"].as_u64().unwrap_or(0),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crafted_frames_have_valid_checksums() {
        let src = Ipv4Addr::new(10, 244, 64, 1);
        let dst = Ipv4Addr::new(172, 18, 0, 1);
        for (flags, payload) in [(TCP_SYN, 0), (TCP_ACK, 64), (TCP_SYN | TCP_ACK, 7)] {
            let f = tcp_frame(src, dst, 40000, 8000, flags, payload);
            assert_eq!(f.len(), 14 + 20 + 20 + payload);
            // A correct header sums (with its checksum) to 0xffff, i.e. folds to 0.
            assert_eq!(csum_fold(csum_add(&f[14..34], 0)), 0);
            let mut pseudo = Vec::new();
            pseudo.extend_from_slice(&src.octets());
            pseudo.extend_from_slice(&dst.octets());
            pseudo.extend_from_slice(&[0, proto::TCP]);
            pseudo.extend_from_slice(&((20 + payload) as u16).to_be_bytes());
            assert_eq!(csum_fold(csum_add(&f[34..], csum_add(&pseudo, 0))), 0);
            assert_eq!(f[34 + 13], flags);
        }
    }
}
