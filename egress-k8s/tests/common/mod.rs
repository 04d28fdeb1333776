//! What the failover, fault and restart tests share: loopback nodes with
//! real heartbeats, agents played by a task that applies every claim at
//! once, and polling with a generous deadline.

#![allow(dead_code)] // each test file uses its own part

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr},
    sync::{Arc, Mutex},
    time::Duration,
};

use egress_config::{HeartbeatConfig, KubernetesConfig};
use egress_fake_api::FakeApi;
use egress_k8s::{
    AgentLink, Desired, Options,
    facts::{DEFAULT_ASSIGNABLE_LABEL, EgressSubnet},
};
use serde_json::{Value, json};

pub const NODES: &str = "/api/v1/nodes";
pub const NAMESPACES: &str = "/api/v1/namespaces";
pub const PODS: &str = "/api/v1/pods";
pub const EIPS: &str = "/apis/egress.example.dev/v1/egressips";
pub const LEASES: &str = "/apis/coordination.k8s.io/v1/leases";
pub const NS: &str = "egress-system";
pub const EGRESS_IP: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 100);
pub const LOCK: &str = "egress-ip-172-18-0-100";

pub const CLAIM_TTL: Duration = Duration::from_secs(2);
pub const CLAIM_RENEW: Duration = Duration::from_millis(400);

pub fn trace() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("egress_k8s=debug")
        .with_test_writer()
        .try_init();
}

/// A Ready node on a loopback address (so that heartbeats really flow),
/// assignable; its subnet is published by its agent.
pub fn node(name: &str, addr: &str) -> Value {
    json!({
        "metadata": {"name": name, "labels": {DEFAULT_ASSIGNABLE_LABEL: "", "kubernetes.io/hostname": name}},
        "status": {
            "addresses": [{"type": "InternalIP", "address": addr}],
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                "lastHeartbeatTime": "2026-01-10T09:00:00Z", "lastTransitionTime": "2026-01-10T08:00:10Z"}]
        }
    })
}

/// node`n` answers heartbeats on 127.0.0.1`n`:`port` and offers 172.18.0.1`n`/16.
pub fn node_addr(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, 10 + n)
}

pub fn options(n: u8, port: u16, assigner: bool) -> Options {
    Options {
        subnets: vec![EgressSubnet {
            interface: "eth0".into(),
            address: format!("172.18.0.1{n}/16").parse().unwrap(),
        }],
        ..Options::new(
            KubernetesConfig {
                claim_ttl: CLAIM_TTL,
                claim_renew: CLAIM_RENEW,
                assigner,
                heartbeat: Some(HeartbeatConfig {
                    bind: IpAddr::V4(node_addr(n)),
                    port,
                    interval: Duration::from_millis(200),
                    timeout: Duration::from_millis(1000),
                }),
                ..Default::default()
            },
            Vec::new(),
        )
        .unwrap()
    }
}

/// Options of a node whose subnet is `addr/16` on eth0, with short claim
/// and leader timings and no heartbeat: the fixtures' node addresses are
/// not reachable from here, so nodes go away by being cordoned or drained.
pub fn unprobed_options(addr: &str) -> Options {
    Options {
        subnets: vec![EgressSubnet {
            interface: "eth0".into(),
            address: format!("{addr}/16").parse().unwrap(),
        }],
        ..Options::new(
            KubernetesConfig {
                claim_ttl: Duration::from_secs(2),
                claim_renew: Duration::from_millis(300),
                leader_ttl: Duration::from_secs(2),
                leader_renew: Duration::from_millis(200),
                heartbeat: None,
                ..Default::default()
            },
            Vec::new(),
        )
        .unwrap()
    }
}

/// A free UDP port, for every responder on its own address.
pub fn free_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.11:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The Nodes, a namespace and a pod on the last node that an EgressIP in
/// the namespace selects.
pub fn seed(api: &FakeApi, nodes: u8) {
    for n in 1..=nodes {
        api.create(NODES, node(&format!("node{n}"), &node_addr(n).to_string()));
    }
    api.create(
        NAMESPACES,
        json!({"metadata": {"name": "shop", "labels": {"team": "a"}}}),
    );
    api.create(PODS, json!({
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {"nodeName": format!("node{nodes}"), "containers": [{"name": "app", "image": "registry.k8s.io/pause:3.10"}]},
        "status": {"phase": "Running", "podIP": "10.244.9.4", "podIPs": [{"ip": "10.244.9.4"}]}
    }));
}

/// One node's controller and the agent it talks to.
pub struct Agent {
    pub link: AgentLink,
    pub task: tokio::task::JoinHandle<Result<(), egress_k8s::Error>>,
    /// Every desired state it was given, in order.
    pub history: Arc<Mutex<Vec<Desired>>>,
}

impl Agent {
    /// Starts `name`'s controller; the agent applies every claim at once.
    pub fn start(api: &FakeApi, name: &str, options: Options) -> Self {
        let (ctl, link) = egress_k8s::link();
        let task = tokio::spawn(egress_k8s::run(api.client(), name.into(), options, ctl));
        let mut desired = link.desired.clone();
        let held = link.held.clone();
        let history: Arc<Mutex<Vec<Desired>>> = Arc::default();
        let log = history.clone();
        tokio::spawn(async move {
            while desired.changed().await.is_ok() {
                let Some(d) = desired.borrow_and_update().clone() else {
                    continue;
                };
                held.send_replace(d.claims.iter().map(|c| c.ip).collect());
                log.lock().unwrap().push(d);
            }
        });
        Self {
            link,
            task,
            history,
        }
    }

    pub fn claims(&self) -> BTreeSet<Ipv4Addr> {
        self.link
            .desired
            .borrow()
            .as_ref()
            .map(|d| d.claims.iter().map(|c| c.ip).collect())
            .unwrap_or_default()
    }

    pub fn synced(&self) -> bool {
        self.link.desired.borrow().is_some()
    }

    /// Kills the agent (no release, no more renewals nor heartbeats);
    /// returns when.
    pub fn kill(self) -> std::time::Instant {
        self.task.abort();
        std::time::Instant::now()
    }
}

pub async fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until every agent has synced and published its node's subnets
/// (so that placement sees them all).
pub async fn all_ready(api: &FakeApi, agents: &[(&str, &Agent)]) {
    eventually("synced", || {
        agents.iter().all(|(_, a)| a.synced()).then_some(())
    })
    .await;
    for (n, _) in agents {
        eventually("subnets published", || {
            api.get(NODES, None, n)?["metadata"]["annotations"]["egress.example.dev/egress-subnets"]
                .as_str()
                .map(|_| ())
        })
        .await;
    }
}

/// Makes `node` eligible for the EgressIP of [`egress_ip_on`].
pub fn make_eligible(api: &FakeApi, node: &str) {
    api.patch(
        NODES,
        None,
        node,
        json!({"metadata": {"labels": {"egress": "yes"}}}),
    );
}

/// Labels `nodes` eligible and creates the EgressIP `team-a` that only
/// they may hold (placement then picks the first by name).
pub fn egress_ip_on(api: &FakeApi, nodes: &[&str]) {
    for n in nodes {
        make_eligible(api, n);
    }
    api.create(EIPS, json!({
        "metadata": {"name": "team-a"},
        "spec": {"egressIPs": [EGRESS_IP.to_string()], "namespaceSelector": {"matchLabels": {"team": "a"}},
                 "nodeSelector": {"matchLabels": {"egress": "yes"}}}
    }));
}

/// The node status names for the egress IP, and whether it says announced.
pub fn holder(api: &FakeApi) -> Option<(String, bool)> {
    let e = api.get(EIPS, None, "team-a")?;
    let ip = &e["status"]["ips"][0];
    let announced = ip["conditions"]
        .as_array()?
        .iter()
        .any(|c| c["type"] == "Announced" && c["status"] == "True");
    Some((ip["node"].as_str()?.to_string(), announced))
}

pub async fn announced_by(api: &FakeApi, node: &str) {
    eventually(&format!("{EGRESS_IP} announced by {node}"), || {
        (holder(api)? == (node.to_string(), true)).then_some(())
    })
    .await;
}

/// The server's history of one Lease: (when stored, the object).
pub fn lease_history(api: &FakeApi, name: &str) -> Vec<(std::time::Instant, Value)> {
    api.history()
        .into_iter()
        .filter(|e| e.collection == LEASES && e.object["metadata"]["name"] == name)
        .map(|e| (e.at, e.object))
        .collect()
}

pub fn claimed_ips(lease: &Value) -> &str {
    lease["metadata"]["annotations"]["egress.example.dev/claimed-ips"]
        .as_str()
        .unwrap_or_default()
}

/// When `node` first published a claim on the egress IP after `since`.
pub fn first_claim(
    api: &FakeApi,
    node: &str,
    since: std::time::Instant,
) -> Option<std::time::Instant> {
    lease_history(api, &format!("egress-claims-{node}"))
        .into_iter()
        .find(|(at, l)| {
            *at >= since
                && claimed_ips(l)
                    .split(',')
                    .any(|s| s == EGRESS_IP.to_string())
        })
        .map(|(at, _)| at)
}
