//! The facts the pure functions need, extracted from Kubernetes objects.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use egress_config::{KubernetesConfig, interface_matches};
use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::{Node, Pod};
use serde::{Deserialize, Serialize};

use crate::pods::SlimPod;

/// Node annotation where each node's agent publishes the IPv4 addresses (with
/// prefix length) of its egress-capable interfaces: an egress IP can only go
/// to a node with a subnet that contains it.
pub const SUBNETS_ANNOTATION: &str = "egress.example.dev/egress-subnets";

/// The OVN-Kubernetes label marking nodes that may hold egress IPs; our default.
pub use egress_config::DEFAULT_ASSIGNABLE_LABEL;

/// One entry of [`SUBNETS_ANNOTATION`]'s JSON list.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct EgressSubnet {
    pub interface: String,
    /// The interface's own address and prefix, e.g. `172.18.0.11/16`.
    pub address: Ipv4Net,
}

impl EgressSubnet {
    /// Whether `ip` is a usable host address of this subnet other than the
    /// interface's own.
    pub fn can_hold(&self, ip: Ipv4Addr) -> bool {
        let net = self.address.trunc();
        net.contains(&ip)
            && ip != self.address.addr()
            && (net.prefix_len() >= 31 || (ip != net.network() && ip != net.broadcast()))
    }
}

/// Chooses the subnets this node publishes from its interface addresses
/// (name, address with prefix): not loopback, link-local or host routes,
/// and only `egress_interfaces` when the section names some.
pub fn egress_subnets(
    config: &KubernetesConfig,
    addresses: &[(String, Ipv4Net)],
) -> Vec<EgressSubnet> {
    let mut v: Vec<EgressSubnet> = addresses
        .iter()
        .filter(|(name, addr)| {
            !addr.addr().is_loopback()
                && !addr.addr().is_link_local()
                && addr.prefix_len() < 32
                && (config.egress_interfaces.is_empty()
                    || interface_matches(&config.egress_interfaces, name))
        })
        .map(|(name, addr)| EgressSubnet {
            interface: name.clone(),
            address: *addr,
        })
        .collect();
    v.sort();
    v
}

/// Serializes the annotation value the agent publishes.
pub fn subnets_annotation_value(subnets: &[EgressSubnet]) -> String {
    serde_json::to_string(subnets).expect("subnets serialize")
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    /// The node's address on the node network: its first IPv4 `InternalIP`,
    /// else its first IPv4 `ExternalIP`.
    pub address: Option<Ipv4Addr>,
    /// Every IPv4 address the node reports or publishes: never an egress IP.
    pub addresses: BTreeSet<Ipv4Addr>,
    pub labels: BTreeMap<String, String>,
    pub subnets: Vec<EgressSubnet>,
    /// Why the subnets annotation could not be read, if it could not.
    pub subnets_error: Option<String>,
    /// `Ready` condition is `True`.
    pub ready: bool,
    /// Cordoned: holds no egress IPs, so that draining a node moves them.
    pub unschedulable: bool,
}

impl NodeInfo {
    pub fn from_node(node: &Node) -> Option<Self> {
        let name = node.metadata.name.clone()?;
        let status = node.status.as_ref();
        let reported: Vec<(String, Ipv4Addr)> = status
            .and_then(|s| s.addresses.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|a| Some((a.type_.clone(), a.address.parse().ok()?)))
            .collect();
        let pick = |t: &str| reported.iter().find(|(ty, _)| ty == t).map(|(_, a)| *a);
        let address = pick("InternalIP").or_else(|| pick("ExternalIP"));
        let (subnets, subnets_error) = match node
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(SUBNETS_ANNOTATION))
        {
            None => (Vec::new(), None),
            Some(raw) => match serde_json::from_str::<Vec<EgressSubnet>>(raw) {
                Ok(s) => (s, None),
                Err(e) => (
                    Vec::new(),
                    Some(format!("annotation {SUBNETS_ANNOTATION}={raw:?}: {e}")),
                ),
            },
        };
        let mut addresses: BTreeSet<Ipv4Addr> = reported.iter().map(|(_, a)| *a).collect();
        addresses.extend(subnets.iter().map(|s| s.address.addr()));
        let ready = status
            .and_then(|s| s.conditions.as_ref())
            .into_iter()
            .flatten()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        Some(Self {
            name,
            address,
            addresses,
            labels: node.metadata.labels.clone().unwrap_or_default(),
            subnets,
            subnets_error,
            ready,
            unschedulable: node
                .spec
                .as_ref()
                .and_then(|s| s.unschedulable)
                .unwrap_or(false),
        })
    }

    pub fn can_hold(&self, ip: Ipv4Addr) -> bool {
        self.subnets.iter().any(|s| s.can_hold(ip))
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    pub node: Option<String>,
    pub ip: Ipv4Addr,
    pub labels: BTreeMap<String, String>,
}

impl PodInfo {
    /// As [`PodInfo::from_slim`], from a full Pod.
    pub fn from_pod(pod: &Pod) -> Option<Self> {
        Self::from_slim(&SlimPod::from(pod))
    }
}

#[cfg(test)]
pub(crate) mod fixtures {
    //! Objects as the API server serves them (trimmed kind-cluster output).
    use super::*;

    pub fn node(name: &str, ip: &str, labels: &[(&str, &str)], subnets: &[(&str, &str)]) -> Node {
        let labels: serde_json::Map<String, serde_json::Value> = [
            ("kubernetes.io/hostname", name),
            ("kubernetes.io/os", "linux"),
        ]
        .iter()
        .chain(labels)
        .map(|(k, v)| (k.to_string(), serde_json::Value::from(*v)))
        .collect();
        let subnets: Vec<EgressSubnet> = subnets
            .iter()
            .map(|(i, a)| EgressSubnet {
                interface: i.to_string(),
                address: a.parse().unwrap(),
            })
            .collect();
        serde_json::from_value(serde_json::json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": name,
                "uid": format!("uid-{name}"),
                "resourceVersion": "1000",
                "creationTimestamp": "2026-01-10T08:00:00Z",
                "labels": labels,
                "annotations": {
                    "node.alpha.kubernetes.io/ttl": "0",
                    SUBNETS_ANNOTATION: subnets_annotation_value(&subnets),
                }
            },
            "spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24"]},
            "status": {
                "addresses": [
                    {"type": "InternalIP", "address": ip},
                    {"type": "Hostname", "address": name}
                ],
                "conditions": [
                    {"type": "MemoryPressure", "status": "False", "reason": "KubeletHasSufficientMemory",
                     "lastHeartbeatTime": "2026-01-10T09:00:00Z", "lastTransitionTime": "2026-01-10T08:00:00Z"},
                    {"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "kubelet is posting ready status",
                     "lastHeartbeatTime": "2026-01-10T09:00:00Z", "lastTransitionTime": "2026-01-10T08:00:10Z"}
                ]
            }
        }))
        .unwrap()
    }

    pub fn pod(ns: &str, name: &str, node: &str, ip: &str, labels: &[(&str, &str)]) -> Pod {
        let labels: serde_json::Map<String, serde_json::Value> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), serde_json::Value::from(*v)))
            .collect();
        serde_json::from_value(serde_json::json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name, "namespace": ns, "uid": format!("uid-{ns}-{name}"),
                "resourceVersion": "2000", "creationTimestamp": "2026-01-10T08:30:00Z",
                "labels": labels
            },
            "spec": {
                "nodeName": node,
                "containers": [{"name": "app", "image": "registry.k8s.io/e2e-test-images/agnhost:2.47"}],
                "restartPolicy": "Always"
            },
            "status": {
                "phase": "Running",
                "hostIP": "172.18.0.11",
                "podIP": ip,
                "podIPs": [{"ip": ip}],
                "startTime": "2026-01-10T08:30:01Z"
            }
        }))
        .unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::{fixtures::*, *};

    #[test]
    fn node_facts() {
        let n = node(
            "node1",
            "172.18.0.11",
            &[(DEFAULT_ASSIGNABLE_LABEL, "")],
            &[("eth0", "172.18.0.11/16"), ("eth1", "192.168.50.11/24")],
        );
        let info = NodeInfo::from_node(&n).unwrap();
        assert_eq!(info.address, Some(Ipv4Addr::new(172, 18, 0, 11)));
        assert!(info.ready);
        assert!(!info.unschedulable);
        assert!(info.addresses.contains(&Ipv4Addr::new(192, 168, 50, 11)));
        assert!(info.can_hold(Ipv4Addr::new(172, 18, 0, 100)));
        assert!(info.can_hold(Ipv4Addr::new(192, 168, 50, 100)));
        assert!(
            !info.can_hold(Ipv4Addr::new(192, 168, 50, 11)),
            "own address"
        );
        assert!(
            !info.can_hold(Ipv4Addr::new(192, 168, 50, 255)),
            "broadcast"
        );
        assert!(!info.can_hold(Ipv4Addr::new(10, 0, 0, 1)));
    }

    #[test]
    fn malformed_subnets_annotation_is_reported_not_fatal() {
        let mut n = node("node1", "172.18.0.11", &[], &[]);
        n.metadata.annotations.as_mut().unwrap().insert(
            SUBNETS_ANNOTATION.into(),
            "[{\"interface\":\"eth0\"}]".into(),
        );
        let info = NodeInfo::from_node(&n).unwrap();
        assert!(info.subnets.is_empty());
        assert!(info.subnets_error.unwrap().contains("address"));
    }

    #[test]
    fn pod_facts_skip_host_network_and_finished_pods() {
        let p = pod("team-a", "web-1", "node1", "10.244.1.5", &[("app", "web")]);
        let info = PodInfo::from_pod(&p).unwrap();
        assert_eq!(info.ip, Ipv4Addr::new(10, 244, 1, 5));
        assert_eq!(info.node.as_deref(), Some("node1"));

        let mut host = p.clone();
        host.spec.as_mut().unwrap().host_network = Some(true);
        assert!(PodInfo::from_pod(&host).is_none());

        let mut done = p.clone();
        done.status.as_mut().unwrap().phase = Some("Succeeded".into());
        assert!(PodInfo::from_pod(&done).is_none());

        let mut pending = p;
        let st = pending.status.as_mut().unwrap();
        st.pod_ip = None;
        st.pod_ips = None;
        st.phase = Some("Pending".into());
        assert!(PodInfo::from_pod(&pending).is_none());
    }

    #[test]
    fn dual_stack_pod_uses_its_ipv4_address() {
        let mut p = pod("team-a", "web-1", "node1", "fd00:10:244:1::5", &[]);
        p.status.as_mut().unwrap().pod_ips = Some(
            serde_json::from_value(
                serde_json::json!([{"ip": "fd00:10:244:1::5"}, {"ip": "10.244.1.5"}]),
            )
            .unwrap(),
        );
        assert_eq!(
            PodInfo::from_pod(&p).unwrap().ip,
            Ipv4Addr::new(10, 244, 1, 5)
        );
    }

    #[test]
    fn subnets_skip_loopback_and_host_routes_and_honour_patterns() {
        let net = |s: &str| -> Ipv4Net { s.parse().unwrap() };
        let addrs = vec![
            ("lo".to_string(), net("127.0.0.1/8")),
            ("eth0".to_string(), net("172.18.0.11/16")),
            ("eth1".to_string(), net("192.168.50.11/24")),
            ("egress-vxlan".to_string(), net("169.254.1.1/16")),
            ("eth0".to_string(), net("172.18.0.100/32")),
        ];
        let all = egress_subnets(&KubernetesConfig::default(), &addrs);
        assert_eq!(
            all.iter().map(|s| s.interface.as_str()).collect::<Vec<_>>(),
            ["eth0", "eth1"]
        );
        let only = egress_subnets(
            &KubernetesConfig {
                egress_interfaces: vec!["eth1*".into()],
                ..Default::default()
            },
            &addrs,
        );
        assert_eq!(only.len(), 1);
        assert_eq!(only[0].address, net("192.168.50.11/24"));
    }
}

#[cfg(test)]
pub(crate) mod eip_fixtures {
    use crate::crd::EgressIP;

    /// An EgressIP as `kubectl get -o json` shows it, `spec` given as JSON.
    pub fn eip(name: &str, created: &str, spec: serde_json::Value) -> EgressIP {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "egress.example.dev/v1",
            "kind": "EgressIP",
            "metadata": {
                "name": name,
                "uid": format!("uid-{name}"),
                "generation": 1,
                "resourceVersion": "3000",
                "creationTimestamp": created
            },
            "spec": spec
        }))
        .unwrap()
    }
}
