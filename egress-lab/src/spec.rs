//! What a lab looks like: sizes, MTUs, policies and datapath settings, and
//! the addressing plan shared with `deploy/examples/static-node1.toml`.

use std::{net::Ipv4Addr, time::Duration};

use egress_config::{DatapathSettings, HeartbeatConfig, KubernetesConfig};
use egress_model::FailurePolicy;
use ipnet::Ipv4Net;
use serde::Serialize;

use crate::error::{LabError, Result};

/// Router address on the node network (bridge `br0`).
pub const ROUTER_NODE_ADDR: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 1);
pub const NODE_PREFIX_LEN: u8 = 24;
/// Router end of the small-MTU link to the server.
pub const ROUTER_SERVER_ADDR: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
pub const SERVER_ADDR: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
pub const SERVER_PREFIX_LEN: u8 = 24;
/// Ports the traffic helpers' servers listen on by convention.
pub const SERVER_TCP_PORT: u16 = 8080;
pub const SERVER_UDP_PORT: u16 = 8081;
pub const SERVER_IPERF_PORT: u16 = 5201;
/// First egress IP; policy `k` (1-based) of the default set uses `.99 + k`.
pub const FIRST_EGRESS_IP: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 100);
pub const TUNNEL_INTERFACE: &str = "egress-vxlan";
pub const TUNNEL_PORT: u16 = 4789;

/// Node `n` (1-based) on the node network.
pub fn node_addr(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(172, 18, 0, 10 + n)
}

/// Pod CIDR of node `n`.
pub fn pod_cidr(n: u8) -> Ipv4Net {
    Ipv4Net::new(Ipv4Addr::new(10, 244, n, 0), 24).expect("24 is a valid prefix length")
}

/// Address the node's host-side pod interfaces carry (the pods' gateway).
pub fn pod_gateway(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, n, 1)
}

/// A pod, by node and index (both 1-based).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct PodRef {
    pub node: u8,
    pub index: u8,
}

impl PodRef {
    pub const fn new(node: u8, index: u8) -> Self {
        Self { node, index }
    }

    pub fn ip(self) -> Ipv4Addr {
        Ipv4Addr::new(10, 244, self.node, 10 + self.index)
    }

    /// Name of the host-side interface on the pod's node.
    pub fn host_interface(self) -> String {
        format!("veth{}", self.index)
    }
}

impl std::fmt::Display for PodRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "n{}p{}", self.node, self.index)
    }
}

/// One `[[policies]]` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicySpec {
    pub id: u32,
    pub name: String,
    pub egress_ip: Ipv4Addr,
    /// Node (1-based) holding the egress IP; `None` while no node does.
    pub node: Option<u8>,
    pub failure_policy: FailurePolicy,
    pub pods: Vec<PodRef>,
    pub marks: Vec<u32>,
    pub vnis: Vec<u32>,
    pub excluded_cidrs: Vec<Ipv4Net>,
    /// Static mode: policies with the same group are one EgressIP's IPs.
    pub group: Option<String>,
    /// Static mode: addresses selected besides the pods' own (a second
    /// address a test gives a pod).
    pub addresses: Vec<Ipv4Addr>,
}

impl PolicySpec {
    pub fn new(id: u32, egress_ip: Ipv4Addr, node: Option<u8>, pods: Vec<PodRef>) -> Self {
        Self {
            id,
            name: format!("policy-{id}"),
            egress_ip,
            node,
            failure_policy: FailurePolicy::FailClosed,
            pods,
            marks: Vec::new(),
            vnis: Vec::new(),
            excluded_cidrs: Vec::new(),
            group: None,
            addresses: Vec::new(),
        }
    }
}

/// The lab's `[datapath]`: the agent's defaults, except a garbage collector
/// sweeping every second so that tests see flows expire quickly.
pub fn lab_datapath() -> DatapathSettings {
    DatapathSettings {
        gc_interval: Duration::from_secs(1),
        ..DatapathSettings::default()
    }
}

/// Kubernetes mode: the agents run `egress-agent run --kubernetes` against an
/// in-memory API server on the router, and the lab's policies become
/// `EgressIP` objects.
#[derive(Clone, Debug, PartialEq)]
pub struct KubernetesSpec {
    /// The agents' `[kubernetes]` section: the agent's defaults, except the
    /// lab's networks (the pod network, egress IPs on `eth0`), every node's
    /// heartbeat on [`HEARTBEAT_PORT`] and a short drain so that tests stop
    /// quickly.
    pub agent: KubernetesConfig,
    /// Give the agents `NODE_IP` as the DaemonSet does; without it they find
    /// their address themselves (the Node object's, first).
    pub node_ip_env: bool,
}

/// Namespace of the agents' claims and leader Leases in Kubernetes mode.
pub const AGENT_NAMESPACE: &str = "egress-system";
/// The agents' heartbeat port in Kubernetes mode (each node has its own
/// network namespace, so all use the same one).
pub const HEARTBEAT_PORT: u16 = 9471;
/// The pod network, never translated.
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";

impl Default for KubernetesSpec {
    fn default() -> Self {
        Self {
            agent: KubernetesConfig {
                namespace: AGENT_NAMESPACE.into(),
                cluster_cidrs: vec![CLUSTER_CIDR.parse().expect("valid CIDR")],
                egress_interfaces: vec!["eth0".into()],
                drain_timeout: Duration::from_secs(2),
                heartbeat: Some(HeartbeatConfig {
                    port: HEARTBEAT_PORT,
                    ..HeartbeatConfig::default()
                }),
                ..KubernetesConfig::default()
            },
            node_ip_env: true,
        }
    }
}

/// The shape of a lab. `Default` is the lab of `cargo xtask lab up`.
#[derive(Clone, Debug)]
pub struct LabSpec {
    /// Namespace name prefix; a random `eg` + 4 hex digits when `None`.
    pub prefix: Option<String>,
    pub nodes: u8,
    pub pods_per_node: u8,
    pub pod_mtu: u32,
    /// MTU of the node network (node uplinks and bridge ports).
    pub node_mtu: u32,
    /// MTU of both ends of the router-server link, the path's bottleneck.
    pub server_link_mtu: u32,
    /// MSS the server advertises. A server behind a tunnel advertises more
    /// than its path carries; without that, TCP would size its segments from
    /// the server's small MTU and never need path-MTU discovery, and the
    /// fragmentation-needed path would go untested. `None` keeps the kernel's.
    pub server_advmss: Option<u32>,
    pub policies: Vec<PolicySpec>,
    /// `[cluster] excluded_cidrs`.
    pub excluded_cidrs: Vec<Ipv4Net>,
    pub datapath: DatapathSettings,
    /// Extra arguments of `egress-agent run` (e.g. `--kubernetes`).
    pub agent_args: Vec<String>,
    /// Extra environment of the agents (e.g. `KUBECONFIG`).
    pub agent_env: Vec<(String, String)>,
    /// Run the agents in Kubernetes mode (see [`KubernetesSpec`]); `None`:
    /// static configuration files.
    pub kubernetes: Option<KubernetesSpec>,
}

impl Default for LabSpec {
    fn default() -> Self {
        let nodes = 3;
        let pods_per_node = 3;
        Self {
            prefix: None,
            nodes,
            pods_per_node,
            pod_mtu: 1500,
            node_mtu: 1500,
            server_link_mtu: 1400,
            server_advmss: Some(1460),
            policies: Self::default_policies(nodes, pods_per_node),
            excluded_cidrs: vec![
                "10.244.0.0/16".parse().expect("valid CIDR"),
                "10.96.0.0/12".parse().expect("valid CIDR"),
            ],
            datapath: lab_datapath(),
            agent_args: Vec::new(),
            agent_env: Vec::new(),
            kubernetes: None,
        }
    }
}

impl LabSpec {
    /// Policy 1: egress IP 172.18.0.100 held by node 1, selecting pod 1 of
    /// every node. Policy 2 (with two nodes or more): 172.18.0.101 held by
    /// node 2, selecting pod 3 of every node (with three pods or more). Pod 2
    /// of every node is selected by nothing.
    pub fn default_policies(nodes: u8, pods_per_node: u8) -> Vec<PolicySpec> {
        let mut policies = vec![PolicySpec {
            name: "team-a".into(),
            ..PolicySpec::new(
                1,
                FIRST_EGRESS_IP,
                Some(1),
                (1..=nodes).map(|n| PodRef::new(n, 1)).collect(),
            )
        }];
        if nodes >= 2 {
            let pods = if pods_per_node >= 3 {
                (1..=nodes).map(|n| PodRef::new(n, 3)).collect()
            } else {
                Vec::new()
            };
            policies.push(PolicySpec {
                name: "team-b".into(),
                ..PolicySpec::new(2, Ipv4Addr::new(172, 18, 0, 101), Some(2), pods)
            });
        }
        policies
    }

    /// The default lab in Kubernetes mode.
    pub fn kubernetes() -> Self {
        Self {
            kubernetes: Some(KubernetesSpec::default()),
            ..Self::default()
        }
    }

    /// Checks what the addressing plan can express.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(LabError::Spec(msg));
        if !(1..=80).contains(&self.nodes) {
            return bad(format!("nodes = {}: must be 1..=80", self.nodes));
        }
        if !(1..=200).contains(&self.pods_per_node) {
            return bad(format!(
                "pods_per_node = {}: must be 1..=200",
                self.pods_per_node
            ));
        }
        for (what, mtu) in [
            ("pod_mtu", self.pod_mtu),
            ("node_mtu", self.node_mtu),
            ("server_link_mtu", self.server_link_mtu),
        ] {
            if !(576..=9000).contains(&mtu) {
                return bad(format!("{what} = {mtu}: must be 576..=9000"));
            }
        }
        if let Some(prefix) = &self.prefix {
            validate_prefix(prefix)?;
        }
        let mut ids = std::collections::BTreeSet::new();
        for p in &self.policies {
            if p.id == 0 || p.id > egress_model::MAX_POLICY_ID {
                return bad(format!(
                    "policy `{}`: id {} out of 1..=2^24-1",
                    p.name, p.id
                ));
            }
            if !ids.insert(p.id) {
                return bad(format!("policy id {} used twice", p.id));
            }
            if let Some(n) = p.node
                && !(1..=self.nodes).contains(&n)
            {
                return bad(format!("policy `{}`: node {n} does not exist", p.name));
            }
            for pod in &p.pods {
                if !(1..=self.nodes).contains(&pod.node)
                    || !(1..=self.pods_per_node).contains(&pod.index)
                {
                    return bad(format!("policy `{}`: pod {pod} does not exist", p.name));
                }
            }
        }
        if self.kubernetes.is_some() {
            self.validate_for_kubernetes()?;
        }
        Ok(())
    }

    /// What an `EgressIP` can express: pods by label (so one policy per pod),
    /// and a node to hold the IP; marks and VNIs are static-mode only.
    fn validate_for_kubernetes(&self) -> Result<()> {
        let bad = |msg: String| Err(LabError::Spec(format!("Kubernetes mode: {msg}")));
        let mut owner = std::collections::BTreeMap::new();
        for p in &self.policies {
            if p.node.is_none() {
                return bad(format!(
                    "policy `{}` has no node: an EgressIP that no node may hold is invalid, not fail-closed, so the lab's expectations would not hold",
                    p.name
                ));
            }
            if !p.marks.is_empty()
                || !p.vnis.is_empty()
                || p.group.is_some()
                || !p.addresses.is_empty()
            {
                return bad(format!(
                    "policy `{}`: marks, VNIs, groups and extra addresses cannot be expressed as an EgressIP",
                    p.name
                ));
            }
            if !is_dns_label(&p.name) {
                return bad(format!(
                    "policy name `{}` must be a DNS label: it names the EgressIP",
                    p.name
                ));
            }
            for pod in &p.pods {
                if let Some(first) = owner.insert(*pod, &p.name) {
                    return bad(format!(
                        "pod {pod} is in policies `{first}` and `{}`: a pod carries one policy label",
                        p.name
                    ));
                }
            }
        }
        Ok(())
    }
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Prefixes become parts of namespace names and bpffs directory names.
pub fn validate_prefix(prefix: &str) -> Result<()> {
    let ok = !prefix.is_empty()
        && prefix.len() <= 12
        && prefix
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(LabError::Spec(format!(
            "prefix `{prefix}`: use 1 to 12 lowercase letters or digits"
        )))
    }
}

/// A fresh prefix: `eg` and four random hex digits.
pub fn random_prefix() -> String {
    format!("eg{:04x}", fastrand::u16(..))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addressing_matches_the_example_config() {
        assert_eq!(node_addr(1), Ipv4Addr::new(172, 18, 0, 11));
        assert_eq!(pod_cidr(2).to_string(), "10.244.2.0/24");
        assert_eq!(PodRef::new(3, 2).ip(), Ipv4Addr::new(10, 244, 3, 12));
        assert_eq!(PodRef::new(3, 2).host_interface(), "veth2");
    }

    #[test]
    fn default_spec_is_valid_and_leaves_pod_two_unselected() {
        let spec = LabSpec::default();
        spec.validate().unwrap();
        assert!(
            spec.policies
                .iter()
                .all(|p| p.pods.iter().all(|pod| pod.index != 2))
        );
        assert_eq!(spec.policies[0].egress_ip, Ipv4Addr::new(172, 18, 0, 100));
        assert_eq!(spec.policies[1].node, Some(2));
    }

    #[test]
    fn validation_names_the_bad_field() {
        let mut spec = LabSpec {
            pods_per_node: 0,
            ..LabSpec::default()
        };
        assert!(
            spec.validate()
                .unwrap_err()
                .to_string()
                .contains("pods_per_node")
        );
        spec.pods_per_node = 3;
        spec.policies[0].pods.push(PodRef::new(9, 1));
        assert!(spec.validate().unwrap_err().to_string().contains("n9p1"));
        spec.policies[0].pods.pop();
        spec.prefix = Some("Bad-Prefix".into());
        assert!(
            spec.validate()
                .unwrap_err()
                .to_string()
                .contains("Bad-Prefix")
        );
    }

    #[test]
    fn random_prefixes_are_valid() {
        for _ in 0..100 {
            validate_prefix(&random_prefix()).unwrap();
        }
    }
}
