//! The new-pod window, measured with real traffic: how long after a
//! selected pod's interface appears its first packet leaves with the egress
//! IP, and how many leave with another address before that.
//!
//! The pod's interface pair is deleted (and in Kubernetes mode its Pod
//! object too), then a sender in the pod's namespace starts sending a
//! numbered datagram every millisecond — its sends fail while it has no
//! interface — and the pair is created again and configured as a CNI plugin
//! would (in Kubernetes mode the Pod object follows, as the kubelet reports
//! it once the sandbox is up). Times are from the creation of the pair.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    thread,
    time::{Duration, Instant},
};

use serde::Serialize;

use crate::{
    error::{LabError, Result},
    failover::{Receiver, Sender},
    spec::{self, PodRef},
    topology::Lab,
};

/// Where the server counts the new pod's datagrams.
pub const WINDOW_UDP_PORT: u16 = 8092;
const SEND_INTERVAL: Duration = Duration::from_millis(1);
/// How long the pod sends after its interface appears.
const OBSERVE: Duration = Duration::from_secs(3);

#[derive(Clone, Debug, Serialize)]
pub struct WindowReport {
    pub pod: String,
    pub kubernetes: bool,
    pub egress_ip: Ipv4Addr,
    /// The first datagram the server saw at all (the path is up).
    pub first_any_ms: Option<f64>,
    /// The first datagram with the egress IP: the figure.
    pub first_egress_ms: Option<f64>,
    /// Datagrams that left with another address before it.
    pub leaked: u64,
    /// Their sources.
    pub leaked_sources: Vec<Ipv4Addr>,
    pub sent: u64,
    pub received: u64,
}

impl WindowReport {
    pub fn summary(&self) -> String {
        let ms = |v: Option<f64>| v.map_or("never".to_string(), |v| format!("{v:.1} ms"));
        format!(
            "{} ({}): first datagram at the server {}, first with {} {}; {} of {} received left with another address {:?}",
            self.pod,
            if self.kubernetes {
                "Kubernetes mode"
            } else {
                "static mode"
            },
            ms(self.first_any_ms),
            self.egress_ip,
            ms(self.first_egress_ms),
            self.leaked,
            self.received,
            self.leaked_sources
        )
    }
}

/// How long an agent may take to drop a deleted Pod from its datapath.
const FORGET_TIMEOUT: Duration = Duration::from_secs(30);

/// One measurement on `pod`, which the lab's policies select.
pub fn measure_new_pod_window(lab: &mut Lab, pod: PodRef) -> Result<WindowReport> {
    let egress_ip = lab
        .policy_of(pod)
        .map(|p| p.egress_ip)
        .ok_or_else(|| LabError::Spec(format!("{pod} is not selected by any policy")))?;
    let kubernetes = lab.kube().is_some();
    lab.unplug_pod(pod)?;
    if kubernetes {
        lab.delete_pod_object(pod)?;
        // Waited for, not assumed: a pod still known when its interface
        // comes back measures nothing about the window.
        lab.agent(pod.node)
            .wait_until_pod_unknown(pod.ip(), FORGET_TIMEOUT)?;
    }
    // The agent forgets the interface meanwhile.
    thread::sleep(Duration::from_secs(2));
    let to = SocketAddrV4::new(spec::SERVER_ADDR, WINDOW_UDP_PORT);
    let server = Receiver::start(&lab.server_ns(), to)?;
    let mut sender = Sender::every(&lab.pod_ns(pod), to, SEND_INTERVAL)?;
    thread::sleep(Duration::from_millis(50));
    let appeared = Instant::now();
    lab.plug_pod(pod)?;
    if kubernetes {
        lab.restore_pod_object(pod)?;
    }
    thread::sleep(OBSERVE);
    let sent = sender.stop()?;
    thread::sleep(Duration::from_millis(100));
    let arrivals = server.arrivals();
    let ms = |at: Instant| at.saturating_duration_since(appeared).as_secs_f64() * 1000.0;
    let first_egress = arrivals.iter().find(|a| *a.from.ip() == egress_ip);
    let leaked: Vec<Ipv4Addr> = arrivals
        .iter()
        .filter(|a| *a.from.ip() != egress_ip)
        .filter(|a| first_egress.is_none_or(|f| a.at <= f.at))
        .map(|a| *a.from.ip())
        .collect();
    let mut sources = leaked.clone();
    sources.sort();
    sources.dedup();
    Ok(WindowReport {
        pod: pod.to_string(),
        kubernetes,
        egress_ip,
        first_any_ms: arrivals.first().map(|a| ms(a.at)),
        first_egress_ms: first_egress.map(|a| ms(a.at)),
        leaked: leaked.len() as u64,
        leaked_sources: sources,
        sent,
        received: arrivals.len() as u64,
    })
}
