//! Fault injectors, each a small piece that breaks one thing and returns a
//! guard that heals it (on `heal()` or when dropped, so that a failing run
//! never leaves a node partitioned or an agent stopped).

use std::{
    net::Ipv4Addr,
    thread,
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use serde::Serialize;
use serde_json::{Value, json};

use crate::{
    error::{LabError, Result},
    exec,
    kubernetes::{self, EGRESS_IPS, POD_NAMESPACE, PODS},
    spec::HEARTBEAT_PORT,
    spec::PodRef,
    topology::Lab,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultKind {
    /// SIGKILL the agent of a node holding an egress IP; start it again later.
    KillHolder,
    /// SIGSTOP the agent of a node holding an egress IP; SIGCONT later.
    StopHolder,
    /// SIGKILL the elected assigner's agent; start it again later.
    KillAssigner,
    /// SIGSTOP the elected assigner's agent; SIGCONT later.
    StopAssigner,
    /// Drop one node's traffic to the API server, then heal.
    ApiPartition,
    /// Drop heartbeat UDP at the assigner's node only, then heal.
    HeartbeatLossAtAssigner,
    /// SIGTERM and start again every agent, one node at a time.
    RollingRestart,
    /// Malformed, oversized and conflicting EgressIPs, then removed.
    BadObjects,
    /// A selected pod deleted (object and interface) and created again.
    PodChurn,
    /// The uplink of a node holding an egress IP cut, then restored.
    LinkCutHolder,
}

pub const ALL_FAULTS: [FaultKind; 10] = [
    FaultKind::KillHolder,
    FaultKind::StopHolder,
    FaultKind::KillAssigner,
    FaultKind::StopAssigner,
    FaultKind::ApiPartition,
    FaultKind::HeartbeatLossAtAssigner,
    FaultKind::RollingRestart,
    FaultKind::BadObjects,
    FaultKind::PodChurn,
    FaultKind::LinkCutHolder,
];

impl FaultKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::KillHolder => "kill-holder",
            Self::StopHolder => "stop-holder",
            Self::KillAssigner => "kill-assigner",
            Self::StopAssigner => "stop-assigner",
            Self::ApiPartition => "api-partition",
            Self::HeartbeatLossAtAssigner => "heartbeat-loss-at-assigner",
            Self::RollingRestart => "rolling-restart",
            Self::BadObjects => "bad-objects",
            Self::PodChurn => "pod-churn",
            Self::LinkCutHolder => "link-cut-holder",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        ALL_FAULTS.into_iter().find(|k| k.name() == name)
    }
}

fn agent_pid(lab: &Lab, n: u8) -> Result<Pid> {
    lab.agent(n)
        .pid()
        .map(|p| Pid::from_raw(p as i32))
        .ok_or_else(|| LabError::Spec(format!("node{n}'s agent is not running")))
}

/// SIGSTOP of node `n`'s agent; SIGCONT on heal.
pub struct Stopped {
    pid: Option<Pid>,
}

pub fn sigstop(lab: &Lab, n: u8) -> Result<Stopped> {
    let pid = agent_pid(lab, n)?;
    kill(pid, Signal::SIGSTOP).map_err(|e| LabError::Spec(format!("SIGSTOP node{n}: {e}")))?;
    Ok(Stopped { pid: Some(pid) })
}

impl Stopped {
    pub fn heal(mut self) {
        if let Some(pid) = self.pid.take() {
            let _ = kill(pid, Signal::SIGCONT);
        }
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        if let Some(pid) = self.pid.take() {
            let _ = kill(pid, Signal::SIGCONT);
        }
    }
}

/// SIGKILL of node `n`'s agent, as a crash or an OOM kill.
pub fn sigkill(lab: &mut Lab, n: u8) -> Result<()> {
    lab.kill_agent(n)
}

/// iptables rules in one namespace, removed on heal.
pub struct Rules {
    ns: String,
    rules: Vec<Vec<String>>,
}

fn add_rules(ns: &str, rules: Vec<Vec<String>>) -> Result<Rules> {
    let mut added = Rules {
        ns: ns.to_owned(),
        rules: Vec::new(),
    };
    for r in rules {
        let mut args = vec!["-I".to_owned()];
        args.extend(r.iter().cloned());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        exec::exec_in(ns, "iptables", &args)?;
        added.rules.push(r);
    }
    Ok(added)
}

impl Rules {
    fn remove(&mut self) -> Result<()> {
        for r in self.rules.drain(..) {
            let mut args = vec!["-D".to_owned()];
            args.extend(r);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            exec::exec_in(&self.ns, "iptables", &args)?;
        }
        Ok(())
    }

    pub fn heal(mut self) -> Result<()> {
        self.remove()
    }
}

impl Drop for Rules {
    fn drop(&mut self) {
        let _ = self.remove();
    }
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| (*s).to_owned()).collect()
}

/// Node `n` cannot reach the API server (its packets to it are dropped in
/// its own namespace, both ways): the agent keeps running, its link stays up.
pub fn partition_api(lab: &Lab, n: u8) -> Result<Rules> {
    let api = lab
        .kube()
        .ok_or_else(|| LabError::Spec("API partition needs Kubernetes mode".into()))?
        .api()
        .addr;
    let (ip, port) = (api.ip().to_string(), api.port().to_string());
    add_rules(
        &lab.node_ns(n),
        vec![
            strings(&[
                "OUTPUT", "-p", "tcp", "-d", &ip, "--dport", &port, "-j", "DROP",
            ]),
            strings(&[
                "INPUT", "-p", "tcp", "-s", &ip, "--sport", &port, "-j", "DROP",
            ]),
        ],
    )
}

/// Heartbeats lost at node `n` only (meant for the assigner): every
/// heartbeat datagram in or out of its namespace is dropped.
pub fn drop_heartbeats(lab: &Lab, n: u8) -> Result<Rules> {
    let port = HEARTBEAT_PORT.to_string();
    add_rules(
        &lab.node_ns(n),
        vec![
            strings(&["INPUT", "-p", "udp", "--dport", &port, "-j", "DROP"]),
            strings(&["INPUT", "-p", "udp", "--sport", &port, "-j", "DROP"]),
            strings(&["OUTPUT", "-p", "udp", "--dport", &port, "-j", "DROP"]),
            strings(&["OUTPUT", "-p", "udp", "--sport", &port, "-j", "DROP"]),
        ],
    )
}

/// Node `n`'s uplink cut at the router (the node's end stays up).
pub struct LinkCut {
    router: String,
    dev: Option<String>,
}

pub fn cut_link(lab: &Lab, n: u8) -> Result<LinkCut> {
    let dev = format!("n{n}");
    exec::exec_in(&lab.router_ns(), "ip", &["link", "set", &dev, "down"])?;
    Ok(LinkCut {
        router: lab.router_ns(),
        dev: Some(dev),
    })
}

impl LinkCut {
    pub fn heal(mut self) -> Result<()> {
        match self.dev.take() {
            Some(dev) => exec::exec_in(&self.router, "ip", &["link", "set", &dev, "up"]).map(drop),
            None => Ok(()),
        }
    }
}

impl Drop for LinkCut {
    fn drop(&mut self) {
        if let Some(dev) = self.dev.take() {
            let _ = exec::exec_in(&self.router, "ip", &["link", "set", &dev, "up"]);
        }
    }
}

/// SIGTERM then the same command again, one node after the other, as a
/// DaemonSet rolling update does (each new agent ready before the next
/// node's goes). Returns each node's (stopped, ready again) times.
pub fn rolling_restart(lab: &mut Lab) -> Result<Vec<(u8, Instant, Instant)>> {
    let mut out = Vec::new();
    for n in 1..=lab.spec().nodes {
        let stopping = Instant::now();
        lab.stop_agent(n)?;
        lab.start_agent(n)?;
        out.push((n, stopping, Instant::now()));
    }
    Ok(out)
}

/// EgressIPs that must not disturb anything: objects that do not
/// deserialize, oversized ones, invalid and conflicting addresses. Removed
/// on heal.
pub struct BadObjects<'a> {
    lab: &'a Lab,
    names: Vec<String>,
}

/// The bad EgressIPs: name -> object.
pub fn bad_egress_ips(nodes: u8) -> Vec<(String, Value)> {
    // Well-formed objects that select no pod, with what only the cluster
    // can judge wrong (addresses, sizes).
    let selecting_nobody = |name: &str, ips: Vec<String>| {
        let mut eip = kubernetes::lab_egress_ip(name, &[]);
        eip.spec.egress_ips = ips;
        eip.spec.pod_selector = Some(kubernetes::match_labels(&[(
            "chaos.egress.example.dev/nobody",
            "x",
        )]));
        eip
    };
    let too_many: Vec<String> = (0..2000u32)
        .map(|i| Ipv4Addr::from(0xc612_0000u32 + i).to_string())
        .collect();
    let mut too_many = selecting_nobody("chaos-too-many", too_many);
    // Oversized in every way: a large annotation too.
    too_many.metadata.annotations = Some(
        [(
            "chaos.egress.example.dev/filler".to_owned(),
            "x".repeat(256 * 1024),
        )]
        .into(),
    );
    let mut bad_cidr = selecting_nobody("chaos-bad-cidr", vec!["172.18.0.151".into()]);
    bad_cidr.spec.excluded_cidrs = vec!["10.0.0.0/33".into(), "garbage".into()];
    let node_ips: Vec<String> = (1..=nodes)
        .map(|n| crate::spec::node_addr(n).to_string())
        .collect();
    let well_formed = [
        selecting_nobody(
            "chaos-bad-ip",
            vec!["172.18.0.300".into(), "not-an-ip".into(), String::new()],
        ),
        bad_cidr,
        too_many,
        selecting_nobody("chaos-router-ip", vec!["172.18.0.1".into()]),
        selecting_nobody("chaos-node-ips", node_ips),
    ];
    // Objects that do not decode as an EgressIP at all (a string for a
    // list, a number for a selector, an unknown enum value): the CRD types
    // cannot express them, so they stay raw JSON.
    let ns_sel = json!({"matchLabels": {"kubernetes.io/metadata.name": POD_NAMESPACE}});
    let nobody = json!({"matchLabels": {"chaos.egress.example.dev/nobody": "x"}});
    let malformed = [
        (
            "chaos-bad-type",
            json!({"egressIPs": "172.18.0.150", "podSelector": 7, "namespaceSelector": ns_sel}),
        ),
        (
            "chaos-bad-policy",
            json!({"egressIPs": ["172.18.0.152"], "failurePolicy": "Sometimes",
                   "podSelector": nobody, "namespaceSelector": ns_sel}),
        ),
    ];
    malformed
        .into_iter()
        .map(|(name, spec)| {
            (
                name.to_owned(),
                json!({"metadata": {"name": name}, "spec": spec}),
            )
        })
        .chain(well_formed.iter().map(|eip| {
            (
                eip.metadata.name.clone().expect("named"),
                kubernetes::to_json(eip),
            )
        }))
        .collect()
}

pub fn put_bad_objects(lab: &Lab) -> Result<BadObjects<'_>> {
    let api = lab
        .kube()
        .ok_or_else(|| LabError::Spec("bad objects need Kubernetes mode".into()))?
        .api();
    let mut guard = BadObjects {
        lab,
        names: Vec::new(),
    };
    for (name, obj) in bad_egress_ips(lab.spec().nodes) {
        api.create(EGRESS_IPS, obj);
        guard.names.push(name);
    }
    Ok(guard)
}

impl BadObjects<'_> {
    fn remove(&mut self) {
        if let Some(k) = self.lab.kube() {
            for name in self.names.drain(..) {
                k.api().delete(EGRESS_IPS, None, &name);
            }
        }
    }

    pub fn heal(mut self) {
        self.remove();
    }
}

impl Drop for BadObjects<'_> {
    fn drop(&mut self) {
        self.remove();
    }
}

/// A pod deleted as Kubernetes deletes one: its Pod object, then its
/// interface; `recreate` gives it both back (interface first, as the CNI
/// runs before the kubelet reports the pod).
pub struct DeletedPod {
    pub pod: PodRef,
    object: Value,
}

pub fn delete_pod(lab: &Lab, pod: PodRef) -> Result<DeletedPod> {
    let api = lab
        .kube()
        .ok_or_else(|| LabError::Spec("pod churn needs Kubernetes mode".into()))?
        .api();
    let name = pod.to_string();
    let current = api
        .get(PODS, Some(POD_NAMESPACE), &name)
        .ok_or_else(|| LabError::Spec(format!("pod {pod} has no object")))?;
    api.delete(PODS, Some(POD_NAMESPACE), &name);
    lab.unplug_pod(pod)?;
    let object = json!({
        "metadata": {"name": name, "namespace": POD_NAMESPACE,
                     "labels": current["metadata"]["labels"].clone()},
        "spec": current["spec"].clone(),
        "status": current["status"].clone(),
    });
    Ok(DeletedPod { pod, object })
}

impl DeletedPod {
    pub fn recreate(self, lab: &Lab) -> Result<()> {
        lab.plug_pod(self.pod)?;
        let api = lab
            .kube()
            .ok_or_else(|| LabError::Spec("pod churn needs Kubernetes mode".into()))?
            .api();
        api.create(PODS, self.object);
        Ok(())
    }
}

/// The node holding `ip` of EgressIP `name` per its status (announced).
pub fn holder_of(lab: &Lab, name: &str, ip: Ipv4Addr) -> Option<u8> {
    match lab.kube()?.holder(name, ip)? {
        (node, true) => kubernetes::node_number(&node),
        _ => None,
    }
}

/// The elected assigner's node.
pub fn assigner(lab: &Lab) -> Option<u8> {
    kubernetes::node_number(&lab.kube()?.leader()?)
}

/// Sleeps `d` (a fault's hold time), in small steps.
pub fn hold(d: Duration) {
    thread::sleep(d);
}
