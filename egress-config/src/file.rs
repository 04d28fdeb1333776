//! The whole file: parsing, validation and its projection to the desired
//! datapath state of a static-mode node. A file is either valid as a whole
//! or rejected with an error that names the offending field; nothing is
//! applied from a rejected file.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use egress_model::{FailurePolicy, MAX_POLICY_ID, NodeState, PolicyId, PolicyState, RemotePod};
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::{DatapathSettings, KubernetesConfig};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Syntax {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("{path}: {field}: {message}")]
    Invalid {
        path: PathBuf,
        field: String,
        message: String,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Pinned state lives under /sys/fs/bpf/<instance>/.
    pub instance: String,
    #[serde(default)]
    pub node: NodeConfig,
    #[serde(default)]
    pub cluster: ClusterConfig,
    #[serde(default)]
    pub datapath: DatapathSettings,
    /// Static mode only; an empty list is not written, so that a
    /// Kubernetes-mode file has no `policies` key at all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<PolicyConfig>,
    /// Settings of the Kubernetes mode (`run --kubernetes`).
    #[serde(default)]
    pub kubernetes: KubernetesConfig,
}

/// Where policies come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// `[[policies]]` and `cluster.nodes` in the file.
    Static,
    /// EgressIP resources and Nodes from the API server; the file carries
    /// only this node's interfaces and the datapath settings.
    Kubernetes,
}

/// This node. In static mode `name`, `address`, `uplink` and `pod_cidr` are
/// required. In Kubernetes mode one file serves every node: the name and
/// address come from the environment (NODE_NAME, NODE_IP) and the uplink
/// defaults to the interface holding the node address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    pub name: String,
    pub address: Option<Ipv4Addr>,
    pub uplink: Option<String>,
    pub pod_cidr: Option<Ipv4Net>,
    pub pod_interfaces: Vec<String>,
    pub upstream_interfaces: Vec<String>,
    pub tunnel_interface: String,
    pub tunnel_port: u16,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            name: String::new(),
            address: None,
            uplink: None,
            pod_cidr: None,
            pod_interfaces: Vec::new(),
            upstream_interfaces: Vec::new(),
            tunnel_interface: "egress-vxlan".into(),
            tunnel_port: 4789,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    #[serde(default)]
    pub nodes: Vec<ClusterNode>,
    #[serde(default)]
    pub excluded_cidrs: Vec<Ipv4Net>,
}

/// A `cluster.nodes` entry: `"172.18.0.12"`, or
/// `{ address = "172.18.0.12", pod_cidr = "10.244.2.0/24" }`. The pod CIDR
/// says which node hosts which selected pod: an egress node accepts a
/// pod's steered traffic only from the node whose pod CIDR holds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ClusterNode {
    Address(Ipv4Addr),
    WithPods(NodeWithPods),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeWithPods {
    pub address: Ipv4Addr,
    pub pod_cidr: Option<Ipv4Net>,
}

impl ClusterNode {
    pub fn address(&self) -> Ipv4Addr {
        match self {
            Self::Address(a) => *a,
            Self::WithPods(n) => n.address,
        }
    }

    pub fn pod_cidr(&self) -> Option<Ipv4Net> {
        match self {
            Self::Address(_) => None,
            Self::WithPods(n) => n.pod_cidr.map(|c| c.trunc()),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    pub id: PolicyId,
    pub name: String,
    pub egress_ip: Ipv4Addr,
    #[serde(default)]
    pub node: Option<Ipv4Addr>,
    #[serde(default)]
    pub failure_policy: FailurePolicy,
    #[serde(default)]
    pub pods: Vec<Ipv4Addr>,
    #[serde(default)]
    pub marks: Vec<u32>,
    #[serde(default)]
    pub vnis: Vec<u32>,
    #[serde(default)]
    pub excluded_cidrs: Vec<Ipv4Net>,
    /// Policies with the same group are the several egress IPs of one
    /// EgressIP: a flow keeps the egress IP it started with while that IP is
    /// held, when its pod moves to another policy of the group.
    #[serde(default)]
    pub group: Option<String>,
}

impl AgentConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates a static-mode file; `path` only names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        Self::parse_for(text, path, Mode::Static)
    }

    pub fn load_for(path: &Path, mode: Mode) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse_for(&text, path, mode)
    }

    pub fn parse_for(text: &str, path: &Path, mode: Mode) -> Result<Self, ConfigError> {
        let config: Self = toml::from_str(text).map_err(|source| ConfigError::Syntax {
            path: path.to_owned(),
            source: Box::new(source),
        })?;
        config
            .validate(mode)
            .map_err(|(field, message)| ConfigError::Invalid {
                path: path.to_owned(),
                field,
                message,
            })?;
        Ok(config)
    }

    fn validate(&self, mode: Mode) -> Result<(), (String, String)> {
        let bad = |field: &str, message: String| Err((field.to_owned(), message));
        if self.instance.is_empty()
            || self.instance.len() > 64
            || !self
                .instance
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return bad(
                "instance",
                format!(
                    "{:?} must be 1-64 characters of [A-Za-z0-9._-]",
                    self.instance
                ),
            );
        }
        let nodes: BTreeSet<Ipv4Addr> = self.cluster.nodes.iter().map(|n| n.address()).collect();
        if nodes.len() != self.cluster.nodes.len() {
            return bad("cluster.nodes", "lists an address twice".into());
        }
        let cidrs: Vec<(Ipv4Net, Ipv4Addr)> = self
            .cluster
            .nodes
            .iter()
            .filter_map(|n| Some((n.pod_cidr()?, n.address())))
            .collect();
        for (i, (a, node)) in cidrs.iter().enumerate() {
            if let Some((b, other)) = cidrs[i + 1..]
                .iter()
                .find(|(b, _)| a.contains(b) || b.contains(a))
            {
                return bad(
                    "cluster.nodes",
                    format!("the pod CIDRs of {node} ({a}) and {other} ({b}) overlap"),
                );
            }
        }
        if mode == Mode::Kubernetes {
            if !self.policies.is_empty() {
                return bad(
                    "policies",
                    "in Kubernetes mode policies come from EgressIP resources; remove them".into(),
                );
            }
            if !self.cluster.nodes.is_empty() {
                return bad(
                    "cluster.nodes",
                    "in Kubernetes mode nodes come from the API server; remove them".into(),
                );
            }
            if let Err(e) = self.kubernetes.validate() {
                return bad("kubernetes", e);
            }
        } else {
            if self.node.name.is_empty() {
                return bad("node.name", "required".into());
            }
            let Some(address) = self.node.address else {
                return bad("node.address", "required".into());
            };
            if !nodes.contains(&address) {
                return bad("node.address", format!("{address} is not in cluster.nodes"));
            }
            if self.node.uplink.is_none() {
                return bad("node.uplink", "required".into());
            }
            let Some(own) = self.node.pod_cidr else {
                return bad("node.pod_cidr", "required".into());
            };
            if let Some(listed) = self
                .cluster
                .nodes
                .iter()
                .find(|n| n.address() == address)
                .and_then(|n| n.pod_cidr())
                && listed != own.trunc()
            {
                return bad(
                    "node.pod_cidr",
                    format!(
                        "{own} differs from the pod_cidr cluster.nodes gives {address} ({listed})"
                    ),
                );
            }
        }
        if self
            .node
            .uplink
            .as_ref()
            .is_some_and(|u| u.is_empty() || u.len() > 15)
        {
            return bad(
                "node.uplink",
                "must name an interface (at most 15 characters)".into(),
            );
        }
        if self.node.tunnel_port == 0 {
            return bad("node.tunnel_port", "must not be 0".into());
        }
        for (i, pattern) in self
            .node
            .pod_interfaces
            .iter()
            .chain(&self.node.upstream_interfaces)
            .enumerate()
        {
            if pattern.is_empty()
                || pattern.len() > 15
                || pattern[..pattern.len() - 1].contains('*')
            {
                return bad(
                    "node.pod_interfaces/upstream_interfaces",
                    format!(
                        "entry {i} {pattern:?}: an interface name of at most 15 characters, optionally ending in `*`"
                    ),
                );
            }
        }
        let d = &self.datapath;
        if d.max_flows == 0 {
            return bad("datapath.max_flows", "must be at least 1".into());
        }
        if d.max_pods == 0 {
            return bad("datapath.max_pods", "must be at least 1".into());
        }
        if d.nat_port_min == 0 || d.nat_port_min > d.nat_port_max {
            return bad(
                "datapath.nat_port_min",
                format!(
                    "range {}..={} is empty or starts at 0",
                    d.nat_port_min, d.nat_port_max
                ),
            );
        }
        if d.gc_interval.is_zero() {
            return bad("datapath.gc_interval_secs", "must be at least 1".into());
        }
        if d.timeouts.unreplied.is_zero() {
            return bad(
                "datapath.timeouts.unreplied",
                "must be at least 1 (second)".into(),
            );
        }
        if d.max_policies < 2 || d.max_policies > MAX_POLICY_ID + 1 {
            return bad(
                "datapath.max_policies",
                format!("must be within 2..={}", MAX_POLICY_ID + 1),
            );
        }

        let mut ids = BTreeMap::new();
        let mut names = BTreeMap::new();
        let mut ips = BTreeMap::new();
        let mut pods = BTreeMap::new();
        let mut marks = BTreeMap::new();
        let mut vnis = BTreeMap::new();
        for (i, p) in self.policies.iter().enumerate() {
            let at = |field: &str| format!("policies[{i}].{field}");
            if p.id == 0 || p.id >= d.max_policies {
                return bad(
                    &at("id"),
                    format!(
                        "{} must be within 1..{} (datapath.max_policies)",
                        p.id, d.max_policies
                    ),
                );
            }
            if let Some(other) = ids.insert(p.id, i) {
                return bad(
                    &at("id"),
                    format!("{} is also the id of policies[{other}]", p.id),
                );
            }
            if p.name.is_empty() {
                return bad(&at("name"), "must not be empty".into());
            }
            if let Some(other) = names.insert(p.name.as_str(), i) {
                return bad(
                    &at("name"),
                    format!("{:?} is also the name of policies[{other}]", p.name),
                );
            }
            if let Some(other) = ips.insert(p.egress_ip, i) {
                return bad(
                    &at("egress_ip"),
                    format!("{} is also the egress IP of policies[{other}]", p.egress_ip),
                );
            }
            if nodes.contains(&p.egress_ip) {
                return bad(
                    &at("egress_ip"),
                    format!("{} is a node address", p.egress_ip),
                );
            }
            if p.egress_ip.is_unspecified()
                || p.egress_ip.is_multicast()
                || p.egress_ip.is_broadcast()
            {
                return bad(
                    &at("egress_ip"),
                    format!("{} cannot be a source address", p.egress_ip),
                );
            }
            if let Some(node) = p.node
                && !nodes.contains(&node)
            {
                return bad(&at("node"), format!("{node} is not in cluster.nodes"));
            }
            for pod in &p.pods {
                if let Some(other) = pods.insert(*pod, i) {
                    return bad(
                        &at("pods"),
                        format!("{pod} is also selected by policies[{other}]"),
                    );
                }
                if mode == Mode::Static && self.node_of(*pod).is_none() {
                    return bad(
                        &at("pods"),
                        format!(
                            "{pod} is in no node's pod CIDR (node.pod_cidr, or a cluster.nodes entry written \
                             {{ address = \"…\", pod_cidr = \"…\" }}): the egress node accepts a pod's \
                             steered traffic only from the node that hosts it"
                        ),
                    );
                }
            }
            if mode == Mode::Static
                && (!p.marks.is_empty() || !p.vnis.is_empty())
                && let Some(bare) = self
                    .cluster
                    .nodes
                    .iter()
                    .find(|n| n.pod_cidr().is_none() && Some(n.address()) != self.node.address)
            {
                return bad(
                    &at("marks"),
                    format!(
                        "pods selected by mark or VNI are chosen on their own node, so the egress node \
                         accepts their steered traffic by the sending node's pod CIDR: give cluster.nodes \
                         entry {} a pod_cidr ({{ address = \"…\", pod_cidr = \"…\" }})",
                        bare.address()
                    ),
                );
            }
            if p.group.as_deref().is_some_and(str::is_empty) {
                return bad(&at("group"), "must not be empty".into());
            }
            for mark in &p.marks {
                if *mark == 0 {
                    return bad(
                        &at("marks"),
                        "0 means unmarked and cannot select a policy".into(),
                    );
                }
                if let Some(other) = marks.insert(*mark, i) {
                    return bad(
                        &at("marks"),
                        format!("{mark:#x} is also a mark of policies[{other}]"),
                    );
                }
            }
            for vni in &p.vnis {
                if *vni == 0 || *vni > MAX_POLICY_ID {
                    return bad(
                        &at("vnis"),
                        format!("{vni} is not a VNI (1..={MAX_POLICY_ID})"),
                    );
                }
                if let Some(other) = vnis.insert(*vni, i) {
                    return bad(
                        &at("vnis"),
                        format!("{vni} is also a VNI of policies[{other}]"),
                    );
                }
            }
        }
        // A policy's own id steers to it; an extra VNI must not shadow another policy's.
        for (vni, i) in &vnis {
            if let Some(owner) = ids.get(vni)
                && owner != i
            {
                return bad(
                    &format!("policies[{i}].vnis"),
                    format!("{vni} is the id of policies[{owner}]"),
                );
            }
        }
        Ok(())
    }

    /// Every node's pod CIDR and address: this node's from `[node]`, the
    /// others' from `cluster.nodes`.
    fn pod_cidrs(&self) -> BTreeMap<Ipv4Net, Ipv4Addr> {
        let mut out: BTreeMap<Ipv4Net, Ipv4Addr> = self
            .cluster
            .nodes
            .iter()
            .filter_map(|n| Some((n.pod_cidr()?, n.address())))
            .collect();
        if let (Some(cidr), Some(address)) = (self.node.pod_cidr, self.node.address) {
            out.insert(cidr.trunc(), address);
        }
        out
    }

    /// The address of the node whose pod CIDR holds `pod`.
    fn node_of(&self, pod: Ipv4Addr) -> Option<Ipv4Addr> {
        self.pod_cidrs()
            .into_iter()
            .find(|(cidr, _)| cidr.contains(&pod))
            .map(|(_, node)| node)
    }

    /// The desired datapath state of this node.
    pub fn node_state(&self) -> NodeState {
        let pod_cidrs = self.pod_cidrs();
        let mut state = NodeState {
            node_addr: self.node.address,
            nodes: self.cluster.nodes.iter().map(|n| n.address()).collect(),
            global_excluded: self.cluster.excluded_cidrs.iter().copied().collect(),
            pod_cidrs: pod_cidrs.clone(),
            ..Default::default()
        };
        let mut groups: BTreeMap<&str, PolicyId> = BTreeMap::new();
        for p in &self.policies {
            if let Some(g) = &p.group {
                let first = groups.entry(g.as_str()).or_insert(p.id);
                *first = (*first).min(p.id);
            }
        }
        for p in &self.policies {
            if let Some(first) = p.group.as_deref().and_then(|g| groups.get(g))
                && *first != p.id
            {
                state.groups.insert(p.id, *first);
            }
            state.policies.insert(
                p.id,
                PolicyState {
                    name: p.name.clone(),
                    egress_ip: p.egress_ip,
                    egress_node: p.node,
                    failure_policy: p.failure_policy,
                    excluded: p.excluded_cidrs.iter().copied().collect(),
                },
            );
            for pod in &p.pods {
                let node = pod_cidrs
                    .iter()
                    .find(|(cidr, _)| cidr.contains(pod))
                    .map(|(_, node)| *node);
                match node {
                    Some(n) if Some(n) == self.node.address => {
                        state.pods.insert(*pod, p.id);
                    }
                    Some(node) => {
                        state
                            .remote_pods
                            .insert(*pod, RemotePod { policy: p.id, node });
                    }
                    None => {}
                }
            }
            state.marks.extend(p.marks.iter().map(|m| (*m, p.id)));
            state.vnis.extend(p.vnis.iter().map(|v| (*v, p.id)));
        }
        state
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::HeartbeatConfig;

    const EXAMPLE: &str = include_str!("../../deploy/examples/static-node1.toml");

    fn parse(text: &str) -> Result<AgentConfig, ConfigError> {
        AgentConfig::parse(text, Path::new("test.toml"))
    }

    fn invalid_field(text: &str) -> String {
        match parse(text) {
            Err(ConfigError::Invalid { field, .. }) => field,
            other => panic!("expected a validation error, got {other:?}"),
        }
    }

    #[test]
    fn the_documented_example_is_valid() {
        let c = parse(EXAMPLE).unwrap();
        assert_eq!(c.node.address, Some(Ipv4Addr::new(172, 18, 0, 11)));
        assert_eq!(c.policies.len(), 1);
        assert_eq!(c.datapath.timeouts.tcp_closing, Duration::from_secs(30));
    }

    /// The example's `cluster.nodes` written the old way: bare addresses.
    fn with_bare_nodes(text: &str) -> String {
        let start = text.find("nodes = [").unwrap();
        let end = start + text[start..].find("\n]").unwrap() + 2;
        format!(
            "{}nodes = [\"172.18.0.11\", \"172.18.0.12\", \"172.18.0.13\"]{}",
            &text[..start],
            &text[end..]
        )
    }

    #[test]
    fn pods_are_attributed_to_the_node_whose_pod_cidr_holds_them() {
        let s = parse(EXAMPLE).unwrap().node_state();
        assert_eq!(
            s.remote_pods,
            BTreeMap::from([(
                Ipv4Addr::new(10, 244, 2, 2),
                RemotePod {
                    policy: 1,
                    node: Ipv4Addr::new(172, 18, 0, 12)
                }
            )])
        );
        assert_eq!(s.pod_cidrs.len(), 3);
        assert_eq!(
            s.pod_cidrs[&"10.244.3.0/24".parse().unwrap()],
            Ipv4Addr::new(172, 18, 0, 13)
        );
    }

    #[test]
    fn old_files_with_bare_node_addresses_stay_valid_or_say_what_is_missing() {
        let old = with_bare_nodes(EXAMPLE);
        // Policy 1 selects 10.244.2.2, which no known pod CIDR holds.
        match parse(&old) {
            Err(ConfigError::Invalid { field, message, .. }) => {
                assert_eq!(field, "policies[0].pods");
                assert!(message.contains("10.244.2.2"), "{message}");
                assert!(message.contains("pod_cidr"), "{message}");
            }
            other => panic!("expected a validation error, got {other:?}"),
        }
        // Only this node's pods: still valid as it was.
        let local_only = old.replace(
            "pods = [\"10.244.1.2\", \"10.244.2.2\"]",
            "pods = [\"10.244.1.2\"]",
        );
        let s = parse(&local_only).unwrap().node_state();
        assert_eq!(s.pods.len(), 1);
        assert!(s.remote_pods.is_empty());
        // Marks are judged by the sending node's pod CIDR, which must be known.
        assert_eq!(
            invalid_field(&local_only.replace("marks = []", "marks = [7]")),
            "policies[0].marks"
        );
        assert!(parse(&EXAMPLE.replace("marks = []", "marks = [7]")).is_ok());
    }

    #[test]
    fn node_pod_cidrs_must_agree_and_not_overlap() {
        assert_eq!(
            invalid_field(&EXAMPLE.replace(
                "pod_cidr = \"10.244.3.0/24\"",
                "pod_cidr = \"10.244.0.0/16\""
            )),
            "cluster.nodes"
        );
        assert_eq!(
            invalid_field(&EXAMPLE.replace(
                "pod_cidr = \"10.244.1.0/24\" }",
                "pod_cidr = \"10.244.9.0/24\" }"
            )),
            "node.pod_cidr"
        );
    }

    #[test]
    fn policies_of_one_group_share_its_lowest_id() {
        let policies = "\n[[policies]]\nid = 5\nname = \"a5\"\negress_ip = \"172.18.0.105\"\ngroup = \"a\"\n\
                        \n[[policies]]\nid = 3\nname = \"a3\"\negress_ip = \"172.18.0.103\"\ngroup = \"a\"\n\
                        \n[[policies]]\nid = 4\nname = \"b\"\negress_ip = \"172.18.0.104\"\n";
        let s = parse(&format!("{EXAMPLE}{policies}")).unwrap().node_state();
        assert_eq!(s.groups, BTreeMap::from([(5, 3)]));
        assert_eq!((s.group_of(3), s.group_of(4), s.group_of(1)), (3, 4, 1));
    }

    #[test]
    fn node_state_keeps_only_local_pods() {
        let s = parse(EXAMPLE).unwrap().node_state();
        assert_eq!(s.pods, BTreeMap::from([(Ipv4Addr::new(10, 244, 1, 2), 1)]));
        assert_eq!(
            s.policies[&1].egress_node,
            Some(Ipv4Addr::new(172, 18, 0, 11))
        );
        assert!(s.is_local(&s.policies[&1]));
        assert_eq!(s.nodes.len(), 3);
        assert_eq!(s.global_excluded.len(), 2);
    }

    #[test]
    fn unknown_fields_and_bad_addresses_name_their_place() {
        let err = parse(&EXAMPLE.replace("tunnel_port = 4789", "tunnel_port = 4789\ncolour = 1"))
            .unwrap_err();
        assert!(err.to_string().contains("colour"), "{err}");
        let err = parse(&EXAMPLE.replace("\"172.18.0.100\"", "\"172.18.0.300\"")).unwrap_err();
        assert!(err.to_string().contains("line"), "{err}");
    }

    #[test]
    fn semantic_errors_name_the_field() {
        assert_eq!(
            invalid_field(&EXAMPLE.replacen(
                "address = \"172.18.0.11\"",
                "address = \"172.18.0.99\"",
                1
            )),
            "node.address"
        );
        assert_eq!(
            invalid_field(&EXAMPLE.replace(
                "egress_ip = \"172.18.0.100\"",
                "egress_ip = \"172.18.0.12\""
            )),
            "policies[0].egress_ip"
        );
        assert_eq!(
            invalid_field(&EXAMPLE.replace("node = \"172.18.0.11\"", "node = \"172.18.0.50\"")),
            "policies[0].node"
        );
        assert_eq!(
            invalid_field(&EXAMPLE.replace("id = 1\n", "id = 0\n")),
            "policies[0].id"
        );
        assert_eq!(
            invalid_field(&EXAMPLE.replace("marks = []", "marks = [0]")),
            "policies[0].marks"
        );
        let inverted = EXAMPLE
            .replace("nat_port_min = 1024", "nat_port_min = 2000")
            .replace("nat_port_max = 65535", "nat_port_max = 1500");
        assert_eq!(invalid_field(&inverted), "datapath.nat_port_min");
    }

    #[test]
    fn duplicates_across_policies_are_rejected() {
        let second = "\n[[policies]]\nid = 2\nname = \"team-b\"\negress_ip = \"172.18.0.101\"\npods = [\"10.244.1.2\"]\n";
        assert_eq!(
            invalid_field(&format!("{EXAMPLE}{second}")),
            "policies[1].pods"
        );
        let second = "\n[[policies]]\nid = 1\nname = \"team-b\"\negress_ip = \"172.18.0.101\"\n";
        assert_eq!(
            invalid_field(&format!("{EXAMPLE}{second}")),
            "policies[1].id"
        );
        let second = "\n[[policies]]\nid = 2\nname = \"team-b\"\negress_ip = \"172.18.0.100\"\n";
        assert_eq!(
            invalid_field(&format!("{EXAMPLE}{second}")),
            "policies[1].egress_ip"
        );
        let second =
            "\n[[policies]]\nid = 2\nname = \"team-b\"\negress_ip = \"172.18.0.101\"\nvnis = [1]\n";
        assert_eq!(
            invalid_field(&format!("{EXAMPLE}{second}")),
            "policies[1].vnis"
        );
    }

    #[test]
    fn kubernetes_mode_takes_policies_and_nodes_from_the_api() {
        let k8s = |text: &str| match AgentConfig::parse_for(
            text,
            Path::new("k.toml"),
            Mode::Kubernetes,
        ) {
            Err(ConfigError::Invalid { field, .. }) => field,
            other => panic!("expected a validation error, got {other:?}"),
        };
        assert_eq!(k8s(EXAMPLE), "policies");
        let without_policies = &EXAMPLE[..EXAMPLE.rfind("\n[[policies]]").unwrap()];
        assert_eq!(k8s(without_policies), "cluster.nodes");
        let start = without_policies.find("nodes = [").unwrap();
        let end = start + without_policies[start..].find("\n]").unwrap() + 2;
        let bare = format!(
            "{}nodes = []{}",
            &without_policies[..start],
            &without_policies[end..]
        );
        let c = AgentConfig::parse_for(&bare, Path::new("k.toml"), Mode::Kubernetes).unwrap();
        assert_eq!(c.kubernetes.namespace, "egress-system");
        // The shared ConfigMap of deploy/ has no [node] or [cluster] section.
        let shared = "instance = \"egress\"\n[kubernetes]\nnamespace = \"egress-system\"\n";
        let c = AgentConfig::parse_for(shared, Path::new("k.toml"), Mode::Kubernetes).unwrap();
        assert_eq!((c.node.address, c.node.tunnel_port), (None, 4789));
        assert_eq!(invalid_field(shared), "node.name");
        let fast = format!("{bare}\n[kubernetes]\nclaim_ttl_ms = 500\nclaim_renew_ms = 400\n");
        assert_eq!(k8s(&fast), "kubernetes");
    }

    /// The ConfigMap in deploy/ must stay a valid Kubernetes-mode file.
    #[test]
    fn the_deployed_configmap_is_valid() {
        let manifest = include_str!("../../deploy/configmap.yaml");
        let start = manifest
            .find("config.toml: |")
            .expect("configmap has config.toml")
            + "config.toml: |".len();
        let text: String = manifest[start..]
            .lines()
            .skip(1)
            .take_while(|l| l.is_empty() || l.starts_with("    "))
            .map(|l| format!("{}\n", l.strip_prefix("    ").unwrap_or(l)))
            .collect();
        let c =
            AgentConfig::parse_for(&text, Path::new("configmap.yaml"), Mode::Kubernetes).unwrap();
        assert_eq!(c.instance, "egress");
        assert!(!c.node.pod_interfaces.is_empty());
        c.kubernetes.validate().unwrap();
    }

    /// What a tool writes from these types reads back as the same file.
    #[test]
    fn files_round_trip_through_toml() {
        let c = parse(EXAMPLE).unwrap();
        let text = toml::to_string(&c).unwrap();
        assert_eq!(parse(&text).unwrap(), c, "{text}");
        let mut k = AgentConfig {
            instance: "k".into(),
            node: NodeConfig {
                pod_interfaces: vec!["veth*".into()],
                ..Default::default()
            },
            cluster: ClusterConfig::default(),
            datapath: DatapathSettings::default(),
            policies: Vec::new(),
            kubernetes: KubernetesConfig {
                heartbeat: Some(HeartbeatConfig {
                    port: 9999,
                    ..Default::default()
                }),
                cluster_cidrs: vec!["10.244.0.0/16".parse().unwrap()],
                ..Default::default()
            },
        };
        k.datapath.timeouts.udp = Duration::from_secs(5);
        let text = toml::to_string(&k).unwrap();
        let back = AgentConfig::parse_for(&text, Path::new("k.toml"), Mode::Kubernetes).unwrap();
        assert_eq!(back, k, "{text}");
    }

    #[test]
    fn a_zero_unreplied_timeout_is_rejected() {
        assert_eq!(
            invalid_field(&EXAMPLE.replace("unreplied = 30", "unreplied = 0")),
            "datapath.timeouts.unreplied"
        );
    }
}
