//! The lab in Kubernetes mode: an in-memory API server on the router
//! (172.18.0.1, reached by the node agents over br0), a kubeconfig for the
//! agents, and the lab's topology and policies as Kubernetes objects.
//!
//! - one `Node` per lab node (`nodeN`, InternalIP `172.18.0.1N`, Ready, the
//!   egress-assignable label); each agent publishes its subnets on it;
//! - the namespace [`POD_NAMESPACE`] with one `Pod` per lab pod (`nNpI`,
//!   `spec.nodeName`, `status.podIP`);
//! - one `EgressIP` per lab policy, named like it: its pods carry
//!   [`POLICY_LABEL`]`=<policy name>` and the podSelector asks for that; the
//!   nodeSelector names the policy's node by `kubernetes.io/hostname`, so
//!   the assigner has exactly one node to choose.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, TcpListener},
    path::{Path, PathBuf},
    time::Duration,
};

pub use egress_fake_api::{FakeApi, WatchEvent};
use egress_k8s::crd::{EgressIP, EgressIPSpec, FailurePolicySpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
use serde_json::{Value, json};

use crate::{
    agent::Agent,
    error::{LabError, Result, io_err},
    exec, netns,
    spec::{self, LabSpec, PodRef, PolicySpec},
    traffic::wait_for,
};

pub const NODES: &str = "/api/v1/nodes";
pub const NAMESPACES: &str = "/api/v1/namespaces";
pub const PODS: &str = "/api/v1/pods";
pub const EGRESS_IPS: &str = "/apis/egress.example.dev/v1/egressips";
pub const LEASES: &str = "/apis/coordination.k8s.io/v1/leases";

/// Namespace of the lab's pods.
pub const POD_NAMESPACE: &str = "egress-lab";
/// Pod label naming the lab policy (EgressIP) that selects the pod.
pub const POLICY_LABEL: &str = "lab.egress.example.dev/policy";
pub const HOSTNAME_LABEL: &str = "kubernetes.io/hostname";
/// The agents' default assignable label (`[kubernetes] assignable_label`).
pub const ASSIGNABLE_LABEL: &str = egress_config::DEFAULT_ASSIGNABLE_LABEL;
/// Where each agent publishes its egress subnets.
pub const SUBNETS_ANNOTATION: &str = egress_k8s::facts::SUBNETS_ANNOTATION;
/// The agents' default leader Lease (`[kubernetes] leader_lease`).
pub const LEADER_LEASE: &str = egress_config::DEFAULT_LEADER_LEASE;

/// Name of node `n`'s Node object.
pub fn node_name(n: u8) -> String {
    format!("node{n}")
}

/// The lab node a Node name designates.
pub fn node_number(name: &str) -> Option<u8> {
    name.strip_prefix("node")?.parse().ok()
}

/// The API server of a Kubernetes-mode lab, and what it knows of the lab.
pub struct KubeApi {
    api: FakeApi,
    kubeconfig: PathBuf,
    /// Pods whose objects were deleted: their namespaces stay, but nothing
    /// selects them any more.
    deleted_pods: BTreeSet<PodRef>,
    // Only kept alive: the server's tasks run on it. Last, so that it goes
    // after everything that talks to them.
    _runtime: tokio::runtime::Runtime,
}

impl KubeApi {
    /// Serves on the router's node-network address, writes the kubeconfig
    /// into `dir`, and creates the Nodes, Namespaces and Pods of `spec` (no
    /// EgressIPs: see [`Self::apply_policies`]).
    pub fn start(router_ns: &str, dir: &Path, spec: &LabSpec) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("lab-kube-api")
            .enable_all()
            .build()
            .map_err(io_err("starting the API server's runtime"))?;
        let listener = netns::in_netns(router_ns, || {
            TcpListener::bind((spec::ROUTER_NODE_ADDR, 0)).map_err(io_err(format!(
                "binding the API server on {}",
                spec::ROUTER_NODE_ADDR
            )))
        })?;
        let api = {
            let _entered = runtime.enter();
            FakeApi::start_on(listener)
        };
        let kubeconfig = dir.join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            kubeconfig_text(&format!("http://{}", api.addr)),
        )
        .map_err(io_err(format!("writing {}", kubeconfig.display())))?;
        let kube = Self {
            api,
            kubeconfig,
            deleted_pods: BTreeSet::new(),
            _runtime: runtime,
        };
        kube.seed(spec);
        Ok(kube)
    }

    fn seed(&self, spec: &LabSpec) {
        self.api.create(
            NAMESPACES,
            json!({"metadata": {"name": spec::AGENT_NAMESPACE,
                "labels": {"kubernetes.io/metadata.name": spec::AGENT_NAMESPACE}}}),
        );
        self.api.create(
            NAMESPACES,
            json!({"metadata": {"name": POD_NAMESPACE,
                "labels": {"kubernetes.io/metadata.name": POD_NAMESPACE}}}),
        );
        for n in 1..=spec.nodes {
            self.api.create(NODES, node_object(n));
            for i in 1..=spec.pods_per_node {
                let pod = PodRef::new(n, i);
                self.api
                    .create(PODS, pod_object(pod, policy_of(spec, pod).map(|p| &p.name)));
            }
        }
    }

    /// The server, for objects and failures the lab does not model.
    pub fn api(&self) -> &FakeApi {
        &self.api
    }

    /// Where the agents find the server (`KUBECONFIG`).
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// What node `n`'s agent needs in its environment.
    pub fn agent_env(&self, n: u8) -> Vec<(String, String)> {
        vec![
            (
                "KUBECONFIG".into(),
                self.kubeconfig.to_string_lossy().into_owned(),
            ),
            ("NODE_NAME".into(), node_name(n)),
            ("NODE_IP".into(), spec::node_addr(n).to_string()),
        ]
    }

    /// Whether `pod`'s object exists.
    pub fn has_pod(&self, pod: PodRef) -> bool {
        !self.deleted_pods.contains(&pod)
    }

    /// Deletes `pod`'s object, as when Kubernetes removes a pod whose network
    /// namespace lingers: nothing selects its address any more.
    pub fn delete_pod(&mut self, pod: PodRef) -> Result<()> {
        self.api
            .delete(PODS, Some(POD_NAMESPACE), &pod.to_string())
            .ok_or_else(|| LabError::Spec(format!("pod {pod} has no object to delete")))?;
        self.deleted_pods.insert(pod);
        Ok(())
    }

    /// Creates `pod`'s object again, with its policy's label, as the
    /// kubelet reports a pod once its sandbox is up.
    pub fn restore_pod(&mut self, pod: PodRef, spec: &LabSpec) -> Result<()> {
        if self.has_pod(pod) {
            return Err(LabError::Spec(format!("pod {pod} still has its object")));
        }
        self.api
            .create(PODS, pod_object(pod, policy_of(spec, pod).map(|p| &p.name)));
        self.deleted_pods.remove(&pod);
        Ok(())
    }

    /// Makes the pods' labels and the EgressIPs say what `spec.policies`
    /// says: creates, changes (merge patches that also remove what is gone)
    /// and deletes EgressIPs, and relabels pods whose policy changed.
    pub fn apply_policies(&self, spec: &LabSpec) -> Result<()> {
        for n in 1..=spec.nodes {
            for i in 1..=spec.pods_per_node {
                let pod = PodRef::new(n, i);
                if !self.has_pod(pod) {
                    continue;
                }
                let name = pod.to_string();
                let current = self
                    .api
                    .get(PODS, Some(POD_NAMESPACE), &name)
                    .ok_or_else(|| LabError::Spec(format!("pod {pod} has no object")))?;
                let wanted = policy_of(spec, pod).map(|p| p.name.as_str());
                if current["metadata"]["labels"][POLICY_LABEL].as_str() != wanted {
                    self.api.patch(
                        PODS,
                        Some(POD_NAMESPACE),
                        &name,
                        json!({"metadata": {"labels": {POLICY_LABEL: wanted}}}),
                    );
                }
            }
        }
        let wanted: BTreeMap<&str, EgressIPSpec> = spec
            .policies
            .iter()
            .map(|p| (p.name.as_str(), egress_ip_spec(p)))
            .collect();
        for (name, spec) in &wanted {
            let spec_json = to_json(spec);
            match self.api.get(EGRESS_IPS, None, name) {
                None => {
                    self.create_egress_ip(&EgressIP::new(name, spec.clone()));
                }
                Some(current) if current["spec"] != spec_json => {
                    self.api.patch(
                        EGRESS_IPS,
                        None,
                        name,
                        json!({"spec": merge_patch_between(&current["spec"], &spec_json)}),
                    );
                }
                Some(_) => {}
            }
        }
        for eip in self.api.list(EGRESS_IPS) {
            let name = eip["metadata"]["name"].as_str().unwrap_or_default();
            if !wanted.contains_key(name) {
                self.api.delete(EGRESS_IPS, None, name);
            }
        }
        Ok(())
    }

    /// Stores `eip`.
    pub fn create_egress_ip(&self, eip: &EgressIP) -> Value {
        self.api.create(EGRESS_IPS, to_json(eip))
    }

    /// Changes the spec of EgressIP `name` with `change`, by a merge patch
    /// (RFC 7386) from the stored spec; the patched object.
    pub fn update_egress_ip(
        &self,
        name: &str,
        change: impl FnOnce(&mut EgressIPSpec),
    ) -> Result<Value> {
        let current = self
            .api
            .get(EGRESS_IPS, None, name)
            .ok_or_else(|| LabError::Spec(format!("no EgressIP {name}")))?;
        let mut spec: EgressIPSpec = serde_json::from_value(current["spec"].clone())
            .map_err(|e| LabError::Spec(format!("EgressIP {name} does not decode: {e}")))?;
        change(&mut spec);
        let patch = merge_patch_between(&current["spec"], &to_json(&spec));
        Ok(self
            .api
            .patch(EGRESS_IPS, None, name, json!({ "spec": patch })))
    }

    /// The EgressIP named `name`, as stored.
    pub fn egress_ip(&self, name: &str) -> Option<Value> {
        self.api.get(EGRESS_IPS, None, name)
    }

    /// The node the assigner put `ip` of EgressIP `name` on, and whether that
    /// node has announced it (condition `Announced`).
    pub fn holder(&self, name: &str, ip: Ipv4Addr) -> Option<(String, bool)> {
        holder_in(&self.egress_ip(name)?, ip)
    }

    /// The elected assigner's node name.
    pub fn leader(&self) -> Option<String> {
        self.api
            .get(LEASES, Some(spec::AGENT_NAMESPACE), LEADER_LEASE)?["spec"]["holderIdentity"]
            .as_str()
            .filter(|h| !h.is_empty())
            .map(str::to_owned)
    }

    /// Waits until every node's agent has published its egress subnets (it
    /// does so once its controller is up): before that the assigner would
    /// find no node able to hold an IP.
    pub fn wait_subnets_published(&self, nodes: u8, timeout: Duration) -> Result<()> {
        wait_for("every agent publishes its egress subnets", timeout, || {
            let missing: Vec<String> = (1..=nodes)
                .map(node_name)
                .filter(|n| {
                    self.api
                        .get(NODES, None, n)
                        .is_none_or(|o| o["metadata"]["annotations"][SUBNETS_ANNOTATION].is_null())
                })
                .collect();
            if missing.is_empty() {
                Ok(())
            } else {
                Err(format!("not yet published by {missing:?}"))
            }
        })
    }
}

/// `ip` in an EgressIP's status: its node and whether it is announced.
pub fn holder_in(eip: &Value, ip: Ipv4Addr) -> Option<(String, bool)> {
    let entry = eip["status"]["ips"]
        .as_array()?
        .iter()
        .find(|s| s["egressIP"].as_str() == Some(&ip.to_string()))?;
    let node = entry["node"].as_str()?.to_owned();
    let announced = entry["conditions"].as_array().is_some_and(|c| {
        c.iter()
            .any(|c| c["type"] == "Announced" && c["status"] == "True")
    });
    Some((node, announced))
}

fn policy_of(spec: &LabSpec, pod: PodRef) -> Option<&PolicySpec> {
    spec.policies.iter().find(|p| p.pods.contains(&pod))
}

fn kubeconfig_text(server: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: lab\n  cluster:\n    server: {server}\ncontexts:\n- name: lab\n  context:\n    cluster: lab\n    user: lab\ncurrent-context: lab\nusers:\n- name: lab\n  user: {{}}\n"
    )
}

fn node_object(n: u8) -> Value {
    let name = node_name(n);
    json!({
        "metadata": {"name": name, "labels": {HOSTNAME_LABEL: name, ASSIGNABLE_LABEL: ""}},
        "spec": {"podCIDR": spec::pod_cidr(n).to_string()},
        "status": {
            "addresses": [
                {"type": "InternalIP", "address": spec::node_addr(n).to_string()},
                {"type": "Hostname", "address": name}
            ],
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                "lastHeartbeatTime": "2026-01-10T09:00:00Z", "lastTransitionTime": "2026-01-10T08:00:10Z"}]
        }
    })
}

fn pod_object(pod: PodRef, policy: Option<&String>) -> Value {
    let mut labels = json!({"app": "lab"});
    if let Some(p) = policy {
        labels[POLICY_LABEL] = json!(p);
    }
    json!({
        "metadata": {"name": pod.to_string(), "namespace": POD_NAMESPACE, "labels": labels},
        "spec": {"nodeName": node_name(pod.node),
                 "containers": [{"name": "app", "image": "registry.k8s.io/pause:3.10"}]},
        "status": {"phase": "Running", "hostIP": spec::node_addr(pod.node).to_string(),
                   "podIP": pod.ip().to_string(), "podIPs": [{"ip": pod.ip().to_string()}]}
    })
}

/// The selector of labels `labels`.
pub fn match_labels(labels: &[(&str, &str)]) -> LabelSelector {
    LabelSelector {
        match_labels: Some(
            labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        ),
        ..LabelSelector::default()
    }
}

/// The selector of the Node objects of lab nodes `nodes`.
pub fn hostname_in(nodes: &[u8]) -> LabelSelector {
    LabelSelector {
        match_expressions: Some(vec![LabelSelectorRequirement {
            key: HOSTNAME_LABEL.into(),
            operator: "In".into(),
            values: Some(nodes.iter().map(|n| node_name(*n)).collect()),
        }]),
        ..LabelSelector::default()
    }
}

/// An EgressIP named `name` with `ips` for the lab's pods labelled
/// [`POLICY_LABEL`]`=name`, fail-closed, that any node may hold.
pub fn lab_egress_ip(name: &str, ips: &[Ipv4Addr]) -> EgressIP {
    EgressIP::new(
        name,
        EgressIPSpec {
            egress_ips: ips.iter().map(ToString::to_string).collect(),
            namespace_selector: match_labels(&[("kubernetes.io/metadata.name", POD_NAMESPACE)]),
            pod_selector: Some(match_labels(&[(POLICY_LABEL, name)])),
            excluded_cidrs: Vec::new(),
            node_selector: None,
            interface: None,
            failure_policy: FailurePolicySpec::FailClosed,
        },
    )
}

/// The EgressIP spec of a lab policy (which has a node: see
/// `LabSpec::validate`).
pub fn egress_ip_spec(p: &PolicySpec) -> EgressIPSpec {
    let mut spec = lab_egress_ip(&p.name, &[p.egress_ip]).spec;
    spec.failure_policy = match p.failure_policy {
        egress_model::FailurePolicy::FailClosed => FailurePolicySpec::FailClosed,
        egress_model::FailurePolicy::FailOpen => FailurePolicySpec::FailOpen,
    };
    spec.node_selector = p
        .node
        .map(|n| match_labels(&[(HOSTNAME_LABEL, &node_name(n))]));
    spec.excluded_cidrs = p.excluded_cidrs.iter().map(ToString::to_string).collect();
    spec
}

/// `value` as the JSON the API server stores.
pub fn to_json(value: &impl serde::Serialize) -> Value {
    serde_json::to_value(value).expect("Kubernetes objects serialize to JSON")
}

/// The JSON merge patch (RFC 7386) that turns `from` into `to`: keys gone
/// from `to` are set to null, objects are patched key by key, everything
/// else is replaced.
pub fn merge_patch_between(from: &Value, to: &Value) -> Value {
    match (from, to) {
        (Value::Object(a), Value::Object(b)) => {
            let mut patch = serde_json::Map::new();
            for (k, v) in b {
                match a.get(k) {
                    Some(old) if old == v => {}
                    Some(old) => {
                        patch.insert(k.clone(), merge_patch_between(old, v));
                    }
                    None => {
                        patch.insert(k.clone(), v.clone());
                    }
                }
            }
            for k in a.keys().filter(|k| !b.contains_key(*k)) {
                patch.insert(k.clone(), Value::Null);
            }
            Value::Object(patch)
        }
        (_, to) => to.clone(),
    }
}

/// Egress IP -> (egress node, pod addresses) of one node's datapath.
pub type Programmed = BTreeMap<Ipv4Addr, (Option<Ipv4Addr>, BTreeSet<Ipv4Addr>)>;

/// What one node's agent has programmed, from `egress-agent status --json`.
pub fn programmed_policies(agent: &Agent) -> Result<Programmed> {
    let text = agent.cli(&["status", "--json"])?;
    let unexpected = |reason: String| LabError::UnexpectedOutput {
        cmd: format!("egress-agent status --json --instance {}", agent.instance),
        reason,
        output: text.clone(),
    };
    let v: Value = serde_json::from_str(&text).map_err(|e| unexpected(format!("not JSON: {e}")))?;
    let policies = v["policies"]
        .as_array()
        .ok_or_else(|| unexpected("no `policies` array".into()))?;
    let addr = |v: &Value| v.as_str().and_then(|s| s.parse::<Ipv4Addr>().ok());
    policies
        .iter()
        .map(|p| {
            let ip = addr(&p["egress_ip"])
                .ok_or_else(|| unexpected(format!("policy without egress_ip: {p}")))?;
            let pods = p["pods"]
                .as_array()
                .map(|a| a.iter().filter_map(addr).collect())
                .unwrap_or_default();
            Ok((ip, (addr(&p["egress_node"]), pods)))
        })
        .collect()
}

/// The IPv4 addresses on `dev` in namespace `ns`.
pub fn addresses_on(ns: &str, dev: &str) -> Result<BTreeSet<Ipv4Addr>> {
    let out = exec::exec_in(ns, "ip", &["-4", "-j", "addr", "show", "dev", dev])?;
    let v: Value = serde_json::from_str(&out.stdout).map_err(|e| LabError::UnexpectedOutput {
        cmd: format!("ip -4 -j addr show dev {dev} (in {ns})"),
        reason: e.to_string(),
        output: out.stdout.clone(),
    })?;
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .flat_map(|l| l["addr_info"].as_array().cloned().unwrap_or_default())
        .filter_map(|a| a["local"].as_str()?.parse().ok())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_patch_removes_what_is_gone_and_keeps_what_is_equal() {
        let from = json!({"a": 1, "sel": {"matchLabels": {"x": "1"}}, "gone": [1]});
        let to = json!({"a": 1, "sel": {"matchExpressions": [{"key": "x"}]}});
        assert_eq!(
            merge_patch_between(&from, &to),
            json!({"sel": {"matchLabels": null, "matchExpressions": [{"key": "x"}]}, "gone": null})
        );
    }

    #[test]
    fn policies_become_egress_ips_pinned_to_their_node() {
        let spec = LabSpec::kubernetes();
        let team_a = to_json(&egress_ip_spec(&spec.policies[0]));
        assert_eq!(team_a["egressIPs"], json!(["172.18.0.100"]));
        assert_eq!(
            team_a["nodeSelector"]["matchLabels"][HOSTNAME_LABEL],
            "node1"
        );
        assert_eq!(team_a["podSelector"]["matchLabels"][POLICY_LABEL], "team-a");
        assert_eq!(team_a["failurePolicy"], "FailClosed");
        assert_eq!(
            team_a["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"],
            POD_NAMESPACE
        );
        let eip = to_json(&lab_egress_ip("x", &[Ipv4Addr::new(172, 18, 0, 110)]));
        assert_eq!(eip["metadata"]["name"], "x");
        assert_eq!(eip["kind"], "EgressIP");
        assert!(eip.get("status").is_none_or(Value::is_null), "{eip}");
        assert!(eip["spec"].get("nodeSelector").is_none(), "{eip}");
        let widened = to_json(&hostname_in(&[1, 3]));
        assert_eq!(
            widened["matchExpressions"][0]["values"],
            json!(["node1", "node3"])
        );
        let pod = pod_object(PodRef::new(2, 1), Some(&"team-a".to_string()));
        assert_eq!(pod["metadata"]["labels"][POLICY_LABEL], "team-a");
        assert_eq!(pod["spec"]["nodeName"], "node2");
        assert_eq!(pod["status"]["podIP"], "10.244.2.11");
        assert_eq!(node_number("node12"), Some(12));
    }

    #[test]
    fn holder_reads_node_and_announcement() {
        let eip = json!({"status": {"ips": [{"egressIP": "172.18.0.100", "node": "node2",
            "conditions": [{"type": "Announced", "status": "True"}]}]}});
        assert_eq!(
            holder_in(&eip, Ipv4Addr::new(172, 18, 0, 100)),
            Some(("node2".into(), true))
        );
        assert_eq!(holder_in(&eip, Ipv4Addr::new(172, 18, 0, 101)), None);
    }
}
